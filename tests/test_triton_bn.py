"""The Triton BN kernels (channel_stats, bn_finalize, bn_backward_finish) against the float64
reference operators and nn.BatchNorm2d, plus their ahead-of-time compile for sm_80 / sm_90.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (tests/conftest.py).
Tolerances, relative to the largest magnitude of the compared tensor unless stated:
statistics of fp32/bf16/fp16 inputs are accumulated in fp32 (half inputs are exact in
fp32): 1e-5 for means, variances and BN coefficients. Partials are stored in fp32 as the
contract says, so a mean-100 / std-0.01 tensor loses about 4e-6 of each partial mean to
rounding, which bounds its merged M2 at about 1e-4 relative (stated where it applies).
bn_backward_finish: one rounding to g's dtype after fp32 arithmetic: fp32 1e-5, fp16 1e-3,
bf16 1e-2 (the interpreter truncates instead of rounding); float64 1e-12 throughout.
"""
import os
import subprocess
import sys

import pytest
import torch

from fused_preact import reference_ops
from gpu_code import ARCHS, assert_no_spills, compile_triton
from fused_preact.kernels import bn_backward_finish as finish_module
from fused_preact.kernels import bn_finalize as finalize_module
from fused_preact.kernels import channel_stats as stats_module
from fused_preact.kernels.bn_backward_finish import bn_backward_finish
from fused_preact.kernels.bn_finalize import bn_finalize
from fused_preact.kernels.channel_stats import channel_stats, partial_rows
from fused_preact.unit_ops import statistics_dtype

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
# rows (N*H*W) -> an NHWC batch shape with that many rows
ROW_SHAPES = {1: (1, 1, 1), 7: (1, 7, 1), 63: (3, 3, 7), 1000: (2, 20, 25)}
CHANNELS = [1, 3, 17, 64]
FINISH_TOL = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2, torch.float64: 1e-12}


def _diagonal(params):
    """The default run's sample of rows x channels x dtype: each dtype at four (rows, channels) pairs
    that take every row count and every channel count once; the whole product with --full."""
    return list(ROW_SHAPES).index(params["rows"]) == CHANNELS.index(params["channels"])


def _stat_dtype(dtype):
    return statistics_dtype(dtype)


def _stat_tol(dtype):
    return 1e-12 if dtype == torch.float64 else 1e-5


def _close(got, expected, tol, what):
    """|got - expected| <= tol * max|expected| (and the same dtype-independent NaN pattern)."""
    got, expected = got.double().cpu(), expected.double().cpu()
    scale = expected.abs().max().clamp_min(1e-30)
    torch.testing.assert_close(got, expected, rtol=0, atol=float(tol * scale), msg=lambda m: f"{what}: {m}")


def _nhwc(rows, channels, dtype, mean=0.0, std=1.0):
    """Fresh random NHWC data, each channel with its own offset around ``mean``."""
    shape = (*ROW_SHAPES[rows], channels)
    offsets = torch.randn(channels, dtype=torch.float64) * std * 3
    x = mean + offsets + std * torch.randn(shape, dtype=torch.float64)
    return x.to(dtype=dtype, device=DEVICE)


def _float64_stats(x):
    x2d = x.double().reshape(-1, x.shape[-1])
    mean = x2d.mean(0)
    return mean, ((x2d - mean) ** 2).sum(0), x2d.shape[0]


# ---- channel_stats -----------------------------------------------------------------
@pytest.mark.default_cases(keep=_diagonal)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("rows", list(ROW_SHAPES))
def test_channel_stats_partials_merge_to_float64_statistics(rows, channels, dtype):
    x = _nhwc(rows, channels, dtype, mean=0.5, std=2.0)
    pmean, pm2, pcount = channel_stats(x)
    t = partial_rows(rows, channels)
    stat = _stat_dtype(dtype)
    assert pmean.shape == pm2.shape == (t, channels) and pcount.shape == (t,)
    assert pmean.dtype == pm2.dtype == pcount.dtype == stat
    assert pcount.sum().item() == rows and bool((pcount > 0).all())
    mean, m2, n = reference_ops.merge_partials(pmean, pm2, pcount)
    expected_mean, expected_m2, expected_n = _float64_stats(x)
    assert n.item() == expected_n
    tol = _stat_tol(dtype)
    _close(mean, expected_mean, tol, "mean")
    if rows > 1:
        _close(m2, expected_m2, tol * 10, "M2")
    else:
        assert bool((m2 == 0).all()), "one row has no spread"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_channel_stats_large_mean_keeps_its_variance(dtype):
    # mean 100, std 0.01: E[x^2] - E[x]^2 in fp32 would return noise, even negative values
    x = _nhwc(1000, 17, dtype, mean=100.0, std=0.01)
    mean, m2, n = reference_ops.merge_partials(*channel_stats(x))
    expected_mean, expected_m2, _ = _float64_stats(x)
    # fp32: every partial mean is rounded to fp32 (4e-6 at 100), see the module docstring
    torch.testing.assert_close(mean, expected_mean, rtol=1e-7 if dtype == torch.float32 else 1e-14, atol=0)
    torch.testing.assert_close(m2, expected_m2, rtol=1e-4 if dtype == torch.float32 else 1e-10, atol=0)


def test_channel_stats_each_partial_holds_its_rows():
    """Row t of the partials describes pcount[t] consecutive rows of x (the layout bn_finalize merges)."""
    x = _nhwc(1000, 3, torch.float32)
    pmean, pm2, pcount = channel_stats(x)
    x2d, start = x.double().reshape(-1, 3), 0
    for t in range(pcount.shape[0]):
        rows = x2d[start:start + int(pcount[t])]
        start += rows.shape[0]
        torch.testing.assert_close(pmean[t].double(), rows.mean(0), rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(pm2[t].double(), ((rows - rows.mean(0)) ** 2).sum(0), rtol=1e-5, atol=1e-5)
    assert start == x2d.shape[0]


def test_channel_stats_rejects_bad_input():
    with pytest.raises(TypeError, match="x has dtype torch.int32"):
        channel_stats(torch.ones(1, 2, 2, 3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(ValueError, match="x must be a 4-D NHWC tensor"):
        channel_stats(torch.randn(4, 3, device=DEVICE))
    with pytest.raises(ValueError, match="x must be a contiguous NHWC tensor"):
        channel_stats(torch.randn(2, 3, 4, 5, device=DEVICE).transpose(1, 2))


# ---- bn_finalize -------------------------------------------------------------------
def _random_partials(t, channels, dtype=torch.float32, empty_rows=True):
    """Partials of mean-100 / std-0.01 data; some rows empty (count 0, mean and M2 NaN)."""
    count = torch.randint(1, 40, (t,), dtype=torch.float64)
    if empty_rows and t > 1:
        count[torch.randperm(t)[: t // 3]] = 0
    mean = 100 + 0.01 * torch.randn(t, channels, dtype=torch.float64)
    m2 = (count - 1).clamp_min(0)[:, None] * 1e-4 * torch.rand(t, channels, dtype=torch.float64)
    empty = count == 0
    mean[empty], m2[empty] = float("nan"), float("nan")
    return tuple(v.to(dtype=dtype, device=DEVICE) for v in (mean, m2, count))


def _cleaned(pmean, pm2, pcount):
    """The reference merge takes no NaN: an empty row contributes nothing, whatever it holds."""
    empty = (pcount == 0)[:, None]
    return pmean.masked_fill(empty, 0), pm2.masked_fill(empty, 0), pcount


def _parameters(channels, dtype=torch.float32):
    weight = torch.rand(channels, dtype=torch.float64) + 0.5
    bias = torch.randn(channels, dtype=torch.float64)
    running_mean = torch.randn(channels, dtype=torch.float64)
    running_var = torch.rand(channels, dtype=torch.float64) + 0.5
    return tuple(v.to(dtype=dtype, device=DEVICE) for v in (weight, bias, running_mean, running_var))


@pytest.mark.parametrize("momentum", [0.1, None, "no running stats"])
@pytest.mark.parametrize("t, channels", [(1, 1), (1, 17), (7, 3), (7, 64), (300, 1), (300, 17), (2000, 3),
                                         (2000, 64)])
def test_bn_finalize_matches_float64(t, channels, momentum):
    """Many partial rows (2000: several blocks folded with Chan's formula), a third of them empty."""
    partials = _random_partials(t, channels)
    weight, bias, running_mean, running_var = _parameters(channels)
    batches = torch.tensor(5, device=DEVICE)
    update = momentum != "no running stats"
    factor = -1.0 if momentum is None else 0.1
    expected_running = (running_mean.double(), running_var.double())
    got = bn_finalize(*partials, weight, bias, running_mean if update else None, running_var if update else None,
                      batches if update else None, factor, 1e-5)
    expected = reference_ops.bn_finalize(*_cleaned(*partials), weight, bias, *(expected_running if update else (None, None)),
                                         batches, factor, 1e-5)
    for name, g, e in zip(("mean", "invstd", "scale", "shift"), got, expected):
        assert g.dtype == torch.float32 and g.shape == (channels,)
        _close(g, e, 1e-6 if name == "mean" else 1e-5, name)
    if update:
        _close(running_mean, expected_running[0], 1e-6, "running_mean")
        _close(running_var, expected_running[1], 1e-5, "running_var")


def test_bn_finalize_float64_is_exact():
    partials = _random_partials(300, 17, torch.float64)
    weight, bias, running_mean, running_var = _parameters(17, torch.float64)
    expected_running = (running_mean.clone(), running_var.clone())
    got = bn_finalize(*partials, weight, bias, running_mean, running_var, torch.tensor(3, device=DEVICE), -1.0, 1e-5)
    expected = reference_ops.bn_finalize(*_cleaned(*partials), weight, bias, *expected_running,
                                         torch.tensor(3), -1.0, 1e-5)
    for name, g, e in zip(("mean", "invstd", "scale", "shift"), got, expected):
        assert g.dtype == torch.float64
        _close(g, e, 1e-12, name)
    _close(running_mean, expected_running[0], 1e-12, "running_mean")
    _close(running_var, expected_running[1], 1e-12, "running_var")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_bn_finalize_updates_half_precision_buffers_in_their_dtype(dtype):
    partials = _random_partials(7, 17)
    weight, bias, running_mean, running_var = _parameters(17, dtype)
    expected_running = (running_mean.double(), running_var.double())
    got = bn_finalize(*partials, weight, bias, running_mean, running_var, None, 0.1, 1e-5)
    expected = reference_ops.bn_finalize(*_cleaned(*partials), weight, bias, *expected_running, None, 0.1, 1e-5)
    _close(got[2], expected[2], 1e-5, "scale")
    assert running_mean.dtype == running_var.dtype == dtype
    step = 1e-2 if dtype == torch.bfloat16 else 1e-3   # one rounding (truncation in the interpreter)
    _close(running_mean, expected_running[0], step, "running_mean")
    _close(running_var, expected_running[1], step, "running_var")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_finalize_follows_batchnorm2d_over_several_steps(momentum):
    """Running statistics and normalization as nn.BatchNorm2d in training, step after step
    (momentum=None: a cumulative average with factor 1 / num_batches_tracked, read on the device)."""
    channels = 17
    bn = torch.nn.BatchNorm2d(channels, momentum=momentum).to(DEVICE).double().requires_grad_(False)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.5, 0.5)
    running_mean, running_var = bn.running_mean.float(), bn.running_var.float()
    batches = torch.zeros((), dtype=torch.long, device=DEVICE)
    for step in range(4):
        x = (3 + 2 * torch.randn(3, channels, 5, 7, dtype=torch.float64, device=DEVICE)).float()
        expected = bn(x.double())
        batches += 1   # as BatchNorm2d.forward, before the statistics are used
        partials = channel_stats(x.permute(0, 2, 3, 1).contiguous())
        mean, invstd, scale, shift = bn_finalize(*partials, bn.weight.float(), bn.bias.float(), running_mean,
                                                 running_var, batches, -1.0 if momentum is None else momentum,
                                                 bn.eps)
        normalized = x * scale[:, None, None] + shift[:, None, None]
        _close(normalized, expected, 1e-5, f"step {step}: normalized x")
        _close(running_mean, bn.running_mean, 1e-5, f"step {step}: running_mean")
        _close(running_var, bn.running_var, 1e-5, f"step {step}: running_var")
    assert bn.num_batches_tracked.item() == batches.item() == 4



@pytest.mark.parametrize("momentum", [0.1, None])
def test_bn_finalize_float64_running_statistics_follow_batchnorm2d(momentum):
    """Float64 running statistics as nn.BatchNorm2d's to float64 rounding (1e-14), from random
    running statistics so that both terms of the update count; 17 channels: two programs, one
    partly masked. Momentum 0.1 must keep all its 53 bits (rounded to 0.1f the update is off by
    about 2e-8); momentum=None averages with 1, 1/2, 1/3."""
    channels = 17
    bn = torch.nn.BatchNorm2d(channels, momentum=momentum).to(DEVICE).double().requires_grad_(False)
    bn.weight.uniform_(0.5, 1.5)
    bn.bias.uniform_(-0.5, 0.5)
    bn.running_mean.normal_()
    bn.running_var.uniform_(0.5, 1.5)
    running_mean, running_var = bn.running_mean.clone(), bn.running_var.clone()
    batches = torch.zeros((), dtype=torch.long, device=DEVICE)
    for step in range(3):
        x = 0.5 + 1.5 * torch.randn(2, channels, 3, 5, dtype=torch.float64, device=DEVICE)
        bn(x)
        batches += 1   # as BatchNorm2d.forward, before the statistics are used
        partials = channel_stats(x.permute(0, 2, 3, 1).contiguous())
        bn_finalize(*partials, bn.weight, bn.bias, running_mean, running_var, batches,
                    -1.0 if momentum is None else momentum, bn.eps)
        assert running_mean.dtype == running_var.dtype == torch.float64
        _close(running_mean, bn.running_mean, 1e-14, f"step {step}: running_mean")
        _close(running_var, bn.running_var, 1e-14, f"step {step}: running_var")

def test_bn_finalize_reads_nothing_back_to_the_host(monkeypatch):
    """No .item() / bool(tensor) / .tolist() / .cpu(): a training step stays capturable in a CUDA graph."""
    partials = _random_partials(300, 17)
    weight, bias, running_mean, running_var = _parameters(17)
    batches = torch.tensor(4, device=DEVICE)

    def host_sync(*args, **kwargs):
        raise AssertionError("bn_finalize read a tensor back to the host")

    with monkeypatch.context() as patch:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy"):
            patch.setattr(torch.Tensor, name, host_sync)
        if DEVICE == "cuda":
            torch.cuda.set_sync_debug_mode("error")
        try:
            got = bn_finalize(*partials, weight, bias, running_mean, running_var, batches, -1.0, 1e-5)
        finally:
            if DEVICE == "cuda":
                torch.cuda.set_sync_debug_mode("default")
    expected = reference_ops.bn_finalize(*_cleaned(*partials), weight, bias, None, None, None, 0.1, 1e-5)
    _close(got[1], expected[1], 1e-5, "invstd")


def test_bn_finalize_all_rows_empty_gives_nan_statistics():
    pmean, pm2, pcount = _random_partials(5, 3)
    pcount.zero_()
    weight, bias, _, _ = _parameters(3)
    mean, invstd, _, _ = bn_finalize(pmean, pm2, pcount, weight, bias, None, None, None, 0.1, 1e-5)
    assert bool(mean.isnan().all()) and bool(invstd.isnan().all())


def test_bn_finalize_rejects_bad_input():
    pmean, pm2, pcount = _random_partials(5, 3)
    weight, bias, running_mean, running_var = _parameters(3)
    with pytest.raises(ValueError, match="running_mean and running_var must be given together"):
        bn_finalize(pmean, pm2, pcount, weight, bias, running_mean, None, None, 0.1, 1e-5)
    with pytest.raises(ValueError, match="num_batches_tracked is required"):
        bn_finalize(pmean, pm2, pcount, weight, bias, running_mean, running_var, None, -1.0, 1e-5)
    with pytest.raises(ValueError, match=r"bias must be a contiguous tensor of shape \[3\]"):
        bn_finalize(pmean, pm2, pcount, weight, bias[:2], None, None, None, 0.1, 1e-5)
    with pytest.raises(TypeError, match="pm2 has dtype torch.float64"):
        bn_finalize(pmean, pm2.double(), pcount, weight, bias, None, None, None, 0.1, 1e-5)
    with pytest.raises(TypeError, match="running_var has dtype torch.float16"):
        bn_finalize(pmean, pm2, pcount, weight, bias, running_mean, running_var.half(), None, 0.1, 1e-5)


# ---- bn_backward_finish ------------------------------------------------------------
def _backward_inputs(rows, channels, dtype):
    """h with mean 100 / std 0.01 (xhat must come from h - mean), its statistics, and the true sums of g."""
    h = _nhwc(rows, channels, dtype, mean=100.0, std=0.01)
    g = _nhwc(rows, channels, dtype)
    stat = _stat_dtype(dtype)
    h64, g64 = h.double().reshape(-1, channels), g.double().reshape(-1, channels)
    mean = h64.mean(0)
    invstd = 1 / (h64.var(0, unbiased=False) + 1e-5).sqrt()
    xhat = (h64 - mean) * invstd
    weight = (torch.rand(channels, dtype=torch.float64, device=DEVICE) + 0.5).to(stat)
    return (g, h, mean.to(stat), invstd.to(stat), weight, g64.sum(0).to(stat), (g64 * xhat).sum(0).to(stat),
            float(rows))


@pytest.mark.default_cases(keep=_diagonal)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("channels", CHANNELS)
@pytest.mark.parametrize("rows", list(ROW_SHAPES))
def test_bn_backward_finish_matches_float64(rows, channels, dtype):
    inputs = _backward_inputs(rows, channels, dtype)
    # every switch is covered: the (batch_stats, add) pairs alternate with the shape
    batch_stats = (rows + channels) % 2 == 0 or rows == 1000
    add = _nhwc(rows, channels, dtype) if channels in (3, 64) else None
    got = bn_backward_finish(*inputs, add, batch_stats)
    expected = reference_ops.bn_backward_finish(*inputs, add, batch_stats)
    assert got.dtype == dtype and got.shape == inputs[0].shape
    _close(got, expected, FINISH_TOL[dtype], "dh")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("with_add", [True, False])
@pytest.mark.parametrize("batch_stats", [True, False])
def test_bn_backward_finish_every_switch(batch_stats, with_add, dtype):
    inputs = _backward_inputs(63, 17, dtype)
    add = _nhwc(63, 17, dtype) if with_add else None
    got = bn_backward_finish(*inputs, add, batch_stats)
    expected = reference_ops.bn_backward_finish(*inputs, add, batch_stats)
    _close(got, expected, FINISH_TOL[dtype], "dh")


def test_bn_backward_finish_takes_a_half_precision_weight():
    g, h, mean, invstd, weight, sum_g, sum_g_xhat, count = _backward_inputs(63, 17, torch.bfloat16)
    got = bn_backward_finish(g, h, mean, invstd, weight.bfloat16(), sum_g, sum_g_xhat, count, None, True)
    expected = reference_ops.bn_backward_finish(g, h, mean, invstd, weight.bfloat16(), sum_g, sum_g_xhat, count,
                                                None, True)
    _close(got, expected, FINISH_TOL[torch.bfloat16], "dh")


def test_bn_backward_finish_rejects_bad_input():
    g, h, mean, invstd, weight, sum_g, sum_g_xhat, count = _backward_inputs(63, 17, torch.float32)
    with pytest.raises(ValueError, match=r"h has shape \[3, 3, 7, 16\] but g has \[3, 3, 7, 17\]"):
        bn_backward_finish(g, h[..., :16].contiguous(), mean, invstd, weight, sum_g, sum_g_xhat, count, None, True)
    with pytest.raises(TypeError, match="mean has dtype torch.float64"):
        bn_backward_finish(g, h, mean.double(), invstd, weight, sum_g, sum_g_xhat, count, None, True)
    with pytest.raises(ValueError, match=r"sum_g must be a contiguous tensor of shape \[17\]"):
        bn_backward_finish(g, h, mean, invstd, weight, sum_g[:3], sum_g_xhat, count, None, True)
    with pytest.raises(TypeError, match="add has dtype torch.bfloat16"):
        bn_backward_finish(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, g.bfloat16(), True)
    with pytest.raises(ValueError, match="count must be positive"):
        bn_backward_finish(g, h, mean, invstd, weight, sum_g, sum_g_xhat, 0.0, None, True)


# ---- ahead-of-time compile for the GPUs we target ------------------------------------
# Under the interpreter the kernels are not JIT functions: the compile runs in a subprocess
# without TRITON_INTERPRET, which writes one cubin per variant and architecture, of the variants
# whose tests were selected. Triton's cache makes a rerun of unchanged kernels quick; all of them
# take about two minutes here with a cold cache (50 s warm): the default run compiles one variant of
# each kernel and dtype, every switch at least once (DEFAULT_AOT), the rest with --full.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
AOT_VARIANTS = {v["name"]: v for module in (stats_module, finalize_module, finish_module)
                for v in module.aot_variants()}
DEFAULT_AOT = {"channel_stats_bf16_c64", "channel_stats_fp16_c64", "channel_stats_fp32_c64", "channel_stats_fp64_c64",
               "bn_finalize_fp32_bf16_momentum", "bn_finalize_fp32_fp16_cumulative", "bn_finalize_fp32_fp32_no_running",
               "bn_finalize_fp64_fp32_momentum", "bn_finalize_fp64_fp64_cumulative",
               "bn_backward_finish_bf16_c128_batch_add", "bn_backward_finish_fp16_c16_running",
               "bn_backward_finish_fp32_c64_batch", "bn_backward_finish_fp64_c128_running_add"}


def _compile_one(job) -> None:
    name, arch, folder = job
    variant = AOT_VARIANTS[name]
    cubin = compile_triton(variant["kernel"], variant["signature"], variant["constexprs"], arch,
                           num_warps=variant["num_warps"], num_stages=variant["num_stages"])
    with open(os.path.join(folder, f"{name}.sm{arch}.cubin"), "wb") as f:
        f.write(cubin)


def compile_all(folder: str, names) -> None:
    """Entry point of the subprocess: ``<name>.sm<arch>.cubin`` for each variant named and arch, two
    compiles at a time (the CI machine's cores)."""
    from concurrent.futures import ProcessPoolExecutor
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_compile_one, [(name, arch, folder) for name in names for arch in ARCHS]))


@pytest.fixture(scope="module")
def cubins(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bn_cubins"))
    names = sorted({item.callspec.params["name"] for item in request.session.items
                    if getattr(item, "originalname", None) == "test_aot_compile_without_spills"
                    and item.path == request.path})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]; "
            f"from test_triton_bn import compile_all; compile_all({folder!r}, {names!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder


def test_aot_variants_cover_every_launch_configuration():
    assert DEFAULT_AOT <= set(AOT_VARIANTS)
    variants = list(AOT_VARIANTS.values())
    assert not any(v["tensor_cores"] for v in variants)
    for v in variants:   # every kernel argument is typed, every constexpr given
        assert set(v["signature"]) == set(v["kernel"].arg_names), v["name"]
        assert {k for k, t in v["signature"].items() if t == "constexpr"} == set(v["constexprs"]), v["name"]
    # each dtype the launchers accept, each switch
    for dtype in ("fp32", "bf16", "fp16", "fp64"):
        assert any(n.startswith(f"channel_stats_{dtype}_") for n in AOT_VARIANTS)
        assert any(n.startswith(f"bn_backward_finish_{dtype}_") for n in AOT_VARIANTS)
    for mode in ("no_running", "momentum", "cumulative"):
        assert sum(n.startswith("bn_finalize_") and n.endswith(mode) for n in AOT_VARIANTS) == 5
    assert len([n for n in AOT_VARIANTS if n.startswith("bn_backward_finish_")]) == 4 * 4 * 4


@pytest.mark.slow
@pytest.mark.default_cases(keep=lambda params: params["name"] in DEFAULT_AOT)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(AOT_VARIANTS))
def test_aot_compile_without_spills(cubins, name, arch):
    with open(os.path.join(cubins, f"{name}.sm{arch}.cubin"), "rb") as f:
        assert_no_spills(f.read(), f"{name} sm_{arch}")


def test_bn_finalize_merges_many_partials_in_parallel_groups(monkeypatch):
    """More partial rows than GROUP_ROWS: a first launch of cdiv(C, 16) x groups programs merges each
    group of rows (in parallel, not one program per 16 channels walking them all), the second merges
    the groups; a group whose rows are all empty (NaN mean, count 0) is skipped like an empty row."""
    t, channels = 3 * finalize_module.GROUP_ROWS + 5, 20
    pmean, pm2, pcount = _random_partials(t, channels)
    pcount[: finalize_module.GROUP_ROWS + 3] = 0       # the first group empty, and 3 rows of the next
    pmean[: finalize_module.GROUP_ROWS + 3] = float("nan")
    grids = []
    real = finalize_module._merge_groups_kernel

    class Recorded:
        def __getitem__(self, grid):
            grids.append(grid)
            return real[grid]
    monkeypatch.setattr(finalize_module, "_merge_groups_kernel", Recorded())
    weight, bias, _, _ = _parameters(channels)
    got = bn_finalize(pmean, pm2, pcount, weight, bias, None, None, None, 0.1, 1e-5)
    assert grids == [(2, 4)]   # 2 channel blocks x 4 groups of rows
    expected = reference_ops.bn_finalize(*_cleaned(pmean, pm2, pcount), weight, bias, None, None, None, 0.1, 1e-5)
    for name, g, e in zip(("mean", "invstd", "scale", "shift"), got, expected):
        _close(g, e, 1e-6 if name == "mean" else 1e-5, name)
