"""convert_to_fused on units that pad explicitly before ``padding=0`` convs, as TensorFlow ports
write "SAME" padding (tests/foreign_models.py ``tf_same_preresnet``): symmetric ``(1, 1, 1, 1)``
and, before a stride-2 conv, asymmetric ``(0, 1, 0, 1)``, as ``nn.ZeroPad2d`` or ``F.pad``.

The pad is part of the match (``UnitMatch.pads``) and runs fused as each conv's per-side zero
padding (the fused unit's ``conv_padding``); a pad that is not a zero pad of H and W, is more
than the kernel's half width on a side, or changes with the input size stays eager with its
reason. Float64, against the unconverted model: 1e-10 relative to each tensor's largest magnitude.
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import foreign_models as fm
from comparisons import assert_same_step, perturb_bn, relative_error
from fused_preact import convert_to_fused, dispatch
from fused_preact.fused import _FusedUnitMixin
from fused_preact.recognize import recognize

TOLERANCE = 1e-10


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


def _fused_units(model):
    return [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]


@pytest.mark.parametrize("pad", ["module", "function"])
def test_recognition_keeps_each_convs_explicit_pad(pad):
    identity_unit, projection_unit = fm.tf_same_preresnet(widths=(4, 8), pad=pad).blocks
    match = recognize(identity_unit, 4).match
    assert match.shortcut == "identity" and match.pads == ((1, 1, 1, 1), (1, 1, 1, 1))
    recognition = recognize(projection_unit, 4)
    assert recognition.match.shortcut == "projection" and recognition.match.shortcut_conv == "downsample"
    assert recognition.match.pads == ((0, 1, 0, 1), (1, 1, 1, 1))
    assert recognition.size % 2 == 0     # its stride-2 branch and projection agree on even inputs only
    assert recognize(fm.KLPreActBlock(4, 4), 4).match.pads is None


class _ChannelPad(nn.Module):         # pads channels too: (W, W, H, H, C, C)
    def __init__(self, c):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c + 2, c, 3, padding=0, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.pad(torch.relu(self.bn1(x)), (1, 1, 1, 1, 1, 1)))
        return x + self.conv2(torch.relu(self.bn2(out)))


class _OneSidedPad(nn.Module):        # (2, 0, 2, 0): more than a 3x3's half width on a side
    def __init__(self, c):
        super().__init__()
        self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
        self.conv1 = nn.Conv2d(c, c, 3, padding=0, bias=False)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

    def forward(self, x):
        out = self.conv1(F.pad(torch.relu(self.bn1(x)), (2, 0, 2, 0)))
        return x + self.conv2(torch.relu(self.bn2(out)))


@pytest.mark.parametrize("unit,reason", [
    (fm.TFSamePreActBlock(4, 4, 1, "function", pad_value=0.5),
     "conv2 takes a constant pad of value 0.5, not a zero padding"),
    (_ChannelPad(4), r"conv1 takes a pad of dimensions other than H and W \(\[1, 1, 1, 1, 1, 1\]\)"),
    (_OneSidedPad(4), r"conv1's zero padding \(2, 0, 2, 0\) .* is more than 1 on a side"),
    (fm.TFSamePreActBlock(4, 8, 2, "dynamic"),
     r"its explicit padding depends on the input size \(\[\(1, 1, 1, 1\), \(1, 1, 1, 1\)\] at 5 px, "
     r"\[\(0, 1, 0, 1\), \(1, 1, 1, 1\)\] at 6 px\)"),
], ids=["nonzero value", "channels", "one-sided 2", "from the input size"])
def test_pads_the_fused_unit_cannot_take_stay_eager_with_the_reason(unit, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), perturb_bn(unit.double()).float())
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match=r"0 of 1 residual units fused; left eager: "
                                            + type(unit).__name__ + " x1: " + reason):
        convert_to_fused(model)
    assert model[1] is unit
    x = torch.randn(2, 3, 6, 6)
    assert torch.equal(model(x), reference(x))


@pytest.mark.parametrize("backend,pad,memory", [("cuda", "module", "default"), ("cuda", "function", "default"),
                                                pytest.param("triton", "module", "default", marks=pytest.mark.full),
                                                ("cuda", "module", "min")])   # Triton's padding: test_conv_padding
def test_explicit_padding_fused_and_exact(backend, pad, memory, one_cpu_thread):
    """Both forms, (1, 1, 1, 1) and the stride-2 (0, 1, 0, 1), fused on the C++ CPU kernels and the
    Triton interpreter, memory="min" too (its recompute passes each conv's padding); training then
    eval; state and the very tensors kept."""
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64) * 1.5 + 0.3
    _need(backend, x)
    model = perturb_bn(fm.tf_same_preresnet(widths=(4, 8), pad=pad).double())
    reference = copy.deepcopy(model)
    params, keys = list(model.parameters()), list(model.state_dict())
    _, report = convert_to_fused(model, backend=backend, memory=memory, return_report=True)
    assert report.num_fused == report.num_units == 2, report.summary()
    assert [u.memory for u in _fused_units(model)] == [memory] * 2
    assert [u.conv_padding for u in _fused_units(model)] == [((1, 1, 1, 1), (1, 1, 1, 1)),
                                                             ((0, 1, 0, 1), (1, 1, 1, 1))]
    assert [id(p) for p in model.parameters()] == [id(p) for p in params] and list(model.state_dict()) == keys
    fm.tf_same_preresnet(widths=(4, 8), pad=pad).load_state_dict(model.state_dict(), strict=True)
    assert [u.conv_padding for u in _fused_units(copy.deepcopy(model))] == [u.conv_padding
                                                                          for u in _fused_units(model)]
    for training in (True, False):
        reference.train(training), model.train(training)
        assert_same_step(reference, model, x)


def test_size_dependent_pad_stays_eager_the_rest_fuses():
    """TensorFlow's SAME computed per call: a stride-1 3x3 pads (1, 1, 1, 1) at every size (fused),
    a stride-2 one (1, 1, 1, 1) or (0, 1, 0, 1) by the size's parity (left eager)."""
    model = perturb_bn(fm.tf_same_preresnet(widths=(4, 8), pad="dynamic").double())
    reference = copy.deepcopy(model)
    with pytest.warns(RuntimeWarning, match=r"1 of 2 residual units fused .*; left eager: TFSamePreActBlock x1: its "
                                            r"explicit padding depends on the input size"):
        _, report = convert_to_fused(model, backend="eager", return_report=True)
    assert report.fused == ["blocks.0"] and list(report.left_eager) == ["blocks.1"]
    for size in (7, 8):
        x = torch.randn(4, 3, size, size, dtype=torch.float64)
        assert relative_error(model(x), reference(x)) <= TOLERANCE
