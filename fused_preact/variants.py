"""Every other residual unit studied in He et al., "Identity Mappings in Deep Residual
Networks" (ECCV 2016, arXiv:1603.05027): the activation orders of its Fig. 4, the
shortcuts of its Fig. 2 and the single-conv unit of its Table 3, eager PyTorch. The four
standard units (full pre-activation and original, basic and bottleneck, identity
shortcuts) are explicit classes in ``units``; ``make_unit`` returns those for their
variants and a ``VariantUnit`` for the others.

A unit computes ``y = combine(h(x), F(x))`` where ``F`` is the residual branch
(two 3x3 convs, or 1x1-3x3-1x1 with expansion 4, or one 3x3 conv in
``SingleConvUnit``) and ``h`` the shortcut. ``VariantUnit`` takes the variants as
arguments (``activation``, ``shortcut``): it serves the paper's experiments, and runs eager.

Activation variants (paper Fig. 4 / Table 2), for the basic unit::

    original          (a)  y = relu(x + BN(conv(relu(BN(conv(x))))))
    bn_after_add      (b)  y = relu(BN(x + conv(relu(BN(conv(x))))))
    relu_before_add   (c)  y = x + relu(BN(conv(relu(BN(conv(x))))))
    relu_only_preact  (d)  y = x + BN(conv(relu(BN(conv(relu(x))))))
    full_preact       (e)  y = x + conv(relu(BN(conv(relu(BN(x))))))

Shortcut variants (paper Fig. 2 / Table 1), with ``s`` the shortcut value and
``r`` the residual branch output::

    identity           y = s + r
    scaling            y = scale_shortcut * s + scale_residual * r
    exclusive_gating   y = (1 - g) * s + g * r,  g = sigmoid(conv1x1(x) + b_g)
    shortcut_gating    y = (1 - g) * s + r
    conv1x1            y = conv1x1(x) + r          (a projection on every unit)
    dropout            y = dropout(s, p) + r

Layout rules, from the paper's appendix and its public Torch code:
- a unit that changes shape (stride 2, or more channels, as in stage 1 of the
  bottleneck nets: 16 -> 64) uses a 1x1 projection shortcut (``projection="B"``)
  that takes the *pre-activated* input, so the first BN-ReLU is shared by both
  paths; ``projection="A"`` (CIFAR basic nets of the original ResNet paper)
  subsamples and zero-pads the raw input instead, keeping the shortcut free of
  parameters and activations; ``projection="raw"`` is a 1x1 projection of the *raw*
  input ``x`` (the ports of fb.resnet.torch's pre-activation nets), so the first
  BN-ReLU belongs to the residual branch alone;
- a unit that keeps its shape keeps its BN-ReLU inside the residual branch, so
  the shortcut is a clean identity;
- post-activation units (a)-(c) take a projection as in the original ResNet:
  conv1x1 followed by BN.

Module names are stable (they are the state_dict keys): ``conv1..convK`` are the
branch's convolutions in order, ``bn_i`` is the BN that belongs to ``conv_i``
(before it in pre-activation units, after it in post-activation units),
``bn_add`` the BN after the addition of variant (b), ``shortcut`` the projection
conv (``shortcut_bn`` its BN in post-activation units), ``gate`` the gating conv.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .units import (ACTIVATIONS, BOTTLENECK_EXPANSION, BOTTLENECK_STRIDE_ON, PROJECTIONS, SHORTCUTS, OriginalBlock,
                    OriginalBottleneck, PadShortcut, PreActBlock, PreActBottleneck, ResidualUnit, _choice,
                    branch_convs, conv1x1, conv3x3, raw_shortcut)


class VariantUnit(ResidualUnit):
    """One residual unit of any variant in the paper (see the module docstring).

    Args:
        in_channels, out_channels: channels of the unit's input and output.
        stride: spatial stride of the unit (1 or 2).
        bottleneck: ``False`` for two 3x3 convs, ``True`` for 1x1-3x3-1x1 with a
            width of ``out_channels // 4``.
        activation: one of ``ACTIVATIONS`` (paper Fig. 4).
        shortcut: one of ``SHORTCUTS`` (paper Fig. 2).
        projection: shortcut of a shape-changing unit: ``"B"`` 1x1 conv
            projection (of the pre-activated input in pre-activation units),
            ``"raw"`` 1x1 conv projection of the raw input, ``"A"`` subsample +
            zero-pad.
        stride_on: where a bottleneck puts its stride: ``"1x1"`` (the paper's
            code, default) or ``"3x3"`` (timm / torchvision).
        scale_shortcut, scale_residual: the lambdas of ``shortcut="scaling"``.
        gate_bias: initial gate bias ``b_g`` of the gating shortcuts.
        dropout: drop ratio of ``shortcut="dropout"``.
        shortcut_bn: whether the 1x1 projection of a post-activation unit is followed by
            its own BN (``shortcut_bn``, the original ResNet's and torchvision's
            ``downsample``); ``False`` keeps the bare 1x1 conv. Pre-activation units have
            no shortcut BN either way.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        *,
        bottleneck: bool = False,
        activation: str = "full_preact",
        shortcut: str = "identity",
        projection: str = "B",
        stride_on: str = "1x1",
        scale_shortcut: float = 0.5,
        scale_residual: float = 0.5,
        gate_bias: float = -6.0,
        dropout: float = 0.5,
        shortcut_bn: bool = True,
    ):
        super().__init__(in_channels, out_channels, stride)
        _choice("activation", activation, ACTIVATIONS)
        _choice("shortcut", shortcut, SHORTCUTS)
        _choice("projection", projection, PROJECTIONS)
        _choice("stride_on", stride_on, BOTTLENECK_STRIDE_ON)
        if bottleneck and out_channels % BOTTLENECK_EXPANSION:
            raise ValueError(f"a bottleneck unit needs out_channels divisible by 4, got {out_channels}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")

        self.bottleneck, self.activation, self.shortcut_kind = bottleneck, activation, shortcut
        self.projection, self.stride_on = projection, stride_on
        self.scale_shortcut, self.scale_residual = scale_shortcut, scale_residual
        self.preact = activation in ("relu_only_preact", "full_preact")
        changes_shape = self._changes_shape()

        # residual branch: conv1..convK, each with its BN (before it if pre-activation)
        convs = self._branch_convs(in_channels, out_channels, stride)
        self.num_convs = len(convs)
        for i, conv in enumerate(convs, start=1):     # registered in the order they run
            if activation == "full_preact":
                setattr(self, f"bn{i}", nn.BatchNorm2d(conv.in_channels))
            setattr(self, f"conv{i}", conv)
            if activation != "full_preact" and (activation != "bn_after_add" or i < len(convs)):
                setattr(self, f"bn{i}", nn.BatchNorm2d(conv.out_channels))
        if activation == "bn_after_add":
            self.bn_add = nn.BatchNorm2d(out_channels)

        # shortcut: identity, zero-pad (A) or 1x1 projection (B, and the conv1x1 variant)
        self.pad_shortcut = None
        self.shortcut = None
        self.shortcut_bn = None
        if shortcut == "conv1x1" or (changes_shape and projection in ("B", "raw")):
            self.shortcut = conv1x1(in_channels, out_channels, stride)
            if not self.preact and shortcut_bn:
                self.shortcut_bn = nn.BatchNorm2d(out_channels)
        elif changes_shape:
            self.pad_shortcut = PadShortcut(in_channels, out_channels, stride)
        # a pre-activation unit with a projection shares its first activation with the shortcut,
        # unless the projection takes the raw input
        self.shares_preact = self.preact and self.shortcut is not None and projection != "raw"

        self.gate = None
        if shortcut in ("exclusive_gating", "shortcut_gating"):
            self.gate = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=True)
            nn.init.constant_(self.gate.bias, gate_bias)
        self.shortcut_dropout = nn.Dropout(dropout) if shortcut == "dropout" else None

    def _branch_convs(self, in_channels: int, out_channels: int, stride: int) -> list[nn.Conv2d]:
        """The residual branch's convolutions, in the order they run."""
        return branch_convs(in_channels, out_channels, stride, self.stride_on if self.bottleneck else None)

    # -- the two paths -------------------------------------------------------
    def _preactivate(self, x: torch.Tensor) -> torch.Tensor:
        """First activation of a pre-activation unit: relu(bn1(x)) or relu(x)."""
        if self.activation == "full_preact":
            x = self.bn1(x)
        return F.relu(x)

    def _residual(self, x: torch.Tensor, preactivated: bool) -> torch.Tensor:
        h = x
        for i in range(1, self.num_convs + 1):
            last = i == self.num_convs
            if self.activation == "full_preact":           # BN -> ReLU -> conv
                if not (i == 1 and preactivated):
                    h = F.relu(getattr(self, f"bn{i}")(h))
                h = self._branch_conv(i, h)
            elif self.activation == "relu_only_preact":    # ReLU -> conv -> BN
                if not (i == 1 and preactivated):
                    h = F.relu(h)
                h = getattr(self, f"bn{i}")(self._branch_conv(i, h))
            else:                                          # conv -> BN -> ReLU
                h = self._branch_conv(i, h)
                if not last:
                    h = F.relu(getattr(self, f"bn{i}")(h))
                elif self.activation == "original":
                    h = getattr(self, f"bn{i}")(h)
                elif self.activation == "relu_before_add":
                    h = F.relu(getattr(self, f"bn{i}")(h))
        return h

    def _shortcut(self, x: torch.Tensor) -> torch.Tensor:
        return raw_shortcut(self, x)

    def _combine(self, shortcut_in: torch.Tensor, s: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
        kind = self.shortcut_kind
        if kind == "scaling":
            return self.scale_shortcut * s + self.scale_residual * r
        if kind in ("exclusive_gating", "shortcut_gating"):
            g = torch.sigmoid(self.gate(shortcut_in))
            return (1 - g) * s + (g * r if kind == "exclusive_gating" else r)
        if kind == "dropout":
            return self.shortcut_dropout(s) + r
        return s + r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        if self.shares_preact:
            x_preact = self._preactivate(x)
            shortcut_in = x_preact
            r = self._residual(x_preact, preactivated=True)
        else:
            shortcut_in = x
            r = self._residual(x, preactivated=False)
        y = self._combine(shortcut_in, self._shortcut(shortcut_in), r)
        if self.activation == "original":
            y = F.relu(y)
        elif self.activation == "bn_after_add":
            y = F.relu(self.bn_add(y))
        return y

    def extra_repr(self) -> str:
        kind = "bottleneck" if self.bottleneck else "basic"
        return (f"{self.in_channels}->{self.out_channels}, stride={self.stride}, {kind}, "
                f"activation={self.activation}, shortcut={self.shortcut_kind}")


class SingleConvUnit(VariantUnit):
    """A unit whose shortcut skips a single 3x3 conv: Table 3's "ResNet-110 (1layer skip)".

    The paper says only that in this 110-layer net "each shortcut skips only 1
    layer (i.e., a Residual Unit has only 1 layer)"; neither the authors' Torch
    code (resnet-1k-layers, fb.resnet.torch) nor the text gives more. What the
    text leaves open, and what this unit chooses:

    - the order of BN and ReLU: the same orders as the two-conv units of Fig. 4,
      with the branch cut to one conv, e.g. ``original`` (a)
      ``y = relu(x + BN(conv(x)))`` and ``full_preact`` (e)
      ``y = x + conv(relu(BN(x)))``; every activation and shortcut variant works;
    - the layout of the net: 36 units per stage (108 convs, plus the stem conv and
      the classifier make 110 layers, as the 54 two-conv units of ResNet-110);
      widths 16/32/64 (see ``models.cifar_resnet_1layer``);
    - a shape-changing unit puts its stride on its one conv and takes the shortcut
      the caller picks (``projection``, as the two-conv units; the experiments use
      ``"A"``, the zero-padded identity of [1]'s CIFAR nets).

    It runs eager: no fused kernel computes a one-conv unit, and
    ``convert_to_fused`` leaves it as it is (no fused unit computes it).
    State names: ``conv1, bn1`` (plus ``shortcut``, ``gate`` ... as ``VariantUnit``).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, **options):
        if options.get("bottleneck"):
            raise ValueError("SingleConvUnit has one 3x3 conv: bottleneck=True does not apply")
        super().__init__(in_channels, out_channels, stride, **options)

    def _branch_convs(self, in_channels: int, out_channels: int, stride: int) -> list[nn.Conv2d]:
        return [conv3x3(in_channels, out_channels, stride)]


def make_unit(in_channels: int, out_channels: int, stride: int = 1, *, bottleneck: bool = False,
              activation: str = "full_preact", shortcut: str = "identity", projection: str = "B",
              stride_on: str = "1x1", single_conv: bool = False, **shortcut_options) -> ResidualUnit:
    """A unit of the given variant. The standard full pre-activation unit with an
    identity shortcut comes back as ``PreActBlock`` / ``PreActBottleneck``, the original
    unit with an identity shortcut (projection ``"A"`` or ``"B"``) as ``OriginalBlock`` /
    ``OriginalBottleneck`` (which ``convert_to_fused`` turns into their fused twins);
    ``shortcut_options`` (``scale_shortcut``, ``scale_residual``, ``gate_bias``, ``dropout``) only
    matter to other shortcuts.
    ``single_conv=True`` gives a ``SingleConvUnit`` (one 3x3 conv, always eager)."""
    if single_conv:
        if bottleneck:
            raise ValueError("single_conv=True needs bottleneck=False: a single-conv unit has one 3x3 conv")
        return SingleConvUnit(in_channels, out_channels, stride, activation=activation, shortcut=shortcut,
                              projection=projection, stride_on=stride_on, **shortcut_options)
    if activation == "full_preact" and shortcut == "identity":
        if bottleneck:
            return PreActBottleneck(in_channels, out_channels, stride, projection, stride_on)
        return PreActBlock(in_channels, out_channels, stride, projection)
    if activation == "original" and shortcut == "identity" and projection in ("A", "B"):
        if bottleneck:
            return OriginalBottleneck(in_channels, out_channels, stride, projection, stride_on)
        return OriginalBlock(in_channels, out_channels, stride, projection)
    return VariantUnit(in_channels, out_channels, stride, bottleneck=bottleneck, activation=activation,
                       shortcut=shortcut, projection=projection, stride_on=stride_on, **shortcut_options)
