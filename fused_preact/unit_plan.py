"""The static structure of one call of a fused unit (``UnitPlan``) and which gradients its backward
forms (``GradNeeds``, ``BackwardWork``).

A plan is read from the unit module once per call (``unit_plan(unit)``): the kind (pre-activation or
original), each branch conv's kernel size, stride and zero padding (always explicit: ``K // 2`` per
side when the unit has no ``conv_padding``), how each BN behaves in this call (``nn.BatchNorm2d``'s
rules), the shortcut and the memory mode. The unit operators (``unit_function``) take it as one
string argument (``encode`` / ``decode``), so an exported graph carries it as a constant and
``torch.compile`` traces its construction (f-strings of ints, bools and float reprs, no json).

BN order, the one rule both kinds follow: the branch BNs in order (``bn1`` .. ``bnN``: before their
conv in a pre-activation unit, after it in an original unit), then the shortcut projection's own BN
(original units with ``shortcut_bn``). Every per-BN list of the operators (parameters, running
statistics, saved statistics, gradients) is in that order.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch
from torch import nn

from .unit_ops import Padding, padded_output_shape

# What a fused unit keeps for its backward (the ``memory`` argument of the fused units,
# ``convert_to_fused`` and the trainer): "default" saves x and the raw conv outputs that feed a BN,
# "min" saves x alone (an original unit: x and its output y) and recomputes the rest in the backward.
MEMORY_MODES = ("default", "min")
KINDS = ("preact", "original")
SHORTCUTS = ("identity", "projection", "raw_projection", "pad")


def check_memory(memory: str) -> str:
    """``memory`` if it is one of ``MEMORY_MODES``, else a ValueError naming the allowed values."""
    if not isinstance(memory, str) or memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {MEMORY_MODES}, got {memory!r}")
    return memory


@dataclass(frozen=True)
class BatchNormMode:
    """How one BN of the unit behaves in this call, as ``nn.BatchNorm2d.forward`` decides it."""
    batch_stats: bool       # normalize with batch statistics (training, or no running stats)
    update_running: bool    # update running_mean / running_var
    momentum: float         # -1.0 for momentum=None (cumulative average)
    eps: float


@dataclass(frozen=True)
class ConvSpec:
    """One conv of the unit: kernel size, stride and the zero padding of its input's pre-activation
    ``(left, right, top, bottom)`` that every conv operator call for it passes."""
    kernel_size: int
    stride: int
    padding: Padding

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        return padded_output_shape(height, width, self.kernel_size, self.stride, self.padding)


@dataclass(frozen=True)
class UnitPlan:
    """The static structure of one call of a fused unit (see the module docstring)."""
    kind: str                           # "preact" | "original"
    convs: tuple[ConvSpec, ...]         # the branch convs, in order
    bn: tuple[BatchNormMode, ...]       # every BN, in the BN order of the module docstring
    shortcut: str                       # identity | projection (of relu(bn1(x))) | raw_projection (of x) | pad
    shortcut_stride: int
    pad_front: int = 0                  # option A: zero channels before x's ...
    pad_back: int = 0                   # ... and after them
    recompute: bool = False             # memory="min"

    # -- derived structure -------------------------------------------------------------------
    @property
    def num_convs(self) -> int:
        return len(self.convs)

    @property
    def shortcut_conv(self) -> Optional[ConvSpec]:
        """The 1x1 projection (no padding), or None."""
        if self.shortcut not in ("projection", "raw_projection"):
            return None
        return ConvSpec(1, self.shortcut_stride, (0, 0, 0, 0))

    @property
    def shortcut_bn(self) -> Optional[int]:
        """The index of the projection's own BN (original units), or None."""
        return self.num_convs if len(self.bn) > self.num_convs else None

    def prologue_bn(self, i: int) -> Optional[int]:
        """The BN whose scale and shift are branch conv ``i``'s prologue (None: it reads its input as
        it is, the original unit's first conv)."""
        if self.kind == "preact":
            return i
        return i - 1 if i > 0 else None

    def output_bn(self, i: int) -> Optional[int]:
        """The BN that reads branch conv ``i``'s output (None: the pre-activation unit's last conv,
        whose output is the unit's)."""
        if self.kind == "preact":
            return i + 1 if i + 1 < self.num_convs else None
        return i

    # -- wire format -------------------------------------------------------------------------
    def encode(self) -> str:
        """The plan as the unit operators' ``plan`` string (``decode`` reads it back)."""
        convs = "|".join(f"{c.kernel_size},{c.stride},{c.padding[0]},{c.padding[1]},{c.padding[2]},"
                         f"{c.padding[3]}" for c in self.convs)
        bns = "|".join(f"{int(m.batch_stats)},{int(m.update_running)},{m.momentum!r},{m.eps!r}" for m in self.bn)
        return (f"kind={self.kind};convs={convs};bn={bns};shortcut={self.shortcut};"
                f"shortcut_stride={self.shortcut_stride};pad={self.pad_front},{self.pad_back};"
                f"recompute={int(self.recompute)}")


@functools.lru_cache(maxsize=1024)
def decode_plan(text: str) -> UnitPlan:
    """The ``UnitPlan`` of an operator's ``plan`` string; ValueError naming ``plan`` if malformed."""
    try:
        fields = dict(part.split("=", 1) for part in text.split(";"))
        convs = tuple(ConvSpec(k, s, (left, right, top, bottom))
                      for k, s, left, right, top, bottom in
                      (map(int, c.split(",")) for c in fields["convs"].split("|")))
        bn = tuple(BatchNormMode(bool(int(b)), bool(int(u)), float(m), float(e))
                   for b, u, m, e in (m.split(",") for m in fields["bn"].split("|")))
        pad_front, pad_back = map(int, fields["pad"].split(","))
        plan = UnitPlan(kind=fields["kind"], convs=convs, bn=bn, shortcut=fields["shortcut"],
                        shortcut_stride=int(fields["shortcut_stride"]), pad_front=pad_front, pad_back=pad_back,
                        recompute=bool(int(fields["recompute"])))
    except (KeyError, ValueError) as error:
        raise ValueError(f"plan is not a fused-unit plan string ({error}): {text!r}") from None
    if plan.kind not in KINDS or plan.shortcut not in SHORTCUTS:
        raise ValueError(f"plan names an unknown unit kind or shortcut: {text!r}")
    return plan


def batchnorm_mode(bn: nn.BatchNorm2d) -> BatchNormMode:
    batch_stats = bn.training or bn.running_mean is None
    return BatchNormMode(batch_stats=batch_stats,
                         update_running=bn.training and bn.running_mean is not None,
                         momentum=-1.0 if bn.momentum is None else float(bn.momentum),
                         eps=float(bn.eps))


def unit_plan(unit: nn.Module) -> UnitPlan:
    """The plan of ``unit`` in its present state (training flag, BN settings, ``conv_padding``,
    ``memory``), read through the attributes of the fused-unit contract."""
    convs = [getattr(unit, f"conv{i}") for i in range(1, unit.num_convs + 1)]
    bns = [getattr(unit, f"bn{i}") for i in range(1, unit.num_convs + 1)]
    kind = "preact" if unit.preact else "original"
    pad_front = pad_back = 0
    if unit.shortcut is not None:
        shortcut = "projection" if unit.shares_preact else "raw_projection"
    elif unit.pad_shortcut is not None:
        pad_front = getattr(unit.pad_shortcut, "front_channels", 0)
        shortcut, pad_back = "pad", unit.pad_shortcut.extra_channels - pad_front
    else:
        shortcut = "identity"
    projection_padding = getattr(unit.shortcut, "padding", (0, 0))   # a 1x1's "same"/"valid" pad nothing
    if not isinstance(projection_padding, str) and tuple(projection_padding) != (0, 0):
        raise ValueError(f"{type(unit).__name__}: the shortcut projection has padding "
                         f"{tuple(projection_padding)}; the fused unit runs 1x1 projections without padding "
                         f"(explicit padding, conv_padding, applies to the branch convs only)")
    paddings = getattr(unit, "conv_padding", None)
    specs = []
    for i, conv in enumerate(convs):
        k = conv.kernel_size[0]
        padding = (k // 2,) * 4 if paddings is None else tuple(paddings[i])
        specs.append(ConvSpec(k, conv.stride[0], padding))
    shortcut_bn = getattr(unit, "shortcut_bn", None) if kind == "original" else None
    if shortcut_bn is not None:
        bns.append(shortcut_bn)
    return UnitPlan(kind=kind, convs=tuple(specs), bn=tuple(batchnorm_mode(bn) for bn in bns),
                    shortcut=shortcut, shortcut_stride=unit.stride, pad_front=pad_front, pad_back=pad_back,
                    recompute=check_memory(getattr(unit, "memory", "default")) == "min")


def check_branch_shape(plan: UnitPlan, height: int, width: int, unit_name: str, explicit: bool) -> None:
    """The branch's output must have the shortcut's height and width (``explicit``: the unit has
    ``conv_padding``, named in the error)."""
    if not explicit:
        return
    paddings = tuple(c.padding for c in plan.convs)
    h, w = height, width
    for conv in plan.convs:
        try:
            h, w = conv.output_size(h, w)
        except ValueError as error:
            raise ValueError(f"{unit_name}: conv_padding {paddings}: {error}") from None
    s = plan.shortcut_stride
    expected = ((height - 1) // s + 1, (width - 1) // s + 1)
    if (h, w) != expected:
        raise ValueError(f"{unit_name}: with conv_padding {paddings} the residual branch turns a "
                         f"{height}x{width} input into {h}x{w}, but the shortcut gives {expected[0]}x{expected[1]}")


# -- gradient selection ---------------------------------------------------------------------------
@dataclass(frozen=True)
class GradNeeds:
    """Which gradients the caller asked for (autograd's ``needs_input_grad``), by name."""
    x: bool
    conv: tuple[bool, ...]          # each branch conv's weight
    bn_weight: tuple[bool, ...]     # each BN's weight, in BN order
    bn_bias: tuple[bool, ...]
    shortcut: bool                  # the projection's weight

    def flags(self) -> list[bool]:
        """The backward operators' ``needs`` argument (``from_flags`` reads it back)."""
        return [self.x, *self.conv, *self.bn_weight, *self.bn_bias, self.shortcut]

    @staticmethod
    def from_flags(flags, plan: UnitPlan) -> "GradNeeds":
        n, m = plan.num_convs, len(plan.bn)
        flags = [bool(f) for f in flags]
        if len(flags) != 2 + n + 2 * m:
            raise ValueError(f"needs must hold {2 + n + 2 * m} flags for this plan, got {len(flags)}")
        return GradNeeds(x=flags[0], conv=tuple(flags[1:1 + n]), bn_weight=tuple(flags[1 + n:1 + n + m]),
                         bn_bias=tuple(flags[1 + n + m:1 + n + 2 * m]), shortcut=flags[-1])

    def bn(self, j: int) -> bool:
        return self.bn_weight[j] or self.bn_bias[j]


@dataclass(frozen=True)
class BackwardWork:
    """Which kernels a unit's backward runs for ``GradNeeds``: only what a requested gradient needs.

    ``wgrad[i]`` / ``dgrad[i]``: branch conv i's weight / data gradient (the data gradient also forms
    the BN-backward sums of the BN below it, so it runs when that BN's weight or bias gradient is
    asked for); ``finish[j]``: BN j's input gradient (``bn_backward_finish``); ``shortcut_wgrad`` /
    ``shortcut_dgrad``: the projection's. The FLOP formulas count exactly this work.
    """
    wgrad: tuple[bool, ...]
    dgrad: tuple[bool, ...]
    finish: tuple[bool, ...]
    shortcut_wgrad: bool
    shortcut_dgrad: bool

    @property
    def any(self) -> bool:
        return any(self.wgrad) or any(self.dgrad) or any(self.finish) or self.shortcut_wgrad or self.shortcut_dgrad


def backward_work(plan: UnitPlan, needs: GradNeeds) -> BackwardWork:
    """The ``BackwardWork`` of ``plan`` for ``needs`` (see its docstring)."""
    n = plan.num_convs
    dgrad, finish = [False] * n, [False] * len(plan.bn)
    # walk from the unit's input towards its output: is the gradient at a point needed below it?
    if plan.kind == "preact":
        # triple i: BN i reads h_i (h_0 = x), conv i reads relu(bn_i(h_i)) and gives h_{i+1}
        below = needs.x                                   # the gradient of h_0 = x
        for i in range(n):
            finish[i] = below                             # dh_i from conv i's masked data gradient
            dgrad[i] = below or needs.bn(i)
            below = dgrad[i] or needs.conv[i]            # the gradient of h_{i+1}
        # the shared-preactivation projection's data gradient joins conv 0's: needed with it
        shortcut_dgrad = dgrad[0] if plan.shortcut == "projection" else (
            needs.x and plan.shortcut == "raw_projection")
    else:
        # conv i reads x (i = 0) or relu(bn_{i-1}(h_i)) and gives h_{i+1}, which BN i reads
        below = needs.x                                   # the gradient at conv 0's input x
        for i in range(n):
            dgrad[i] = below if i == 0 else (below or needs.bn(i - 1))
            finish[i] = dgrad[i] or needs.conv[i]         # dh_{i+1}: what conv i's gradients start from
            below = finish[i]
        shortcut_dgrad = needs.x and plan.shortcut == "raw_projection"
        if plan.shortcut_bn is not None:
            finish[plan.shortcut_bn] = needs.shortcut or shortcut_dgrad
    return BackwardWork(wgrad=tuple(needs.conv), dgrad=tuple(dgrad), finish=tuple(finish),
                        shortcut_wgrad=needs.shortcut and plan.shortcut_conv is not None,
                        shortcut_dgrad=shortcut_dgrad)


class BatchNormParams(NamedTuple):
    """One BN's tensors as the unit operators take them (per-BN lists, in the plan's BN order)."""
    weight: torch.Tensor
    bias: torch.Tensor
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]


def bn_params(bn_weights, bn_biases, running_means, running_vars, batches_tracked) -> list[BatchNormParams]:
    """The operators' per-BN lists as one record per BN."""
    return [BatchNormParams(*p) for p in zip(bn_weights, bn_biases, running_means, running_vars, batches_tracked)]
