"""Residual networks of the paper, built from any unit variant of ``units.py``.

CIFAR (paper Sec. 4 and its public Torch code): a 3x3 stem conv 3 -> 16, three
stages at 32x32, 16x16 and 8x8, then BN-ReLU, global average pooling and the
classifier. Basic nets have depth 6n+2 (widths 16/32/64); bottleneck nets have
depth 9n+2 (outputs 64/128/256, bottleneck widths 16/32/64); single-conv nets
(``cifar_resnet_1layer``, Table 3's "1layer skip") have depth 3n+2 and run eager.
The first unit of each stage changes shape; in the bottleneck nets that includes
stage 1 (16 -> 64).

ImageNet: a 7x7 stride-2 stem conv 3 -> 64 and a 3x3 stride-2 max pool, four
stages at 56, 28, 14 and 7, then BN-ReLU, pooling and the classifier (as timm's
``resnetv2``; the first unit's shared BN-ReLU is the stem's activation).

Post-activation variants (original ResNet units) put BN-ReLU after the stem conv
and need no final BN-ReLU, since their units end activated (or, for
``relu_before_add``, are never normalized after the addition in the paper either).
Their original units with an identity shortcut (option A or B) are ``OriginalBlock`` /
``OriginalBottleneck`` (``variants.make_unit``), which ``convert_to_fused`` -- and so the
trainer with a fused backend -- turns into fused units, as the pre-activation ones.

Initialization as the paper: He-normal convs (fan-out, as its code), no conv
bias, BN gamma 1 and beta 0; the classifier keeps PyTorch's default weights and a
zero bias; gating convs keep their bias ``gate_bias``.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .units import BOTTLENECK_EXPANSION, ResidualUnit
from .variants import make_unit

CIFAR_DEPTHS = {"basic": 6, "bottleneck": 9}
IMAGENET_STAGES = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
    200: ("bottleneck", (3, 24, 36, 3)),
}


class ResNet(nn.Module):
    """A stem, stages of residual units, and a pooled linear classifier.

    Args:
        stage_depths: units per stage.
        stage_channels: output channels of each stage's units.
        bottleneck: bottleneck units (width = channels // 4) instead of basic ones.
        num_classes: classifier outputs.
        stem: ``"cifar"`` (3x3 conv) or ``"imagenet"`` (7x7/2 conv + 3x3/2 max pool).
        stem_channels: channels of the stem conv.
        **unit_options: passed to every unit (``activation``, ``shortcut``,
            ``projection``, ``stride_on``, ``scale_shortcut``, ``scale_residual``,
            ``gate_bias``, ``dropout``); see ``variants.VariantUnit``.
    """

    def __init__(self, stage_depths: Sequence[int], stage_channels: Sequence[int], *, bottleneck: bool,
                 num_classes: int, stem: str = "cifar", stem_channels: int = 16, **unit_options):
        super().__init__()
        if len(stage_depths) != len(stage_channels):
            raise ValueError(f"stage_depths and stage_channels differ in length: "
                             f"{len(stage_depths)} vs {len(stage_channels)}")
        if stem not in ("cifar", "imagenet"):
            raise ValueError(f"stem must be 'cifar' or 'imagenet', got {stem!r}")
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes <= 0:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        activation = unit_options.get("activation", "full_preact")
        self.preact = activation in ("relu_only_preact", "full_preact")
        self.num_classes = num_classes

        # stem
        if stem == "cifar":
            layers = [nn.Conv2d(3, stem_channels, 3, padding=1, bias=False)]
        else:
            layers = [nn.Conv2d(3, stem_channels, 7, stride=2, padding=3, bias=False)]
        if not self.preact:
            layers += [nn.BatchNorm2d(stem_channels), nn.ReLU(inplace=True)]
        if stem == "imagenet":
            layers.append(nn.MaxPool2d(3, stride=2, padding=1))
        self.stem = nn.Sequential(*layers)

        # stages: the first unit of each stage after the first halves the resolution
        stages, channels = [], stem_channels
        for index, (depth, out_channels) in enumerate(zip(stage_depths, stage_channels)):
            units = []
            for u in range(depth):
                stride = 2 if (u == 0 and index > 0) else 1
                units.append(make_unit(channels, out_channels, stride, bottleneck=bottleneck, **unit_options))
                channels = out_channels
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)

        # head: pre-activation nets end with BN-ReLU
        self.norm = nn.BatchNorm2d(channels) if self.preact else None
        self.fc = nn.Linear(channels, num_classes)
        self.num_features = channels
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.zeros_(self.fc.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__}: x must be an image batch of shape (N, 3, H, W), got {shape}")
        x = self.stages(self.stem(x))
        if self.norm is not None:
            x = F.relu(self.norm(x))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_features(x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

    def units(self) -> list[ResidualUnit]:
        """The residual units in order of depth."""
        return [m for m in self.modules() if isinstance(m, ResidualUnit)]


def cifar_resnet(depth: int, num_classes: int = 10, *, bottleneck: bool = False, **unit_options) -> ResNet:
    """CIFAR ResNet of any valid depth: 6n+2 with basic units, 9n+2 with bottlenecks."""
    kind = "bottleneck" if bottleneck else "basic"
    per_unit = CIFAR_DEPTHS[kind]
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < per_unit + 2 or (depth - 2) % per_unit:
        rule = "6n+2 (20, 56, 110, ...)" if kind == "basic" else "9n+2 (164, 1001, ...)"
        raise ValueError(f"depth must be {rule} for a CIFAR ResNet with {kind} units, got {depth!r}")
    n = (depth - 2) // per_unit
    widths = (16, 32, 64)
    channels = tuple(w * BOTTLENECK_EXPANSION for w in widths) if bottleneck else widths
    return ResNet((n, n, n), channels, bottleneck=bottleneck, num_classes=num_classes,
                  stem="cifar", stem_channels=16, **unit_options)


def cifar_resnet_1layer(depth: int, num_classes: int = 10, **unit_options) -> ResNet:
    """CIFAR ResNet of depth 3n+2 whose shortcuts each skip one 3x3 conv (``variants.SingleConvUnit``):
    n units per stage at widths 16/32/64; depth 110 is Table 3's "ResNet-110 (1layer skip)".
    Its units always run eager (no fused one-conv unit)."""
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 5 or (depth - 2) % 3:
        raise ValueError(f"depth must be 3n+2 (5, 8, ..., 110) for a CIFAR ResNet with single-conv units, "
                         f"got {depth!r}")
    n = (depth - 2) // 3
    return ResNet((n, n, n), (16, 32, 64), bottleneck=False, num_classes=num_classes, stem="cifar",
                  stem_channels=16, single_conv=True, **unit_options)


def imagenet_resnet(depth: int, num_classes: int = 1000, **unit_options) -> ResNet:
    """ImageNet pre-activation ResNet-18/34 (basic) or -50/101/152/200 (bottleneck)."""
    if depth not in IMAGENET_STAGES:
        raise ValueError(f"depth must be one of {sorted(IMAGENET_STAGES)} for an ImageNet ResNet, got {depth!r}")
    kind, stage_depths = IMAGENET_STAGES[depth]
    bottleneck = kind == "bottleneck"
    channels = (256, 512, 1024, 2048) if bottleneck else (64, 128, 256, 512)
    return ResNet(stage_depths, channels, bottleneck=bottleneck, num_classes=num_classes,
                  stem="imagenet", stem_channels=64, **unit_options)


def _preset(builder, depth, suffix="", **fixed):
    cifar = builder is not imagenet_resnet

    def create(num_classes: int = 10 if cifar else 1000, **unit_options) -> ResNet:
        return builder(depth, num_classes, **fixed, **unit_options)
    create.__name__ = f"{'cifar' if cifar else 'imagenet'}_resnet{depth}{suffix}"
    create.__doc__ = f"{create.__name__}: {builder.__doc__}"
    return create


MODELS = {
    **{f"cifar_resnet{d}": _preset(cifar_resnet, d) for d in (20, 56, 110)},
    **{f"cifar_resnet{d}": _preset(cifar_resnet, d, bottleneck=True) for d in (164, 1001)},
    **{f"imagenet_resnet{d}": _preset(imagenet_resnet, d) for d in IMAGENET_STAGES},
}
MODELS["cifar_resnet110_1layer"] = _preset(cifar_resnet_1layer, 110, "_1layer")
cifar_resnet20 = MODELS["cifar_resnet20"]
cifar_resnet56 = MODELS["cifar_resnet56"]
cifar_resnet110 = MODELS["cifar_resnet110"]
cifar_resnet164 = MODELS["cifar_resnet164"]
cifar_resnet1001 = MODELS["cifar_resnet1001"]
cifar_resnet110_1layer = MODELS["cifar_resnet110_1layer"]
imagenet_resnet18 = MODELS["imagenet_resnet18"]
imagenet_resnet34 = MODELS["imagenet_resnet34"]
imagenet_resnet50 = MODELS["imagenet_resnet50"]
imagenet_resnet101 = MODELS["imagenet_resnet101"]
imagenet_resnet152 = MODELS["imagenet_resnet152"]
imagenet_resnet200 = MODELS["imagenet_resnet200"]


def create_model(name: str, **kwargs) -> ResNet:
    """Build a model by name: a preset of ``MODELS`` or ``cifar_resnet<depth>[_bottleneck|_1layer]``."""
    if name in MODELS:
        return MODELS[name](**kwargs)
    prefix = "cifar_resnet"
    if name.startswith(prefix):
        body = name[len(prefix):]
        if body.endswith("_1layer") and body[: -len("_1layer")].isdigit():
            return cifar_resnet_1layer(int(body[: -len("_1layer")]), **kwargs)
        bottleneck = body.endswith("_bottleneck")
        digits = body[: -len("_bottleneck")] if bottleneck else body
        if digits.isdigit():
            return cifar_resnet(int(digits), bottleneck=bottleneck, **kwargs)
    raise ValueError(f"name must be one of {sorted(MODELS)} or 'cifar_resnet<depth>[_bottleneck|_1layer]', "
                     f"got {name!r}")
