"""Running experiments: one trainer run per (experiment, seed), resumable, never repeated.

A run lives in ``<out>/<experiment>/seed<k>[-x<scale>][-n<units>]``: the trainer's
own outputs (``checkpoint.pt``, ``log.csv``, ``metrics.json``, ``curves.png``),
its ``diverged.json`` when the run stopped being finite, and this runner's
``run.json`` (the experiment, seed, scale and trainer configuration).

- a run with ``metrics.json`` (the trainer writes it only at the end) or
  ``diverged.json`` is done: it is skipped, not repeated;
- a run with a ``checkpoint.pt`` and neither is continued with ``--resume``
  (the trainer's checkpoints are atomic and resume exactly);
- a folder whose records (``run.json``, the checkpoint's, ``metrics.json``'s or
  ``diverged.json``'s configuration) describe a run of another configuration is
  refused with the differences, not continued or counted: the configuration is
  the trainer's own record (``fused_preact.train.run_config``) of the planned
  command line;
- a run stopped by SIGINT / SIGTERM stops the whole batch, to be continued by
  the same command.

Single-process runs execute in this process (``subprocess=False``) or as
``python -m fused_preact.train``; ``nproc > 1`` goes through
``torchrun --nproc-per-node=N -m fused_preact.train`` (one process per GPU, the
trainer's DDP path), the global batch unchanged.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess as subprocesses
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from .registry import Experiment, select

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


@dataclass
class Run:
    experiment: Experiment
    seed: int
    folder: Path
    argv: list[str]
    scale: float
    units_per_stage: Optional[int]

    @property
    def config(self) -> dict:
        """What the run trains (the trainer's record of its flags: data, net, precision, recipe)."""
        from ..train.cli import parse_args
        from ..train.run_config import record
        return record(parse_args(self.argv))


def run_folder(out: str | os.PathLike, name: str, seed: int, scale: float = 1.0,
               units_per_stage: Optional[int] = None) -> Path:
    tag = f"seed{seed}" + (f"-x{scale:g}" if scale != 1 else "") + (f"-n{units_per_stage}" if units_per_stage else "")
    return Path(out) / name / tag


def count_images(folder: Path) -> int:
    """Image files under ``folder`` (an ImageNet ``train/``), for epoch-based recipes at a scale."""
    count = 0
    for _, _, files in os.walk(folder):
        count += sum(f.lower().endswith(IMAGE_SUFFIXES) for f in files)
    return count


def plan(experiment: Experiment, seed: int, *, data: str, out: str | os.PathLike, scale: float = 1.0,
         backend: str = "auto", device: Optional[str] = None, units_per_stage: Optional[int] = None,
         progress: bool = True, train_images: Optional[int] = None) -> Run:
    """The trainer command line of one run."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r}")
    if experiment.recipe.iters is None and scale != 1 and train_images is None:
        train_images = count_images(Path(data) / "train")
    folder = run_folder(out, experiment.name, seed, scale, units_per_stage)
    argv = [*experiment.trainer_flags(units_per_stage), *experiment.recipe.flags(scale, train_images),
            "--seed", str(seed), "--data", str(data), "--out", str(folder),
            "--backend", backend if experiment.fusable else "eager"]
    if device:
        argv += ["--device", device]
    if not progress:
        argv.append("--no-progress")
    return Run(experiment, seed, folder, argv, scale, units_per_stage)


def state_of(folder: Path) -> str:
    """``finished``, ``diverged``, ``started`` (a checkpoint to resume) or ``new``."""
    if (folder / "diverged.json").exists():
        return "diverged"
    if (folder / "metrics.json").exists():
        return "finished"
    if (folder / "checkpoint.pt").exists():
        return "started"
    return "new"


class RunFolderMismatch(ValueError):
    """A run folder that holds a run of another configuration."""


def recorded_configs(folder: Path) -> dict[str, Optional[dict]]:
    """The configuration each record in a run folder gives (file name -> record; None: the file holds
    none, e.g. written before records had one)."""
    from ..train import checkpoint

    found: dict[str, Optional[dict]] = {}
    for name in ("run.json", "metrics.json", "diverged.json"):
        path = folder / name
        if path.exists():
            try:
                config = json.loads(path.read_text()).get("config")
            except ValueError as error:
                raise RunFolderMismatch(f"{path} is not JSON ({error}); remove it or give another --out") from error
            found[name] = config if isinstance(config, dict) else None
    if (folder / "checkpoint.pt").exists():
        found["checkpoint.pt"] = checkpoint.load(folder / "checkpoint.pt").get("config")
    return found


def check_folder(run: Run) -> None:
    """Refuse a run folder whose records describe another configuration than ``run``'s."""
    from ..train.run_config import describe, differences

    expected = run.config
    for name, config in recorded_configs(run.folder).items():
        if config is None:
            raise RunFolderMismatch(f"{run.folder} holds a run of another configuration: its {name} has no "
                                    f"configuration record (written by an older version); give another --out or "
                                    f"move that folder away")
        found = differences(config, expected)
        if found:
            raise RunFolderMismatch(f"{run.folder} holds a run of another configuration (its {name}): "
                                    f"{describe(found)}; give another --out or move that folder away")


def execute(run: Run, *, nproc: int = 1, subprocess: bool = False) -> str:
    """Run (or continue, or skip) one run; returns its state afterwards, or ``interrupted``."""
    from ..train.records import write_json

    check_folder(run)
    state = state_of(run.folder)
    record_path = run.folder / "run.json"
    if state in ("finished", "diverged"):
        print(f"{run.experiment.name} seed {run.seed}: {state} before, not repeated ({run.folder})", flush=True)
        return state
    run.folder.mkdir(parents=True, exist_ok=True)
    write_json(record_path, {"experiment": run.experiment.name, "seed": run.seed, "scale": run.scale,
                             "units_per_stage": run.units_per_stage, "config": run.config, "argv": run.argv})
    argv = run.argv + (["--resume"] if state == "started" else [])
    arch = run.experiment.arch_with(run.units_per_stage)
    size = f" [as {arch}]" if arch != run.experiment.arch else ""
    print(f"{run.experiment.name} seed {run.seed}: {'continuing' if state == 'started' else 'starting'} "
          f"({run.experiment.describe()}){size} in {run.folder}", flush=True)
    if nproc > 1 or subprocess:
        code = _launch(argv, nproc)
        after = state_of(run.folder)
        if code and code < 128 and after not in ("finished", "diverged"):
            raise RuntimeError(f"{run.experiment.name} seed {run.seed}: the trainer failed (exit status {code})")
        interrupted = code >= 128
    else:
        interrupted = _in_process(argv)
        after = state_of(run.folder)
    if interrupted or after not in ("finished", "diverged"):
        return "interrupted"
    return after


def _in_process(argv: list[str]) -> bool:
    from ..train import Diverged, main
    try:
        result = main(argv)
    except Diverged as error:   # recorded in diverged.json by the trainer
        print(f"diverged: {error}", flush=True)
        return False
    return "interrupted" in result


def _launch(argv: list[str], nproc: int) -> int:
    """The trainer's exit status (>= 128: stopped by a signal)."""
    if nproc > 1:
        torchrun = shutil.which("torchrun")
        launcher = [torchrun] if torchrun else [sys.executable, "-m", "torch.distributed.run"]
        command = [*launcher, f"--nproc-per-node={nproc}", "-m", "fused_preact.train", *argv]
    else:
        command = [sys.executable, "-m", "fused_preact.train", *argv]
    code = subprocesses.run(command).returncode
    return 128 - code if code < 0 else code   # killed by a signal: -N


def run_experiments(names: Sequence[str], *, data: str, seeds: int = 1, scale: float = 1.0,
                    out: str | os.PathLike = "runs/paper", backend: str = "auto", device: Optional[str] = None,
                    nproc: int = 1, units_per_stage: Optional[int] = None, progress: bool = True,
                    subprocess: bool = False, imagenet_data: Optional[str] = None) -> dict[str, list[str]]:
    """Run every seed of every named experiment (see ``registry.select``); returns the states
    ``{experiment: [state of seed 0, ...]}``. Stops at the first interrupted run. ``data`` is the
    CIFAR folder, ``imagenet_data`` ImageNet's (default: ``data``)."""
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds <= 0:
        raise ValueError(f"seeds must be a positive int, got {seeds!r}")
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc <= 0:
        raise ValueError(f"nproc must be a positive int, got {nproc!r}")
    if not data:
        raise ValueError("data must name the dataset folder")
    experiments = select(list(names))
    imagenet_data = imagenet_data or data
    train_images = None
    if scale != 1 and any(e.recipe.iters is None for e in experiments):
        train_images = count_images(Path(imagenet_data) / "train")
    runs = [plan(e, seed, data=imagenet_data if e.dataset == "imagenet" else data, out=out, scale=scale,
                 backend=backend, device=device, units_per_stage=units_per_stage, progress=progress,
                 train_images=train_images)
            for e in experiments for seed in range(seeds)]
    states: dict[str, list[str]] = {}
    for run in runs:
        state = execute(run, nproc=nproc, subprocess=subprocess)
        states.setdefault(run.experiment.name, []).append(state)
        if state == "interrupted":
            print(f"stopped at {run.experiment.name} seed {run.seed}; the same command continues", flush=True)
            break
    return states
