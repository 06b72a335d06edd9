"""convert_to_fused on pre-activation ResNets written like other codebases (tests/foreign_models.py):
units recognized by what they compute, fused exactly, state kept, and told about.

Float64 throughout; against the unconverted model, relative to the largest magnitude of
each tensor (running statistics included): 1e-10.
"""
import copy
import io
import logging
import pickle
import warnings

import pytest
import torch
from torch import nn

import foreign_models as fm
from fused_preact import convert, convert_to_fused, dispatch, models
from fused_preact.converted import ConvertedUnit
from fused_preact.fused import FusedPreActBlock, _FusedUnitMixin
from fused_preact.recognize import UnitMatch, recognize
from comparisons import assert_same_step, perturb_bn, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# name, builder, input size, units, branch convs of the fused units, their shortcut kinds
FORMS = [
    ("kuangliu basic", lambda: fm.kuangliu_preact_resnet18(widths=(4, 8), num_blocks=(2, 1)), 8,
     3, 2, {"identity", "projection"}),
    ("kuangliu bottleneck 3x3", lambda: fm.kuangliu_preact_resnet50(widths=(2, 4), num_blocks=(1, 2)), 8,
     3, 3, {"identity", "projection"}),
    ("wide resnet", lambda: fm.wide_resnet(depth=16, widen_factor=2, base=2), 12,
     6, 2, {"identity", "projection"}),
    ("fb basic raw", lambda: fm.fb_preresnet(8, "BasicBlock", base=4), 12,
     3, 2, {"identity", "raw_projection"}),
    ("fb bottleneck 3x3 raw", lambda: fm.fb_preresnet(11, "Bottleneck", base=2), 12,
     3, 3, {"raw_projection"}),
    ("fb bottleneck 1x1 raw", lambda: fm.fb_preresnet(11, "Bottleneck", base=2, stride_on="1x1"), 12,
     3, 3, {"raw_projection"}),
]


def _shortcut_kind(unit):
    """identity | projection (of the pre-activation) | raw_projection (of x), as the kernels see it."""
    view, _ = unit._kernel_view(torch.zeros(1))
    return ("identity" if view.shortcut is None else "projection" if view.shares_preact else "raw_projection")


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


def _fused_units(model):
    return [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]


@pytest.mark.parametrize("name,build,size,units,convs,shortcuts", FORMS, ids=[f[0] for f in FORMS])
def test_converts_and_keeps_state(name, build, size, units, convs, shortcuts):
    model = perturb_bn(build().double())
    unconverted = copy.deepcopy(model)
    state = copy.deepcopy(model.state_dict())
    params = list(model.parameters())
    buffers = list(model.buffers())
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    converted, report = convert_to_fused(model, backend="eager", return_report=True)
    assert converted is model
    fused = _fused_units(model)
    assert len(fused) == units and report.num_fused == report.num_units == units
    assert all(type(u) is ConvertedUnit and u.num_convs == convs for u in fused)
    assert {_shortcut_kind(u) for u in fused} == shortcuts
    # the very tensors, in the original order (an optimizer built before keeps working)
    assert all(a is b for a, b in zip(model.parameters(), params)) and len(list(model.parameters())) == len(params)
    assert all(a is b for a, b in zip(model.buffers(), buffers))
    assert optimizer.param_groups[0]["params"][0] is next(model.parameters())
    # state_dict: same keys, same order, loads strictly both ways
    assert list(model.state_dict()) == list(state)
    model.load_state_dict(state, strict=True)
    unconverted.load_state_dict(model.state_dict(), strict=True)
    # pickles and deep-copies, still fused
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (torch.load(buffer, weights_only=False), pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert len(_fused_units(clone)) == units and list(clone.state_dict()) == list(state)


# every form on the C++ backend; on the Triton interpreter (2-5 s a form) one form by default, all with --full
@pytest.mark.default_cases(keep=lambda params: params["backend"] == "cuda" or params["name"] == "kuangliu basic")
@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.slow)])
@pytest.mark.parametrize("name,build,size,units,convs,shortcuts", FORMS, ids=[f[0] for f in FORMS])
def test_converted_model_computes_the_same_in_float64(backend, name, build, size, units, convs, shortcuts):
    x = torch.randn(2, 3, size, size, dtype=torch.float64) * 1.5 + 0.3
    _need(backend, x.to(DEVICE))
    model = perturb_bn(build().double())
    reference = copy.deepcopy(model).to(DEVICE)
    convert_to_fused(model, backend=backend).to(DEVICE)
    assert len(_fused_units(model)) == units
    x = x.to(DEVICE)
    assert_same_step(reference, model, x)                   # training: batch statistics, running updates
    if backend == "cuda":                                      # eval too (Triton's interpreter is slow)
        reference.eval(), model.eval()
        assert_same_step(reference, model, x)


def test_wide_resnet_with_dropout_stays_eager_with_the_reason():
    """Decision: dropout between the convs is not fused (no counter-based mask in the kernels yet);
    those units stay eager and the warning says why."""
    model = fm.wide_resnet(depth=10, widen_factor=2, dropRate=0.3, base=2)
    with pytest.warns(RuntimeWarning, match=r"0 of 3 residual units fused.*WideBasicBlock x3: it applies dropout "
                                            r"between its convolutions"):
        _, report = convert_to_fused(model, return_report=True)
    assert not _fused_units(model) and report.num_units == 3
    assert set(report.classes.values()) == {"WideBasicBlock"}


def test_recognition_follows_data_flow_not_names():
    """The same unit with meaningless names and the BN-ReLU spelled three ways."""
    class Unit(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.BatchNorm2d(6)
            self.z = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.m = nn.BatchNorm2d(6)
            self.q = nn.Conv2d(6, 6, 3, padding=1, bias=False)
            self.act = nn.ReLU(inplace=True)

        def forward(self, inp):
            t = self.act(self.a(inp))
            t = self.z(t)
            t = self.m(t).clamp(min=0)
            return inp + self.q(t)

    unit = Unit()
    recognition = recognize(unit, 6)
    assert recognition.match == UnitMatch(bns=("a", "m"), convs=("z", "q"), shortcut="identity", shortcut_conv=None)
    fused = convert_to_fused(copy.deepcopy(unit))
    assert isinstance(fused, ConvertedUnit) and list(fused.state_dict()) == list(unit.state_dict())


class _PostActivation(nn.Module):      # torchvision's BasicBlock layout
    def __init__(self, c):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x):
        return torch.relu(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _TanhAfterSum(_PostActivation):   # an original unit but for the activation after the sum
    def forward(self, x):
        return torch.tanh(x + self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))))


class _Scaled(fm.KLPreActBlock):       # a scaled residual: y = x + 0.2 * F(x)
    def forward(self, x):
        out = self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))
        return x + 0.2 * out


class _Grouped(fm.KLPreActBlock):
    def __init__(self, c):
        super().__init__(c, c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, groups=2, bias=False)


class _SharedPreact(fm.KLPreActBlock):   # the shortcut's projection behind a BN of its own
    def __init__(self, c):
        super().__init__(c, 2 * c, stride=2)
        self.bn_s = nn.BatchNorm2d(c)

    def forward(self, x):
        out = self.conv2(torch.relu(self.bn2(self.conv1(torch.relu(self.bn1(x))))))
        return out + self.shortcut(torch.relu(self.bn_s(x)))


@pytest.mark.parametrize("unit,reason", [
    (_TanhAfterSum(4), "its output is aten.tanh of the residual sum"),
    (_Scaled(4, 4), "its residual branch ends in aten.mul"),
    (_Grouped(4), "conv2 has bias, groups"),
    (_SharedPreact(4), "its shortcut convolves a ReLU"),
], ids=["tanh after the sum", "scaled", "grouped", "separate shortcut BN"])
def test_units_computing_something_else_stay_eager_and_named(unit, reason):
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), unit)
    with pytest.warns(RuntimeWarning, match=r"0 of 1 residual units fused; left eager: "
                                            + type(unit).__name__ + " x1: " + reason):
        _, report = convert_to_fused(model, return_report=True)
    assert model[1] is unit and report.left_eager["1"].startswith(reason)


def test_all_fused_is_one_log_line_and_no_warning(caplog):
    model = fm.fb_preresnet(8, base=4)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with caplog.at_level(logging.INFO, logger="fused_preact.convert"):
            convert_to_fused(model, backend="eager")
    lines = [r.getMessage() for r in caplog.records if r.name == "fused_preact.convert"]
    assert len(lines) == 1 and lines[0].startswith("convert_to_fused: 3 of 3 residual units fused")


def test_nothing_recognized_in_a_bn_conv_model_warns():
    class Odd(nn.Module):                  # holds BN and conv, runs on no input we can give it
        def __init__(self):
            super().__init__()
            self.bn, self.conv = nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)

        def forward(self, x, y):
            return self.conv(self.bn(x)) + y
    with pytest.warns(RuntimeWarning, match="found no residual unit"):
        convert_to_fused(nn.Sequential(Odd()))


def test_guard_leaves_a_wrong_mapping_eager(monkeypatch):
    """Were the recognizer to swap two BNs of equal width, the float64 guard catches it."""
    real = convert.recognize

    def swapped(module, in_channels):
        result = real(module, in_channels)
        if result.match is not None:
            match = result.match
            result = type(result)(True, match=UnitMatch(match.bns[::-1], match.convs, match.shortcut,
                                                        match.shortcut_conv))
        return result
    monkeypatch.setattr(convert, "recognize", swapped)
    model = nn.Sequential(fm.KLPreActBlock(4, 4))
    with pytest.warns(RuntimeWarning, match=r"0 of 1 .*KLPreActBlock x1: the fused unit's output differs"):
        convert_to_fused(model)
    assert type(model[0]) is fm.KLPreActBlock


def test_each_configuration_is_recorded_and_checked_once(monkeypatch):
    """ResNet-1001 in the fb.resnet.torch port: 333 units, 6 configurations, 6 recordings and
    6 guard runs (what keeps the conversion of a deep net to about a second)."""
    calls = {"recognize": 0, "guard": 0}
    real_recognize, real_guard = convert.recognize, convert.check_replacement

    def counting(name, real):
        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)
        return wrapper
    monkeypatch.setattr(convert, "recognize", counting("recognize", real_recognize))
    monkeypatch.setattr(convert, "check_replacement", counting("guard", real_guard))
    model = fm.fb_preresnet(1001, "Bottleneck", base=4)
    _, report = convert_to_fused(model, backend="eager", return_report=True)
    assert report.num_fused == report.num_units == 333
    assert calls == {"recognize": 6, "guard": 6}


def test_own_resnet1001_converts_with_few_guard_runs(monkeypatch):
    runs = []
    real = convert.check_replacement
    monkeypatch.setattr(convert, "check_replacement", lambda *a, **k: runs.append(1) or real(*a, **k))
    _, report = convert_to_fused(models.cifar_resnet1001(), return_report=True)
    assert report.num_fused == 333 and len(runs) == 6


def test_converted_foreign_model_double_backward_and_empty_batch():
    model = fm.fb_preresnet(8, base=4)
    eager = copy.deepcopy(model)
    convert_to_fused(model, backend="cuda" if dispatch.unavailable_reason("cuda", torch.zeros(1)) is None
                     else "eager")
    if not any(u.backend != "eager" for u in _fused_units(model)):
        pytest.skip("the C++ extension is not built")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    (grad,) = torch.autograd.grad(model(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="backend='eager'"):
        grad.square().sum().backward()   # a gradient penalty through the fused units
    empty = torch.randn(0, 3, 8, 8)   # the model's own head cannot take it (view(0, -1)): its units can

    def trunk(net):
        return net.layer3(net.layer2(net.layer1(net.conv1(empty))))
    assert trunk(model).shape == trunk(eager).shape == (0, 16, 2, 2)


def test_guard_without_the_extension_checks_the_mapping_with_the_eager_path(monkeypatch):
    """No C++ build: the guard's fused copy runs what the kernels compute in eager PyTorch, which still
    proves the mapping (a swapped BN pair fails it) and lets a right one through."""
    monkeypatch.setattr(convert, "guard_backend", lambda: "eager")
    model = fm.fb_preresnet(8, base=4)
    _, report = convert_to_fused(model, backend="eager", return_report=True)
    assert report.guard_backend == "eager" and report.num_fused == 3
    assert "eager PyTorch computing what the fused kernels compute" in report.summary()
    real = convert.recognize
    monkeypatch.setattr(convert, "recognize", lambda module, width: (lambda r: type(r)(
        True, match=UnitMatch(r.match.bns[::-1], r.match.convs, r.match.shortcut, r.match.shortcut_conv))
        if r.match is not None else r)(real(module, width)))
    with pytest.warns(RuntimeWarning, match="differs"):
        _, report = convert_to_fused(nn.Sequential(fm.KLPreActBlock(4, 4)), return_report=True)
    assert report.num_fused == 0


def test_own_unit_becomes_a_fused_twin_that_keeps_its_hooks_and_state():
    """No class change in place: a new FusedPreActBlock holding the unit's very modules, parameters
    and hooks (the same dictionaries); the eager unit itself stays what it was."""
    from fused_preact.units import PreActBlock
    unit = PreActBlock(4, 4)
    seen = []
    unit.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    fused = convert_to_fused(unit, backend="eager")
    assert fused is not unit and type(fused) is FusedPreActBlock and type(unit) is PreActBlock
    assert fused._modules is unit._modules and fused.conv1 is unit.conv1
    assert [p for p in fused.parameters()] == [p for p in unit.parameters()]
    fused(torch.randn(2, 4, 5, 5))
    assert seen == [(2, 4, 5, 5)]


def test_copies_between_the_ops_do_not_count_as_calls():
    """``.clone()`` / ``.contiguous()`` on a conv output is the same value, not a second conv call."""
    class CopyingBlock(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.bn1, self.bn2 = nn.BatchNorm2d(c), nn.BatchNorm2d(c)
            self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
            self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)

        def forward(self, x):
            h = self.conv1(torch.relu(self.bn1(x))).clone()
            return x + self.conv2(torch.relu(self.bn2(h))).contiguous()

    _, report = convert_to_fused(nn.Sequential(CopyingBlock(8), CopyingBlock(8)), backend="eager",
                                 return_report=True)
    assert report.num_fused == 2, report.summary()


class _ReluAfter(nn.Module):           # a wrapper whose output is a ReLU of its child unit's sum
    def __init__(self, c):
        super().__init__()
        self.inner = fm.KLPreActBlock(c, c)

    def forward(self, x):
        return torch.relu(self.inner(x))


def test_the_smallest_module_holding_the_unit_is_fused():
    """Candidates are found by their subtree (a unit nested in containers counts once, as its own
    module): an nn.Sequential of one unit, and a wrapper that adds a ReLU after its child unit's
    sum, each fuse the unit inside and stay themselves; every unit counted once."""
    model = perturb_bn(nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sequential(fm.KLPreActBlock(4, 4)),
                                     _ReluAfter(4)).double())
    reference = copy.deepcopy(model)
    _, report = convert_to_fused(model, backend="eager", return_report=True)
    assert report.fused == ["1.0", "2.inner"] and report.num_units == 2, report.summary()
    assert type(model[1]) is nn.Sequential and type(model[2]) is _ReluAfter
    x = torch.randn(4, 3, 6, 6, dtype=torch.float64)
    assert relative_error(model(x), reference(x)) <= 1e-10


def test_no_plain_unit_counts_as_n_of_n_never_found_no_unit():
    """A model whose N residual units all stay eager says "0 of N" and names the reason once per
    class with its count, not "found no residual unit"."""
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), *[_Scaled(4, 4) for _ in range(3)])
    with pytest.warns(RuntimeWarning) as record:
        _, report = convert_to_fused(model, return_report=True)
    message = str(record[0].message)
    assert "0 of 3 residual units fused; left eager: _Scaled x3: its residual branch ends in aten.mul" in message
    assert "found no residual unit" not in message and report.num_units == 3
