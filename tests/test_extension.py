"""The C++/CUDA extension: build, batch_stats against a float64 reference, errors, compiled code."""
import os
import re
import shutil
import subprocess

import pytest
import torch

from fused_preact import _extension, cpu_instructions

pytestmark = pytest.mark.skipif(not _extension.available(), reason=str(_extension.unavailable_reason()))

SHAPES = [(1, 3, 7, 9), (3, 5, 15, 15), (2, 17, 9, 7), (3, 64, 7, 7), (1, 8, 1, 1), (5, 1, 4, 3)]
# float32/float64 statistics of fp32 / fp64 inputs; half inputs are exact in fp32 accumulation
TOLERANCE = {torch.float64: 1e-12, torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5}
DEVICES = ["cpu", pytest.param("cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


def reference(x):
    x64 = x.double()
    return x64.mean(dim=(0, 2, 3)), x64.var(dim=(0, 2, 3), unbiased=False)


def check(x):
    mean, var = _extension.batch_stats(x)
    expected_mean, expected_var = reference(x)
    assert mean.dtype == var.dtype == (torch.float64 if x.dtype == torch.float64 else torch.float32)
    assert mean.shape == var.shape == (x.shape[1],)
    tol = TOLERANCE[x.dtype]
    scale = x.double().abs().amax(dim=(0, 2, 3)).clamp_min(1)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=tol, atol=tol * scale.max().item())
    torch.testing.assert_close(var.double(), expected_var, rtol=tol * 10, atol=tol * scale.max().item() ** 2)


def test_cpu_kernels_run_on_every_intra_op_thread():
    """at::parallel_for is inline: built without OpenMP it would run every CPU kernel on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert torch.ops.fused_preact.cpu_threads() == 2
    finally:
        torch.set_num_threads(threads)


def test_cpu_kernels_use_instructions_this_cpu_has():
    simd = _extension.cpu_simd()
    assert simd in ("avx512", "avx2", "generic")
    assert not cpu_instructions.missing_flags(simd)


def test_extension_built_for_another_cpu_refuses_to_load(monkeypatch):
    monkeypatch.setattr(_extension, "_tried", False)
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_reason", None)
    monkeypatch.setattr(cpu_instructions, "missing_flags", lambda simd: {"avx512f"})
    assert not _extension.available()
    assert re.search(r"built for \w+ CPU code on another machine and this CPU lacks avx512f; rebuild",
                     _extension.unavailable_reason())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_batch_stats_matches_float64(shape, channels_last, dtype, device):
    x = (torch.randn(shape, dtype=torch.float64) * 2 + torch.randn(shape[1], 1, 1, dtype=torch.float64))
    x = x.to(dtype=dtype, device=device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check(x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_stats_large_mean_does_not_cancel(channels_last, device):
    # mean 100, std 0.01: E[x^2] - E[x]^2 in fp32 would lose the variance entirely
    x = (100 + 0.01 * torch.randn(4, 6, 32, 32)).to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    mean, var = _extension.batch_stats(x)
    expected_mean, expected_var = reference(x)
    torch.testing.assert_close(mean.double(), expected_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(var.double(), expected_var, rtol=1e-3, atol=0)


def test_batch_stats_many_rows_in_parallel():
    x = torch.randn(32, 24, 33, 31).contiguous(memory_format=torch.channels_last) * 3 - 1
    check(x)


@pytest.mark.parametrize("make,match", [
    (lambda: torch.randn(4, 5, 6), r"x must be a 4-D tensor \(N, C, H, W\), got 3-D"),
    (lambda: torch.randint(0, 4, (2, 3, 4, 4)), "x must be float32, float64, float16 or bfloat16"),
    (lambda: torch.randn(0, 3, 4, 4), r"x has an empty batch"),
    (lambda: torch.randn(2, 3, 8, 8)[:, :, ::2], "x must be contiguous in NCHW or channels_last"),
])
def test_batch_stats_rejects_bad_input_naming_the_argument(make, match):
    with pytest.raises(RuntimeError, match=match):
        _extension.batch_stats(make())


def test_batch_stats_meta_and_compile():
    mean, var = torch.ops.fused_preact.batch_stats(torch.empty(2, 7, 5, 5, device="meta", dtype=torch.bfloat16))
    assert mean.shape == var.shape == (7,) and mean.dtype == torch.float32 and mean.device.type == "meta"

    def normalize(x):
        mean, var = torch.ops.fused_preact.batch_stats(x)
        return (x - mean[None, :, None, None]) * torch.rsqrt(var[None, :, None, None] + 1e-5)

    x = torch.randn(3, 5, 7, 9) * 4 + 2
    compiled = torch.compile(normalize, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), normalize(x))


@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_stats_passes_opcheck(channels_last):
    x = torch.randn(2, 6, 5, 7, dtype=torch.bfloat16) * 3 + 1
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.fused_preact.batch_stats.default, (x,))


def test_batch_stats_compiles_with_dynamic_shapes():
    compiled = torch.compile(_extension.batch_stats, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in [(2, 3, 5, 5), (3, 4, 7, 9)]:
        x = torch.randn(shape) + 5
        for got, expected in zip(compiled(x), _extension.batch_stats(x)):
            torch.testing.assert_close(got, expected)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_batch_stats_cuda_many_chunks_agrees_with_cpu(channels_last, dtype):
    x = (torch.randn(32, 64, 56, 56) * 2 + 3).to(dtype)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    check(x.cuda())
    for got, expected in zip(_extension.batch_stats(x.cuda()), _extension.batch_stats(x)):
        torch.testing.assert_close(got.cpu(), expected, rtol=1e-5, atol=1e-5)


# -- the compiled CUDA code ---------------------------------------------------
def _cuobjdump():
    """The CUDA toolkit's cuobjdump, or the copy triton ships."""
    folders = [os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin"), os.environ.get("PATH", "")]
    try:
        import triton
        folders.append(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    except ImportError:
        pass
    for folder in folders:
        path = shutil.which("cuobjdump", path=folder)
        if path:
            return path
    pytest.skip("cuobjdump not found")


@pytest.fixture(scope="module")
def extension_file():
    if not _extension.built_with_cuda():
        pytest.skip("the extension was built without its CUDA part")
    return _extension.load().__file__


def test_cuda_code_for_sm80_and_sm90(extension_file):
    listing = subprocess.run([_cuobjdump(), "--list-elf", extension_file], capture_output=True, text=True,
                             check=True).stdout
    assert "sm_80" in listing and "sm_90" in listing, listing


def test_ptx_of_the_newest_architecture_for_newer_gpus(extension_file):
    """setup.py adds PTX of the newest architecture built (8.0;9.0 -> 9.0+PTX): a Blackwell GPU
    JIT-compiles it, and the cuda backend counts it as code for that GPU."""
    listing = subprocess.run([_cuobjdump(), "--list-ptx", extension_file], capture_output=True, text=True,
                             check=True).stdout
    for source in ("conv1x1_fused", "elementwise_cuda", "statistics_cuda"):
        assert f"{source}.sm_90.ptx" in listing, listing
    assert "+PTX" in (_extension.build_info() or {}).get("cuda_archs", "")


@pytest.mark.parametrize("arch", [80, 90])
def test_elementwise_and_statistics_kernels_keep_to_128_registers(extension_file, arch):
    """Their launch configuration promises <= 128 registers (256-thread blocks, two per
    multiprocessor); backward_reduce_kernel<BFloat16, *, 8> took 143-147."""
    usage = subprocess.run([_cuobjdump(), "-arch", f"sm_{arch}", "--dump-resource-usage", extension_file],
                           capture_output=True, text=True, check=True).stdout
    checked = 0
    for block in usage.split("Fatbin elf code")[1:]:
        source = re.search(r"identifier = (\S+)", block)
        if source is None or not source.group(1).endswith(("elementwise_cuda.cu", "statistics_cuda.cu")):
            continue
        for name, registers in re.findall(r"Function (\S+):\s*\n\s*REG:(\d+)", block):
            assert int(registers) <= 128, f"sm_{arch} {name}: {registers} registers"
            checked += 1
    assert checked >= 40, usage   # every variant of both files was seen


def test_no_cuda_kernel_spills_to_local_memory(extension_file):
    usage = subprocess.run([_cuobjdump(), "--dump-resource-usage", extension_file], capture_output=True,
                           text=True, check=True).stdout
    kernels = re.findall(r"Function (\S+):\s*\n\s*REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    assert kernels, usage
    for name, _reg, stack, _shared, local in kernels:
        assert int(local) == 0 and int(stack) == 0, f"{name} uses local memory: {usage}"
