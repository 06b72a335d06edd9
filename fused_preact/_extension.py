"""Loads the C++/CUDA extension ``fused_preact._C`` (built from ``csrc/`` by ``pip install -e .``).

Importing the module registers the ``torch.ops.fused_preact`` operators. A missing
build is not an error here: ``available()`` says whether it loaded and
``unavailable_reason()`` why not; callers that need it raise with that reason.

The build writes ``_build_info.json`` beside the extension (setup.py): the torch it was compiled
against, and whether its CUDA part was built. The extension is loaded only under that same torch
(a C++ extension built against another torch fails to load, or crashes, in ways that name neither
version): importing the package then warns once naming both versions, and the ``cuda`` backend
says the same when asked for. When building the CUDA part failed, importing the package warns once
with the reason recorded at build time (pip shows no output of a build that succeeded).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import warnings
from dataclasses import dataclass
from typing import Optional

import torch  # the extension links against torch's libraries: load them first

from . import cpu_instructions

BUILD_INFO = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build_info.json")  # setup.py writes it
REBUILD = "rebuild it: `pip install -e .` in a source checkout, else reinstall fused-preact"

_module = None
_reason: Optional[str] = None
_tried = False


def build_info() -> Optional[dict]:
    """What the build recorded (``torch``, ``torch_cuda``, ``cuda``, ``cuda_not_built``,
    ``cuda_failure``, ``cuda_archs``: TORCH_CUDA_ARCH_LIST as built), or None when there is no record."""
    try:
        with open(BUILD_INFO, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def mismatch(info: Optional[dict]) -> Optional[str]:
    """Why a built extension with build record ``info`` must not be loaded under this torch."""
    if info is None:
        return (f"the C++ extension fused_preact._C has no build record ({BUILD_INFO} is missing: built "
                f"by an older setup.py?), so the torch it was built against is unknown; {REBUILD}")
    built = f"{info.get('torch')} (CUDA {info.get('torch_cuda')})"
    running = f"{torch.__version__} (CUDA {torch.version.cuda})"
    if built != running:
        return (f"the C++ extension fused_preact._C was built against torch {built} and this is torch "
                f"{running}; {REBUILD}")
    return None


def load():
    """The imported extension module, or None when it is not built (see ``unavailable_reason``)."""
    global _module, _reason, _tried
    if not _tried:
        _tried = True
        if importlib.util.find_spec("fused_preact._C") is None:
            _reason = ("the C++ extension fused_preact._C is not built; build it with `pip install -e .` "
                       "(in a source checkout)")
            return None
        _reason = mismatch(build_info())
        if _reason is not None:
            return None
        try:
            module = importlib.import_module("fused_preact._C")
        except ImportError as error:
            _reason = f"the C++ extension fused_preact._C does not load ({error}); {REBUILD}"
        else:
            missing = cpu_instructions.missing_flags(str(torch.ops.fused_preact.cpu_simd()))
            if missing:
                _reason = (f"the C++ extension fused_preact._C was built for "
                           f"{torch.ops.fused_preact.cpu_simd()} CPU code on another machine and this "
                           f"CPU lacks {', '.join(sorted(missing))}; rebuild it here (or build with "
                           "FUSED_PREACT_CPU_SIMD=avx2 or generic for other machines)")
            else:
                _module = module
    return _module


def available() -> bool:
    return load() is not None


def unavailable_reason() -> Optional[str]:
    load()
    return _reason


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return available() and bool(torch.ops.fused_preact.built_with_cuda())


# What builds that recorded no architecture list were built for (setup.py's default before it added PTX).
DEFAULT_CUDA_ARCHS = "8.0;9.0"
# The extension's CUDA code uses sm_80 instructions (cp.async, bf16 mma.sync): nothing older runs it.
MIN_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class CudaArch:
    """One entry of the build's architecture list: machine code (SASS) for ``capability``, and PTX
    that the driver JIT-compiles for any newer GPU when ``ptx``. ``specific`` (sm_90a): the code runs
    on exactly that capability."""
    capability: tuple[int, int]
    ptx: bool = False
    specific: bool = False

    def __str__(self) -> str:
        name = f"sm_{self.capability[0]}{self.capability[1]}{'a' if self.specific else ''}"
        return name + ("+PTX" if self.ptx else "")


def parse_cuda_archs(arch_list: str) -> list[CudaArch]:
    """``"8.0;9.0+PTX"`` (TORCH_CUDA_ARCH_LIST's form) as CudaArch entries; names torch expands
    itself ("Ampere") are skipped."""
    archs = []
    for entry in arch_list.replace(" ", ";").split(";"):
        ptx = entry.endswith("+PTX")
        number = entry[:-4] if ptx else entry
        specific = number.endswith("a")
        number = number[:-1] if specific else number
        major, _, minor = number.partition(".")
        if major.isdigit() and minor.isdigit():
            archs.append(CudaArch((int(major), int(minor)), ptx, specific))
    return archs


def cuda_archs(info: Optional[dict] = None) -> tuple[list[CudaArch], bool]:
    """The architectures the extension's CUDA part was built for, and whether the build recorded
    them (else ``DEFAULT_CUDA_ARCHS`` is assumed)."""
    info = build_info() if info is None else info
    recorded = (info or {}).get("cuda_archs")
    return parse_cuda_archs(recorded or DEFAULT_CUDA_ARCHS), bool(recorded)


def code_for_capability(capability: tuple[int, int], archs: list[CudaArch]) -> Optional[str]:
    """How a GPU of compute ``capability`` runs the extension's CUDA code built for ``archs``:
    ``"sm_XY"`` (machine code; a GPU runs the code of its major version and any lower minor),
    ``"sm_XY+PTX (JIT)"`` (the driver compiles the PTX of an older architecture at first use), or
    None when it has no code it can run."""
    capability = tuple(capability)
    native = [a for a in archs if (a.capability == capability if a.specific else
                                   a.capability[0] == capability[0] and a.capability[1] <= capability[1])]
    if native:
        return str(max(native, key=lambda a: a.capability)).replace("+PTX", "")
    jit = [a for a in archs if a.ptx and not a.specific and a.capability <= capability]
    if jit:
        return f"{max(jit, key=lambda a: a.capability)} (JIT)"
    return None


def capability_problem(capability: tuple[int, int], info: Optional[dict] = None) -> Optional[str]:
    """Why the extension's CUDA kernels cannot run on a GPU of compute ``capability`` (None when
    they can): below sm_80, or no machine code nor PTX in the build that this GPU runs."""
    capability = tuple(capability)
    if capability < MIN_CAPABILITY:
        return (f"the extension's CUDA kernels need compute capability {MIN_CAPABILITY[0]}.{MIN_CAPABILITY[1]} "
                f"or newer (cp.async, bf16 tensor cores); this GPU is {capability[0]}.{capability[1]}")
    archs, recorded = cuda_archs(info)
    if code_for_capability(capability, archs) is not None:
        return None
    built = ", ".join(map(str, archs)) or "no architecture"
    assumed = "" if recorded else f" (not recorded by the build: assumed {DEFAULT_CUDA_ARCHS})"
    return (f"the extension was built for {built}{assumed} and has no code for compute capability "
            f"{capability[0]}.{capability[1]} (no kernel image would run: rebuild with "
            f"TORCH_CUDA_ARCH_LIST=\"{capability[0]}.{capability[1]}\" or a list with +PTX)")


def cpu_simd() -> Optional[str]:
    """The instruction set of the extension's CPU kernels ("avx512", "avx2", "generic"), or None."""
    return str(torch.ops.fused_preact.cpu_simd()) if available() else None


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a 4-D tensor (N, C, H, W), in one read pass.

    Accepts contiguous NCHW or channels_last float32/float64/float16/bfloat16 tensors on the CPU
    (or on a GPU when built with CUDA); returns float32 statistics (float64 for float64 input).
    """
    if not available():
        raise RuntimeError(f"batch_stats needs the C++ extension: {_reason}")
    return torch.ops.fused_preact.batch_stats(x)


def warn_of_build_failure(info: Optional[dict] = None) -> None:
    """One warning when the build record (default: this build's) says that the CUDA part failed to
    build and the CPU part was built alone. A deliberate CPU-only build (FUSED_PREACT_CUDA=0, a CPU
    torch, no toolkit) is quiet."""
    info = build_info() if info is None else info
    failure = info and info.get("cuda_failure")
    if failure:
        warnings.warn(f"fused-preact: the C++ extension was built without its CUDA part: {failure}. "
                      "It runs CPU tensors only; fix the toolkit and rebuild (FUSED_PREACT_CUDA=1 makes "
                      "this a build error, FUSED_PREACT_CUDA=0 builds the CPU part alone on purpose)",
                      RuntimeWarning, stacklevel=3)


def warn_at_import() -> None:
    """At ``import fused_preact``: one warning when a built extension lies here that will not be
    loaded (built against another torch, or without a build record), else when its CUDA part failed
    to build. Nothing without a build."""
    if importlib.util.find_spec("fused_preact._C") is None:
        return
    info = build_info()
    reason = mismatch(info)
    if reason is not None:
        warnings.warn(f"fused-preact: {reason}", RuntimeWarning, stacklevel=3)
    else:
        warn_of_build_failure(info)


warn_at_import()
