"""Table 3's "ResNet-110 (1layer skip)": single-conv units against a float64 functional
reference (outputs, gradients, running statistics) and the parameter counts of the nets."""
import pytest
import torch
import torch.nn.functional as F

from fused_preact.convert import convert_to_fused
from fused_preact.models import cifar_resnet110, cifar_resnet110_1layer, cifar_resnet_1layer, create_model
from fused_preact.variants import SingleConvUnit, make_unit


@pytest.mark.parametrize("activation", ["original", "full_preact"])
@pytest.mark.parametrize("shape", [(16, 16, 1, "B"), (6, 10, 2, "A"), (6, 10, 2, "B")])
def test_unit_matches_the_formula_in_float64(activation, shape):
    cin, cout, stride, projection = shape
    torch.manual_seed(0)
    unit = make_unit(cin, cout, stride, activation=activation, projection=projection, single_conv=True).double()
    assert isinstance(unit, SingleConvUnit) and unit.num_convs == 1
    for p in unit.parameters():              # not the trivial BN init
        p.data.normal_(0.2, 1.0)
    ref = {k: v.clone() for k, v in unit.state_dict().items()}
    x = torch.randn(5, cin, 9, 7, dtype=torch.float64, requires_grad=True)   # odd sizes, >= 16 values per channel
    y = unit(x)
    y.square().sum().backward()

    # the same computation, written out, on copies of the parameters and BN state
    xr = x.detach().clone().requires_grad_(True)
    params = {k: v.clone().requires_grad_(v.is_floating_point() and "running" not in k and "num_batches" not in k)
              for k, v in ref.items()}

    def bn(name, t):
        return F.batch_norm(t, params[f"{name}.running_mean"], params[f"{name}.running_var"],
                            params[f"{name}.weight"], params[f"{name}.bias"], training=True, momentum=0.1)

    def conv(t):
        return F.conv2d(t, params["conv1.weight"], stride=stride, padding=1)

    changes = stride != 1 or cin != cout
    if activation == "full_preact":
        a = F.relu(bn("bn1", xr))
        if changes and projection == "B":
            s = F.conv2d(a, params["shortcut.weight"], stride=stride)
        elif changes:
            s = F.pad(xr[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, cout - cin))
        else:
            s = xr
        expected = s + conv(a)
    else:
        if changes and projection == "B":
            s = bn("shortcut_bn", F.conv2d(xr, params["shortcut.weight"], stride=stride))
        elif changes:
            s = F.pad(xr[:, :, ::stride, ::stride], (0, 0, 0, 0, 0, cout - cin))
        else:
            s = xr
        expected = F.relu(s + bn("bn1", conv(xr)))
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    expected.square().sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-10)
    named = dict(unit.named_parameters())
    for k, p in params.items():
        if k in named:
            torch.testing.assert_close(named[k].grad, p.grad, rtol=1e-10, atol=1e-10)
        elif "running" in k:
            torch.testing.assert_close(unit.state_dict()[k], p, rtol=1e-12, atol=1e-12)


def _conv_params(cin, cout, k=3):
    return cin * cout * k * k


@pytest.mark.parametrize("activation", ["original", "full_preact"])
def test_resnet110_1layer_layout_and_parameter_count(activation):
    net = cifar_resnet110_1layer(activation=activation, projection="A")
    units = net.units()
    assert len(units) == 108 and all(isinstance(u, SingleConvUnit) for u in units)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 110            # 108 unit convs + stem conv + classifier
    # counted by layer: stem conv, 36 units per stage (first of stages 2, 3 widens), 8,096 BN parameters, fc
    convs_total = _conv_params(3, 16) + 36 * _conv_params(16, 16) + _conv_params(16, 32) \
        + 35 * _conv_params(32, 32) + _conv_params(32, 64) + 35 * _conv_params(64, 64)
    bn_total = 2 * (16 + 36 * 16 + 36 * 32 + 36 * 64) if activation == "original" else \
        2 * (36 * 16 + 16 + 35 * 32 + 32 + 35 * 64 + 64)
    count = sum(p.numel() for p in net.parameters())
    assert count == convs_total + bn_total + 64 * 10 + 10 == 1_727_962
    # as many weights as ResNet-110 with the same shortcuts (108 3x3 convs of the same shapes)
    assert count == sum(p.numel() for p in cifar_resnet110(activation=activation, projection="A").parameters())
    # projection B adds the two 1x1 shortcut convs (and their BN in the original net)
    extra = 16 * 32 + 32 * 64 + (2 * (32 + 64) if activation == "original" else 0)
    assert sum(p.numel() for p in cifar_resnet110_1layer(activation=activation).parameters()) == count + extra


def test_names_depth_rule_and_fusing_leaves_it_eager():
    net = create_model("cifar_resnet8_1layer", num_classes=100)
    assert len(net.units()) == 6 and net(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert create_model("cifar_resnet110_1layer").fc.out_features == 10
    with pytest.raises(ValueError, match="3n\\+2"):
        cifar_resnet_1layer(9)
    with pytest.raises(ValueError, match="bottleneck"):
        make_unit(16, 16, single_conv=True, bottleneck=True)
    net = convert_to_fused(create_model("cifar_resnet5_1layer"), "eager")
    assert all(type(u) is SingleConvUnit for u in net.units())


def test_refuses_bottleneck():
    with pytest.raises(ValueError, match="bottleneck=True"):
        SingleConvUnit(16, 16, bottleneck=True)
