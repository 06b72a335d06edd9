"""Triton conv kernels (conv_bnrelu_fwd, conv_dgrad, conv_wgrad) against the float64 reference ops.

Without a GPU they run in Triton's interpreter (conftest sets TRITON_INTERPRET=1).

Tolerances: each output element may differ from the float64 reference by ``REL[dtype]`` times
its magnitude bound, the same product computed on absolute values (plus |residual|, |add|, and
|output| for the final rounding). bf16/fp16 allow two steps of their precision: the
interpreter truncates fp32 -> bf16 casts (activations and fp32 weights) where a GPU rounds to
nearest. fp32 allows TF32 when a GPU runs with cudnn.allow_tf32.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fused_preact.kernels.conv_bnrelu_fwd import STATS_ROWS, conv_bnrelu_fwd, stats_rows
from fused_preact.kernels.conv_dgrad import conv_dgrad
from fused_preact.kernels.conv_wgrad import conv_wgrad
from fused_preact.kernels.runtime import interpreting
from fused_preact.unit_ops import conv_output_size, statistics_dtype
from fused_preact import reference_ops as ref

TF32 = not interpreting() and torch.backends.cudnn.allow_tf32
REL = {torch.float64: 1e-12, torch.float32: 2e-3 if TF32 else 1e-5,
       torch.bfloat16: 2 * 2.0 ** -7, torch.float16: 2 * 2.0 ** -10}
DEVICE = "cpu" if interpreting() else "cuda"

# (n, h, w, cin, cout, k, stride): odd sizes, channels not multiples of 16, batch 1 and 3
SHAPES = [
    (3, 9, 7, 5, 17, 3, 1),
    (1, 15, 15, 24, 3, 3, 2),
    (3, 7, 9, 17, 24, 1, 2),
    (1, 9, 15, 3, 5, 1, 1),
    (1, 7, 7, 16, 16, 3, 2),
]


def _nchw(t):
    return t.permute(0, 3, 1, 2)


def _nhwc(t):
    return t.permute(0, 2, 3, 1)


def _vector_dtype(dtype):
    return statistics_dtype(dtype)


def _bn_vectors(cin, dtype):
    vdtype = _vector_dtype(dtype)
    scale = (torch.rand(cin, dtype=vdtype) + 0.5).to(DEVICE)
    shift = (torch.randn(cin, dtype=vdtype) * 0.5).to(DEVICE)
    return scale, shift


def _weight(cout, cin, k, dtype, weight_dtype):
    w = torch.randn(cout, cin, k, k, dtype=torch.float64) / (cin * k * k) ** 0.5
    return w.to(weight_dtype if weight_dtype is not None else dtype).to(DEVICE)


def _preact64(x, scale, shift):
    """|a| of the reference (a >= 0): relu(scale * x + shift) in float64, rounded like the kernel input."""
    return ref._preact(x, scale, shift).to(x.dtype).double()


def _assert_within(actual, expected, bound, what):
    err = (actual.double().cpu() - expected.double().cpu()).abs()
    bound = bound.double().cpu()
    worst = (err - bound).max()
    assert worst <= 0, f"{what}: error exceeds the bound by {worst.item():.3g} (max error {err.max().item():.3g})"


# ---------------------------------------------------------------------------------------------
# conv_bnrelu_fwd
# ---------------------------------------------------------------------------------------------
FWD_CASES = [
    # shape index, dtype, weight dtype (None: x's), residual, stats
    (0, torch.float32, None, True, True),
    (1, torch.float32, None, False, True),
    (2, torch.float32, None, True, False),
    (3, torch.float32, None, False, False),
    (4, torch.float32, None, True, True),
    (0, torch.bfloat16, torch.float32, True, True),
    (1, torch.bfloat16, None, False, True),
    (2, torch.bfloat16, torch.float32, False, True),
    (4, torch.float16, torch.float32, True, True),
    (0, torch.float64, None, True, True),
    (2, torch.float64, None, False, True),
]


@pytest.mark.parametrize("shape,dtype,weight_dtype,residual,stats", FWD_CASES)
def test_conv_bnrelu_fwd_matches_reference(shape, dtype, weight_dtype, residual, stats):
    n, h, w, cin, cout, k, stride = SHAPES[shape]
    ho, wo = conv_output_size(h, k, stride), conv_output_size(w, k, stride)
    x = (torch.randn(n, h, w, cin, dtype=torch.float64) * 2).to(dtype).to(DEVICE)
    weight = _weight(cout, cin, k, dtype, weight_dtype)
    scale, shift = _bn_vectors(cin, dtype)
    res = torch.randn(n, ho, wo, cout, dtype=torch.float64).to(dtype).to(DEVICE) if residual else None

    y, pmean, pm2, pcount = conv_bnrelu_fwd(x, weight, scale, shift, res, stride, stats)
    y_ref = ref.conv_bnrelu(x.cpu(), weight.cpu(), scale.cpu(), shift.cpu(),
                            None if res is None else res.cpu(), stride, False)[0]

    assert y.shape == (n, ho, wo, cout) and y.dtype == dtype and y.is_contiguous()
    magnitude = _nhwc(F.conv2d(_nchw(_preact64(x.cpu(), scale.cpu(), shift.cpu())),
                               weight.cpu().to(dtype).double().abs(), stride=stride, padding=k // 2))
    if res is not None:
        magnitude = magnitude + res.cpu().double().abs()
    _assert_within(y, y_ref, REL[dtype] * (magnitude + y_ref.double().abs()) + 1e-30, "y")

    stat_dtype = _vector_dtype(dtype)
    if not stats:
        assert pmean.numel() == pm2.numel() == pcount.numel() == 0
        return
    t = stats_rows(n, ho, wo)
    assert pmean.shape == pm2.shape == (t, cout) and pcount.shape == (t,)
    assert pmean.dtype == pm2.dtype == pcount.dtype == stat_dtype
    counts = torch.full((t,), float(STATS_ROWS), dtype=torch.float64)
    counts[-1] = n * ho * wo - STATS_ROWS * (t - 1)
    assert torch.equal(pcount.cpu().double(), counts)
    # the partials describe the stored y exactly (to the statistics' precision)
    mean, m2, count = ref.merge_partials(pmean.cpu(), pm2.cpu(), pcount.cpu())
    rows = y.cpu().double().reshape(-1, cout)
    stat_rel = 1e-12 if dtype == torch.float64 else 2e-6
    assert count.item() == rows.shape[0]
    _assert_within(mean, rows.mean(0), stat_rel * (rows.abs().mean(0) + rows.std(0)), "merged mean")
    true_m2 = ((rows - rows.mean(0)) ** 2).sum(0)
    _assert_within(m2, true_m2, stat_rel * 10 * true_m2 + 1e-30, "merged M2")


RAW_FWD_CASES = [
    # shape index, dtype, weight dtype, stats: the conv reads x as it is (PROLOGUE=False)
    (0, torch.float32, None, True),
    (2, torch.bfloat16, torch.float32, True),
    (1, torch.float64, None, False),
]


@pytest.mark.parametrize("shape,dtype,weight_dtype,stats", RAW_FWD_CASES)
def test_conv_bnrelu_fwd_without_prologue(shape, dtype, weight_dtype, stats):
    """scale and shift None: y = conv(x), zero padding (the original unit's first conv and projection)."""
    n, h, w, cin, cout, k, stride = SHAPES[shape]
    x = (torch.randn(n, h, w, cin, dtype=torch.float64) * 2 - 0.5).to(dtype).to(DEVICE)
    weight = _weight(cout, cin, k, dtype, weight_dtype)
    y, pmean, pm2, pcount = conv_bnrelu_fwd(x, weight, None, None, None, stride, stats)
    y_ref = ref.conv_bnrelu(x.cpu(), weight.cpu(), None, None, None, stride, False)[0]
    magnitude = _nhwc(F.conv2d(_nchw(x.cpu().double().abs()), weight.cpu().to(dtype).double().abs(),
                               stride=stride, padding=k // 2))
    _assert_within(y, y_ref, REL[dtype] * (magnitude + y_ref.double().abs()) + 1e-30, "y")
    if stats:
        mean, m2, count = ref.merge_partials(pmean.cpu(), pm2.cpu(), pcount.cpu())
        rows = y.cpu().double().reshape(-1, cout)
        assert count.item() == rows.shape[0]
        _assert_within(mean, rows.mean(0), 2e-6 * (rows.abs().mean(0) + rows.std(0)), "merged mean")
    else:
        assert pmean.numel() == 0


def test_conv_bnrelu_fwd_stats_of_mean_100_std_001_output():
    """An output with mean 100 and std 0.01 keeps its variance (no E[y^2] - E[y]^2)."""
    n, h, w, cin, cout = 3, 15, 15, 5, 17
    x = torch.randn(n, h, w, cin).to(DEVICE)
    weight = (torch.randn(cout, cin, 3, 3) * 1e-4).to(DEVICE)
    scale, shift = _bn_vectors(cin, torch.float32)
    residual = (100 + 0.01 * torch.randn(n, h, w, cout)).to(DEVICE)
    y, pmean, pm2, pcount = conv_bnrelu_fwd(x, weight, scale, shift, residual, 1, True)
    mean, m2, count = ref.merge_partials(pmean.cpu(), pm2.cpu(), pcount.cpu())
    rows = y.cpu().double().reshape(-1, cout)
    true_var = rows.var(0, unbiased=False)
    assert (rows.mean(0) - 100).abs().max() < 0.01 and (true_var.sqrt() - 0.01).abs().max() < 0.002
    assert ((mean - rows.mean(0)).abs() < 1e-5).all()
    assert ((m2 / count - true_var).abs() / true_var).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# conv_dgrad
# ---------------------------------------------------------------------------------------------
DGRAD_CASES = [
    # shape index, dtype, weight dtype, add, h
    (0, torch.float32, None, True, True),
    (1, torch.float32, None, False, True),
    (2, torch.float32, None, True, False),
    (3, torch.float32, None, False, False),
    (4, torch.float32, None, True, True),
    (0, torch.bfloat16, torch.float32, False, True),
    (1, torch.bfloat16, None, True, True),
    (4, torch.float16, torch.float32, True, True),
    (1, torch.float64, None, True, True),
    (2, torch.float64, None, False, True),
]


@pytest.mark.parametrize("shape,dtype,weight_dtype,add,with_h", DGRAD_CASES)
def test_conv_dgrad_matches_reference(shape, dtype, weight_dtype, add, with_h):
    n, h, w, cin, cout, k, stride = SHAPES[shape]
    ho, wo = conv_output_size(h, k, stride), conv_output_size(w, k, stride)
    dy = torch.randn(n, ho, wo, cout, dtype=torch.float64).to(dtype).to(DEVICE)
    weight = _weight(cout, cin, k, dtype, weight_dtype)
    joined = torch.randn(n, h, w, cin, dtype=torch.float64).to(dtype).to(DEVICE) if add else None
    vdtype = _vector_dtype(dtype)
    if with_h:
        hx = torch.randn(n, h, w, cin, dtype=torch.float64).to(dtype).to(DEVICE)
        scale, shift = _bn_vectors(cin, dtype)
        mean = torch.randn(cin, dtype=vdtype).to(DEVICE)
        invstd = (torch.rand(cin, dtype=vdtype) + 0.5).to(DEVICE)
    else:
        hx = scale = shift = mean = invstd = None

    g, sum_g, sum_g_xhat = conv_dgrad(dy, weight, hx, scale, shift, mean, invstd, joined, stride, h, w)
    cpu = [None if t is None else t.cpu() for t in (dy, weight, hx, scale, shift, mean, invstd, joined)]
    g_ref, sum_g_ref, sum_g_xhat_ref = ref.conv_dgrad(*cpu, stride, h, w)

    assert g.shape == (n, h, w, cin) and g.dtype == dtype and g.is_contiguous()
    magnitude = _nhwc(torch.nn.grad.conv2d_input((n, cin, h, w), weight.cpu().to(dtype).double().abs(),
                                                 _nchw(dy.cpu().double().abs()), stride=stride, padding=k // 2))
    if joined is not None:
        magnitude = magnitude + joined.cpu().double().abs()
    bound = REL[dtype] * magnitude
    _assert_within(g, g_ref, bound + REL[dtype] * g_ref.double().abs() + 1e-30, "g")
    if not with_h:
        assert sum_g.numel() == sum_g_xhat.numel() == 0
        return
    assert sum_g.shape == sum_g_xhat.shape == (cin,) and sum_g.dtype == sum_g_xhat.dtype == vdtype
    xhat = ((hx.cpu().double() - mean.cpu().double()) * invstd.cpu().double()).abs()
    _assert_within(sum_g, sum_g_ref, bound.sum((0, 1, 2)) + 1e-12, "sum_g")
    _assert_within(sum_g_xhat, sum_g_xhat_ref, (bound * xhat).sum((0, 1, 2)) + 1e-12, "sum_g_xhat")


def test_conv_dgrad_is_deterministic():
    n, h, w, cin, cout, k, stride = SHAPES[1]
    dy = torch.randn(n, conv_output_size(h, k, stride), conv_output_size(w, k, stride), cout).to(DEVICE)
    weight = _weight(cout, cin, k, torch.float32, None)
    hx = torch.randn(n, h, w, cin).to(DEVICE)
    scale, shift = _bn_vectors(cin, torch.float32)
    mean, invstd = torch.randn(cin).to(DEVICE), (torch.rand(cin) + 0.5).to(DEVICE)
    first = conv_dgrad(dy, weight, hx, scale, shift, mean, invstd, None, stride, h, w)
    second = conv_dgrad(dy, weight, hx, scale, shift, mean, invstd, None, stride, h, w)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


# ---------------------------------------------------------------------------------------------
# conv_wgrad
# ---------------------------------------------------------------------------------------------
WGRAD_CASES = [
    # shape index, dtype, weight dtype
    (0, torch.float32, None),
    (1, torch.float32, None),
    (2, torch.float32, None),
    (3, torch.float32, None),
    (4, torch.float32, None),
    (0, torch.bfloat16, torch.float32),
    (2, torch.bfloat16, None),
    (4, torch.float16, torch.float32),
    (1, torch.float64, None),
]


@pytest.mark.parametrize("shape,dtype,weight_dtype", WGRAD_CASES)
def test_conv_wgrad_matches_reference(shape, dtype, weight_dtype):
    n, h, w, cin, cout, k, stride = SHAPES[shape]
    ho, wo = conv_output_size(h, k, stride), conv_output_size(w, k, stride)
    dy = torch.randn(n, ho, wo, cout, dtype=torch.float64).to(dtype).to(DEVICE)
    x = torch.randn(n, h, w, cin, dtype=torch.float64).to(dtype).to(DEVICE)
    weight = _weight(cout, cin, k, dtype, weight_dtype)
    scale, shift = _bn_vectors(cin, dtype)

    dweight = conv_wgrad(dy, x, scale, shift, weight, stride)
    dweight_ref = ref.conv_wgrad(dy.cpu(), x.cpu(), scale.cpu(), shift.cpu(), weight.cpu(), stride)

    assert dweight.shape == weight.shape and dweight.dtype == weight.dtype and dweight.is_contiguous()
    magnitude = torch.nn.grad.conv2d_weight(_nchw(_preact64(x.cpu(), scale.cpu(), shift.cpu())), tuple(weight.shape),
                                            _nchw(dy.cpu().double().abs()), stride=stride, padding=k // 2)
    weight_rel = 2.0 ** -23 if weight.dtype == torch.float32 else REL[weight.dtype]
    _assert_within(dweight, dweight_ref,
                   REL[dtype] * magnitude + weight_rel * dweight_ref.double().abs() + 1e-30, "dweight")


@pytest.mark.parametrize("shape,dtype,weight_dtype", [(0, torch.float32, None), (2, torch.float16, torch.float32)])
def test_conv_wgrad_without_prologue(shape, dtype, weight_dtype):
    """scale and shift None: dW = conv_weight_grad(x, dy), x read as it is."""
    n, h, w, cin, cout, k, stride = SHAPES[shape]
    ho, wo = conv_output_size(h, k, stride), conv_output_size(w, k, stride)
    dy = torch.randn(n, ho, wo, cout, dtype=torch.float64).to(dtype).to(DEVICE)
    x = (torch.randn(n, h, w, cin, dtype=torch.float64) - 0.5).to(dtype).to(DEVICE)
    weight = _weight(cout, cin, k, dtype, weight_dtype)
    dweight = conv_wgrad(dy, x, None, None, weight, stride)
    dweight_ref = ref.conv_wgrad(dy.cpu(), x.cpu(), None, None, weight.cpu(), stride)
    magnitude = torch.nn.grad.conv2d_weight(_nchw(x.cpu().double().abs()), tuple(weight.shape),
                                            _nchw(dy.cpu().double().abs()), stride=stride, padding=k // 2)
    weight_rel = 2.0 ** -23 if weight.dtype == torch.float32 else REL[weight.dtype]
    _assert_within(dweight, dweight_ref,
                   REL[dtype] * magnitude + weight_rel * dweight_ref.double().abs() + 1e-30, "dweight")
    with pytest.raises(ValueError, match="scale and shift must be given together"):
        conv_wgrad(dy, x, torch.ones(cin).to(DEVICE), None, weight, stride)


def test_weight_strides_are_honoured():
    """A non-contiguous weight (channels_last nn.Conv2d weight) is indexed by its strides."""
    n, h, w, cin, cout, k, stride = SHAPES[0]
    x = torch.randn(n, h, w, cin).to(DEVICE)
    weight = _weight(cout, cin, k, torch.float32, None)
    strided = weight.to(memory_format=torch.channels_last)
    assert not strided.is_contiguous()
    scale, shift = _bn_vectors(cin, torch.float32)
    assert torch.equal(conv_bnrelu_fwd(x, strided, scale, shift, None, stride, False)[0],
                       conv_bnrelu_fwd(x, weight, scale, shift, None, stride, False)[0])
    dy = torch.randn(n, h, w, cout).to(DEVICE)
    assert torch.equal(conv_dgrad(dy, strided, None, None, None, None, None, None, stride, h, w)[0],
                       conv_dgrad(dy, weight, None, None, None, None, None, None, stride, h, w)[0])


# ---------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------
def _fwd_args(**override):
    args = dict(x=torch.randn(1, 5, 5, 16), weight=torch.randn(8, 16, 3, 3), scale=torch.ones(16),
                shift=torch.zeros(16), residual=None, stride=1, stats=True)
    args.update(override)
    return {k: (v.to(DEVICE) if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


@pytest.mark.parametrize("override,error,message", [
    ({"weight": torch.randn(8, 17, 3, 3)}, ValueError, "weight has 17 input channels but x has 16"),
    ({"weight": torch.randn(8, 16, 5, 5)}, ValueError, "weight must be"),
    ({"weight": torch.randn(8, 16, 3, 3, dtype=torch.float16)}, TypeError, "weight has dtype"),
    ({"x": torch.randint(0, 9, (1, 5, 5, 16), dtype=torch.int32)}, TypeError, "x has dtype"),
    ({"x": torch.randn(1, 16, 5, 5).permute(0, 2, 3, 1)}, ValueError, "x must be a contiguous"),
    ({"x": torch.randn(5, 5, 16)}, ValueError, "x must be a 4-D"),
    ({"scale": torch.ones(15)}, ValueError, "scale has shape"),
    ({"shift": torch.zeros(16, dtype=torch.float64)}, TypeError, "shift has dtype"),
    ({"stride": 3}, ValueError, "stride must be"),
    ({"residual": torch.randn(1, 5, 5, 7)}, ValueError, "residual has shape"),
    ({"residual": torch.randn(1, 5, 5, 8, dtype=torch.float64)}, TypeError, "residual has dtype"),
    ({"shift": None}, ValueError, "scale and shift must be given together"),
])
def test_conv_bnrelu_fwd_rejects_bad_input(override, error, message):
    with pytest.raises(error, match=message):
        conv_bnrelu_fwd(**_fwd_args(**override))


def test_conv_dgrad_rejects_bad_input():
    dy, weight = torch.randn(1, 5, 5, 8).to(DEVICE), torch.randn(8, 16, 3, 3).to(DEVICE)
    h = torch.randn(1, 5, 5, 16).to(DEVICE)
    ones = torch.ones(16).to(DEVICE)
    with pytest.raises(ValueError, match="weight has 9 output channels but dy has 8"):
        conv_dgrad(dy, torch.randn(9, 16, 3, 3).to(DEVICE), None, None, None, None, None, None, 1, 5, 5)
    with pytest.raises(ValueError, match="dy is 5x5 but a 3x3 stride-2 conv"):
        conv_dgrad(dy, weight, None, None, None, None, None, None, 2, 5, 5)
    with pytest.raises(ValueError, match="mean is required when h is given"):
        conv_dgrad(dy, weight, h, ones, ones, None, ones, None, 1, 5, 5)
    with pytest.raises(ValueError, match="add has shape"):
        conv_dgrad(dy, weight, None, None, None, None, None, torch.randn(1, 5, 5, 8).to(DEVICE), 1, 5, 5)
    with pytest.raises(ValueError, match="height must be a positive int"):
        conv_dgrad(dy, weight, None, None, None, None, None, None, 1, 0, 5)


def test_conv_wgrad_rejects_bad_input():
    x, weight = torch.randn(1, 5, 5, 16).to(DEVICE), torch.randn(8, 16, 3, 3).to(DEVICE)
    ones, zeros = torch.ones(16).to(DEVICE), torch.zeros(16).to(DEVICE)
    with pytest.raises(ValueError, match="dy has shape"):
        conv_wgrad(torch.randn(1, 3, 3, 8).to(DEVICE), x, ones, zeros, weight, 1)
    with pytest.raises(TypeError, match="dy has dtype"):
        conv_wgrad(torch.randn(1, 5, 5, 8, dtype=torch.float64).to(DEVICE), x, ones, zeros, weight, 1)
    with pytest.raises(ValueError, match="weight has 17 input channels but x has 16"):
        conv_wgrad(torch.randn(1, 5, 5, 8).to(DEVICE), x, ones, zeros, torch.randn(8, 17, 3, 3).to(DEVICE), 1)
