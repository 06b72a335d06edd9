"""FLOP formulas of the unit operators for ``torch.utils.flop_counter.FlopCounterMode``.

The counter sees a fused unit as its ``fused_preact_unit`` operators (their kernels run inside
them), so each gets a formula that counts what eager PyTorch's convolutions count for the same
work: ``2 * N * Ho * Wo * Cout * Cin * K * K`` per conv forward, the same again for each data
gradient and each weight gradient the backward forms (``unit_plan.backward_work``: only the
gradients asked for, as eager's ``convolution_backward`` with its output mask). BN, ReLU and the
additions count nothing, as in eager. ``memory="min"``'s recompute is counted where it runs (the
backward's extra forward convs), as the counter counts an activation checkpoint's.

Module-walking counters (thop, fvcore, torchinfo) do not see into the operators: run them on the
unconverted model.
"""
from __future__ import annotations

import torch
from torch.utils.flop_counter import register_flop_formula

from .unit_plan import ConvSpec, GradNeeds, UnitPlan, backward_work, decode_plan

NAMESPACE = "fused_preact_unit"


def _conv_flops(spec: ConvSpec, batch: int, height: int, width: int, weight_shape) -> tuple[int, tuple[int, int]]:
    """FLOPs of one conv forward (as FlopCounterMode counts ``aten.convolution``) and its output size."""
    ho, wo = spec.output_size(height, width)
    cout, cin, kh, kw = weight_shape
    return 2 * batch * ho * wo * cout * cin * kh * kw, (ho, wo)


def _per_conv(plan: UnitPlan, x_shape, conv_shapes, shortcut_shape) -> tuple[list[int], int]:
    """Forward FLOPs of each branch conv and of the projection (0 without one); x_shape is NHWC."""
    batch, height, width = x_shape[0], x_shape[1], x_shape[2]
    flops = []
    for spec, shape in zip(plan.convs, conv_shapes):
        f, (height, width) = _conv_flops(spec, batch, height, width, shape)
        flops.append(f)
    shortcut = 0
    if plan.shortcut_conv is not None and shortcut_shape is not None:
        shortcut = _conv_flops(plan.shortcut_conv, batch, x_shape[1], x_shape[2], shortcut_shape)[0]
    return flops, shortcut


def _named(op_name: str, args, kwargs) -> dict:
    schema = getattr(getattr(torch.ops, NAMESPACE), op_name).default._schema
    return {**dict(zip((a.name for a in schema.arguments), args)), **kwargs}


def _forward_flops(op_name: str, args, kwargs) -> int:
    a = _named(op_name, args, kwargs)
    convs, shortcut = _per_conv(decode_plan(a["plan"]), a["x"], a["conv_weights"], a["shortcut_weight"])
    return sum(convs) + shortcut


def _backward_flops(op_name: str, args, kwargs) -> int:
    a = _named(op_name, args, kwargs)
    plan = decode_plan(a["plan"])
    work = backward_work(plan, GradNeeds.from_flags(a["needs"], plan))
    convs, shortcut = _per_conv(plan, a["x"], a["conv_weights"], a["shortcut_weight"])
    total = sum(f for f, run in zip(convs, work.wgrad) if run) + sum(f for f, run in zip(convs, work.dgrad) if run)
    total += shortcut * (work.shortcut_wgrad + work.shortcut_dgrad)
    if plan.recompute and work.any:   # the forward's convs that feed a BN, run again
        recomputed = convs[:-1] if plan.kind == "preact" else convs
        total += sum(recomputed) + (shortcut if plan.shortcut_bn is not None else 0)
    return total


@register_flop_formula(torch.ops.fused_preact_unit.preact)
def preact_flops(*args, out_shape=None, **kwargs) -> int:
    return _forward_flops("preact", args, kwargs)


@register_flop_formula(torch.ops.fused_preact_unit.original)
def original_flops(*args, out_shape=None, **kwargs) -> int:
    return _forward_flops("original", args, kwargs)


@register_flop_formula(torch.ops.fused_preact_unit.preact_backward)
def preact_backward_flops(*args, out_shape=None, **kwargs) -> int:
    return _backward_flops("preact_backward", args, kwargs)


@register_flop_formula(torch.ops.fused_preact_unit.original_backward)
def original_backward_flops(*args, out_shape=None, **kwargs) -> int:
    return _backward_flops("original_backward", args, kwargs)
