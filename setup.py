"""Build and install fused-preact: the Python package, the Triton kernels and the C++/CUDA extension.

    pip install --no-build-isolation -e .

The extension ``fused_preact._C`` always gets its CPU part; its CUDA part is built
when nvcc and a CUDA build of torch are there. Environment:
    FUSED_PREACT_CUDA=1|0      force / skip the CUDA part (unset: automatic)
    CUDA_HOME                  defaults to /usr/local/cuda when unset and present
    TORCH_CUDA_ARCH_LIST       defaults to "8.0;9.0"
    FUSED_PREACT_PTXAS_VERBOSE=1  report registers and spills of every CUDA kernel
    FUSED_PREACT_CPU_SIMD=avx512|avx2|generic  the vector code of the CPU kernels (unset: the
                               widest the building machine's CPU has, as an editable install runs
                               where it is built; the extension refuses to load on a CPU without it)
"""
import glob
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
STANDARD_CUDA_HOME = "/usr/local/cuda"

# torch.utils.cpp_extension reads CUDA_HOME when it is imported. A wrapper `nvcc` on PATH makes
# torch guess a folder one level too high (the link then fails: cannot find -lcudart).
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir(STANDARD_CUDA_HOME):
    os.environ["CUDA_HOME"] = STANDARD_CUDA_HOME
# Without a GPU to ask, torch cannot pick architectures by itself.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def notice(message: str) -> None:
    print(f"fused-preact: {message}", file=sys.stderr)


def nvidia_wheel_includes(cuda_home: str) -> list:
    """The include folder of the nvidia CUDA wheels (nvidia/cu13/include), when the toolkit at
    ``cuda_home`` lacks cublas_v2.h / cusparse.h, which ATen's CUDA headers include."""
    if os.path.exists(os.path.join(cuda_home, "include", "cublas_v2.h")):
        return []
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in getattr(nvidia, "__path__", []):
        found += sorted(glob.glob(os.path.join(base, "cu[0-9]*", "include")))
    return [d for d in found if os.path.isdir(d)]


def load_cpu_instructions():
    """fused_preact/cpu_instructions.py, loaded by path (the package itself needs torch and triton)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fused_preact_cpu_instructions",
                                                  os.path.join(ROOT, "fused_preact", "cpu_instructions.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ATen builds its own vectorized kernels with these flags; CPU_CAPABILITY selects at::vec's
# Vectorized<T> for that instruction set (in its own inline namespace, so no clash with torch's
# copies). The CPU flags each set needs are in fused_preact/cpu_instructions.py. Measured on the
# 2-core dev machines: the generic at::vec loops made the fused CPU passes 2-14x slower than AVX2
# (notes/cpp_ops.md).
CPU_SIMD_COMPILER_FLAGS = {
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mfma", "-mf16c",
               "-DCPU_CAPABILITY_AVX512", "-DCPU_CAPABILITY=AVX512",
               "-Wno-maybe-uninitialized"],  # GCC 12's avx512fintrin.h `__Y = __Y` (GCC bug 105593)
    "avx2": ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY_AVX2", "-DCPU_CAPABILITY=AVX2"],
    "generic": [],
}


def cpu_simd_flags() -> list:
    """The compiler flags of the CPU kernels' vector code (the extension reports the choice, and
    refuses to load on a CPU that lacks the instructions: fused_preact/_extension.py)."""
    instructions = load_cpu_instructions()
    choice = os.environ.get("FUSED_PREACT_CPU_SIMD", "").strip().lower()
    if choice not in ("", *instructions.REQUIRED_CPU_FLAGS):
        raise SystemExit(f"fused-preact: FUSED_PREACT_CPU_SIMD must be avx512, avx2, generic or unset, got {choice!r}")
    if choice == "":
        choice = instructions.widest_supported(instructions.cpu_flags() or frozenset())
        if choice == "generic":
            notice("neither AVX-512 nor AVX2/FMA/F16C found in /proc/cpuinfo: the CPU kernels use generic vector code")
    return CPU_SIMD_COMPILER_FLAGS[choice]


def openmp_flags() -> list:
    """-fopenmp when torch runs its intra-op threads on OpenMP (its Linux wheels do): at::parallel_for
    is inline, and without _OPENMP defined it runs every CPU kernel on one thread (measured: the
    2-thread dev machine then took the same time with 1 and 2 threads). The process keeps one
    OpenMP runtime: torch's libgomp.so.1 is loaded first and has the same soname."""
    import torch

    return ["-fopenmp"] if "ATen parallel backend: OpenMP" in torch.__config__.parallel_info() else []


def want_cuda(cpp_extension) -> bool:
    import torch

    choice = os.environ.get("FUSED_PREACT_CUDA", "").strip().lower()
    if choice not in ("", "0", "1", "auto"):
        raise SystemExit(f"fused-preact: FUSED_PREACT_CUDA must be 0, 1, auto or unset, got {choice!r}")
    if choice == "0":
        notice("FUSED_PREACT_CUDA=0: building the CPU part of the extension only")
        return False
    missing = None
    if torch.version.cuda is None:
        missing = f"torch {torch.__version__} is not a CUDA build"
    elif cpp_extension.CUDA_HOME is None or shutil.which("nvcc", path=os.path.join(cpp_extension.CUDA_HOME, "bin")) is None:
        missing = "nvcc was not found (set CUDA_HOME)"
    if missing and choice == "1":
        raise SystemExit(f"fused-preact: FUSED_PREACT_CUDA=1 but {missing}")
    if missing:
        notice(f"{missing}: building the CPU part of the extension only")
        return False
    return True


def extension_modules():
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError:
        notice("torch is not installed in the build environment (use pip's --no-build-isolation): "
               "installing without the C++ extension")
        return [], {}
    cuda = want_cuda(cpp_extension)
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    openmp = openmp_flags()
    cxx = ["-O3", "-g0"] + openmp + cpu_simd_flags()   # the C++ standard is the one torch asks for
    macros = []
    kwargs = dict(name="fused_preact._C", sources=sources, include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_link_args=["-s"] + openmp, py_limited_api=False)
    if cuda:
        sources += sorted(glob.glob(os.path.join("csrc", "*.cu")))
        macros.append(("WITH_CUDA", None))
        nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
        if os.environ.get("FUSED_PREACT_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        kwargs["include_dirs"] += nvidia_wheel_includes(cpp_extension.CUDA_HOME)
        ext = cpp_extension.CUDAExtension(define_macros=macros, extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                          **kwargs)
    else:
        ext = cpp_extension.CppExtension(define_macros=macros, extra_compile_args={"cxx": cxx}, **kwargs)
    return [ext], {"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fused-preact",
    version="0.1.0",
    description="Pre-activation ResNets with fused BN-ReLU-conv units (Triton and C++/CUDA)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    packages=find_packages(include=["fused_preact", "fused_preact.*", "kernels", "kernels.*"]),
    install_requires=["torch>=2.4", "triton>=3.0,<4; platform_system=='Linux'", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "timm": ["timm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
