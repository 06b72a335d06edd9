"""What the trainer reads off its parsed flags, used both by ``cli`` (which parses them and fills in
the defaults) and by ``loop`` (which runs them); here so that ``loop`` needs nothing of ``cli``.
"""
from __future__ import annotations

import argparse

UNIT_OPTIONS = ("activation", "shortcut", "projection", "stride_on", "scale_shortcut", "scale_residual",
                "gate_bias", "dropout")


def dataset_kind(dataset: str) -> str:
    """The recipe family of a dataset name: "imagenet" or "cifar"."""
    return "imagenet" if dataset == "imagenet" else "cifar"


def unit_options(args: argparse.Namespace) -> dict:
    """The unit variant flags that were given, as keyword arguments of ``create_model``."""
    return {name: getattr(args, name) for name in UNIT_OPTIONS if getattr(args, name, None) is not None}


def memory_mode(args: argparse.Namespace) -> str:
    """What the fused units keep for the backward (``--memory``; "default" for the flags of a
    checkpoint written before the flag existed)."""
    return getattr(args, "memory", None) or "default"
