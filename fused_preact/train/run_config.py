"""A run's configuration: the flag values that decide what is trained, recorded in every checkpoint.

A run is one training of one net on one data set by one recipe. ``--resume`` continues a run
only under the configuration it was started with: a checkpoint of a ResNet-110 at lr 0.1 does
not continue as a ResNet-164, nor silently at lr 0.001 while ``log.csv`` says so. Every flag
is either

- ``DEFINING``: what is trained (data and augmentation, the net, precision, the recipe). A
  resume with another value is refused, listing each difference (old -> new). The recipe's
  optimizer and schedule values and the run's length (``OVERRIDABLE``) may be changed on
  purpose by naming them in ``--override``: the new values are then applied (the optimizer's
  groups and the lr schedule are rebuilt from them) and recorded in the checkpoint, in the
  printed log, in ``log.csv`` and in ``metrics.json``'s ``overrides``. The others make another
  run (another net, another batch, other data): a resume cannot change them.
- ``RUN_ONLY``: where and how the run executes or reports (folders, device, backend, memory
  mode, progress, evaluation cadence): free to change between resumes. The fused and eager
  backends compute the same unit to rounding, so a run may move between machines.

``tests/test_train_resume.py`` checks that every flag of the parser is in exactly one group.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any, Iterable

from .errors import TrainerError

DEFINING = (
    # data and augmentation
    "dataset", "synthetic", "synthetic_images", "image_size", "no_flip", "pad", "imagenet_augment", "scale_range",
    # the net
    "arch", "activation", "shortcut", "projection", "stride_on", "scale_shortcut", "scale_residual", "gate_bias",
    "dropout",
    # precision and batch statistics
    "amp", "sync_bn",
    # the recipe
    "iters", "epochs", "batch_size", "lr", "momentum", "weight_decay", "milestones", "milestone_epochs",
    "lr_factor", "warmup_iters", "warmup_lr", "seed",
)
OVERRIDABLE = ("iters", "epochs", "lr", "momentum", "weight_decay", "milestones", "milestone_epochs", "lr_factor",
               "warmup_iters", "warmup_lr")
RUN_ONLY = (
    "data", "no_verify", "workers", "eval_crops", "backend", "memory", "channels_last", "compile", "cuda_graph",
    "device", "deterministic", "out", "resume", "override", "overwrite", "eval_only", "eval_batch_size",
    "eval_every", "print_freq", "log_signal", "log_signal_every", "stop_after_iters", "no_progress",
)


def flag(key: str) -> str:
    """The command-line spelling of a configuration key: ``warmup_iters`` -> ``--warmup-iters``."""
    return "--" + key.replace("_", "-")


def key_of(name: str) -> str:
    """The configuration key a user named in ``--override`` (``lr``, ``--lr``, ``warmup-iters``...)."""
    return name.strip().lstrip("-").replace("-", "_")


def _plain(value: Any) -> Any:
    """A value as JSON holds it (tuples as lists), so records compare equal after a round trip."""
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def record(args: argparse.Namespace) -> dict:
    """The run's configuration: every ``DEFINING`` flag's value (JSON-plain)."""
    return {key: _plain(getattr(args, key, None)) for key in DEFINING}


@dataclass(frozen=True)
class Difference:
    key: str
    old: Any
    new: Any

    def __str__(self) -> str:
        return f"{flag(self.key)} {_show(self.old)} -> {_show(self.new)}"

    def as_dict(self) -> dict:
        return {"key": self.key, "old": self.old, "new": self.new}


def _show(value: Any) -> str:
    if value is None:
        return "(not set)"
    if isinstance(value, list):
        return "[" + " ".join(str(v) for v in value) + "]" if value else "[]"
    return str(value)


def differences(old: dict, new: dict) -> list[Difference]:
    """The keys whose values differ between two records, in ``DEFINING`` order (a key one record
    lacks counts as not set there)."""
    keys = [k for k in DEFINING if k in old or k in new]
    keys += sorted(k for k in set(old) | set(new) if k not in DEFINING)
    return [Difference(k, old.get(k), new.get(k)) for k in keys if _plain(old.get(k)) != _plain(new.get(k))]


class ConfigurationMismatch(TrainerError):
    """``--resume`` (or a run folder) with a configuration other than the run's own."""

    def __init__(self, message: str, differences: list[Difference]):
        super().__init__(message)
        self.differences = differences


def describe(found: Iterable[Difference]) -> str:
    return "; ".join(str(d) for d in found)


def check_overrides(names: Iterable[str]) -> list[str]:
    """The keys of ``--override``'s names; unknown and fixed keys raise ``ValueError`` saying why."""
    keys = []
    for name in names:
        key = key_of(name)
        if key in OVERRIDABLE:
            keys.append(key)
        elif key in DEFINING:
            raise ValueError(f"--override {name}: {flag(key)} decides what is trained (another value makes another "
                             f"run, not a continuation of this one); overridable: "
                             f"{' '.join(flag(k) for k in OVERRIDABLE)}")
        elif key in RUN_ONLY:
            raise ValueError(f"--override {name}: {flag(key)} may change on any resume, it needs no --override")
        else:
            raise ValueError(f"--override {name}: no such setting; overridable: "
                             f"{' '.join(flag(k) for k in OVERRIDABLE)}")
    return keys


def resolve(recorded: dict, args: argparse.Namespace, source: str) -> list[Difference]:
    """The differences between a checkpoint's configuration (``recorded``) and this run's flags that
    ``args.override`` names: those are applied (the caller builds the optimizer and the schedule from
    ``args``). Any other difference raises ``ConfigurationMismatch`` listing all of them."""
    allowed = set(check_overrides(getattr(args, "override", None) or ()))
    found = differences(recorded, record(args))
    refused = [d for d in found if d.key not in allowed]
    if refused:
        raise ConfigurationMismatch(f"--resume {source}: {mismatch_advice(refused)}", refused)
    return found


def mismatch_advice(refused: list[Difference]) -> str:
    """What differs and what the user can do about each difference."""
    text = [f"the run there was configured otherwise: {describe(refused)}. Repeat the run's own values "
            f"(its args.json has them)"]
    fixed = [flag(d.key) for d in refused if d.key not in OVERRIDABLE]
    changeable = [d.key for d in refused if d.key in OVERRIDABLE]
    if fixed:
        text.append(f"{' '.join(fixed)} cannot change within a run (another net, batch, precision or data is "
                    f"another run: give another --out)")
    if changeable:
        text.append(f"to change {' '.join(flag(k) for k in changeable)} on purpose, add "
                    f"--override {' '.join(changeable)}")
    return "; ".join(text)
