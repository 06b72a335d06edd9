"""convert_to_fused on pytorchcv's pre-activation nets (the real package, pytorchcv==0.0.74 in
requirements.txt): every ``PreResUnit`` fused, exactly; the units that are no plain
pre-activation unit (SE-PreResNet, PyramidNet) stay eager with their reasons and counted.

pytorchcv nests a unit's modules (``PreResUnit`` -> ``body`` -> ``conv1`` (``PreConvBlock``: bn,
activ, conv) ..., ``identity_conv`` beside ``body``) and its body returns ``(x, x_pre_activ)``;
the unit's recorded computation, input to residual sum, is what is matched.

Float64 throughout, against the unconverted model, relative to each tensor's largest magnitude:
1e-10. The nets' fixed-size final ``AvgPool2d`` is swapped for a global one so the small inputs
used here (CIFAR nets at 8 px, ImageNet nets at 64 px: 2 x 2 in the last stage) reach the head;
batch 4, so every BN normalizes >= 16 values per channel.
"""
import copy
import re

import pytest
import torch
from torch import nn

pytest.importorskip("pytorchcv", reason="pytorchcv is a test dependency (requirements.txt)")
from pytorchcv.models.preresnet import PreResUnit, get_preresnet, preresnet18_wd4  # noqa: E402
from pytorchcv.models.preresnet_cifar import (get_preresnet_cifar, preresnet20_cifar10,  # noqa: E402
                                              preresnet56_cifar10, preresnet164bn_cifar10)
from pytorchcv.models.pyramidnet_cifar import get_pyramidnet_cifar  # noqa: E402
from pytorchcv.models.sepreresnet_cifar import sepreresnet20_cifar10  # noqa: E402
from pytorchcv.models.wrn_cifar import get_wrn_cifar  # noqa: E402

from comparisons import assert_same_step, perturb_bn  # noqa: E402
from fused_preact import convert_to_fused, dispatch  # noqa: E402
from fused_preact.converted import ConvertedUnit  # noqa: E402
from fused_preact.fused import _FusedUnitMixin  # noqa: E402
from fused_preact.recognize import UnitMatch, recognize  # noqa: E402

BATCH = 4

# name, builder, input size, branch convs of its units (2: basic, 3: bottleneck)
NETS = [
    ("preresnet20_cifar10", preresnet20_cifar10, 8, 2),
    ("preresnet56_cifar10", preresnet56_cifar10, 8, 2),
    ("preresnet164bn_cifar10", preresnet164bn_cifar10, 8, 3),
    ("preresnet18_wd4", preresnet18_wd4, 64, 2),
    ("preresnet50 width/8", lambda: get_preresnet(blocks=50, width_scale=0.125), 64, 3),
    ("wrn16_2_cifar10", lambda: get_wrn_cifar(num_classes=10, blocks=16, width_factor=2), 8, 2),
]
NET_IDS = [n[0] for n in NETS]


def _net(build):
    model = build()
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    return perturb_bn(model.double())


def _units(model, class_name):
    return [path for path, m in model.named_modules() if type(m).__name__ == class_name]


def _fused_units(model):
    return [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]


def _converted(build, backend, x):
    """(unconverted reference, converted model, its report), every PreResUnit checked fused, after a
    momentum step of an optimizer built before the conversion (its state must stay usable)."""
    model = _net(build)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    model(x).square().mean().backward()
    optimizer.step()
    model.zero_grad(set_to_none=True)
    reference = copy.deepcopy(model)
    units = _units(model, "PreResUnit")
    params, buffers = list(model.parameters()), list(model.buffers())
    keys = list(model.state_dict())
    converted, report = convert_to_fused(model, backend=backend, return_report=True)
    assert converted is model
    assert units and report.fused == units and report.num_units == len(units), report.summary()
    assert f"{len(units)} of {len(units)} residual units fused" in report.summary()
    assert len(_fused_units(model)) == len(units) and not _units(model, "PreResUnit")
    # the very tensors, in the original order (an optimizer built before keeps working)
    assert [id(p) for p in model.parameters()] == [id(p) for p in params]
    assert [id(b) for b in model.buffers()] == [id(b) for b in buffers]
    assert all(p in optimizer.state and "momentum_buffer" in optimizer.state[p] for p in model.parameters())
    # state_dict: the same keys in the same order; loads strictly into a fresh unconverted net
    assert list(model.state_dict()) == keys
    fresh = build()
    fresh.features.final_pool = nn.AdaptiveAvgPool2d(1)
    fresh.double().load_state_dict(model.state_dict(), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), reference.state_dict().values()))
    return reference, model, report


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


# by default one net of each structure (CIFAR basic, CIFAR bottleneck with BN shortcut, ImageNet, WRN);
# the deeper CIFAR net and the bottleneck ImageNet net with --full
@pytest.mark.default_cases(ids=["preresnet20_cifar10", "preresnet164bn_cifar10", "preresnet18_wd4", "wrn16_2_cifar10"])
@pytest.mark.parametrize("name,build,size,num_convs", NETS, ids=NET_IDS)
def test_every_preres_unit_fused_and_exact_on_the_cpp_cpu_kernels(name, build, size, num_convs, one_cpu_thread):
    """backend="cuda" on CPU tensors runs the extension's C++ CPU kernels; training then eval."""
    x = torch.randn(BATCH, 3, size, size, dtype=torch.float64) * 1.5 + 0.3
    _need("cuda", x)
    reference, model, _ = _converted(build, "cuda", x)
    assert all(type(u) is ConvertedUnit and u.num_convs == num_convs for u in _fused_units(model))
    for training in (True, False):
        reference.train(training), model.train(training)
        assert_same_step(reference, model, x)


# the interpreter costs ~0.1 s per program instance: by default a PreResNet-8 (one unit per stage:
# an identity and two projection units), the named nets in the full run
TRITON_NETS = [pytest.param("preresnet8_cifar10", lambda: get_preresnet_cifar(num_classes=10, blocks=8,
                                                                             bottleneck=False),
                             8, 2, marks=pytest.mark.full, id="preresnet8_cifar10")]
TRITON_NETS += [pytest.param(*n, marks=pytest.mark.full, id=n[0]) for n in NETS
                if n[0] in ("preresnet20_cifar10", "preresnet164bn_cifar10", "wrn16_2_cifar10")]


@pytest.mark.parametrize("name,build,size,num_convs", TRITON_NETS)
def test_fused_and_exact_on_the_triton_interpreter(name, build, size, num_convs, one_cpu_thread):
    """backend="triton" on the CPU runs Triton's interpreter; training then eval."""
    x = torch.randn(BATCH, 3, size, size, dtype=torch.float64) * 1.5 + 0.3
    _need("triton", x)
    reference, model, _ = _converted(build, "triton", x)
    for training in (True, False):
        reference.train(training), model.train(training)
        assert_same_step(reference, model, x)


@pytest.mark.parametrize("build,unit_class,reason", [
    (sepreresnet20_cifar10, "SEPreResUnit",
     "its residual branch ends in aten.mul of two computed tensors (a gate or squeeze-excitation scale)"),
    (lambda: get_pyramidnet_cifar(num_classes=10, blocks=14, alpha=48, bottleneck=False), "PyrUnit",
     "its residual branch ends in a BatchNorm (bn)"),
], ids=["sepreresnet20", "pyramidnet14_a48"])
def test_units_that_are_no_plain_preact_unit_stay_eager_counted_and_exact(build, unit_class, reason):
    """Every unit counted ("0 of N", never "found no residual unit"), one reason per class with
    its count, and the model computes exactly what it did."""
    model = _net(build)
    reference = copy.deepcopy(model)
    n = len(_units(model, unit_class))
    with pytest.warns(RuntimeWarning, match=rf"0 of {n} residual units fused; left eager: {unit_class} x{n}: "
                                            + re.escape(reason)) as record:
        _, report = convert_to_fused(model, return_report=True)
    assert n and report.num_units == n and report.num_fused == 0
    assert report.reasons_by_class() == {unit_class: {report.left_eager[_units(model, unit_class)[0]]: n}}
    assert not any("found no residual unit" in str(w.message) for w in record)
    x = torch.randn(BATCH, 3, 8, 8, dtype=torch.float64)
    assert torch.equal(model(x), reference(x))


def test_preres_unit_is_matched_through_its_tuple_returning_body():
    """The unit is the smallest module computing input -> residual sum: its body returns
    ``(x, x_pre_activ)`` (no residual unit), the stage around it only contains it."""
    unit = PreResUnit(8, 16, stride=2, bottleneck=False)
    assert recognize(unit, 8).match == UnitMatch(
        bns=("body.conv1.bn", "body.conv2.bn"), convs=("body.conv1.conv", "body.conv2.conv"),
        shortcut="projection", shortcut_conv="identity_conv")
    body = recognize(unit.body, 8)
    assert not body.residual and body.reason == "its output is a tuple of tensors, not one residual sum"
    stage = recognize(nn.Sequential(PreResUnit(8, 8, stride=1, bottleneck=True)), 8)
    assert stage.residual and stage.inner == "0" and stage.match is None
