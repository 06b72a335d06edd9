"""convert_to_fused on this project's models and on timm's resnetv2."""
import copy
import warnings

import pytest
import torch

from comparisons import assert_same_step

from fused_preact import convert_to_fused, dispatch, models
from fused_preact.converted import ConvertedUnit
from fused_preact.fused import FusedPreActBlock, FusedPreActBottleneck
from fused_preact.variants import VariantUnit


def _run(model, x, seed=0):
    """Output, input gradient and parameter gradients of a training step's backward."""
    x = x.detach().clone().requires_grad_()
    model.zero_grad(set_to_none=True)
    y = model(x)
    y.backward(torch.ones_like(y) + torch.arange(y.shape[-1], dtype=y.dtype) / 10)
    return y.detach(), x.grad, [p.grad.clone() for p in model.parameters()]


def _assert_same_training_step(before, after, x):
    y0, dx0, g0 = _run(before, x)
    y1, dx1, g1 = _run(after, x)
    torch.testing.assert_close(y1, y0, rtol=0, atol=0)
    torch.testing.assert_close(dx1, dx0, rtol=0, atol=0)
    assert len(g0) == len(g1)
    for grad1, grad0 in zip(g1, g0):   # same parameters in the same order
        torch.testing.assert_close(grad1, grad0, rtol=0, atol=0)
    for (name, b0), b1 in zip(before.state_dict().items(), after.state_dict().values()):
        torch.testing.assert_close(b1, b0, rtol=0, atol=0, msg=name)


# the ImageNet layout with --full (about 15 s here); its units are the CIFAR nets' classes
@pytest.mark.parametrize("builder,size", [(models.cifar_resnet20, 16), (models.cifar_resnet164, 16),
                                          pytest.param(lambda: models.imagenet_resnet50(num_classes=5), 64,
                                                       marks=pytest.mark.full, id="imagenet_resnet50")])
def test_converts_own_models_in_place(builder, size):
    model = builder().double()
    params_before = list(model.parameters())
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert convert_to_fused(model, backend="eager") is model
        units = model.units()
        assert units and all(isinstance(u, (FusedPreActBlock, FusedPreActBottleneck)) for u in units)
        assert all(a is b for a, b in zip(model.parameters(), params_before))   # optimizers stay valid
        _assert_same_training_step(reference, model, torch.randn(2, 3, size, size, dtype=torch.float64))


@pytest.mark.parametrize("activation,reason", [
    ("relu_before_add", "VariantUnit x7: its residual branch ends in a ReLU, not a convolution"),
    # BN and ReLU after the addition (Fig. 4(b)): residual units too, counted ("0 of 9", not "0 of 0")
    ("bn_after_add", "VariantUnit x9: its output is a ReLU of bn_add of the residual sum, not the sum itself"),
])
def test_other_variants_are_left_alone(activation, reason):
    model = models.cifar_resnet20(activation=activation)
    with pytest.warns(RuntimeWarning, match=rf"0 of 9 residual units fused; left eager: {reason}"):
        _, report = convert_to_fused(model, return_report=True)
    assert all(type(u) is VariantUnit for u in model.units())
    assert report.num_units == 9 and not report.fused


# resnetv2_50 with --full (its bottleneck units also run in test_convert_keeps_model.py, at small widths)
@pytest.mark.parametrize("name", [pytest.param("resnetv2_50", marks=pytest.mark.full), "resnetv2_18"])
def test_converts_timm_resnetv2(name):
    """timm's units, fused on the C++ CPU kernels (the eager path where the extension is not built)."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, num_classes=10).double()
    reference = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    params_before = list(model.parameters())
    names = [n for n, _ in model.named_modules()]
    backend = "cuda" if dispatch.unavailable_reason("cuda", torch.zeros(1, dtype=torch.float64)) is None else "eager"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rng = torch.get_rng_state()
        convert_to_fused(model, backend=backend)
        assert torch.equal(torch.get_rng_state(), rng)        # converting draws no random numbers
        fused = [m for m in model.modules() if isinstance(m, ConvertedUnit)]
        assert len(fused) == (16 if name == "resnetv2_50" else 8)
        assert {u.original_class.__name__ for u in fused} == {"PreActBottleneck" if name == "resnetv2_50"
                                                              else "PreActBasic"}
        assert [n for n, _ in model.named_modules()] == names  # timm's module paths
        assert list(model.state_dict()) == list(state)      # timm's key names and order
        model.load_state_dict(state, strict=True)            # timm checkpoints still load
        assert all(a is b for a, b in zip(model.parameters(), params_before))
        assert_same_step(reference, model, torch.randn(2, 3, 64, 64, dtype=torch.float64))


def test_timm_units_that_compute_something_else_stay_eager():
    pytest.importorskip("timm")
    from timm.layers import BatchNormAct2d, create_conv2d
    from timm.models.resnetv2 import DownsampleConv, PreActBottleneck
    gn_unit = PreActBottleneck(128, 128)   # timm's defaults: weight-standardized convs, group norm
    bn_unit = PreActBottleneck(128, 256, stride=2, conv_layer=create_conv2d, norm_layer=BatchNormAct2d,
                               proj_layer=DownsampleConv)
    model = torch.nn.Sequential(gn_unit, bn_unit)
    with pytest.warns(RuntimeWarning, match=r"1 of 2 residual units fused.*left eager: PreActBottleneck x1: "
                                             r"conv1 is a StdConv2d"):
        _, report = convert_to_fused(model, return_report=True)
    assert report.fused == ["1"] and list(report.left_eager) == ["0"]
    assert model[0] is gn_unit and isinstance(model[1], ConvertedUnit) and model[1].original_class is PreActBottleneck
    assert model[1].conv2.stride == (2, 2) and model[1]._parts.shortcut == "downsample.conv"


def test_convert_rejects_bad_arguments():
    with pytest.raises(ValueError, match="backend"):
        convert_to_fused(models.cifar_resnet20(), backend="fast")
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        convert_to_fused("resnet")


@pytest.mark.parametrize("name,unit_class,count,reason", [
    ("resnet50_gn", "Bottleneck", 16, "its residual branch ends in aten.native_group_norm"),
    ("skresnet18", "SelectiveKernelBasic", 8, "conv2.conv takes aten.sum"),
])
def test_the_report_counts_every_residual_unit(name, unit_class, count, reason):
    """M counts residual units of any normalization and any branch (timm's GroupNorm and
    selective-kernel ResNets, whose first conv takes half of the input's channels), left eager
    with the reason: "0 of 16", not "0 of 0"."""
    timm = pytest.importorskip("timm")
    model = timm.create_model(name, num_classes=10)
    with pytest.warns(RuntimeWarning, match=rf"0 of {count} residual units fused; left eager: "
                                            rf"{unit_class} x{count}: {reason}"):
        _, report = convert_to_fused(model, return_report=True)
    assert report.num_units == count and not report.fused
