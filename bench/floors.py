"""The floor of a fused operator: the least time any kernel could take for one call.

    floor = max(bytes it must move / copy bandwidth, FLOPs / matrix rate)

Both rates are measured in the same run (``measure.device_rates``): the copy
bandwidth counts bytes read plus bytes written by a large device-to-device copy,
so ``bytes`` here also counts every byte read and every byte written once. The
fraction of the floor a kernel reaches is ``floor / measured time`` (1.0 = at the
floor).

Traffic follows the operator contract (``fused_preact/unit_ops.py``): activations
are read and written once, the weight once, per-channel vectors and statistics
partials once. FLOPs count a multiply-add as two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch

OPERATORS = ("channel_stats", "bn_finalize", "conv_bnrelu", "conv_dgrad", "conv_wgrad",
             "bn_backward_finish", "bn_relu_apply")


@dataclass(frozen=True)
class Traffic:
    """What one operator call must move and compute."""
    bytes: int
    flops: int
    dtype: torch.dtype     # the dtype of its matrix product (or its main tensor)


def _nbytes(t) -> int:
    return t.numel() * t.element_size() if isinstance(t, torch.Tensor) else 0


def _conv_flops(dy_or_y: torch.Tensor, weight: torch.Tensor) -> int:
    """2 * output positions * Cout * Cin * K * K of a conv with NHWC output ``dy_or_y``."""
    n, ho, wo, cout = dy_or_y.shape
    _, cin, kh, kw = weight.shape
    return 2 * n * ho * wo * cout * cin * kh * kw


# arguments an operator reads only for their shape or dtype, and arguments it updates in place
_SHAPE_ONLY = {"conv_wgrad": (4,)}                 # weight
_READ_AND_WRITTEN = {"bn_finalize": (5, 6)}        # running_mean, running_var


def operator_traffic(op: str, args: Sequence, outputs: Sequence) -> Traffic:
    """Bytes and FLOPs of one call of operator ``op``, given its arguments and its outputs.

    Bytes: every tensor argument read once (in-place updated ones read and written),
    every output written once. FLOPs: the convolution's multiply-adds for the three
    conv operators, 0 for the others (they are bound by memory).
    """
    if op not in OPERATORS:
        raise ValueError(f"op must be one of {OPERATORS}, got {op!r}")
    outputs = [outputs] if isinstance(outputs, torch.Tensor) else list(outputs)
    shape_only = _SHAPE_ONLY.get(op, ())
    moved = sum(_nbytes(a) for i, a in enumerate(args) if i not in shape_only)
    moved += sum(_nbytes(args[i]) for i in _READ_AND_WRITTEN.get(op, ()) if i < len(args))
    moved += sum(_nbytes(o) for o in outputs)
    flops = 0
    if op == "conv_bnrelu":
        flops = _conv_flops(outputs[0], args[1])
    elif op in ("conv_dgrad", "conv_wgrad"):
        flops = _conv_flops(args[0], args[1] if op == "conv_dgrad" else args[4])
    main = args[0]
    return Traffic(int(moved), int(flops), main.dtype)


def floor_seconds(traffic: Traffic, copy_bytes_per_s: float, matrix_flops_per_s: Optional[float]) -> float:
    """max(bytes / bandwidth, FLOPs / matrix rate); the FLOP term is dropped when no rate is known
    for the dtype (the floor is then a lower bound from memory traffic alone)."""
    if copy_bytes_per_s <= 0:
        raise ValueError(f"copy_bytes_per_s must be positive, got {copy_bytes_per_s}")
    memory = traffic.bytes / copy_bytes_per_s
    if traffic.flops == 0 or not matrix_flops_per_s:
        return memory
    if matrix_flops_per_s < 0:
        raise ValueError(f"matrix_flops_per_s must be positive, got {matrix_flops_per_s}")
    return max(memory, traffic.flops / matrix_flops_per_s)


def fraction_of_floor(floor_s: float, measured_s: float) -> float:
    """How close a measured time is to its floor: 1.0 at the floor, 0.5 at twice the floor."""
    if measured_s <= 0:
        raise ValueError(f"measured_s must be positive, got {measured_s}")
    return floor_s / measured_s
