"""convert_to_fused on original (post-activation) ResNets: torchvision's ResNets, CIFAR ports
whose option-A shortcut is a lambda or ``F.pad`` (tests/foreign_models.py), and this project's
``activation="original"`` nets. Units recognized by what they compute, fused exactly, state,
tensors and key order kept, and told about (ResNeXt's grouped convs stay eager).

Float64 throughout; against the unconverted model, relative to the largest magnitude of each
tensor (running statistics included): 1e-10.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import foreign_models as fm
from comparisons import assert_same_step, perturb_bn
from fused_preact import convert_to_fused, dispatch, models
from fused_preact.converted import ConvertedUnit
from fused_preact.fused import FusedOriginalBlock, FusedOriginalBottleneck, FusedPreActBlock, _FusedUnitMixin
from fused_preact.recognize import OriginalUnitMatch, recognize
from fused_preact.units import OriginalBlock, OriginalBottleneck, PadShortcut, PreActBlock

torchvision = pytest.importorskip("torchvision")
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet  # noqa: E402


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


def _fused_units(model):
    return [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]


def _original_class(unit):
    """The class of the module a fused unit stands for."""
    return unit.original_class if isinstance(unit, ConvertedUnit) else type(unit)


# -- recognition: what each way of writing the unit is seen as ------------------------------------
class _PostActivation(nn.Module):      # torchvision's BasicBlock layout, written with torch.relu calls
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _BareProjection(nn.Module):      # a 1x1 projection without its own BN, the ReLU as clamp
    def __init__(self, c):
        super().__init__()
        self.a, self.b = nn.Conv2d(c, 2 * c, 3, 2, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.c, self.d = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, bias=False), nn.BatchNorm2d(2 * c)
        self.proj = nn.Conv2d(c, 2 * c, 1, 2, bias=False)

    def forward(self, x):
        out = self.d(self.c(F.relu(self.b(self.a(x)))))
        return (self.proj(x) + out).clamp(min=0)


@pytest.mark.parametrize("build,width,expected", [
    (lambda: _PostActivation(4), 4, OriginalUnitMatch(("conv1", "conv2"), ("bn1", "bn2"), "identity")),
    (lambda: _BareProjection(4), 4, OriginalUnitMatch(("a", "c"), ("b", "d"), "projection", "proj")),
    (lambda: fm.akamaster_resnet(20, "A").layer2[0], 4,
     OriginalUnitMatch(("conv1", "conv2"), ("bn1", "bn2"), "pad", pad_stride=2, pad_front=2, pad_back=2)),
    (lambda: fm.akamaster_resnet(20, "B").layer2[0], 4,
     OriginalUnitMatch(("conv1", "conv2"), ("bn1", "bn2"), "projection", "shortcut.0", "shortcut.1")),
    (lambda: fm.pad_resnet(20).blocks[3], 4,
     OriginalUnitMatch(("conv1", "conv2"), ("bn1", "bn2"), "pad", pad_stride=2, pad_back=4)),
    (lambda: BasicBlock(8, 16, 2, nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))), 8,
     OriginalUnitMatch(("conv1", "conv2"), ("bn1", "bn2"), "projection", "downsample.0", "downsample.1")),
    (lambda: Bottleneck(16, 4), 16, OriginalUnitMatch(("conv1", "conv2", "conv3"), ("bn1", "bn2", "bn3"), "identity")),
], ids=["relu calls", "bare projection", "akamaster A (lambda)", "akamaster B", "F.pad in forward",
        "torchvision basic", "torchvision bottleneck"])
def test_recognizes_the_ways_original_units_are_written(build, width, expected):
    recognition = recognize(build(), width)
    assert recognition.residual and recognition.match == expected, recognition


# -- torchvision ------------------------------------------------------------------------------------
def _torchvision(depth, **kwargs):
    return getattr(torchvision.models, f"resnet{depth}")(num_classes=10, **kwargs)


def _check_converted(model, units, classes):
    """Converted in place: every unit fused (``classes``: the classes of the modules fused), the very
    tensors in the original order (an optimizer built before keeps working), the original's module
    paths and state_dict keys, strict loads."""
    unconverted = copy.deepcopy(model)
    params, buffers = list(model.parameters()), list(model.buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    state = copy.deepcopy(model.state_dict())
    names = [n for n, _ in model.named_modules()]
    converted, report = convert_to_fused(model, backend="cuda", return_report=True)
    assert converted is model and report.num_fused == report.num_units == units, report.summary()
    fused = _fused_units(model)
    assert len(fused) == units and {_original_class(u) for u in fused} == classes
    assert [n for n, _ in model.named_modules()] == names
    assert [p is q for p, q in zip(model.parameters(), params)] == [True] * len(params)
    assert [b is c for b, c in zip(model.buffers(), buffers)] == [True] * len(buffers)
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
    assert list(model.state_dict()) == list(state)
    unconverted.load_state_dict(model.state_dict(), strict=True)
    model.load_state_dict(state, strict=True)
    return unconverted


@pytest.mark.full
@pytest.mark.parametrize("depth,units,cls", [(18, 8, BasicBlock), (34, 16, BasicBlock), (50, 16, Bottleneck)])
def test_torchvision_resnets_convert_and_compute_the_same_in_float64(depth, units, cls):
    """Every block fused; a training and an eval step as the unconverted net, on the C++ CPU
    kernels (64 px, batch 4: layer4's BNs see 4 x 2 x 2 = 16 values per channel)."""
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    _need("cuda", x)
    model = perturb_bn(_torchvision(depth).double())
    reference = _check_converted(model, units, {cls})
    assert {u.backend for u in _fused_units(model)} == {"cuda"}
    assert_same_step(reference, model, x)
    reference.eval(), model.eval()
    assert_same_step(reference, model, x)


@pytest.mark.full
def test_torchvision_resnet18_on_the_triton_interpreter():
    x = torch.randn(4, 3, 64, 64, dtype=torch.float64)
    _need("triton", x)
    model = perturb_bn(_torchvision(18).double())
    reference = copy.deepcopy(model)
    convert_to_fused(model, backend="triton")
    assert len(_fused_units(model)) == 8
    assert_same_step(reference, model, x)


def test_one_block_of_each_torchvision_form_on_the_triton_interpreter():
    """Basic and bottleneck, identity and downsample (conv + BN), stride on the 3x3: small widths."""
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    _need("triton", x)
    downsample = nn.Sequential(nn.Conv2d(8, 16, 1, 2, bias=False), nn.BatchNorm2d(16))
    model = perturb_bn(nn.Sequential(BasicBlock(8, 8), Bottleneck(8, 4, 2, downsample)).double())
    reference = copy.deepcopy(model)
    convert_to_fused(model, backend="triton")
    assert [_original_class(u) for u in _fused_units(model)] == [BasicBlock, Bottleneck]
    assert_same_step(reference, model, x)


def test_zero_init_residual_converts_and_stays_exact():
    """A torchvision ResNet of one BasicBlock per stage with zero_init_residual=True: each unit's
    last BN weight is 0 (no perturbation here). 16 px, batch 16: layer3 and layer4 run at 1x1,
    their BNs see 16 values per channel. The whole ResNet-18/34/50: the full run."""
    x = torch.randn(16, 3, 16, 16, dtype=torch.float64)
    _need("cuda", x)
    model = ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10, zero_init_residual=True).double()
    assert all(float(block.bn2.weight.detach().abs().max()) == 0 for block in (model.layer1[0], model.layer4[0]))
    reference = _check_converted(model, 4, {BasicBlock})
    assert_same_step(reference, model, x)


def test_resnext_reports_its_blocks_left_eager_with_the_reason():
    model = torchvision.models.resnext50_32x4d()
    with pytest.warns(RuntimeWarning, match=r"0 of 16 residual units fused; left eager: Bottleneck x16: conv2 is a "
                                            r"grouped convolution \(groups=32, as in ResNeXt\)"):
        _, report = convert_to_fused(model, return_report=True)
    assert not _fused_units(model) and report.num_units == 16


def test_dilated_unit_stays_eager_with_the_reason():
    """A bottleneck as torchvision's replace_stride_with_dilation builds it: its 3x3 conv dilates."""
    model = ResNet(BasicBlock, [1, 1, 1, 1])
    model.layer4[0] = Bottleneck(256, 128, 1, nn.Sequential(nn.Conv2d(256, 512, 1, bias=False),
                                                            nn.BatchNorm2d(512)), dilation=2)
    model.fc = nn.Linear(512, 10)
    _, report = convert_to_fused(model, return_report=True)
    assert report.left_eager == {"layer4.0": "conv2 is a dilated convolution (dilation=(2, 2)): the fused kernels "
                                             "do not dilate"}
    assert report.num_fused == 3


# The saved-activation bound of a converted torchvision ResNet-50 (memory="min": at most 0.6x eager) is
# tests/test_original_memory.py::test_torchvision_resnet50_saves_at_most_0_6x_eagers_activations.


# -- CIFAR ports of the original ResNet ------------------------------------------------------------
@pytest.mark.parametrize("build", [lambda: fm.pad_resnet(20), lambda: fm.akamaster_resnet(20, "A"),
                                   lambda: fm.akamaster_resnet(20, "B")],
                         ids=["F.pad in forward", "akamaster option A (lambda, zeros on both sides)",
                              "akamaster option B"])
def test_cifar_ports_convert_and_compute_the_same_in_float64(build):
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64) * 1.5 + 0.3
    _need("cuda", x)
    model = perturb_bn(build().double())
    reference = _check_converted(model, 9, {type(next(m for m in model.modules() if "BasicBlock" in type(m).__name__))})
    assert_same_step(reference, model, x)
    reference.eval(), model.eval()
    assert_same_step(reference, model, x)


def test_option_a_with_zeros_in_front_on_the_triton_interpreter_and_in_a_preact_unit():
    """akamaster's option A (half the zero channels before x's) on the Triton interpreter, and the
    same shortcut in a pre-activation unit (``PadShortcut(front_channels=...)``) on the C++ kernels."""
    x = torch.randn(2, 4, 6, 6, dtype=torch.float64)
    _need("triton", x)
    model = perturb_bn(fm.akamaster_resnet(8, "A").layer2.double())
    reference = copy.deepcopy(model)
    convert_to_fused(model, backend="triton")
    assert model[0]._parts.pad_shortcut.front_channels == 2
    assert_same_step(reference, model, x)

    _need("cuda", x)
    unit = perturb_bn(PreActBlock(4, 8, 2, "A").double())
    unit.pad_shortcut = PadShortcut(4, 8, 2, front_channels=3)
    reference = copy.deepcopy(unit)
    fused = convert_to_fused(unit, backend="cuda")
    assert type(fused) is FusedPreActBlock and fused.pad_shortcut is unit.pad_shortcut
    assert_same_step(reference, fused, torch.randn(4, 4, 6, 6, dtype=torch.float64))
    with pytest.raises(ValueError, match="front_channels must be an int in \\[0, 4\\]"):
        PadShortcut(4, 8, 2, front_channels=5)


# -- this project's original nets --------------------------------------------------------------------
@pytest.mark.parametrize("build,size,eager_class,fused_class", [
    (lambda: models.cifar_resnet(8, activation="original", projection="A"), 8, OriginalBlock, FusedOriginalBlock),
    (lambda: models.cifar_resnet(11, bottleneck=True, activation="original"), 8, OriginalBottleneck,
     FusedOriginalBottleneck),
], ids=["cifar basic A", "cifar bottleneck B"])
def test_own_original_nets_build_units_that_convert_by_class(build, size, eager_class, fused_class):
    model = perturb_bn(build().double())
    assert {type(u) for u in model.units()} == {eager_class}
    reference = copy.deepcopy(model)
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    backend = "cuda" if dispatch.unavailable_reason("cuda", x) is None else "eager"
    assert convert_to_fused(model, backend=backend) is model
    assert {type(u) for u in model.units()} == {fused_class}
    assert_same_step(reference, model, x)
    reference.load_state_dict(model.state_dict(), strict=True)

