"""What the benchmark measures: named cases at three levels, and ``--only`` selection.

- ``conv``: one BN-ReLU-conv with output statistics (the fused ``conv_bnrelu``
  operator), at every conv shape of the units below; the level where cuDNN's own
  fused scale-bias-ReLU-conv-genstats graph competes.
- ``unit``: one full pre-activation unit (identity shortcut, stride 1), basic and
  bottleneck, at every stage shape of the CIFAR nets (batch 128: 16x32x32, 32x16x16,
  64x8x8; bottleneck outputs 64/128/256) and of the ImageNet nets (batch 64: basic
  64..512 channels, bottleneck 256x56x56 .. 2048x7x7).
- ``model``: CIFAR ResNet-110/164/1001 (batch 128, 32 px) and ImageNet pre-act
  ResNet-50/152/200 (batch 64, 224 px); beside them the original (post-activation)
  unit's nets: CIFAR ResNet-110 original (option A, the paper's baseline) and
  torchvision's ResNet-50 (``model/torchvision_resnet50``), which the fused contenders
  run through ``convert_to_fused``.

Names read ``level/family/what``, e.g. ``unit/imagenet/bottleneck-256x56x56``.
Without a GPU, ``smoke_cases`` gives a handful of tiny shapes of each level.
"""
from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import Callable, Optional, Sequence

from torch import nn

from fused_preact.models import create_model
from fused_preact.units import PreActBlock, PreActBottleneck

LEVELS = ("conv", "unit", "model")
# train: forward + backward + SGD step; infer: eval-mode forward; pgd-train / pgd-eval: an attack's
# step, torch.autograd.grad(loss, x) with every parameter frozen, BN in training / eval mode (only
# the input gradient: PGD, AutoAttack, adversarial training). The pgd modes run when --mode names them.
STEP_MODES = ("train", "infer", "pgd-train", "pgd-eval")
DEFAULT_MODES = ("train", "infer")
MODES = {"conv": ("fwd",), "unit": STEP_MODES, "model": STEP_MODES}

CIFAR_BATCH, IMAGENET_BATCH = 128, 64
CIFAR_STAGES = ((16, 32), (32, 16), (64, 8))                      # basic widths, spatial size
IMAGENET_STAGES = ((64, 56), (128, 28), (256, 14), (512, 7))      # basic widths, spatial size
EXPANSION = 4
CIFAR_MODELS = ("cifar_resnet110", "cifar_resnet164", "cifar_resnet1001")
IMAGENET_MODELS = ("imagenet_resnet50", "imagenet_resnet152", "imagenet_resnet200")


@dataclass(frozen=True)
class ConvShape:
    """A BN-ReLU-conv: input channels, output channels, kernel size, stride, input size."""
    cin: int
    cout: int
    kernel: int
    stride: int
    size: int


@dataclass(frozen=True)
class Case:
    """One thing to measure: a named module builder and the shape of its input.

    ``build()`` returns a fresh module (eager PyTorch, float32) for ``unit`` and
    ``model`` cases; ``conv`` cases carry ``conv`` instead.
    """
    name: str
    level: str
    batch: int
    input_shape: tuple[int, ...]          # without the batch dimension, NCHW order
    build: Optional[Callable[[], nn.Module]] = None
    conv: Optional[ConvShape] = None
    quick: bool = False                   # part of the --quick selection

    @property
    def modes(self) -> tuple[str, ...]:
        return MODES[self.level]

    def with_batch(self, batch: int) -> "Case":
        return Case(self.name, self.level, batch, self.input_shape, self.build, self.conv, self.quick)


def _unit_case(family: str, bottleneck: bool, channels: int, size: int, batch: int, quick: bool) -> Case:
    kind = "bottleneck" if bottleneck else "basic"
    unit = PreActBottleneck if bottleneck else PreActBlock
    return Case(f"unit/{family}/{kind}-{channels}x{size}x{size}", "unit", batch, (channels, size, size),
                build=lambda: unit(channels, channels), quick=quick)


def _unit_convs(bottleneck: bool, channels: int, size: int) -> list[ConvShape]:
    if not bottleneck:
        return [ConvShape(channels, channels, 3, 1, size)]
    width = channels // EXPANSION
    return [ConvShape(channels, width, 1, 1, size), ConvShape(width, width, 3, 1, size),
            ConvShape(width, channels, 1, 1, size)]


def _conv_case(family: str, conv: ConvShape, batch: int, quick: bool) -> Case:
    stride = f"/s{conv.stride}" if conv.stride != 1 else ""
    name = f"conv/{family}/{conv.kernel}x{conv.kernel}{stride}-{conv.cin}x{conv.size}x{conv.size}-to-{conv.cout}"
    return Case(name, "conv", batch, (conv.cin, conv.size, conv.size), conv=conv, quick=quick)


def _model_case(name: str, batch: int, image: int, quick: bool) -> Case:
    return Case(f"model/{name}", "model", batch, (3, image, image), build=lambda: create_model(name), quick=quick)


def _original_cifar_case(name: str, batch: int, image: int, quick: bool) -> Case:
    """This project's CIFAR net of ``name`` with original units and option-A shortcuts (Table 1's baseline)."""
    return Case(f"model/{name}-original", "model", batch, (3, image, image),
                build=lambda: create_model(name, activation="original", projection="A"), quick=quick)


def _torchvision_case(name: str, batch: int, image: int, quick: bool, layers: Optional[list[int]] = None,
                      **options) -> Case:
    """``torchvision.models.<name>(**options)``: original units, stride on the 3x3 (v1.5). With
    ``layers``: torchvision's ``ResNet`` class of ``BasicBlock``s, that many per stage (``resnet10``)."""
    def build() -> nn.Module:
        import torchvision       # only the cases that use it need it
        if layers is not None:
            return torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, layers, **options)
        return getattr(torchvision.models, name)(**options)
    return Case(f"model/torchvision_{name}", "model", batch, (3, image, image), build=build, quick=quick)


def first_unit_channels(model: nn.Module) -> int:
    """Input channels of the first residual unit of ``model`` (this project's ``ResNet`` or any net
    whose units name their first conv ``conv1``, as torchvision's)."""
    if hasattr(model, "units"):
        return model.units()[0].in_channels
    return next(m.conv1.in_channels for m in list(model.modules())[1:] if isinstance(getattr(m, "conv1", None),
                                                                                      nn.Conv2d))


def _family_cases(family: str, batch: int, stages: Sequence[tuple[int, int]]) -> tuple[list, list]:
    units, convs = [], []
    for index, (width, size) in enumerate(stages):
        quick = family == "cifar" or index == 0
        for bottleneck in (False, True):
            channels = width * EXPANSION if bottleneck else width
            units.append(_unit_case(family, bottleneck, channels, size, batch, quick))
            convs += [_conv_case(family, c, batch, quick) for c in _unit_convs(bottleneck, channels, size)]
    return units, convs


def gpu_cases() -> list[Case]:
    """The full catalogue at the paper's shapes."""
    cifar_units, cifar_convs = _family_cases("cifar", CIFAR_BATCH, CIFAR_STAGES)
    imagenet_units, imagenet_convs = _family_cases("imagenet", IMAGENET_BATCH, IMAGENET_STAGES)
    models = ([_model_case(m, CIFAR_BATCH, 32, m == "cifar_resnet164") for m in CIFAR_MODELS]
              + [_model_case(m, IMAGENET_BATCH, 224, m == "imagenet_resnet50") for m in IMAGENET_MODELS]
              + [_original_cifar_case("cifar_resnet110", CIFAR_BATCH, 32, False),
                 _torchvision_case("resnet50", IMAGENET_BATCH, 224, True)])
    return _unique(cifar_convs + imagenet_convs) + cifar_units + imagenet_units + models


def smoke_cases() -> list[Case]:
    """Tiny shapes of every level, for a CPU (the fused CPU paths, Triton's interpreter)."""
    units = [_unit_case("tiny", False, 8, 8, 4, True), _unit_case("tiny", True, 32, 8, 4, True)]
    convs = [_conv_case("tiny", ConvShape(8, 8, 3, 1, 8), 4, True),
             _conv_case("tiny", ConvShape(32, 8, 1, 1, 8), 4, True)]
    # the smallest CIFAR net (one unit per stage) at 8 px: the net pools globally
    # and the original unit's: the same net with original units, torchvision's ResNet class with one
    # BasicBlock per stage (a ResNet-10: ResNet-18's units and widths, half of them) at 16 px; batches
    # such that every BN sees >= 16 values per channel (stage 3 at 2x2; layer3 and layer4 at 1x1), else
    # fp32 training steps differ from float64 by O(1) in eager and fused alike
    originals = [_original_cifar_case("cifar_resnet8", 4, 8, True),
                 _torchvision_case("resnet10", 16, 16, True, layers=[1, 1, 1, 1], num_classes=10)]
    return convs + units + [_model_case("cifar_resnet8", 2, 8, True)] + originals


def _unique(cases: list[Case]) -> list[Case]:
    return list({case.name: case for case in cases}.values())


def select(cases: Sequence[Case], only: Optional[str], *, quick: bool, batch: Optional[int]) -> list[Case]:
    """The cases named by ``only`` (comma-separated names, globs or name parts such as
    ``unit``, ``imagenet``, ``bottleneck``; run in the order of the patterns, so a short
    budget measures the first ones), the quick subset with ``quick``, all batches
    set to ``batch`` when given. Raises ValueError naming ``--only`` when a pattern matches nothing."""
    if batch is not None and (isinstance(batch, bool) or not isinstance(batch, int) or batch <= 0):
        raise ValueError(f"--batch must be a positive integer, got {batch!r}")
    chosen = list(cases)
    if only is not None:
        patterns = [p.strip() for p in only.split(",") if p.strip()]
        if not patterns:
            raise ValueError("--only needs at least one level, shape or case name")
        for pattern in patterns:
            if not any(_matches(case.name, pattern) for case in cases):
                names = ", ".join(case.name for case in cases)
                raise ValueError(f"--only {pattern!r} matches no case; cases: {names}")
        ordered = [case for pattern in patterns for case in chosen if _matches(case.name, pattern)]
        chosen = list({case.name: case for case in ordered}.values())   # first pattern's place wins
    elif quick:
        chosen = [case for case in chosen if case.quick]
    if batch is not None:
        chosen = [case.with_batch(batch) for case in chosen]
    return chosen


def _matches(name: str, pattern: str) -> bool:
    return pattern in name or fnmatch(name, pattern)
