"""The tensor-core 1x1 conv kernels of csrc/conv1x1_fused.cu.

Compile checks (run everywhere the extension was built with CUDA): the .so holds the kernels for
sm_80 and sm_90, the GEMM kernels use tensor cores (HMMA) and nothing spills to local memory.

GPU checks (``gpu``, skipped without a device): ``torch.ops.fused_preact.conv_bnrelu`` /
``conv_dgrad`` / ``conv_wgrad`` with 1x1 weights on CUDA bf16/fp16 against the float64 oracle in
``fused_preact/reference_ops.py``, and a profiler check that these calls ran the fused kernels (which
they do only when ``conv1x1_fused_supported`` accepts the shapes).
"""
from __future__ import annotations

import re
import subprocess

import pytest
import torch

from fused_preact import reference_ops as ref
from fused_preact import _extension
from gpu_code import ARCHS, cuobjdump

pytestmark = pytest.mark.skipif(not _extension.built_with_cuda(),
                                reason=str(_extension.unavailable_reason() or "extension built without CUDA"))

GEMM_KERNELS = ("rows_gemm_kernel", "wgrad_kernel")
ALL_KERNELS = GEMM_KERNELS + ("dgrad_untouched_kernel", "sum_rows_kernel", "reduce_splits_kernel")


# -- compiled code --------------------------------------------------------------------------------
def _so_path() -> str:
    return _extension.load().__file__


def _dump(flag: str, arch: int, functions=()) -> str:
    """cuobjdump's ``flag`` output for ``arch``, of the named (mangled) ``functions`` only when given (the
    whole library's disassembly takes ~5 s here; cuobjdump warns for the cubins that lack one)."""
    only = ["--function", ",".join(functions)] if functions else []
    return subprocess.run([cuobjdump(), "-arch", f"sm_{arch}", flag, *only, _so_path()], capture_output=True,
                          text=True, check=True).stdout


def _function_names(arch: int) -> list[str]:
    return re.findall(r"Function (\S+):", _dump("--dump-resource-usage", arch))


def _ours(name: str) -> bool:
    return "conv1x1_fused" in name and any(kernel in name for kernel in ALL_KERNELS)


@pytest.mark.parametrize("arch", ARCHS)
def test_kernels_compiled_without_local_memory(arch):
    text = _dump("--dump-resource-usage", arch)
    usage = {name: dict((k, int(v)) for k, v in re.findall(r"(\w+):(\d+)", fields))
             for name, fields in re.findall(r"Function (\S+):\s*\n\s*((?:\w+:\d+\s*)+)", text)}
    ours = {name: fields for name, fields in usage.items() if _ours(name)}
    for kernel in ALL_KERNELS:
        assert any(kernel in name for name in ours), f"sm_{arch}: {kernel} missing from {_so_path()}"
    # forward and dgrad x (bf16, fp16), wgrad x (bf16, fp16)
    assert sum("rows_gemm_kernel" in name for name in ours) == 4
    assert sum("wgrad_kernel" in name for name in ours) == 2
    for name, fields in ours.items():
        assert fields.get("LOCAL", 0) == 0 and fields.get("STACK", 0) == 0, f"sm_{arch} {name}: {fields}"
        assert fields["REG"] <= 255


@pytest.mark.parametrize("arch", ARCHS)
def test_gemm_kernels_use_tensor_cores(arch):
    gemms = [name for name in _function_names(arch) if _ours(name) and any(k in name for k in GEMM_KERNELS)]
    assert gemms, f"sm_{arch}: no GEMM kernel of conv1x1_fused in {_so_path()}"
    text = _dump("--dump-sass", arch, gemms)
    # split the disassembly into functions: "Function : <name>" up to the next one
    functions = re.split(r"\n\s*Function : ", text)[1:]
    bodies = {body.split("\n", 1)[0].strip(): body for body in functions}
    for kernel in GEMM_KERNELS:
        mine = [body for name, body in bodies.items() if "conv1x1_fused" in name and kernel in name]
        assert mine, f"sm_{arch}: no {kernel} in the disassembly"
        for body in mine:
            assert "HMMA.16816.F32" in body, f"sm_{arch}: {kernel} has no m16n8k16 HMMA"
            assert "LDSM" in body and "LDGSTS" in body, f"sm_{arch}: {kernel} lacks ldmatrix / cp.async"


# -- GPU correctness -------------------------------------------------------------------------------
gpu = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [torch.bfloat16, torch.float16]
# (N, H, W, Cin, Cout, stride): odd sizes, batch 1 and 3, tails in every tile dimension
# (M % 128, Cout % 64, Cin % 32), channel counts 16..256
SHAPES = [
    (1, 7, 7, 16, 32, 1),
    (3, 9, 9, 64, 16, 2),
    (3, 15, 15, 32, 64, 1),
    (1, 15, 9, 256, 128, 2),
    (3, 7, 9, 128, 256, 1),
    (3, 9, 15, 48, 24, 2),
    (1, 9, 7, 24, 200, 1),
]
# unit roundoff of each dtype
EPS = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}


def _bn_vectors(channels, device, mean=0.0):
    """scale and shift of a BN-ReLU whose input has about this mean: about half the values pass."""
    scale = (torch.rand(channels, device=device) + 0.5)
    shift = -scale * mean + 0.3 * torch.randn(channels, device=device)
    return scale, shift


def _assert_close(got, expected, dtype, what, ulps=2.0):
    """Within `ulps` units of the dtype's roundoff of each value plus the rms: room for the final
    rounding and for pre-activations computed in fp32 then rounded (the contract), which may differ
    by one unit from the float64 oracle's single rounding; any indexing error is O(rms)."""
    got, expected = got.double().cpu(), expected.double().cpu()
    rms = expected.pow(2).mean().sqrt().item() + 1e-30
    bound = ulps * EPS[dtype] * (expected.abs() + rms)
    excess = (got - expected).abs() - bound
    assert excess.max().item() <= 0, (
        f"{what}: max |error| {(got - expected).abs().max().item():.3g} exceeds the bound at "
        f"{int(excess.argmax())} (rms {rms:.3g})")


def _cases(shapes=SHAPES):
    return [pytest.param(dtype, shape, marks=gpu, id=f"{str(dtype)[6:]}-{'x'.join(map(str, shape))}")
            for dtype in DTYPES for shape in shapes]


def _inputs(dtype, shape, mean=0.0):
    n, h, w, cin, cout, stride = shape
    x = (torch.randn(n, h, w, cin, device="cuda") + mean).to(dtype)
    weight = torch.randn(cout, cin, 1, 1, device="cuda") / cin ** 0.5
    scale, shift = _bn_vectors(cin, "cuda", mean)
    return x, weight, scale, shift


def _on_cpu(*tensors):
    return [t.cpu() if isinstance(t, torch.Tensor) else t for t in tensors]


@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("dtype, shape", _cases())
def test_conv_bnrelu_1x1(dtype, shape, residual):
    x, weight, scale, shift = _inputs(dtype, shape)
    n, h, w, cin, cout, stride = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = torch.randn(n, ho, wo, cout, device="cuda").to(dtype) if residual else None
    for stats in (True, False):
        y, pmean, pm2, pcount = torch.ops.fused_preact.conv_bnrelu(x, weight, scale, shift, res, stride, stats)
        expected = ref.conv_bnrelu(*_on_cpu(x, weight, scale, shift, res), stride, False)[0]
        assert y.shape == (n, ho, wo, cout) and y.dtype == dtype and y.is_contiguous()
        _assert_close(y, expected, dtype, "y")
        if not stats:
            assert pmean.numel() == pm2.numel() == pcount.numel() == 0
            continue
        _check_stats(y, pmean, pm2, pcount)


def _check_stats(y, pmean, pm2, pcount):
    """The partials describe y as stored: merged mean and M2 equal float64 statistics of y."""
    rows, channels = y.numel() // y.shape[-1], y.shape[-1]
    assert pmean.dtype == pm2.dtype == pcount.dtype == torch.float32
    assert pmean.shape == pm2.shape == (pcount.shape[0], channels)
    assert pcount.sum().item() == rows and (pcount >= 0).all()
    mean, m2, count = ref.merge_partials(pmean.cpu(), pm2.cpu(), pcount.cpu())
    y64 = y.double().cpu().reshape(rows, channels)
    expected_mean = y64.mean(0)
    expected_m2 = ((y64 - expected_mean) ** 2).sum(0)
    assert count.item() == rows
    torch.testing.assert_close(mean, expected_mean, rtol=1e-6, atol=1e-6 * y64.abs().max().item())
    torch.testing.assert_close(m2, expected_m2, rtol=1e-5, atol=1e-6 * expected_m2.max().item())


@pytest.mark.parametrize("dtype, shape", _cases([(3, 15, 15, 64, 64, 1), (1, 9, 7, 32, 48, 2)]))
def test_conv_bnrelu_1x1_statistics_of_a_large_mean(dtype, shape):
    """y = conv(...) + residual with mean 200 and std ~1: E[y^2] - E[y]^2 in fp32 would lose the
    variance (fp32 spacing at 4e4 is 4e-3); the partials must keep it to 1e-5."""
    x, weight, scale, shift = _inputs(dtype, shape)
    n, h, w, cin, cout, stride = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    res = (200.0 + torch.randn(n, ho, wo, cout, device="cuda")).to(dtype)
    y, pmean, pm2, pcount = torch.ops.fused_preact.conv_bnrelu(x, weight * 0.1, scale, shift, res, stride, True)
    assert y.double().mean().item() > 150
    _check_stats(y, pmean, pm2, pcount)


def _dgrad_inputs(dtype, shape, with_h, with_add):
    n, h, w, cin, cout, stride = shape
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dy = torch.randn(n, ho, wo, cout, device="cuda").to(dtype)
    weight = torch.randn(cout, cin, 1, 1, device="cuda") / cout ** 0.5
    add = torch.randn(n, h, w, cin, device="cuda").to(dtype) if with_add else None
    if not with_h:
        return dy, weight, None, None, None, None, None, add
    hin = (torch.randn(n, h, w, cin, device="cuda") * 2 + 1).to(dtype)
    mean = hin.float().mean((0, 1, 2))
    invstd = hin.float().var((0, 1, 2), unbiased=False).add(1e-5).rsqrt()
    scale, shift = _bn_vectors(cin, "cuda", 1.0)
    return dy, weight, hin, scale, shift, mean, invstd, add


@pytest.mark.parametrize("with_h, with_add", [(True, True), (True, False), (False, True), (False, False)])
@pytest.mark.parametrize("dtype, shape", _cases())
def test_conv_dgrad_1x1(dtype, shape, with_h, with_add):
    n, h, w, cin, cout, stride = shape
    args = _dgrad_inputs(dtype, shape, with_h, with_add)
    g, sum_g, sum_gx = torch.ops.fused_preact.conv_dgrad(*args, stride, h, w)
    eg, esum_g, esum_gx = ref.conv_dgrad(*_on_cpu(*args), stride, h, w)
    assert g.shape == (n, h, w, cin) and g.dtype == dtype and g.is_contiguous()
    _assert_close(g, eg, dtype, "g")
    if stride == 2 and not with_add:  # no output reads the odd rows / columns: exactly 0 there
        assert (g[:, 1::2].float() == 0).all() and (g[:, :, 1::2].float() == 0).all()
    if not with_h:
        assert sum_g.numel() == sum_gx.numel() == 0
        return
    assert sum_g.shape == sum_gx.shape == (cin,) and sum_g.dtype == sum_gx.dtype == torch.float32
    # the sums are of g before rounding; bound by the sums of magnitudes, which cancel
    hin, mean, invstd = args[2].double().cpu(), args[5].double().cpu(), args[6].double().cpu()
    magnitude = eg.double().abs().sum((0, 1, 2))
    magnitude_x = (eg.double() * (hin - mean) * invstd).abs().sum((0, 1, 2))
    assert ((sum_g.double().cpu() - esum_g.double()).abs() <= 4 * EPS[dtype] * magnitude + 1e-6).all()
    assert ((sum_gx.double().cpu() - esum_gx.double()).abs() <= 4 * EPS[dtype] * magnitude_x + 1e-6).all()


@pytest.mark.parametrize("weight_dtype", ["float32", "activation"])
@pytest.mark.parametrize("dtype, shape", _cases(SHAPES + [(8, 28, 28, 64, 64, 1), (4, 27, 27, 32, 72, 2)]))
def test_conv_wgrad_1x1(dtype, shape, weight_dtype):
    n, h, w, cin, cout, stride = shape
    x, weight, scale, shift = _inputs(dtype, shape, mean=0.5)
    if weight_dtype == "activation":
        weight = weight.to(dtype)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dy = torch.randn(n, ho, wo, cout, device="cuda").to(dtype)
    dw = torch.ops.fused_preact.conv_wgrad(dy, x, scale, shift, weight, stride)
    assert dw.shape == weight.shape and dw.dtype == weight.dtype and dw.is_contiguous()
    expected = ref.conv_wgrad(*_on_cpu(dy, x, scale, shift, weight), stride).double()
    # fp32 accumulation of exact products: error bounded by the sum of |terms|; a pre-activation
    # computed in fp32 (the contract) may round one unit away from the oracle's: at most a few
    # such terms per column, each under EPS * max|dy| * max|a|
    a = ref._preact(x.cpu(), scale.cpu(), shift.cpu()).to(dtype).double()[:, ::stride, ::stride]
    dy_abs = dy.double().cpu().abs()
    magnitude = torch.einsum("nhwo,nhwi->oi", dy_abs, a.abs())
    largest_term = dy_abs.amax((0, 1, 2))[:, None] * a.abs().amax((0, 1, 2))[None, :]
    rounding = 0.0 if dw.dtype == torch.float32 else EPS[dtype]
    bound = (2 * rounding * expected.abs() + (1e-5 * magnitude + 2 * EPS[dtype] * largest_term)[:, :, None, None]
             + 1e-6)
    assert ((dw.double().cpu() - expected).abs() <= bound).all()
    # split-K partials are reduced in a fixed order: bitwise reproducible
    assert torch.equal(dw, torch.ops.fused_preact.conv_wgrad(dy, x, scale, shift, weight, stride))


def _kernels_run(fn) -> list:
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.key for event in prof.key_averages()]


@pytest.mark.parametrize("dtype, shape", _cases())
def test_fused_kernels_serve_these_shapes(dtype, shape):
    """conv1x1_fused_supported accepts every shape above: the ops ran our kernels, not cuDNN."""
    n, h, w, cin, cout, stride = shape
    x, weight, scale, shift = _inputs(dtype, shape)
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    dy = torch.randn(n, ho, wo, cout, device="cuda").to(dtype)
    dgrad_args = _dgrad_inputs(dtype, shape, True, True)
    calls = {  # (kernel, op): each op is profiled on its own
        ("rows_gemm_kernel", "conv_bnrelu"):
            lambda: torch.ops.fused_preact.conv_bnrelu(x, weight, scale, shift, None, stride, True),
        ("rows_gemm_kernel", "conv_dgrad"): lambda: torch.ops.fused_preact.conv_dgrad(*dgrad_args, stride, h, w),
        ("wgrad_kernel", "conv_wgrad"): lambda: torch.ops.fused_preact.conv_wgrad(dy, x, scale, shift, weight, stride),
    }
    for (kernel, op), call in calls.items():
        names = _kernels_run(call)
        assert any(kernel in name for name in names), f"{op}: {kernel} did not run; kernels: {names}"
