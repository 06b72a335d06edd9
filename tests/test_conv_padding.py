"""Explicit per-side zero padding of the conv operators and of the fused units (``conv_padding``).

Nets that pad explicitly (``F.pad`` / ``nn.ZeroPad2d`` before a ``padding=0`` conv, TensorFlow's
stride-2 "SAME" padding ``(0, 1, 0, 1)`` included) run fused: ``conv_bnrelu``, ``conv_dgrad`` and
``conv_wgrad`` take ``padding = [left, right, top, bottom]`` of the activated input, and a fused
unit's ``conv_padding`` passes one such padding per branch conv to them.

Both backends, float64: the Triton kernels (Triton's interpreter on this CPU-only machine) and the
C++ extension (its CPU kernels for CPU tensors; ``backend="cuda"``). The oracle pads with
``F.pad`` / ``nn.ZeroPad2d`` and convolves with ``padding=0`` in float64 (autograd gives the data
and weight gradients), independent of the code under test. Tolerance: 1e-10 relative to the
largest magnitude of each compared tensor (float64 sums of at most a few hundred products).
"""
from __future__ import annotations

import copy
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_preact import reference_ops as ref
from comparisons import perturb_bn, relative_error
from fused_preact import dispatch
from fused_preact.fused import FusedPreActBlock, FusedPreActBottleneck
from fused_preact.unit_ops import padded_output_shape

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "cuda"]
TOL = 1e-10

# tiny shapes: threads only slow them down on the shared cores
pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _ops(backend):
    probe = torch.zeros(1, 1, 1, 1, dtype=torch.float64, device=DEVICE)
    reason = dispatch.unavailable_reason(backend, probe)
    if reason is not None:
        pytest.skip(reason)
    return dispatch._registry[backend].ops()


def _close(got, expected, what):
    error = relative_error(got.cpu(), expected.cpu())
    assert error <= TOL, f"{what}: max error {error:.3g} relative to max |value| (bound {TOL:g})"


# ---------------------------------------------------------------------------------------------
# the operators
# ---------------------------------------------------------------------------------------------
# (n, h, w, cin, cout, k, stride, padding [left, right, top, bottom])
OP_CASES = [
    (2, 8, 7, 5, 6, 3, 2, [0, 1, 0, 1]),   # stride-2 "SAME": asymmetric for the even H, unread for the odd W
    (1, 9, 7, 6, 4, 3, 1, [2, 0, 0, 3]),   # asymmetric beyond K // 2 and rows no window reaches
    (2, 6, 6, 4, 7, 1, 2, [0, 1, 0, 1]),   # a padded 1x1: the C++ general path, not the 1x1 kernels
    (1, 7, 10, 3, 4, 3, 2, [1, 2, 0, 3]),  # every side different, stride 2
    # symmetric, as a padding=0 conv after ZeroPad2d(1): the default kernels (also in
    # test_default_padding_is_unchanged), so in the full run only
    pytest.param(2, 7, 9, 4, 5, 3, 1, [1, 1, 1, 1], marks=pytest.mark.full),
]
OP_IDS = [f"k{c[5]}s{c[6]}_{'-'.join(map(str, c[7]))}_{c[1]}x{c[2]}"
          for c in (case.values if hasattr(case, "values") else case for case in OP_CASES)]


def _op_inputs(n, h, w, cin, cout, k, stride, padding):
    ho, wo = padded_output_shape(h, w, k, stride, padding)
    f64 = dict(dtype=torch.float64, device=DEVICE)
    x = torch.randn(n, h, w, cin, **f64) * 1.5 + 0.3
    weight = torch.randn(cout, cin, k, k, **f64) / (cin * k * k) ** 0.5
    scale, shift = torch.rand(cin, **f64) + 0.5, torch.randn(cin, **f64) * 0.5
    return x, weight, scale, shift, (ho, wo)


def _activated(x, scale, shift):
    """relu(scale * x + shift) as NCHW float64."""
    return torch.relu(x * scale + shift).permute(0, 3, 1, 2)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.cuda_kernels)])
@pytest.mark.parametrize("n,h,w,cin,cout,k,stride,padding", OP_CASES, ids=OP_IDS)
def test_conv_ops_with_padding(backend, n, h, w, cin, cout, k, stride, padding):
    ops = _ops(backend)
    x, weight, scale, shift, (ho, wo) = _op_inputs(n, h, w, cin, cout, k, stride, padding)
    residual = torch.randn(n, ho, wo, cout, dtype=torch.float64, device=DEVICE)

    # forward: y and the partial statistics of y
    y, pmean, pm2, pcount = ops.conv_bnrelu(x, weight, scale, shift, residual, stride, True, padding)
    expected = F.conv2d(F.pad(_activated(x, scale, shift), padding), weight, stride=stride)
    expected = expected.permute(0, 2, 3, 1) + residual
    assert y.shape == (n, ho, wo, cout)
    _close(y, expected, "y")
    mean, m2, count = ref.merge_partials(pmean.cpu(), pm2.cpu(), pcount.cpu())
    rows = expected.reshape(-1, cout).cpu()
    assert count.item() == rows.shape[0]
    _close(mean, rows.mean(0), "mean of y")
    _close(m2, ((rows - rows.mean(0)) ** 2).sum(0), "M2 of y")

    # dgrad: the input gradient through the padding, ReLU mask and BN backward's two sums
    dy = torch.randn(n, ho, wo, cout, dtype=torch.float64, device=DEVICE)
    add = torch.randn(n, h, w, cin, dtype=torch.float64, device=DEVICE)
    mean_in, invstd_in = x.mean((0, 1, 2)), torch.rand(cin, dtype=torch.float64, device=DEVICE) + 0.5
    g, sum_g, sum_g_xhat = ops.conv_dgrad(dy, weight, x, scale, shift, mean_in, invstd_in, add, stride, h, w,
                                          padding)
    u = torch.zeros(n, cin, h, w, dtype=torch.float64, device=DEVICE, requires_grad=True)
    F.conv2d(F.pad(u, padding), weight, stride=stride).backward(dy.permute(0, 3, 1, 2))
    expected_g = (u.grad.permute(0, 2, 3, 1) + add) * (scale * x + shift > 0)
    _close(g, expected_g, "g")
    _close(sum_g, expected_g.sum((0, 1, 2)), "sum_g")
    _close(sum_g_xhat, (expected_g * (x - mean_in) * invstd_in).sum((0, 1, 2)), "sum_g_xhat")
    # without h: the plain data gradient (a shortcut projection's)
    t, empty_g, empty_xhat = ops.conv_dgrad(dy, weight, None, None, None, None, None, None, stride, h, w, padding)
    _close(t, u.grad.permute(0, 2, 3, 1), "t")
    assert empty_g.numel() == 0 and empty_xhat.numel() == 0

    # wgrad: the activated input recomputed, padded
    dweight = ops.conv_wgrad(dy, x, scale, shift, weight, stride, padding)
    w_leaf = weight.clone().requires_grad_(True)
    F.conv2d(F.pad(_activated(x, scale, shift), padding), w_leaf, stride=stride).backward(dy.permute(0, 3, 1, 2))
    _close(dweight, w_leaf.grad, "dweight")


@pytest.mark.parametrize("backend", BACKENDS)
def test_default_padding_is_unchanged(backend):
    """``padding=None`` and ``[K // 2] * 4`` give the old operators' results, bit for bit."""
    ops = _ops(backend)
    x, weight, scale, shift, (ho, wo) = _op_inputs(2, 7, 6, 4, 5, 3, 2, None)
    dy = torch.randn(2, ho, wo, 5, dtype=torch.float64, device=DEVICE)
    for padding in (None, [1, 1, 1, 1]):
        extra = () if padding is None else (padding,)
        y = ops.conv_bnrelu(x, weight, scale, shift, None, 2, False, *extra)[0]
        g = ops.conv_dgrad(dy, weight, None, None, None, None, None, None, 2, 7, 6, *extra)[0]
        dw = ops.conv_wgrad(dy, x, scale, shift, weight, 2, *extra)
        if padding is None:
            first = (y, g, dw)
        else:
            for a, b, what in zip(first, (y, g, dw), ("y", "g", "dweight")):
                assert torch.equal(a, b), what
    _close(first[0], ref.conv_bnrelu(x, weight, scale, shift, None, 2, False)[0], "y")


@pytest.mark.parametrize("backend", BACKENDS)
def test_padding_shapes_of_fake_tensors(backend):
    """The fake (Triton) and Meta (C++) implementations give the padded output shapes."""
    ops = _ops(backend)
    padding = [0, 1, 2, 0]
    ho, wo = padded_output_shape(8, 7, 3, 2, padding)
    with torch._subclasses.fake_tensor.FakeTensorMode():
        x = torch.empty(2, 8, 7, 4, dtype=torch.float64, device=DEVICE)
        weight = torch.empty(5, 4, 3, 3, dtype=torch.float64, device=DEVICE)
        vector = torch.empty(4, dtype=torch.float64, device=DEVICE)
        dy = torch.empty(2, ho, wo, 5, dtype=torch.float64, device=DEVICE)
        y = ops.conv_bnrelu(x, weight, vector, vector, None, 2, True, padding)[0]
        g = ops.conv_dgrad(dy, weight, None, None, None, None, None, None, 2, 8, 7, padding)[0]
        dw = ops.conv_wgrad(dy, x, vector, vector, weight, 2, padding)
        assert tuple(y.shape) == (2, ho, wo, 5) and tuple(g.shape) == (2, 8, 7, 4) and tuple(dw.shape) == (5, 4, 3, 3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_padding_is_named(backend):
    ops = _ops(backend)
    x, weight, scale, shift, _ = _op_inputs(1, 5, 5, 3, 4, 3, 1, None)
    for padding, message in (([1, 1, 1], "padding must be 4"), ([1, -1, 1, 1], "padding must be")):
        with pytest.raises((ValueError, RuntimeError), match=message):
            ops.conv_bnrelu(x, weight, scale, shift, None, 1, False, padding)
    small = x[:, :2, :2].contiguous()   # without padding, a 2x2 input holds no 3x3 window
    with pytest.raises((ValueError, RuntimeError), match="padding"):
        ops.conv_bnrelu(small, weight, scale, shift, None, 1, False, [0, 0, 0, 0])
    dy = torch.randn(1, 5, 5, 4, dtype=torch.float64, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError), match="padding"):   # dy does not fit this padding
        ops.conv_dgrad(dy, weight, None, None, None, None, None, None, 1, 5, 5, [0, 1, 0, 1])
    with pytest.raises((ValueError, RuntimeError), match="padding must be 4"):
        ops.conv_wgrad(dy, x, scale, shift, weight, 1, [1, 1])


# ---------------------------------------------------------------------------------------------
# the fused units
# ---------------------------------------------------------------------------------------------
def _reference(unit):
    """The unit's float64 eager twin whose branch convs are ``nn.Sequential(nn.ZeroPad2d(p), conv
    with padding 0)``, as a net that pads explicitly is written (no ``conv_padding`` involved)."""
    twin = copy.deepcopy(unit).double()
    twin.backend, padding = "eager", twin.conv_padding
    twin.conv_padding = None
    for i, pad in enumerate(padding, start=1):
        conv = getattr(twin, f"conv{i}")
        conv.padding = (0, 0)
        setattr(twin, f"conv{i}", nn.Sequential(nn.ZeroPad2d(pad), conv))
    return twin


def _twin_name(name):
    """A parameter or buffer name of the unit in its ``_reference`` twin."""
    head, _, tail = name.partition(".")
    return f"{head}.1.{tail}" if head.startswith("conv") else name


def check_unit(unit, x):
    """Output, input and parameter gradients and running statistics of ``unit`` (its backend, float64)
    against ``_reference(unit)``."""
    reference = _reference(unit)
    x_ref = x.double().clone().requires_grad_(True)
    y_ref = reference(x_ref)
    dy = torch.randn_like(y_ref)
    y_ref.backward(dy)
    unit = unit.double().to(DEVICE)
    xd = x.double().to(DEVICE).requires_grad_(True)
    y = unit(xd)
    y.backward(dy.to(DEVICE))
    _close(y, y_ref, "output")
    _close(xd.grad, x_ref.grad, "input gradient")
    twin_params = dict(reference.named_parameters())
    for name, p in unit.named_parameters():
        _close(p.grad, twin_params[_twin_name(name)].grad, f"{name}.grad")
    twin_buffers = dict(reference.named_buffers())
    for name, b in unit.named_buffers():
        _close(b.double(), twin_buffers[_twin_name(name)].double(), name)


def _make(cls, args, padding, backend, zero_conv_padding=True):
    unit = perturb_bn(cls(*args, backend=backend))
    if zero_conv_padding:   # as converted from a padding=0 conv: the module's own padding is not used
        for i in range(1, unit.num_convs + 1):
            getattr(unit, f"conv{i}").padding = (0, 0)
    unit.conv_padding = padding
    return unit


SAME = (0, 1, 0, 1)
UNIT_CASES = [
    # name, class, constructor args, conv_padding, input shape
    ("basic s2 SAME", FusedPreActBlock, (4, 8, 2), (SAME, (1, 1, 1, 1)), (2, 4, 8, 6)),
    ("bottleneck s2 3x3 SAME", FusedPreActBottleneck, (4, 16, 2, "B", "3x3"), ((0,) * 4, SAME, (0,) * 4),
     (2, 4, 6, 8)),
    ("bottleneck symmetric", FusedPreActBottleneck, (8, 8), ((0,) * 4, (1, 1, 1, 1), (0,) * 4), (2, 8, 7, 5)),
    # TensorFlow's SAME for an odd height and an even width (stride 2): (0, 1) across, (1, 1) down
    ("basic s2 A SAME odd", FusedPreActBlock, (4, 6, 2, "A"), ((0, 1, 1, 1), (1, 1, 1, 1)), (2, 4, 7, 8)),
    ("basic symmetric", FusedPreActBlock, (5, 5), ((1, 1, 1, 1), (1, 1, 1, 1)), (2, 5, 5, 7)),
    ("bottleneck s2 3x3 SAME odd", FusedPreActBottleneck, (4, 8, 2, "raw", "3x3"),
     ((0,) * 4, (1, 1, 0, 1), (0,) * 4), (2, 4, 8, 5)),
]
# The default run: SAME on both unit kinds (train; eval too for the basic unit) and the symmetric form
# on the bottleneck (train); every case in train and eval with --full.
DEFAULT_UNIT_RUNS = {("basic s2 SAME", True), ("basic s2 SAME", False), ("bottleneck s2 3x3 SAME", True),
                     ("bottleneck symmetric", True)}
UNIT_RUNS = [pytest.param(*case, train, id=f"{case[0]}-{'train' if train else 'eval'}",
                          marks=[] if (case[0], train) in DEFAULT_UNIT_RUNS else [pytest.mark.full])
             for case in UNIT_CASES for train in (True, False)]


# with --full: the default run has this in tests/test_unit_cross_product.py
# (units with conv_padding against eager, every padding kind, both kinds and memory modes)
@pytest.mark.full
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,cls,args,padding,shape,train", UNIT_RUNS)
def test_fused_unit_with_conv_padding(backend, name, cls, args, padding, shape, train):
    _ops(backend)
    check_unit(_make(cls, args, padding, backend).train(train), torch.randn(shape) * 1.5 + 0.3)


def test_eager_path_pads_like_zeropad2d():
    """``backend="eager"`` with ``conv_padding`` (the fused unit's fallback) is the ZeroPad2d twin."""
    for name, cls, args, padding, shape in UNIT_CASES:
        check_unit(_make(cls, args, padding, "eager"), torch.randn(shape))


def test_symmetric_conv_padding_is_the_conv_padding():
    """``conv_padding`` of K // 2 per side computes what the unit without it computes."""
    unit = perturb_bn(FusedPreActBottleneck(4, 8, 2, "B", "3x3", backend="eager")).double()
    padded = copy.deepcopy(unit)
    padded.conv_padding = ((0,) * 4, (1,) * 4, (0,) * 4)
    x = torch.randn(2, 4, 7, 6, dtype=torch.float64)
    _close(padded(x), unit(x), "output")


def test_conv_padding_is_checked(monkeypatch):
    unit = FusedPreActBlock(4, 8, 2, backend="cuda")
    with pytest.raises(ValueError, match="conv_padding must be None or 2"):
        unit.conv_padding = ((1, 1, 1, 1),)
    with pytest.raises(ValueError, match=r"conv_padding entry 2 \(conv2\)"):
        unit.conv_padding = ((1, 1, 1, 1), (1, 1, -1, 1))
    unit.conv_padding = [[0, 1, 0, 1], [1, 1, 1, 1]]
    assert unit.conv_padding == ((0, 1, 0, 1), (1, 1, 1, 1))
    assert "conv_padding" not in str(unit.state_dict().keys()) and "conv_padding=" in repr(unit)
    # (0, 1) on an odd size gives one row less than the stride-2 shortcut: refused, naming conv_padding
    x = torch.randn(2, 4, 7, 8)
    if dispatch.unavailable_reason("cuda", x) is None:
        with pytest.raises(ValueError, match="conv_padding"):
            unit(x)
    # an extension built before the padding argument (which every fused unit passes) is refused by name
    old_schema = SimpleNamespace(arguments=[SimpleNamespace(name="x")])
    if dispatch._extension.available():
        monkeypatch.setattr(torch.ops.fused_preact.conv_bnrelu, "default", SimpleNamespace(_schema=old_schema),
                            raising=False)
        assert "predates the conv operators' padding argument" in dispatch._extension_error()
        monkeypatch.undo()
    # a shortcut projection with padding is refused
    unit.shortcut.padding = (1, 1)
    unit.conv_padding = None
    if dispatch.unavailable_reason("cuda", x) is None:
        with pytest.raises(ValueError, match="shortcut projection has padding"):
            unit(torch.randn(2, 4, 8, 8))
