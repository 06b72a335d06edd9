"""The C++ operators of the fused-unit contract (torch.ops.fused_preact.*) against the float64 oracle
in fused_preact/reference_ops.py: statistics partials, bn_finalize with BatchNorm running statistics, the
BN-ReLU apply / backward passes and the conv composites; schemas, opcheck, Meta shapes, compile and
argument errors.

CUDA cases are parametrized too: they skip without a device, and while the extension registers no
CUDA kernel for an operator (see notes/cpp_ops.md)."""
import math

import pytest
import torch

from fused_preact import reference_ops as ref
from fused_preact import _extension
from fused_preact.unit_ops import OPERATORS, SCHEMAS, conv_output_size

pytestmark = pytest.mark.skipif(not _extension.available(), reason=str(_extension.unavailable_reason()))
ops = torch.ops.fused_preact

# rows per statistics partial on every device (csrc/unit_ops.h kRowsPerPartial, the 1x1 GEMM's row tile)
ROWS_PER_PARTIAL = 128


def _has_cuda_kernel(op):
    return _extension.available() and torch._C._dispatch_has_kernel_for_dispatch_key(
        f"fused_preact::{op}", "CUDA")


def devices(op):
    return ["cpu", pytest.param("cuda", marks=[
        pytest.mark.gpu,
        pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
        pytest.mark.skipif(not _has_cuda_kernel(op), reason=f"no CUDA kernel registered for {op}")])]


DTYPES = [torch.float32, torch.float64, torch.bfloat16]
# (rtol, atol relative to the largest magnitude of the expected tensor)
TOL = {torch.float64: (1e-9, 1e-9), torch.float32: (1e-4, 1e-5), torch.bfloat16: (1.6e-2, 8e-3)}
SHAPES = [(1, 7, 9, 3), (3, 9, 15, 5), (3, 15, 7, 17)]   # NHWC
# 286 rows (a partial second block of 256) of 83 channels: the CPU kernels' register-blocked
# channel groups (4 vectors: 64 float32 lanes with AVX-512), a whole leftover vector and a tail.
WIDE = (2, 13, 11, 83)


def close(got, expected, dtype):
    rtol, atol = TOL[dtype]
    expected = expected.double()
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(got.double().cpu(), expected.cpu(), rtol=rtol, atol=atol * scale)


def activation(shape, dtype, device, mean=1.0, std=2.0):
    c = shape[-1]
    x = torch.randn(shape, dtype=torch.float64) * std + mean + torch.randn(c, dtype=torch.float64)
    return x.to(dtype=dtype, device=device)


def channel_params(c, device):
    scale = (torch.rand(c) + 0.5) * torch.where(torch.rand(c) < 0.2, -1.0, 1.0)
    return scale.to(device), (torch.randn(c) * 0.5).to(device)


def merged(pmean, pm2, pcount):
    mean, m2, n = ref.merge_partials(pmean.cpu(), pm2.cpu(), pcount.cpu())
    return mean, m2 / n, n


def check_partials(partials, y):
    """Partials of NHWC y: T = ceil(rows / 256) float32 rows whose merge gives y's mean and var."""
    pmean, pm2, pcount = partials
    rows, c = y.numel() // y.shape[-1], y.shape[-1]
    t = math.ceil(rows / ROWS_PER_PARTIAL)
    assert pmean.shape == pm2.shape == (t, c) and pcount.shape == (t,)
    assert pmean.dtype == pm2.dtype == pcount.dtype == ref.stat_dtype(y)
    assert pcount.sum().item() == rows
    mean, var, _ = merged(pmean, pm2, pcount)
    y64 = y.double().cpu().reshape(rows, c)
    torch.testing.assert_close(mean, y64.mean(0), rtol=1e-5, atol=1e-5 * y64.abs().max().item())
    torch.testing.assert_close(var, y64.var(0, unbiased=False), rtol=1e-4, atol=1e-6)


def test_schemas_match_the_contract():
    for name in OPERATORS:
        expected = torch._C.parse_schema(f"fused_preact::{name}{SCHEMAS[name]}")
        assert getattr(ops, name).default._schema == expected, name


@pytest.mark.skipif(not _extension.built_with_cuda(), reason="extension built without its CUDA part")
def test_built_with_cuda_registers_a_cuda_kernel_for_every_operator():
    """A CUDA build gives backend="cuda" every operator on CUDA tensors (none falls back)."""
    for name in OPERATORS + ("bn_relu_apply", "bn_relu_backward_reduce", "batch_stats"):
        assert _has_cuda_kernel(name), name


# -- statistics ----------------------------------------------------------------
@pytest.mark.parametrize("device", devices("channel_stats"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 16, 16, 8), WIDE])
def test_channel_stats_partials_merge_to_the_statistics(shape, dtype, device):
    x = activation(shape, dtype, device)
    check_partials(ops.channel_stats(x), x)


@pytest.mark.parametrize("device", devices("channel_stats"))
@pytest.mark.parametrize("c", [5, 83])
def test_channel_stats_large_mean_keeps_its_variance(c, device):
    x = (100 + 0.01 * torch.randn(3, 17, 15, c, dtype=torch.float64)).float().to(device)
    mean, var, _ = merged(*ops.channel_stats(x))
    x64 = x.double().cpu().reshape(-1, c)
    torch.testing.assert_close(mean, x64.mean(0), rtol=1e-6, atol=0)  # float32 partials
    torch.testing.assert_close(var, x64.var(0, unbiased=False), rtol=1e-3, atol=0)


@pytest.mark.parametrize("device", devices("bn_finalize"))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("running", ["momentum", "cumulative", "absent"])
@pytest.mark.parametrize("shape", [(3, 9, 15, 5), (1, 7, 9, 17)])
def test_bn_finalize_matches_reference(shape, running, dtype, device):
    x = activation(shape, dtype, device, mean=3.0)
    c = shape[-1]
    partials = ops.channel_stats(x)
    weight, bias = channel_params(c, device)
    momentum = {"momentum": 0.1, "cumulative": -1.0, "absent": 0.1}[running]
    if running == "absent":
        state = (None, None, None)
    else:
        state = ((torch.randn(c) * 0.1).to(device), (torch.rand(c) + 0.5).to(device),
                 torch.tensor(3, device=device))
    expected_state = [None if t is None else t.cpu().clone() for t in state]
    got = ops.bn_finalize(*partials, weight, bias, *state, momentum, 1e-5)
    expected = ref.bn_finalize(*[p.cpu() for p in partials], weight.cpu(), bias.cpu(), *expected_state,
                               momentum, 1e-5)
    for g, e in zip(got, expected):
        assert g.dtype == ref.stat_dtype(x) and g.shape == (c,)
        torch.testing.assert_close(g.cpu(), e, rtol=1e-5, atol=1e-5)
    if running != "absent":
        torch.testing.assert_close(state[0].cpu(), expected_state[0], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(state[1].cpu(), expected_state[1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("device", devices("bn_finalize"))
@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_finalize_running_stats_follow_nn_batchnorm2d(momentum, device):
    c = 6
    bn = torch.nn.BatchNorm2d(c, momentum=momentum).to(device)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    tracked = bn.num_batches_tracked.clone()
    for step in range(3):
        x = activation((2, 5, 7, c), torch.float32, device, mean=2.0)
        bn(x.permute(0, 3, 1, 2))
        tracked += 1
        ops.bn_finalize(*ops.channel_stats(x), bn.weight.detach(), bn.bias.detach(), running_mean,
                        running_var, tracked, -1.0 if momentum is None else momentum, bn.eps)
    torch.testing.assert_close(running_mean, bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(running_var, bn.running_var, rtol=1e-5, atol=1e-6)


# -- elementwise passes --------------------------------------------------------
@pytest.mark.parametrize("device", devices("bn_relu_apply"))
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [WIDE])
def test_bn_relu_apply(shape, dtype, with_residual, device):
    x = activation(shape, dtype, device)
    scale, shift = channel_params(shape[-1], device)
    residual = activation(shape, dtype, device) if with_residual else None
    out = ops.bn_relu_apply(x, scale, shift, residual)
    expected = torch.relu(scale.double().cpu() * x.double().cpu() + shift.double().cpu())
    if with_residual:
        expected = expected + residual.double().cpu()
    assert out.dtype == dtype and out.shape == x.shape
    close(out, expected, dtype)


@pytest.mark.parametrize("device", devices("bn_backward_finish"))
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("batch_stats", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [WIDE])
def test_bn_backward_finish(shape, dtype, batch_stats, with_add, device):
    c = shape[-1]
    g, h = activation(shape, dtype, device, mean=0.0), activation(shape, dtype, device, mean=50.0)
    mean, invstd = (torch.randn(c) + 50).to(device), (torch.rand(c) + 0.5).to(device)
    weight = channel_params(c, device)[0]
    sum_g, sum_g_xhat = (torch.randn(c) * 10).to(device), (torch.randn(c) * 10).to(device)
    add = activation(shape, dtype, device) if with_add else None
    count = float(g.numel() // c)
    got = ops.bn_backward_finish(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, add, batch_stats)
    cpu = [t if t is None else t.cpu() for t in (g, h, mean, invstd, weight, sum_g, sum_g_xhat)]
    expected = ref.bn_backward_finish(*cpu, count, None if add is None else add.cpu(), batch_stats)
    assert got.dtype == dtype
    close(got, expected.double() if dtype != torch.bfloat16 else
          ref.bn_backward_finish(*[t.double() for t in cpu], count,
                                 None if add is None else add.cpu().double(), batch_stats), dtype)


@pytest.mark.parametrize("device", devices("bn_relu_backward_reduce"))
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES + [(3, 16, 16, 8), WIDE])
def test_bn_relu_backward_reduce(shape, dtype, with_add, device):
    c = shape[-1]
    t, h = activation(shape, dtype, device, mean=0.0), activation(shape, dtype, device)
    scale, shift = channel_params(c, device)
    mean, invstd = torch.randn(c).to(device), (torch.rand(c) + 0.5).to(device)
    add = activation(shape, dtype, device) if with_add else None
    g, sum_g, sum_g_xhat = ops.bn_relu_backward_reduce(t, h, scale, shift, mean, invstd, add)
    t64 = t.double().cpu() + (add.double().cpu() if with_add else 0)
    h64 = h.double().cpu()
    g64 = t64 * (scale.double().cpu() * h64 + shift.double().cpu() > 0)
    close(g, g64, dtype)
    xhat = (h64 - mean.double().cpu()) * invstd.double().cpu()
    assert sum_g.dtype == sum_g_xhat.dtype == ref.stat_dtype(t)
    torch.testing.assert_close(sum_g.double().cpu(), g64.sum((0, 1, 2)), rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(sum_g_xhat.double().cpu(), (g64 * xhat).sum((0, 1, 2)), rtol=1e-4, atol=1e-3)


# -- conv composites -----------------------------------------------------------
CONV_CASES = [(k, s) for k in (1, 3) for s in (1, 2)]


def conv_inputs(dtype, device, k, cin=5, cout=6, shape=(3, 9, 7)):
    n, h, w = shape
    x = activation((n, h, w, cin), dtype, device)
    weight = (torch.randn(cout, cin, k, k) / math.sqrt(cin * k * k)).to(device)
    scale, shift = channel_params(cin, device)
    return x, weight, scale, shift


@pytest.mark.parametrize("device", devices("conv_bnrelu"))
@pytest.mark.parametrize("stats", [True, False])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride", CONV_CASES)
def test_conv_bnrelu(k, stride, dtype, with_residual, stats, device):
    x, weight, scale, shift = conv_inputs(dtype, device, k)
    n, h, w, _ = x.shape
    out_shape = (n, conv_output_size(h, k, stride), conv_output_size(w, k, stride), weight.shape[0])
    residual = activation(out_shape, dtype, device) if with_residual else None
    y, pmean, pm2, pcount = ops.conv_bnrelu(x, weight, scale, shift, residual, stride, stats)
    expected = ref.conv_bnrelu(*[t.cpu() for t in (x, weight, scale, shift)],
                               None if residual is None else residual.cpu(), stride, False)[0]
    assert y.shape == out_shape and y.dtype == dtype and y.is_contiguous()
    close(y, expected, dtype)
    if stats:
        check_partials((pmean, pm2, pcount), y)   # the statistics of y as stored
    else:
        assert pmean.numel() == pm2.numel() == pcount.numel() == 0


@pytest.mark.parametrize("device", devices("conv_bnrelu"))
@pytest.mark.parametrize("dtype", DTYPES + [torch.float16])
@pytest.mark.parametrize("k,stride", CONV_CASES)
def test_conv_bnrelu_without_prologue(k, stride, dtype, device):
    """scale and shift None: y = conv(x) with its statistics (the original unit's first conv and
    projection), and its weight gradient of x as it is."""
    x, weight, _, _ = conv_inputs(dtype if dtype != torch.float16 else torch.float32, device, k)
    x = x.to(dtype)
    y, *partials = ops.conv_bnrelu(x, weight, None, None, None, stride, True)
    expected = ref.conv_bnrelu(x.cpu(), weight.cpu(), None, None, None, stride, False)[0]
    close(y, expected, dtype if dtype != torch.float16 else torch.bfloat16)
    check_partials(partials, y)
    dy = activation(y.shape, dtype, device, mean=0.0)
    got = ops.conv_wgrad(dy, x, None, None, weight, stride)
    close(got, ref.conv_wgrad(dy.cpu(), x.cpu(), None, None, weight.cpu(), stride),
          dtype if dtype != torch.float16 else torch.bfloat16)


@pytest.mark.parametrize("device", devices("conv_bnrelu"))
@pytest.mark.parametrize("dtype", DTYPES)
def test_conv_bnrelu_wide_output_statistics(dtype, device):
    """The epilogue's residual add, rounding and partials over register-blocked channel groups."""
    x, weight, scale, shift = conv_inputs(dtype, device, 1, cout=WIDE[-1], shape=WIDE[:3])
    residual = activation(WIDE, dtype, device)
    y, *partials = ops.conv_bnrelu(x, weight, scale, shift, residual, 1, True)
    expected = ref.conv_bnrelu(*[t.cpu() for t in (x, weight, scale, shift)], residual.cpu(), 1, False)[0]
    close(y, expected, dtype)
    check_partials(partials, y)


@pytest.mark.parametrize("device", devices("conv_dgrad"))
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("with_h", [True, False])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride", CONV_CASES)
def test_conv_dgrad(k, stride, dtype, with_h, with_add, device):
    h, weight, scale, shift = conv_inputs(dtype, device, k)
    n, height, width, cin = h.shape
    dy = activation((n, conv_output_size(height, k, stride), conv_output_size(width, k, stride),
                     weight.shape[0]), dtype, device, mean=0.0)
    mean, invstd = torch.randn(cin).to(device), (torch.rand(cin) + 0.5).to(device)
    add = activation(h.shape, dtype, device, mean=0.0) if with_add else None
    bn = (h, scale, shift, mean, invstd) if with_h else (None,) * 5
    got = ops.conv_dgrad(dy, weight, *bn, add, stride, height, width)
    expected = ref.conv_dgrad(*[None if t is None else t.cpu() for t in (dy, weight, *bn, add)],
                              stride, height, width)
    assert got[0].shape == h.shape and got[0].dtype == dtype
    # the bfloat16 reference rounds t + add once from float64; the composite rounds t first
    close(got[0], expected[0], dtype)
    if with_h:
        for g, e in zip(got[1:], expected[1:]):
            assert g.shape == (cin,) and g.dtype == ref.stat_dtype(dy)
            scale_ = max(e.abs().max().item(), 1.0)
            torch.testing.assert_close(g.cpu(), e, rtol=TOL[dtype][0] * 2, atol=TOL[dtype][1] * scale_ * 4)
    else:
        assert got[1].numel() == got[2].numel() == 0


@pytest.mark.parametrize("device", devices("conv_wgrad"))
@pytest.mark.parametrize("weight_dtype", ["float32", "activation"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k,stride", CONV_CASES)
def test_conv_wgrad(k, stride, dtype, weight_dtype, device):
    x, weight, scale, shift = conv_inputs(dtype, device, k)
    if weight_dtype == "activation":
        weight = weight.to(dtype)
    n, h, w, _ = x.shape
    dy = activation((n, conv_output_size(h, k, stride), conv_output_size(w, k, stride), weight.shape[0]),
                    dtype, device, mean=0.0)
    got = ops.conv_wgrad(dy, x, scale, shift, weight, stride)
    expected = ref.conv_wgrad(*[t.cpu() for t in (dy, x, scale, shift, weight)], stride)
    assert got.shape == weight.shape and got.dtype == weight.dtype and got.is_contiguous()
    close(got, expected, dtype)


# -- torch.library integration -------------------------------------------------
def _opcheck_cases():
    x, weight, scale, shift = conv_inputs(torch.float32, "cpu", 3, shape=(2, 5, 7))
    dy = torch.randn(2, 3, 4, 6)
    stats = ops.channel_stats(x)
    c = x.shape[-1]
    vec = lambda: torch.rand(c) + 0.5  # noqa: E731
    return {
        "channel_stats": (x,),
        "bn_finalize": (*stats, vec(), vec(), torch.zeros(c), torch.ones(c), torch.tensor(2), -1.0, 1e-5),
        "conv_bnrelu": (x, weight, scale, shift, torch.randn(2, 3, 4, 6), 2, True),
        "conv_dgrad": (dy, weight, x, scale, shift, vec(), vec(), torch.randn_like(x), 2, 5, 7),
        "conv_wgrad": (dy, x, scale, shift, weight, 2),
        "bn_backward_finish": (x, x + 1, vec(), vec(), vec(), vec(), vec(), 70.0, torch.randn_like(x), True),
        "bn_relu_apply": (x, scale, shift, torch.randn_like(x)),
        "bn_relu_backward_reduce": (x, x + 1, scale, shift, vec(), vec(), None),
        "bn_add_relu": (x, scale, shift, torch.randn_like(x), vec(), vec()),
        "bn_add_relu_backward": (torch.randn_like(x), torch.relu(torch.randn_like(x)), x, vec(), vec(),
                                 x + 1, vec(), vec()),
    }


@pytest.mark.parametrize("name", list(OPERATORS) + ["bn_relu_apply", "bn_relu_backward_reduce"])
def test_opcheck(name):
    torch.library.opcheck(getattr(ops, name).default, _opcheck_cases()[name])


@pytest.mark.parametrize("name", list(OPERATORS) + ["bn_relu_apply", "bn_relu_backward_reduce"])
def test_meta_shapes_match_cpu(name):
    args = _opcheck_cases()[name]
    meta_args = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
    real = getattr(ops, name)(*args)
    fake = getattr(ops, name)(*meta_args)
    real, fake = (real, fake) if isinstance(real, tuple) else ((real,), (fake,))
    for r, f in zip(real, fake):
        assert f.device.type == "meta" and f.shape == r.shape and f.dtype == r.dtype


def test_compiled_forward_and_backward_of_a_unit_step():
    x, weight, scale_unused, _ = conv_inputs(torch.float32, "cpu", 3)
    c = x.shape[-1]
    bn_weight, bn_bias = channel_params(c, "cpu")

    def step(x, weight, dy):
        mean, invstd, scale, shift = ops.bn_finalize(*ops.channel_stats(x), bn_weight, bn_bias, None, None,
                                                     None, 0.1, 1e-5)
        y, *_ = ops.conv_bnrelu(x, weight, scale, shift, None, 1, True)
        g, sum_g, sum_g_xhat = ops.conv_dgrad(dy, weight, x, scale, shift, mean, invstd, None, 1,
                                              x.shape[1], x.shape[2])
        dh = ops.bn_backward_finish(g, x, mean, invstd, bn_weight, sum_g, sum_g_xhat,
                                    float(x.numel() // c), None, True)
        return y, dh, ops.conv_wgrad(dy, x, scale, shift, weight, 1)

    dy = torch.randn(*x.shape[:3], weight.shape[0])
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    for got, expected in zip(compiled(x, weight, dy), step(x, weight, dy)):
        torch.testing.assert_close(got, expected)


# -- argument errors -----------------------------------------------------------
def _bad_calls():
    x, weight, scale, shift = conv_inputs(torch.float32, "cpu", 3)
    c = x.shape[-1]
    v = torch.ones(c)
    stats = ops.channel_stats(x)
    return [
        (lambda: ops.channel_stats(x[0]), r"channel_stats: x must be a 4-D NHWC tensor"),
        (lambda: ops.channel_stats(x.int()), r"channel_stats: x must be float32, float64"),
        (lambda: ops.channel_stats(x.transpose(1, 2)), r"channel_stats: x must be contiguous NHWC"),
        (lambda: ops.bn_relu_apply(x, torch.ones(c + 1), v, None), r"bn_relu_apply: scale must be a 1-D tensor of 5"),
        (lambda: ops.bn_relu_apply(x, v, v, x[:, :1]), r"bn_relu_apply: residual must have shape"),
        (lambda: ops.bn_relu_apply(x, v, v, x.double()), r"bn_relu_apply: residual must have x's dtype"),
        (lambda: ops.conv_bnrelu(x, weight[:, :3], scale, shift, None, 1, True), r"conv_bnrelu: weight has 3 input"),
        (lambda: ops.conv_bnrelu(x, torch.randn(6, 5, 5, 5), scale, shift, None, 1, True), r"K = 1 or 3"),
        (lambda: ops.conv_bnrelu(x, weight, scale, shift, None, 0, True), r"conv_bnrelu: stride must be >= 1"),
        (lambda: ops.conv_bnrelu(x, weight.double(), scale, shift, None, 1, True), r"weight must be float32 or x's"),
        (lambda: ops.conv_dgrad(torch.randn(3, 9, 7, 6), weight, x, None, shift, v, v, None, 1, 9, 7),
         r"conv_dgrad: scale is required when h is given"),
        (lambda: ops.conv_dgrad(torch.randn(3, 9, 7, 6), weight, None, None, None, None, None, None, 1, 8, 7),
         r"conv_dgrad: height and width \(8, 7\)"),
        (lambda: ops.conv_wgrad(torch.randn(3, 5, 4, 6), x, scale, shift, weight, 1), r"conv_wgrad: dy must have shape"),
        (lambda: ops.bn_finalize(stats[0], stats[1][:, :2].contiguous(), stats[2], v, v, None, None, None, 0.1, 1e-5),
         r"bn_finalize: pm2 must have pmean's shape"),
        (lambda: ops.bn_finalize(*stats, v, v, torch.zeros(c), torch.ones(c), None, -1.0, 1e-5),
         r"bn_finalize: num_batches_tracked is required when momentum < 0"),
        (lambda: ops.bn_finalize(*stats, v, v, torch.zeros(c), None, None, 0.1, 1e-5),
         r"running_mean and running_var must be given together"),
        (lambda: ops.bn_backward_finish(x, x, v, v, v, v, v, 10.0, x[..., :2], True), r"bn_backward_finish: add must have"),
        (lambda: ops.conv_bnrelu(x, weight, scale, None, None, 1, True), r"conv_bnrelu: scale and shift must be given"),
        (lambda: ops.conv_wgrad(torch.randn(3, 9, 7, 6), x, None, shift, weight, 1),
         r"conv_wgrad: scale and shift must be given"),
        (lambda: ops.bn_add_relu(x, v, v, x[..., :2], None, None), r"bn_add_relu: residual must have shape"),
        (lambda: ops.bn_add_relu(x, v, v, x, v, None), r"bn_add_relu: residual_scale and residual_shift"),
        (lambda: ops.bn_add_relu_backward(x, x.double(), x, v, v, None, None, None),
         r"bn_add_relu_backward: y must have dy's dtype"),
        (lambda: ops.bn_add_relu_backward(x, x, x, v, v, x, None, v),
         r"bn_add_relu_backward: residual, residual_mean and residual_invstd"),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls()) if _extension.available() else 0))
def test_bad_arguments_raise_naming_the_argument(case):
    call, match = _bad_calls()[case]
    with pytest.raises((RuntimeError, TypeError), match=match):
        call()
