"""A converted model is still the user's model: the same module paths, parameter and buffer names
and tensors; ``get_submodule`` / ``get_parameter`` / ``torch.func.functional_call`` with the
original names; ``to_eager`` back to the very modules; re-conversion checked; ``affine=False`` and
``track_running_stats=False`` BatchNorms fused and exact; what ``backend="eager"`` reports.

Float64 against the unconverted model on the C++ CPU kernels (``backend="cuda"`` on CPU tensors),
relative to the largest magnitude of each tensor: 1e-10.
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.func import functional_call

import foreign_models as fm
from comparisons import assert_same_step, perturb_bn, relative_error
from fused_preact import convert, convert_to_fused, dispatch, models, to_eager
from fused_preact.converted import ConvertedUnit
from fused_preact.fused import FusedOriginalBottleneck, FusedPreActBlock, _FusedUnitMixin
from fused_preact.units import OriginalBottleneck, PreActBlock

torchvision = pytest.importorskip("torchvision")


def _need_cpp():
    reason = dispatch.unavailable_reason("cuda", torch.zeros(1, dtype=torch.float64))
    if reason is not None:
        pytest.skip(reason)


def _small_timm_resnetv2():
    """timm's resnetv2_50 layout (bottleneck units, BN-act layers) at small widths and depths."""
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import ResNetV2
    return ResNetV2(layers=[2, 1], channels=(32, 64), num_classes=5, conv_layer=create_conv2d,
                    norm_layer=BatchNormAct2d, stem_chs=8)


def _pytorchcv_preresnet8():
    pytest.importorskip("pytorchcv")
    from pytorchcv.models.preresnet_cifar import get_preresnet_cifar
    model = get_preresnet_cifar(num_classes=10, blocks=8, bottleneck=False)
    model.features.final_pool = nn.AdaptiveAvgPool2d(1)
    return model


# name, builder, input (batch, size, training): in training every BN sees at least 16 values per channel;
# torchvision's nets in eval mode by default (their float64 training step at 64 px: about 20 s here)
MODELS = [
    ("torchvision resnet18", lambda: torchvision.models.resnet18(num_classes=10), (2, 32, False)),
    pytest.param("torchvision resnet18 training", lambda: torchvision.models.resnet18(num_classes=10), (4, 64, True),
                 marks=pytest.mark.full, id="torchvision resnet18 training"),
    pytest.param("torchvision resnet50", lambda: torchvision.models.resnet50(num_classes=10), (4, 64, True),
                 marks=pytest.mark.full, id="torchvision resnet50"),
    ("pytorchcv preresnet8", _pytorchcv_preresnet8, (4, 8, True)),
    ("timm resnetv2", _small_timm_resnetv2, (4, 32, True)),
    ("kuangliu, nn.Sequential shortcut", lambda: fm.kuangliu_preact_resnet18(widths=(4, 8), num_blocks=(2, 1)),
     (4, 8, True)),
]
MODEL_IDS = [m[0] if isinstance(m, tuple) else m.id for m in MODELS]


def _names(model):
    return ([n for n, _ in model.named_parameters()], [n for n, _ in model.named_buffers()],
            [n for n, _ in model.named_modules()])


@pytest.mark.parametrize("name,build,shape", MODELS, ids=MODEL_IDS)
def test_converted_model_keeps_names_paths_and_functional_call(name, build, shape):
    _need_cpp()
    model = perturb_bn(build().double())
    reference = copy.deepcopy(model)
    names = _names(model)
    modules = dict(model.named_modules())
    parameters = dict(model.named_parameters())
    convert_to_fused(model, backend="cuda")
    fused_paths = {path for path, m in model.named_modules() if isinstance(m, _FusedUnitMixin)}
    assert fused_paths, "nothing was fused"
    assert _names(model) == names
    for path, module in modules.items():              # every original path: the very module, but the units
        found = model.get_submodule(path)
        assert found is module or (path in fused_paths and isinstance(found, ConvertedUnit)
                                   and found.eager_module() is module), path
    assert all(model.get_parameter(n) is p for n, p in parameters.items())

    # functional_call with the original names (training: batch statistics, running updates): the
    # fused kernels read the tensors passed in
    batch, size, training = shape
    model.train(training), reference.train(training)
    x = torch.randn(batch, 3, size, size, dtype=torch.float64)
    tensors = {n: t.detach().clone() * (1.1 if t.is_floating_point() else 1)
               for n, t in list(reference.named_parameters()) + list(reference.named_buffers())}
    params = {n: tensors[n].requires_grad_() for n, _ in reference.named_parameters()}
    results = []
    for net in (reference, model):
        state = {**{n: t.clone() for n, t in tensors.items()}, **params}
        y = functional_call(net, state, (x,))
        grads = torch.autograd.grad(y.square().sum(), list(params.values()))
        results.append((y, grads, {n: state[n] for n, _ in reference.named_buffers()}))
    (y0, g0, b0), (y1, g1, b1) = results
    assert relative_error(y1, y0) <= 1e-10
    for n, a, b in zip(params, g1, g0):
        assert relative_error(a, b) <= 1e-10, n
    for n in b0:
        assert relative_error(b1[n], b0[n]) <= 1e-10, n


def test_functional_call_runs_the_fused_kernels(monkeypatch):
    """The kernels, not the eager fallback, ran functional_call's tensors (counted)."""
    _need_cpp()
    calls = []
    real = dispatch.run_unit
    monkeypatch.setattr(dispatch, "run_unit", lambda *args: calls.append(args[0]) or real(*args))
    model = convert_to_fused(fm.kuangliu_preact_resnet18(widths=(4, 8), num_blocks=(2, 1)).double(), "cuda")
    calls.clear()                                   # the conversion's float64 checks ran kernels too
    params = {n: p.detach() * 2 for n, p in model.named_parameters()}
    functional_call(model, params, (torch.randn(2, 3, 8, 8, dtype=torch.float64),))
    assert calls == ["cuda"] * 3


def test_state_travels_with_the_unit_and_reads_through_to_the_original():
    """A converted unit shares its original's dictionaries: a submodule replaced on either is
    replaced on both; .to(), train(), deepcopy and attributes of the original stay consistent."""
    block = torchvision.models.resnet.BasicBlock(
        4, 8, 2, nn.Sequential(nn.Conv2d(4, 8, 1, 2, bias=False), nn.BatchNorm2d(8)))
    fused = convert_to_fused(block, backend="eager")
    assert isinstance(fused, ConvertedUnit) and fused.original_class is type(block)
    assert fused.stride == 2 and fused.expansion == 1            # the original's own attributes
    assert fused.downsample[0] is block.downsample[0]
    fused.downsample[1] = nn.BatchNorm2d(8)
    assert block.downsample[1] is fused.downsample[1]
    fused.double().eval()
    assert block.conv1.weight.dtype == torch.float64 and not block.training
    clone = copy.deepcopy(fused)
    assert clone.eager_module()._modules is clone._modules and clone.conv1 is not fused.conv1
    assert "fused BasicBlock: original basic, stride 2, projection downsample.0 + downsample.1" in repr(fused)


@pytest.mark.parametrize("build,size", [
    pytest.param(lambda: torchvision.models.resnet.ResNet(torchvision.models.resnet.BasicBlock, [1, 1, 1, 1],
                                                          num_classes=5), 32, marks=pytest.mark.full, id="torchvision"),
    pytest.param(lambda: models.cifar_resnet(8, num_classes=5), 8, id="own units"),
    pytest.param(lambda: fm.kuangliu_preact_resnet18(widths=(4, 8), num_blocks=(2, 1)), 8, id="kuangliu"),
])
def test_to_eager_gives_back_the_model(build, size):
    """to_eager(convert_to_fused(m)) is m again: the same module classes at the same paths, the
    same tensors, float64 outputs and gradients; and it converts again."""
    model = perturb_bn(build().double())
    reference = copy.deepcopy(model)
    classes = {n: type(m) for n, m in model.named_modules()}
    tensors = list(model.parameters()) + list(model.buffers())
    state = model.state_dict()
    backend = "cuda" if dispatch.unavailable_reason("cuda", torch.zeros(1, dtype=torch.float64)) is None else "eager"
    assert to_eager(convert_to_fused(model, backend=backend)) is model
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert all(a is b for a, b in zip(list(model.parameters()) + list(model.buffers()), tensors))
    assert list(model.state_dict()) == list(state)
    assert not any(isinstance(m, _FusedUnitMixin) for m in model.modules())
    x = torch.randn(16, 3, size, size, dtype=torch.float64)
    assert_same_step(reference, model, x, tolerance=0)
    _, report = convert_to_fused(model, backend=backend, return_report=True)
    assert report.num_fused == report.num_units > 0


def test_to_eager_of_a_unit_built_fused():
    unit = FusedPreActBlock(4, 8, 2, backend="eager")
    eager = to_eager(unit)
    assert type(eager) is PreActBlock and eager.conv1 is unit.conv1 and not hasattr(eager, "backend")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        to_eager("model")


def test_reconversion_is_checked_like_a_first_conversion(monkeypatch):
    """Converting a converted model again (another memory mode) runs the float64 guard for each
    configuration again; a unit that fails it goes back to its eager module, named in the report."""
    model = fm.kuangliu_preact_resnet18(widths=(4, 8), num_blocks=(2, 1))   # 3 units, 2 configurations
    convert_to_fused(model, backend="eager")
    first = model.layer1[0]
    runs = []
    real = convert.check_replacement
    monkeypatch.setattr(convert, "check_replacement", lambda *a, **k: runs.append(1) or real(*a, **k))
    _, report = convert_to_fused(model, backend="eager", memory="min", return_report=True)
    assert len(runs) == 2 and report.num_fused == 3 and model.layer1[0] is first and first.memory == "min"
    monkeypatch.setattr(convert, "check_replacement", lambda *a, **k: "the fused unit's output differs (test)")
    with pytest.warns(RuntimeWarning, match=r"0 of 3 residual units fused; left eager: KLPreActBlock x3: the fused "
                                            r"unit's output differs \(test\)"):
        convert_to_fused(model, backend="eager")
    assert type(model.layer1[0]) is fm.KLPreActBlock


def test_backend_eager_reports_what_runs(caplog):
    import logging
    with caplog.at_level(logging.INFO, logger="fused_preact.convert"):
        _, report = convert_to_fused(models.cifar_resnet(8), backend="eager", return_report=True)
    assert report.summary().startswith("convert_to_fused: 3 of 3 residual units fused with backend='eager': they "
                                       "run their eager PyTorch computation, no fused kernel")


@pytest.mark.default_cases(ids=["affine=False"])
@pytest.mark.parametrize("bn", [dict(affine=False), dict(track_running_stats=False),
                                dict(affine=False, track_running_stats=False, momentum=None)],
                         ids=["affine=False", "track_running_stats=False", "neither, momentum=None"])
def test_batchnorms_without_affine_or_running_stats_run_fused_and_exact(bn, monkeypatch):
    """Own units given such BNs, and a foreign unit built with them (recognized and converted):
    the fused kernels run them (weight 1 and bias 0 for affine=False), training and eval."""
    _need_cpp()
    calls = []
    real = dispatch.run_unit
    monkeypatch.setattr(dispatch, "run_unit", lambda *args: calls.append(args[0]) or real(*args))
    own = perturb_bn(FusedOriginalBottleneck(8, 16, 2, backend="cuda").double())
    for name in ("bn1", "bn2", "bn3", "shortcut_bn"):
        setattr(own, name, perturb_bn(nn.BatchNorm2d(getattr(own, name).num_features, **bn).double()))
    reference = copy.deepcopy(own).eager_module()
    assert type(reference) is OriginalBottleneck
    foreign = fm.KLPreActBlock(8, 16, 2)
    for name in ("bn1", "bn2"):
        setattr(foreign, name, nn.BatchNorm2d(getattr(foreign, name).num_features, **bn))
    foreign = perturb_bn(foreign.double())
    foreign_reference = copy.deepcopy(foreign)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        foreign = convert_to_fused(foreign, backend="cuda")
    assert isinstance(foreign, ConvertedUnit)
    calls.clear()                                   # the conversion's float64 checks ran kernels too
    x = torch.randn(4, 8, 7, 7, dtype=torch.float64)
    for training in (True, False):
        for pair in ((reference, own), (foreign_reference, foreign)):
            for m in pair:
                m.train(training)
            assert_same_step(*pair, x)
    assert calls == ["cuda"] * 4
