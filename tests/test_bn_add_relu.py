"""bn_add_relu and bn_add_relu_backward (the end of an original unit) on both backends against the
float64 oracle in fused_preact/reference_ops.py: the Triton kernels (kernels/bn_add_relu.py; Triton's
interpreter without a GPU) and the C++ extension (csrc/elementwise_cpu.cpp / elementwise_cuda.cu).

Tolerances, per element: y within two steps of its dtype of the magnitude of the terms
(|scale * h| + |shift| + |s| + |y|; the interpreter truncates, two steps cover it), 1e-12 for
float64. g = dy * (y > 0) is exact (dy is in g's dtype). The sums accumulate in fp32 (fp64): within
1e-5 (1e-12) of the sum of the magnitudes of their terms.
"""
import os
import subprocess
import sys

import pytest
import torch

from fused_preact import reference_ops as ref
from gpu_code import ARCHS, assert_no_spills
from fused_preact import _extension, dispatch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REL = {torch.float64: 1e-12, torch.float32: 2 * 2.0 ** -23, torch.bfloat16: 2 * 2.0 ** -7,
       torch.float16: 2 * 2.0 ** -10}
SUM_REL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5, torch.float16: 1e-5}
SHAPES = [(3, 5, 7, 17), (2, 13, 11, 83)]   # NHWC: odd sizes; 286 rows x 83 channels (vector tails)


def _ops(backend):
    x = torch.zeros(1, 1, 1, 1, device=DEVICE)
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)
    return dispatch._registry[backend].ops()


def _vectors(channels, dtype, count):
    vdtype = torch.float64 if dtype == torch.float64 else torch.float32
    return [((torch.rand(channels, dtype=vdtype) + 0.5) * torch.where(torch.rand(channels) < 0.2, -1.0, 1.0)
             .to(vdtype)).to(DEVICE) for _ in range(count)]


def _within(got, expected, bound, what):
    error = (got.double().cpu() - expected.double().cpu()).abs()
    excess = (error - bound.double().cpu()).max().item()
    assert excess <= 0, f"{what}: error exceeds its bound by {excess:.3g} (max error {error.max().item():.3g})"


CASES = [
    # backend, shape, dtype, shortcut BN
    ("cuda", 0, torch.float64, True), ("cuda", 1, torch.float32, True), ("cuda", 1, torch.bfloat16, False),
    ("cuda", 0, torch.float16, True), ("cuda", 1, torch.float64, False),
    ("triton", 0, torch.float64, True), ("triton", 0, torch.float32, False), ("triton", 0, torch.bfloat16, True),
    ("triton", 0, torch.float16, False),
]
# the extension's cases run its CUDA kernels on a GPU: bench/device_run.sh sanitizes them
CASES = [pytest.param(*case, marks=pytest.mark.cuda_kernels) if case[0] == "cuda" else case for case in CASES]


@pytest.mark.parametrize("backend,shape,dtype,residual_bn", CASES)
def test_bn_add_relu_forward_and_backward(backend, shape, dtype, residual_bn):
    ops = _ops(backend)
    shape = SHAPES[shape]
    c = shape[-1]
    h = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(DEVICE)
    residual = (torch.randn(shape, dtype=torch.float64) - 0.3).to(dtype).to(DEVICE)
    scale, shift, rscale, rshift, mean, rmean = _vectors(c, dtype, 6)
    invstd, rinvstd = _vectors(c, dtype, 2)
    invstd, rinvstd = invstd.abs(), rinvstd.abs()
    affine = (rscale, rshift) if residual_bn else (None, None)

    y = ops.bn_add_relu(h, scale, shift, residual, *affine)
    cpu = lambda *ts: [None if t is None else t.cpu() for t in ts]  # noqa: E731
    y_ref = ref.bn_add_relu(*cpu(h, scale, shift, residual, *affine))
    assert y.shape == h.shape and y.dtype == dtype and y.is_contiguous()
    s = residual.cpu().double().abs() * (rscale.cpu().double().abs() if residual_bn else 1) \
        + (rshift.cpu().double().abs() if residual_bn else 0)
    terms = (scale.cpu().double() * h.cpu().double()).abs() + shift.cpu().double().abs() + s
    _within(y, y_ref, REL[dtype] * (terms + y_ref.double().abs()), "y")

    dy = torch.randn(shape, dtype=torch.float64).to(dtype).to(DEVICE)
    shortcut = (residual, rmean, rinvstd) if residual_bn else (None, None, None)
    g, sum_g, sum_g_xhat, residual_sum = ops.bn_add_relu_backward(dy, y, h, mean, invstd, *shortcut)
    g_ref, sum_g_ref, sum_g_xhat_ref, residual_sum_ref = ref.bn_add_relu_backward(
        *cpu(dy, y, h, mean, invstd, *shortcut))
    assert g.dtype == dtype and torch.equal(g.cpu(), g_ref)
    stat = torch.float64 if dtype == torch.float64 else torch.float32
    assert sum_g.dtype == sum_g_xhat.dtype == residual_sum.dtype == stat
    g_abs = g_ref.double().abs()
    _within(sum_g, sum_g_ref, SUM_REL[dtype] * g_abs.sum((0, 1, 2)) + 1e-30, "sum_g")
    xhat = ((h.cpu().double() - mean.cpu().double()) * invstd.cpu().double()).abs()
    _within(sum_g_xhat, sum_g_xhat_ref, SUM_REL[dtype] * (g_abs * xhat).sum((0, 1, 2)) + 1e-30, "sum_g_xhat")
    if residual_bn:
        rxhat = ((residual.cpu().double() - rmean.cpu().double()) * rinvstd.cpu().double()).abs()
        _within(residual_sum, residual_sum_ref, SUM_REL[dtype] * (g_abs * rxhat).sum((0, 1, 2)) + 1e-30,
                "residual_sum_g_xhat")
    else:
        assert residual_sum.numel() == 0


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_bn_add_relu_rejects_bad_input(backend):
    ops = _ops(backend)
    h = torch.randn(2, 3, 5, 4, device=DEVICE)
    v = torch.ones(4, device=DEVICE)
    with pytest.raises((ValueError, RuntimeError), match="residual"):
        ops.bn_add_relu(h, v, v, h[..., :2].contiguous(), None, None)
    with pytest.raises((ValueError, RuntimeError), match="residual_scale and residual_shift"):
        ops.bn_add_relu(h, v, v, h, v, None)
    with pytest.raises((ValueError, RuntimeError), match="residual, residual_mean and residual_invstd"):
        ops.bn_add_relu_backward(h, h, h, v, v, h, None, v)
    with pytest.raises((TypeError, RuntimeError), match="y"):
        ops.bn_add_relu_backward(h, h.double(), h, v, v, None, None, None)


@pytest.mark.skipif(not _extension.available(), reason=str(_extension.unavailable_reason()))
def test_bn_add_relu_backward_is_deterministic():
    """Determinism: each backend returns the same sums on a second call."""
    for backend in ("cuda", "triton"):
        ops = _ops(backend)
        h, dy = torch.randn(3, 5, 7, 9, device=DEVICE), torch.randn(3, 5, 7, 9, device=DEVICE)
        y = torch.relu(torch.randn(3, 5, 7, 9, device=DEVICE))
        mean, invstd = torch.randn(9, device=DEVICE), torch.rand(9, device=DEVICE) + 0.5
        first = ops.bn_add_relu_backward(dy, y, h, mean, invstd, h, mean, invstd)
        second = ops.bn_add_relu_backward(dy, y, h, mean, invstd, h, mean, invstd)
        assert all(torch.equal(a, b) for a, b in zip(first, second)), backend


# ---- ahead-of-time compile of the Triton kernels for the GPUs we target ----------------------
# Under the interpreter the kernels are not JIT functions: the compile runs in a subprocess without
# TRITON_INTERPRET, which writes one cubin per variant and architecture. The default run compiles the
# training path (bf16, the widest channel tile, with the shortcut's BN: every load and sum); the full
# sweep (--full, FUSED_PREACT_FULL_TESTS=1 or -m full) every dtype, switch and tile:
# 64 variants x 2 archs, none spilling (measured 2026-12-03 with triton 3.8.0).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_AOT = ("bn_add_relu_fwd_bf16_c128_residual_bn", "bn_add_relu_bwd_bf16_c128_residual_bn")


def _aot_variants(every_variant: bool):
    from fused_preact.kernels import bn_add_relu as module
    return {v["name"]: v for v in module.aot_variants() if every_variant or v["name"] in DEFAULT_AOT}


AOT_VARIANTS = _aot_variants(os.environ.get("FUSED_PREACT_FULL_TESTS") == "1" or "--full" in sys.argv
                             or any(a.startswith("-m") and "full" in a for a in sys.argv)
                             or "full" in sys.argv)


def _compile_one(job) -> None:
    from gpu_code import compile_triton
    every_variant, name, arch, folder = job
    variant = _aot_variants(every_variant)[name]
    cubin = compile_triton(variant["kernel"], variant["signature"], variant["constexprs"], arch,
                           num_warps=variant["num_warps"], num_stages=variant["num_stages"])
    with open(os.path.join(folder, f"{variant['name']}.sm{arch}.cubin"), "wb") as f:
        f.write(cubin)


def compile_all(folder: str, every_variant: bool) -> None:
    """Entry point of the subprocess: ``<name>.sm<arch>.cubin`` for every variant and arch, two compiles
    at a time (the CI machine's cores)."""
    from concurrent.futures import ProcessPoolExecutor

    from gpu_code import ARCHS
    jobs = [(every_variant, name, arch, folder) for name in _aot_variants(every_variant) for arch in ARCHS]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_compile_one, jobs))


@pytest.fixture(scope="module")
def cubins(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("bn_add_relu_cubins"))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    every_variant = len(AOT_VARIANTS) > len(_aot_variants(False))
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]; "
            f"from test_bn_add_relu import compile_all; compile_all({folder!r}, {every_variant})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder


def test_aot_variants_cover_every_switch():
    variants = list(_aot_variants(True).values())
    for v in variants:   # every kernel argument is typed, every constexpr given
        assert set(v["signature"]) == set(v["kernel"].arg_names), v["name"]
        assert {k for k, t in v["signature"].items() if t == "constexpr"} == set(v["constexprs"]), v["name"]
    names = {v["name"] for v in variants}
    for kernel in ("fwd", "bwd"):
        for dtype in ("fp32", "bf16", "fp16", "fp64"):
            assert any(n.startswith(f"bn_add_relu_{kernel}_{dtype}_") and n.endswith("_residual_bn") for n in names)
            assert any(n.startswith(f"bn_add_relu_{kernel}_{dtype}_") and not n.endswith("_residual_bn")
                       for n in names)


@pytest.mark.slow
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(AOT_VARIANTS))
def test_aot_compile_without_spills(cubins, name, arch):
    with open(os.path.join(cubins, f"{name}.sm{arch}.cubin"), "rb") as f:
        assert_no_spills(f.read(), f"{name} sm_{arch}")
