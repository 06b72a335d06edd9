"""Where a benchmark ran: device, driver, library versions and the project's git commit.

Written into every output (console, JSON, Markdown, PNG) so a figure can always be
traced to the machine and the code that produced it.
"""
from __future__ import annotations

import platform
import subprocess
from pathlib import Path
from typing import Optional

import torch

from fused_preact.train import records

REPO = Path(__file__).resolve().parents[1]


def _run(command: list[str]) -> Optional[str]:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=20, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> str:
    """HEAD of the project's checkout, with ``+dirty`` when tracked files differ from it; where there
    is no checkout (a copied tree on a device machine), ``FUSED_PREACT_GIT_COMMIT`` as given
    (``fused_preact.train.records.git_commit``)."""
    return records.git_commit() or "unknown (not a git checkout or git missing)"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``), else what ``platform`` knows of it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _driver_version() -> str:
    version = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if version:
        return version.splitlines()[0]
    return "unknown (nvidia-smi not found)"


def _triton_version() -> str:
    try:
        import triton
    except ImportError:
        return "not installed"
    return triton.__version__


def describe(device: torch.device) -> dict:
    """Everything that identifies this run's hardware and software."""
    device = torch.device(device)
    info = {
        "device": (torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU: {cpu_name()}"),
        "device_type": device.type,
        "driver": _driver_version() if device.type == "cuda" else "n/a (CPU run)",
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "cudnn": str(torch.backends.cudnn.version()) if torch.backends.cudnn.is_available() else "n/a",
        "torch": torch.__version__,
        "triton": _triton_version(),
        "python": platform.python_version(),
        "git_commit": git_commit(),
        "cpu_threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info["compute_capability"] = f"{props.major}.{props.minor}"
        info["memory_gib"] = round(props.total_memory / 2**30, 1)
    return info


def one_line(info: dict) -> str:
    """The identification in one line, for titles and footers."""
    return (f"{info['device']} | driver {info['driver']} | torch {info['torch']} | triton {info['triton']} "
            f"| CUDA {info['cuda']} | commit {short_commit(info['git_commit'])}")


def short_commit(commit: str) -> str:
    """``git_commit()`` cut to 12 characters, keeping its ``+dirty``."""
    return commit[:12] + ("+dirty" if commit.endswith("+dirty") else "")
