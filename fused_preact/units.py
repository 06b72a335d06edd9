"""The four standard residual units of He et al., eager PyTorch: what the fused units compute.

Full pre-activation units ("Identity Mappings in Deep Residual Networks", ECCV 2016,
arXiv:1603.05027, Fig. 4e) and the original, post-activation units of "Deep Residual
Learning" (CVPR 2016; torchvision's ``BasicBlock`` / ``Bottleneck``)::

    PreActBlock         y = s + conv2(relu(bn2(conv1(relu(bn1(x))))))
    PreActBottleneck    y = s + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x)))))))))
    OriginalBlock       y = relu(bn2(conv2(relu(bn1(conv1(x))))) + s)
    OriginalBottleneck  y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + s)

Basic units have two 3x3 convs; bottlenecks 1x1 -> 3x3 -> 1x1 with a width of
``out_channels // 4``. The shortcut ``s`` is ``x`` when the unit keeps its shape, else:

- ``projection="B"``: a 1x1 conv projection (``shortcut``). A pre-activation unit projects
  the *pre-activated* input ``relu(bn1(x))``, so its first BN-ReLU is shared by both
  paths (``shares_preact``); an original unit projects ``x`` and follows the projection
  by its own BN (``shortcut_bn``) unless ``shortcut_bn=False``;
- ``projection="raw"`` (pre-activation only): a 1x1 projection of the raw input ``x``
  (the ports of fb.resnet.torch's pre-activation nets);
- ``projection="A"``: ``x`` subsampled and zero-padded along the channels (``PadShortcut``,
  the original paper's CIFAR nets): no parameters.

The paper's other variants (its Fig. 2 shortcuts and Fig. 4 activation orders) and the
single-conv unit of its Table 3 are in ``variants``.

Module names are the state_dict keys: ``conv_i`` is the branch's i-th conv, ``bn_i`` the
BN that belongs to it (before it in pre-activation units, after it in original units),
``shortcut`` the projection conv and ``shortcut_bn`` its BN.

``conv_padding`` (``None`` here): set on fused units by ``convert_to_fused`` for nets that
pad explicitly; one ``(left, right, top, bottom)`` per branch conv, the total zero padding
of that conv's input, which then runs as ``F.pad`` and the conv with padding 0.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

# the variants of the paper (its Fig. 4 activation orders and Fig. 2 shortcuts), built by
# ``variants``; named here, where the trainer's options and the models read them
ACTIVATIONS = ("original", "bn_after_add", "relu_before_add", "relu_only_preact", "full_preact")
SHORTCUTS = ("identity", "scaling", "exclusive_gating", "shortcut_gating", "conv1x1", "dropout")
PROJECTIONS = ("A", "B", "raw")
BOTTLENECK_STRIDE_ON = ("1x1", "3x3")
SUPPORTED_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
BOTTLENECK_EXPANSION = 4


def _choice(name: str, value, allowed) -> None:
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def check_unit_input(x: torch.Tensor, in_channels: int, unit_name: str) -> None:
    """Raise a clear error, naming the argument, when ``x`` cannot enter a unit."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{unit_name}: x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{unit_name}: x must be a 4-D tensor (N, C, H, W), got {x.dim()}-D of shape {tuple(x.shape)}")
    if x.shape[1] != in_channels:
        raise ValueError(
            f"{unit_name}: x has {x.shape[1]} channels (dim 1) but the unit was built "
            f"with in_channels={in_channels}")
    if x.dtype not in SUPPORTED_DTYPES:
        raise TypeError(
            f"{unit_name}: x must be float32, float64, float16 or bfloat16, got {x.dtype}")


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def raw_shortcut(unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The shortcut of a unit whose shortcut reads the raw input ``x``: its projection (``unit.shortcut``,
    then ``unit.shortcut_bn`` when it has one), else its option-A padding (``unit.pad_shortcut``), else x."""
    if unit.shortcut is not None:
        s = unit.shortcut(x)
        return unit.shortcut_bn(s) if unit.shortcut_bn is not None else s
    if unit.pad_shortcut is not None:
        return unit.pad_shortcut(x)
    return x


class PadShortcut(nn.Module):
    """Option A of the original ResNet: subsample by ``stride`` and zero-pad channels.

    ``extra_channels = out_channels - in_channels`` zero channels, ``front_channels`` of
    them before x's channels (0: all appended, this project's layout; CIFAR ports such as
    akamaster's put half in front, which ``convert_to_fused`` keeps)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int, *, front_channels: int = 0):
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"projection='A' needs out_channels >= in_channels, got {in_channels} -> {out_channels}")
        if isinstance(front_channels, bool) or not isinstance(front_channels, int) \
                or not 0 <= front_channels <= out_channels - in_channels:
            raise ValueError(f"front_channels must be an int in [0, {out_channels - in_channels}], "
                             f"got {front_channels!r}")
        self.extra_channels = out_channels - in_channels
        self.front_channels = front_channels
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride > 1:
            x = x[:, :, ::self.stride, ::self.stride]
        # pad (W_left, W_right, H_top, H_bottom, C_front, C_back)
        return F.pad(x, (0, 0, 0, 0, self.front_channels, self.extra_channels - self.front_channels))

    def extra_repr(self) -> str:
        front = f", front_channels={self.front_channels}" if self.front_channels else ""
        return f"stride={self.stride}, extra_channels={self.extra_channels}{front}"


class ResidualUnit(nn.Module):
    """What every residual unit of this project has: its shape (``in_channels``,
    ``out_channels``, ``stride``, ``num_convs``), the input check, and each branch conv run
    with its own padding or with ``conv_padding`` (see the module docstring)."""

    # explicit zero padding of each branch conv's input, or None (each conv's own padding)
    conv_padding: Optional[tuple[tuple[int, int, int, int], ...]] = None
    num_convs: int

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        _positive_int("in_channels", in_channels)
        _positive_int("out_channels", out_channels)
        _choice("stride", stride, (1, 2))
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def _check_input(self, x: torch.Tensor) -> None:
        check_unit_input(x, self.in_channels, type(self).__name__)

    def _branch_conv(self, i: int, h: torch.Tensor) -> torch.Tensor:
        """Branch conv ``i`` (1-based) of ``h``: with ``conv_padding``, ``F.pad`` by its entry and
        the conv without padding; else the conv module itself."""
        conv = getattr(self, f"conv{i}")
        if self.conv_padding is None:
            return conv(h)
        return F.conv2d(F.pad(h, tuple(self.conv_padding[i - 1])), conv.weight, conv.bias, conv.stride, 0,
                        conv.dilation, conv.groups)

    def _changes_shape(self) -> bool:
        return self.stride != 1 or self.in_channels != self.out_channels


def branch_convs(in_channels: int, out_channels: int, stride: int, stride_on: Optional[str]) -> list[nn.Conv2d]:
    """The branch's convs in the order they run: two 3x3 (``stride_on=None``: a basic unit), or
    1x1 -> 3x3 -> 1x1 at width ``out_channels // 4`` with the stride on the first 1x1 or the 3x3."""
    if stride_on is None:
        return [conv3x3(in_channels, out_channels, stride), conv3x3(out_channels, out_channels)]
    _choice("stride_on", stride_on, BOTTLENECK_STRIDE_ON)
    if out_channels % BOTTLENECK_EXPANSION:
        raise ValueError(f"a bottleneck unit needs out_channels divisible by 4, got {out_channels}")
    width = out_channels // BOTTLENECK_EXPANSION
    s1, s3 = (stride, 1) if stride_on == "1x1" else (1, stride)
    return [conv1x1(in_channels, width, s1), conv3x3(width, width, s3), conv1x1(width, out_channels)]


class _PreActUnit(ResidualUnit):
    """A full pre-activation unit: BN -> ReLU -> conv per branch conv, shortcut of x or of
    the first pre-activation."""

    preact = True
    shortcut_bn = None     # pre-activation projections have no BN of their own

    def __init__(self, in_channels: int, out_channels: int, stride: int, projection: str,
                 stride_on: Optional[str]):
        _choice("projection", projection, PROJECTIONS)
        super().__init__(in_channels, out_channels, stride)
        convs = branch_convs(in_channels, out_channels, stride, stride_on)
        self.projection = projection
        self.num_convs = len(convs)
        for i, conv in enumerate(convs, start=1):     # registered in the order they run
            setattr(self, f"bn{i}", nn.BatchNorm2d(conv.in_channels))
            setattr(self, f"conv{i}", conv)
        self.shortcut: Optional[nn.Conv2d] = None
        self.pad_shortcut: Optional[PadShortcut] = None
        if self._changes_shape() and projection in ("B", "raw"):
            self.shortcut = conv1x1(in_channels, out_channels, stride)
        elif self._changes_shape():
            self.pad_shortcut = PadShortcut(in_channels, out_channels, stride)
        # the projection of "B" takes the first pre-activation, which both paths then share
        self.shares_preact = self.shortcut is not None and projection != "raw"

    def _shortcut_of(self, x: torch.Tensor, x_preact: torch.Tensor) -> torch.Tensor:
        if self.shortcut is not None:
            return self.shortcut(x_preact if self.shares_preact else x)
        if self.pad_shortcut is not None:
            return self.pad_shortcut(x)
        return x

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}, projection={self.projection}"


class PreActBlock(_PreActUnit):
    """Full pre-activation basic unit (paper Fig. 4e): two 3x3 convs.

    ``y = s + conv2(relu(bn2(conv1(relu(bn1(x))))))``; a shape-changing unit's ``s`` is
    ``shortcut(relu(bn1(x)))`` (projection ``"B"``), ``shortcut(x)`` (``"raw"``) or the
    zero-padded ``x`` (``"A"``).
    State names: ``bn1, conv1, bn2, conv2`` and ``shortcut`` when projecting.
    """

    bottleneck = False

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B"):
        super().__init__(in_channels, out_channels, stride, projection, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x_preact = F.relu(self.bn1(x))
        h = self._branch_conv(1, x_preact)
        h = self._branch_conv(2, F.relu(self.bn2(h)))
        return self._shortcut_of(x, x_preact) + h


class PreActBottleneck(_PreActUnit):
    """Full pre-activation bottleneck unit: 1x1 -> 3x3 -> 1x1, width ``out_channels // 4``.

    ``y = s + conv3(relu(bn3(conv2(relu(bn2(conv1(relu(bn1(x)))))))))``, ``s`` as in
    ``PreActBlock``. ``stride_on`` places the stride on the first 1x1 (the paper's code,
    default) or on the 3x3 (timm, torchvision). State names: ``bn1..bn3, conv1..conv3``
    and ``shortcut`` when projecting.
    """

    bottleneck = True

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 stride_on: str = "1x1"):
        super().__init__(in_channels, out_channels, stride, projection, stride_on)
        self.stride_on = stride_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        x_preact = F.relu(self.bn1(x))
        h = self._branch_conv(1, x_preact)
        h = self._branch_conv(2, F.relu(self.bn2(h)))
        h = self._branch_conv(3, F.relu(self.bn3(h)))
        return self._shortcut_of(x, x_preact) + h

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride_on={self.stride_on}"


class _OriginalUnit(ResidualUnit):
    """An original (post-activation) unit: conv -> BN per branch conv, ReLU after the sum."""

    preact = False
    shares_preact = False

    def __init__(self, in_channels: int, out_channels: int, stride: int, projection: str,
                 stride_on: Optional[str], shortcut_bn: bool, shortcut: str):
        _choice("projection", projection, ("A", "B"))
        _choice("shortcut", shortcut, ("identity", "conv1x1"))
        super().__init__(in_channels, out_channels, stride)
        convs = branch_convs(in_channels, out_channels, stride, stride_on)
        self.projection = projection
        self.num_convs = len(convs)
        for i, conv in enumerate(convs, start=1):     # registered in the order they run
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", nn.BatchNorm2d(conv.out_channels))
        self.shortcut: Optional[nn.Conv2d] = None
        self.shortcut_bn: Optional[nn.BatchNorm2d] = None
        self.pad_shortcut: Optional[PadShortcut] = None
        # "conv1x1" projects on every unit, shape kept or not (paper Table 1's "1x1 conv shortcut")
        if shortcut == "conv1x1" or (self._changes_shape() and projection == "B"):
            self.shortcut = conv1x1(in_channels, out_channels, stride)
            if shortcut_bn:
                self.shortcut_bn = nn.BatchNorm2d(out_channels)
        elif self._changes_shape():
            self.pad_shortcut = PadShortcut(in_channels, out_channels, stride)

    def _shortcut_of(self, x: torch.Tensor) -> torch.Tensor:
        return raw_shortcut(self, x)

    def extra_repr(self) -> str:
        shortcut = "conv1x1" if self.shortcut is not None and not self._changes_shape() else self.projection
        return (f"{self.in_channels}->{self.out_channels}, stride={self.stride}, shortcut={shortcut}"
                f"{'' if self.shortcut is None or self.shortcut_bn is not None else ' (no BN)'}")


class OriginalBlock(_OriginalUnit):
    """Original (post-activation) basic unit of He et al. 2015 (paper Fig. 4a), torchvision's
    ``BasicBlock``: ``y = relu(bn2(conv2(relu(bn1(conv1(x))))) + s)``.

    ``s`` is ``x`` when the shape is kept, else the subsampled, zero-padded ``x``
    (``projection="A"``) or the 1x1 projection ``shortcut(x)`` (``"B"``), followed by
    ``shortcut_bn`` when ``shortcut_bn=True`` (torchvision's ``downsample``).
    ``shortcut="conv1x1"`` projects on every unit, shape kept or not (paper Table 1's
    "1x1 conv shortcut").
    State names: ``conv1, bn1, conv2, bn2`` and ``shortcut`` (+ ``shortcut_bn``) when projecting.
    """

    bottleneck = False

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 *, shortcut_bn: bool = True, shortcut: str = "identity"):
        super().__init__(in_channels, out_channels, stride, projection, None, shortcut_bn, shortcut)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        h = F.relu(self.bn1(self._branch_conv(1, x)))
        h = self.bn2(self._branch_conv(2, h))
        return F.relu(self._shortcut_of(x) + h)


class OriginalBottleneck(_OriginalUnit):
    """Original (post-activation) bottleneck unit: 1x1 -> 3x3 -> 1x1 convs, each followed by
    its BN, ReLU after the first two BNs and after the add; width ``out_channels // 4``:
    ``y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + s)``.

    ``stride_on`` places the stride on the 3x3 (torchvision's ResNet v1.5, default) or on
    the first 1x1 (the original paper's). Shortcuts as ``OriginalBlock``. State names:
    ``conv1..conv3, bn1..bn3`` and ``shortcut`` (+ ``shortcut_bn``) when projecting.
    """

    bottleneck = True

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 stride_on: str = "3x3", *, shortcut_bn: bool = True, shortcut: str = "identity"):
        super().__init__(in_channels, out_channels, stride, projection, stride_on, shortcut_bn, shortcut)
        self.stride_on = stride_on

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input(x)
        h = F.relu(self.bn1(self._branch_conv(1, x)))
        h = F.relu(self.bn2(self._branch_conv(2, h)))
        h = self.bn3(self._branch_conv(3, h))
        return F.relu(self._shortcut_of(x) + h)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, stride_on={self.stride_on}"


STANDARD_UNITS = (PreActBlock, PreActBottleneck, OriginalBlock, OriginalBottleneck)
