"""Models: the paper's layout, parameter counts, presets, every variant in a net."""
import itertools

import pytest
import torch

from fused_preact import models
from fused_preact.models import MODELS, cifar_resnet, create_model, imagenet_resnet
from fused_preact.units import PreActBlock, PreActBottleneck
from fused_preact.variants import ACTIVATIONS, SHORTCUTS


def count(model):
    return sum(p.numel() for p in model.parameters())


def test_parameter_counts_match_the_paper():
    # the paper rounds these to 1.7M and 10.2M; exact values follow its public code
    assert count(models.cifar_resnet164()) == 1_703_258
    assert count(models.cifar_resnet1001()) == 10_327_706


def test_cifar_layout_follows_the_paper_code():
    net = models.cifar_resnet164()
    assert net.stem[0].kernel_size == (3, 3) and net.stem[0].out_channels == 16 and len(net.stem) == 1
    units = net.units()
    assert len(units) == 54 and all(type(u) is PreActBottleneck for u in units)
    first = units[0]   # stage 1 of the bottleneck nets changes shape: 16 -> 64, shared BN-ReLU
    assert (first.in_channels, first.out_channels, first.stride) == (16, 64, 1)
    assert first.shortcut is not None and first.shares_preact
    assert all(u.shortcut is None for u in units[1:18])
    assert [u.stride for u in (units[18], units[36])] == [2, 2]
    assert net.norm.num_features == 256 and net.fc.in_features == 256


def test_basic_cifar_nets_offer_options_a_and_b():
    a, b = models.cifar_resnet110(projection="A"), models.cifar_resnet110(projection="B")
    assert count(b) - count(a) == 16 * 32 + 32 * 64
    assert all(u.shortcut is None for u in a.units())


# by default each builder once (CIFAR basic and bottleneck, 1-layer skips, ImageNet basic and bottleneck);
# the deeper presets of the same builders with --full
@pytest.mark.default_cases(keep=lambda params: params["name"] in {"cifar_resnet20", "cifar_resnet164",
                                                                  "cifar_resnet110_1layer", "imagenet_resnet18",
                                                                  "imagenet_resnet50"})
@pytest.mark.parametrize("name", [n for n in MODELS if n != "cifar_resnet1001"])
def test_presets_run(name):
    net = create_model(name, num_classes=7)
    size = 32 if name.startswith("cifar") else 64
    with torch.no_grad():
        assert net(torch.randn(2, 3, size, size)).shape == (2, 7)


@pytest.mark.slow
@pytest.mark.full   # the 1001-layer net (about 10 s here); the builder's other depths run by default
def test_resnet1001_trains_one_step():
    net = models.cifar_resnet1001(num_classes=100)
    out = net(torch.randn(2, 3, 16, 16))
    out.sum().backward()
    assert out.shape == (2, 100) and net.stem[0].weight.grad is not None


@pytest.mark.default_cases(keep=lambda params: params["depth"] in (18, 50, 200))   # basic, bottleneck, timm's
@pytest.mark.parametrize("depth", [18, 34, 50, 101, 152, 200])
def test_imagenet_parameter_counts_match_timm(depth):
    timm = pytest.importorskip("timm")
    ours = count(imagenet_resnet(depth))
    if depth == 200:   # timm registers no resnetv2_200: build its ResNetV2 with the same stages
        from timm.layers import BatchNormAct2d, create_conv2d
        from timm.models.resnetv2 import ResNetV2
        theirs = ResNetV2(layers=[3, 24, 36, 3], conv_layer=create_conv2d, norm_layer=BatchNormAct2d)
    else:
        theirs = timm.create_model(f"resnetv2_{depth}")
    assert ours == count(theirs)


# each (activation, shortcut) once by default, basic and bottleneck nets in turn; both with --full
@pytest.mark.default_cases(keep=lambda params: (ACTIVATIONS.index(params["activation"]) * len(SHORTCUTS)
                                                + SHORTCUTS.index(params["shortcut"])) % 2 == params["bottleneck"])
@pytest.mark.parametrize("activation,shortcut", list(itertools.product(ACTIVATIONS, SHORTCUTS)))
@pytest.mark.parametrize("bottleneck", [False, True])
def test_every_variant_builds_a_trainable_net(activation, shortcut, bottleneck):
    depth = 11 if bottleneck else 8
    net = cifar_resnet(depth, 10, bottleneck=bottleneck, activation=activation, shortcut=shortcut).double()
    x = torch.randn(2, 3, 12, 12, dtype=torch.float64)
    out = net(x)
    assert out.shape == (2, 10)
    out.logsumexp(1).sum().backward()
    assert all(p.grad is not None for p in net.parameters())
    assert (net.norm is not None) == (activation in ("relu_only_preact", "full_preact"))


def test_initialization_follows_the_paper():
    net = models.cifar_resnet56()
    conv = net.units()[10].conv1
    fan_out = conv.out_channels * 9
    assert abs(conv.weight.std().item() / (2 / fan_out) ** 0.5 - 1) < 0.1
    assert all(m.bias is None for m in net.modules() if isinstance(m, torch.nn.Conv2d))
    bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.all(m.weight == 1) and torch.all(m.bias == 0) for m in bns)
    assert torch.all(net.fc.bias == 0)
    gated = cifar_resnet(8, shortcut="exclusive_gating", gate_bias=-6.0)
    assert all(torch.all(u.gate.bias == -6.0) for u in gated.units())


@pytest.mark.parametrize("builder,depth,match", [
    (lambda d: cifar_resnet(d), 21, "6n\\+2"),
    (lambda d: cifar_resnet(d, bottleneck=True), 57, "9n\\+2"),
    (lambda d: cifar_resnet(d), "20", "depth"),
    (imagenet_resnet, 42, "depth"),
])
def test_invalid_depth_is_rejected(builder, depth, match):
    with pytest.raises(ValueError, match=match):
        builder(depth)


def test_model_rejects_bad_input():
    with pytest.raises(ValueError, match=r"x must be an image batch of shape \(N, 3, H, W\)"):
        models.cifar_resnet20()(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match="name must be one of"):
        create_model("resnet7")
    assert count(create_model("cifar_resnet11_bottleneck")) > 0
    assert type(create_model("cifar_resnet20").units()[0]) is PreActBlock
