"""Every residual unit variant of the paper: shapes, gradients, and the paper's equations."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from fused_preact.units import OriginalBlock, OriginalBottleneck, PreActBlock, PreActBottleneck
from fused_preact.variants import ACTIVATIONS, SHORTCUTS, VariantUnit, make_unit

SHAPES = [  # (in, out, stride)
    (8, 8, 1),     # identity unit
    (8, 12, 2),    # stride 2 and more channels
]
BOTTLENECK_SHAPES = [(16, 16, 1), (16, 32, 2), (8, 32, 1)]   # last: stage 1 of the bottleneck nets


def _cases():
    for activation, shortcut in itertools.product(ACTIVATIONS, SHORTCUTS):
        for shape in SHAPES:
            yield False, activation, shortcut, shape
        for shape in BOTTLENECK_SHAPES:
            yield True, activation, shortcut, shape


def _default_case(params):
    """Each (activation, shortcut) once by default, its shape taken in turn from the five (so each
    activation and each shortcut meets basic and bottleneck shapes); the whole product with --full."""
    shapes = SHAPES + BOTTLENECK_SHAPES
    combo = ACTIVATIONS.index(params["activation"]) * len(SHORTCUTS) + SHORTCUTS.index(params["shortcut"])
    return shapes.index(params["shape"]) == combo % len(shapes)


@pytest.mark.default_cases(keep=_default_case)
@pytest.mark.parametrize("bottleneck,activation,shortcut,shape", list(_cases()))
def test_every_variant_runs_forward_and_backward(bottleneck, activation, shortcut, shape):
    cin, cout, stride = shape
    unit = VariantUnit(cin, cout, stride, bottleneck=bottleneck, activation=activation, shortcut=shortcut)
    x = torch.randn(2, cin, 9, 7, dtype=torch.float64, requires_grad=True)
    unit.double()
    y = unit(x)
    assert y.shape == (2, cout, (9 - 1) // stride + 1, (7 - 1) // stride + 1)
    assert torch.isfinite(y).all()
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    for name, p in unit.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name


def _bn(bn, h):
    return F.batch_norm(h, bn.running_mean.clone(), bn.running_var.clone(), bn.weight, bn.bias, True, 0.0, bn.eps)


def _paper_basic(unit, x):
    """Fig. 4 of the paper, written out for the basic unit with an identity shortcut."""
    c1, c2 = unit.conv1, unit.conv2
    relu = F.relu
    a = unit.activation
    if a == "original":
        return relu(x + _bn(unit.bn2, c2(relu(_bn(unit.bn1, c1(x))))))
    if a == "bn_after_add":
        return relu(_bn(unit.bn_add, x + c2(relu(_bn(unit.bn1, c1(x))))))
    if a == "relu_before_add":
        return x + relu(_bn(unit.bn2, c2(relu(_bn(unit.bn1, c1(x))))))
    if a == "relu_only_preact":
        return x + _bn(unit.bn2, c2(relu(_bn(unit.bn1, c1(relu(x))))))
    return x + c2(relu(_bn(unit.bn2, c1(relu(_bn(unit.bn1, x))))))


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_basic_unit_follows_the_paper_equation(activation):
    unit = VariantUnit(6, 6, activation=activation).double()
    for m in unit.modules():   # non-trivial BN affine parameters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    x = torch.randn(3, 6, 7, 9, dtype=torch.float64)
    torch.testing.assert_close(unit(x), _paper_basic(unit, x), rtol=1e-12, atol=1e-12)


def test_full_preact_bottleneck_equation_and_shared_preactivation():
    unit = PreActBottleneck(8, 32, stride=2).double()
    x = torch.randn(2, 8, 9, 9, dtype=torch.float64)
    a1 = F.relu(_bn(unit.bn1, x))
    h = unit.conv1(a1)
    assert unit.conv1.stride == (2, 2) and unit.conv2.stride == (1, 1)   # the paper's stride placement
    h = unit.conv2(F.relu(_bn(unit.bn2, h)))
    h = unit.conv3(F.relu(_bn(unit.bn3, h)))
    expected = h + unit.shortcut(a1)   # projection takes the pre-activated input
    torch.testing.assert_close(unit(x), expected, rtol=1e-12, atol=1e-12)


def test_bottleneck_stride_on_3x3():
    unit = PreActBottleneck(16, 32, stride=2, stride_on="3x3")
    assert unit.conv1.stride == (1, 1) and unit.conv2.stride == (2, 2) and unit.shortcut.stride == (2, 2)


def test_identity_unit_keeps_preactivation_in_the_branch():
    unit = PreActBlock(5, 5).double()
    x = torch.randn(2, 5, 7, 7, dtype=torch.float64)
    r = unit.conv2(F.relu(_bn(unit.bn2, unit.conv1(F.relu(_bn(unit.bn1, x))))))
    torch.testing.assert_close(unit(x), x + r)
    assert unit.shortcut is None


def test_option_a_shortcut_pads_the_raw_input():
    unit = PreActBlock(4, 8, stride=2, projection="A").double()
    x = torch.randn(1, 4, 9, 9, dtype=torch.float64)
    shortcut = torch.cat([x[:, :, ::2, ::2], torch.zeros(1, 4, 5, 5, dtype=torch.float64)], dim=1)
    r = unit.conv2(F.relu(_bn(unit.bn2, unit.conv1(F.relu(_bn(unit.bn1, x))))))
    torch.testing.assert_close(unit(x), shortcut + r)
    assert sum(p.numel() for p in unit.parameters()) == 4 * 2 + 4 * 8 * 9 + 8 * 2 + 8 * 8 * 9


@pytest.mark.parametrize("shortcut", SHORTCUTS)
def test_shortcut_equations(shortcut):
    unit = VariantUnit(6, 6, activation="original", shortcut=shortcut, scale_shortcut=0.5,
                        scale_residual=0.25, gate_bias=-1.0).double().eval()
    x = torch.randn(2, 6, 7, 7, dtype=torch.float64)
    branch = unit.bn2(unit.conv2(F.relu(unit.bn1(unit.conv1(x)))))
    if shortcut == "identity" or shortcut == "dropout":   # dropout is the identity in eval
        expected = x + branch
    elif shortcut == "scaling":
        expected = 0.5 * x + 0.25 * branch
    elif shortcut == "conv1x1":
        expected = unit.shortcut_bn(unit.shortcut(x)) + branch
    else:
        g = torch.sigmoid(unit.gate(x))
        expected = (1 - g) * x + (g * branch if shortcut == "exclusive_gating" else branch)
    torch.testing.assert_close(unit(x), F.relu(expected))


def test_gate_bias_initialization_is_selectable():
    for b in (-6.0, 0.0):
        unit = VariantUnit(4, 4, shortcut="shortcut_gating", gate_bias=b)
        assert torch.all(unit.gate.bias == b)


def test_dropout_shortcut_drops_half_in_training():
    unit = VariantUnit(4, 4, shortcut="dropout", dropout=0.5)
    assert unit.shortcut_dropout.p == 0.5
    unit.train()
    s = unit.shortcut_dropout(torch.ones(10000))
    assert 0.45 < (s == 0).float().mean() < 0.55


def test_make_unit_returns_the_standard_classes():
    assert type(make_unit(4, 4)) is PreActBlock
    assert type(make_unit(4, 16, 2, bottleneck=True, stride_on="3x3")) is PreActBottleneck
    assert type(make_unit(4, 4, activation="original")) is OriginalBlock
    assert type(make_unit(4, 16, 2, bottleneck=True, activation="original", projection="A")) is OriginalBottleneck
    assert type(make_unit(4, 4, activation="original", shortcut="scaling")) is VariantUnit


@pytest.mark.parametrize("kwargs,match", [
    (dict(activation="post"), "activation"),
    (dict(shortcut="gate"), "shortcut"),
    (dict(stride=3), "stride"),
    (dict(projection="C"), "projection"),
    (dict(stride_on="5x5"), "stride_on"),
    (dict(in_channels=0), "in_channels"),
    (dict(bottleneck=True, out_channels=6), "divisible by 4"),
    (dict(dropout=1.0), "dropout"),
])
def test_bad_constructor_arguments_name_the_argument(kwargs, match):
    args = dict(in_channels=4, out_channels=8)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        VariantUnit(**args)


def test_bad_inputs_name_the_argument():
    unit = PreActBlock(4, 4)
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor"):
        unit(torch.randn(4, 8, 8))
    with pytest.raises(ValueError, match=r"x has 3 channels .* in_channels=4"):
        unit(torch.randn(1, 3, 8, 8))
    with pytest.raises(TypeError, match=r"x must be float32, float64, float16 or bfloat16"):
        unit(torch.randint(0, 5, (1, 4, 8, 8)))
