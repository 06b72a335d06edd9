"""Build and install fused-preact: the Python package, the Triton kernels (``fused_preact.kernels``,
from the top-level ``kernels/`` folder) and the C++/CUDA extension ``fused_preact._C``.

    pip install -e .          (or pip install . / pip wheel .; --no-build-isolation works as well)

torch must be installed first: the extension is compiled against the torch of the environment it
is installed into. With pip's build isolation the build runs in a temporary environment without
that torch; the in-tree build backend (build_backend/fused_preact_backend.py, which says why it
does this rather than have pip install a second torch there) makes the target environment's torch
importable. Without any torch the build stops and says what to install.

The extension always gets its CPU part; its CUDA part is built when nvcc and a CUDA build of torch
are there. When the CUDA part cannot be built (a broken toolkit) and FUSED_PREACT_CUDA is unset,
the CPU part is built alone and the reason is recorded: ``import fused_preact`` then warns once
(pip shows no build output of a build that succeeds). The torch version the extension was built
against is recorded too (fused_preact/_build_info.json): fused_preact/_extension.py refuses,
naming both versions, to load it under another torch.

Compiled objects stay in build/<variant>-<python>-torch<version>-<hash of torch's path>/ (ninja):
a rebuild of an unchanged tree compiles nothing, and a changed .cpp recompiles that file alone.

Environment:
    FUSED_PREACT_CUDA=1|0      force / skip the CUDA part (unset: automatic, CPU part alone on failure)
    CUDA_HOME                  defaults to /usr/local/cuda when unset and present
    TORCH_CUDA_ARCH_LIST       defaults to "8.0;9.0"; PTX of the newest plain architecture is added
                               (8.0;9.0+PTX) unless an entry has PTX, so newer GPUs JIT it; the
                               list built is recorded (cuda_archs) for fused_preact.dispatch
    MAX_JOBS                   parallel compile jobs
    FUSED_PREACT_PTXAS_VERBOSE=1  report registers and spills of every CUDA kernel
    FUSED_PREACT_CPU_SIMD=avx512|avx2|generic  the vector code of the CPU kernels (unset: the
                               widest the building machine's CPU has, as an editable install runs
                               where it is built; the extension refuses to load on a CPU without it)
"""
import glob
import hashlib
import json
import os
import shutil
import sys

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
STANDARD_CUDA_HOME = "/usr/local/cuda"
BUILD_INFO = os.path.join("fused_preact", "_build_info.json")   # read by fused_preact/_extension.py
# setup.py commands that compile the extension (the others, egg_info, dist_info and sdist, need no torch)
BUILDING_COMMANDS = {"build", "build_ext", "bdist_wheel", "editable_wheel", "develop", "install", "bdist_egg"}
USER_CUDA_HOME = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")   # as given, before the default

# torch.utils.cpp_extension reads CUDA_HOME when it is imported. A wrapper `nvcc` on PATH makes
# torch guess a folder one level too high (the link then fails: cannot find -lcudart).
if not os.environ.get("CUDA_HOME") and not os.environ.get("CUDA_PATH") and os.path.isdir(STANDARD_CUDA_HOME):
    os.environ["CUDA_HOME"] = STANDARD_CUDA_HOME
# Without a GPU to ask, torch cannot pick architectures by itself.
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")


def with_newest_ptx(arch_list: str) -> str:
    """``arch_list`` (TORCH_CUDA_ARCH_LIST) with PTX of its newest plain architecture added, unless
    some entry already has PTX: a GPU newer than every architecture built for (Blackwell's sm_100 and
    sm_120 for an 8.0;9.0 build) JIT-compiles that PTX instead of finding no kernel image. Names
    torch expands itself ("Ampere") and arch-specific targets ("9.0a", which no other GPU runs) are
    left as they are."""
    entries = [e for e in arch_list.replace(" ", ";").split(";") if e]
    if any(e.endswith("+PTX") for e in entries):
        return arch_list
    plain = [e for e in entries if e.replace(".", "", 1).isdigit()]
    if not plain:
        return arch_list
    newest = max(plain, key=lambda e: tuple(int(part) for part in e.split(".")))
    return ";".join(e + "+PTX" if e == newest else e for e in entries)


os.environ["TORCH_CUDA_ARCH_LIST"] = with_newest_ptx(os.environ["TORCH_CUDA_ARCH_LIST"])


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


def tell_installing_user(message: str) -> None:
    """A line the person running pip sees: pip shows a build's output only when the build fails (or
    with -v), so the line also goes to the controlling terminal when there is one. The same reason
    is recorded in the build info, and `import fused_preact` warns with it."""
    notice(message)
    if os.environ.get("PIP_BUILD_TRACKER") or os.environ.get("PIP_REQ_TRACKER"):   # run by pip (new, old)
        try:
            with open("/dev/tty", "w", encoding="utf-8") as tty:
                tty.write(f"fused-preact: {message}\n")
        except OSError:
            pass


def require_torch():
    """torch.utils.cpp_extension of the torch the extension is built against; exits with what to
    install when there is none."""
    try:
        import torch  # noqa: F401
        from torch.utils import cpp_extension
    except ImportError as error:
        raise SystemExit(
            f"fused-preact: building the C++ extension needs torch, and `import torch` fails here ({error}). "
            "Install torch first (`pip install torch`, or the build for your CUDA version from "
            "pytorch.org), then install fused-preact again.") from None
    return cpp_extension


def put_ninja_on_path() -> None:
    """torch finds ninja on PATH only; the ninja package's binary lies in the scripts folder of the
    environment it was installed into, which is not on PATH in a venv that was not activated."""
    try:
        import ninja
    except ImportError:
        return
    folder = getattr(ninja, "BIN_DIR", None)
    if folder and os.path.isdir(folder) and folder not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = folder + os.pathsep + os.environ.get("PATH", "")


def has_cudart(cuda_home: str) -> bool:
    """The toolkit holds the CUDA runtime the extension links against (-lcudart)."""
    return any(glob.glob(os.path.join(cuda_home, lib, f"libcudart{suffix}"))
               for lib in ("lib64", "lib") for suffix in (".so", ".a", "_static.a"))


def cuda_choice() -> str:
    choice = os.environ.get("FUSED_PREACT_CUDA", "").strip().lower()
    if choice not in ("", "0", "1", "auto"):
        raise SystemExit(f"fused-preact: FUSED_PREACT_CUDA must be 0, 1, auto or unset, got {choice!r}")
    return "auto" if choice == "" else choice


def cuda_plan(cpp_extension):
    """(build the CUDA part?, why not, whether "why not" is a failure the user should hear about).

    Not a failure: FUSED_PREACT_CUDA=0, a CPU build of torch, no toolkit anywhere. A failure: a
    toolkit that was pointed at (CUDA_HOME) or found but cannot build (no nvcc, no libcudart)."""
    import torch

    choice = cuda_choice()
    if choice == "0":
        return False, "FUSED_PREACT_CUDA=0", False
    cuda_home = cpp_extension.CUDA_HOME
    missing, failure = None, True
    if torch.version.cuda is None:
        missing, failure = f"torch {torch.__version__} is not a CUDA build", False
    elif cuda_home is None:
        missing, failure = "no CUDA toolkit was found (set CUDA_HOME)", False
    elif shutil.which("nvcc", path=os.path.join(cuda_home, "bin")) is None:
        missing, failure = f"the CUDA toolkit at CUDA_HOME={cuda_home} has no bin/nvcc", bool(USER_CUDA_HOME)
    elif not has_cudart(cuda_home):
        missing = f"the CUDA toolkit at CUDA_HOME={cuda_home} has no libcudart (lib64/ or lib/)"
    if missing and choice == "1":
        raise SystemExit(f"fused-preact: FUSED_PREACT_CUDA=1 but {missing}")
    return missing is None, missing, failure and missing is not None


def make_extension(cpp_extension, cuda: bool):
    sources = sorted(glob.glob(os.path.join("csrc", "*.cpp")))
    openmp = openmp_flags()
    cxx = ["-O3", "-g0"] + openmp + cpu_simd_flags()   # the C++ standard is the one torch asks for
    kwargs = dict(name="fused_preact._C", include_dirs=[os.path.join(ROOT, "csrc")],
                  extra_link_args=["-s"] + openmp, py_limited_api=False)
    if not cuda:
        return cpp_extension.CppExtension(sources=sources, extra_compile_args={"cxx": cxx}, **kwargs)
    nvcc = ["-O3", "--expt-relaxed-constexpr", "-lineinfo"]
    if os.environ.get("FUSED_PREACT_PTXAS_VERBOSE") == "1":
        nvcc.append("-Xptxas=-v")
    kwargs["include_dirs"] += nvidia_wheel_includes(cpp_extension.CUDA_HOME)
    return cpp_extension.CUDAExtension(sources=sources + sorted(glob.glob(os.path.join("csrc", "*.cu"))),
                                       define_macros=[("WITH_CUDA", None)],
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc}, **kwargs)


def persistent_build_folder(variant: str) -> str:
    """build/<variant>-<python>-torch<version>-<hash of torch's folder>: ninja's objects and log
    outlive the temporary folders pip and setuptools build in, one folder per torch it was built
    against (two environments building from one tree do not undo each other's objects)."""
    import torch

    where = hashlib.sha256(os.path.dirname(os.path.abspath(torch.__file__)).encode()).hexdigest()[:8]
    python = f"cp{sys.version_info.major}{sys.version_info.minor}"
    return os.path.join(ROOT, "build", f"{variant}-{python}-torch{torch.__version__}-{where}")


def build_ext_command(cpp_extension, plan):
    """torch's BuildExtension (ninja) in persistent folders, the CUDA part given up for the CPU part
    alone when it fails to build and FUSED_PREACT_CUDA is unset, and the build info written next to
    the built extension. ``plan``: cuda_plan's answer."""
    import torch

    class BuildExtension(cpp_extension.BuildExtension.with_options(use_ninja=True)):
        def build_extensions(self):
            cuda, why_not, failure = plan
            self.info = {"torch": torch.__version__, "torch_cuda": torch.version.cuda,
                         "python": sys.version.split()[0], "cuda": False, "cuda_not_built": None,
                         "cuda_failure": None, "cuda_archs": None}
            if cuda:
                try:
                    self._build_variant("cuda")
                    self.info["cuda"] = True
                    self.info["cuda_archs"] = os.environ["TORCH_CUDA_ARCH_LIST"]
                    return
                except Exception as error:   # compile or link errors, as distutils or ninja raise them
                    if cuda_choice() == "1":
                        raise
                    why_not, failure = f"building the CUDA part failed ({first_line(error)})", True
                    self._become_cpu_only()
            self.info["cuda_not_built"] = why_not
            if failure:
                self.info["cuda_failure"] = why_not
                tell_installing_user(f"{why_not}: built the CPU part of the extension only")
            else:
                notice(f"{why_not}: building the CPU part of the extension only")
            self._build_variant("cpu")

        def _build_variant(self, variant: str):
            self.build_temp = persistent_build_folder(variant)
            os.makedirs(self.build_temp, exist_ok=True)
            super().build_extensions()

        def _become_cpu_only(self):
            """Swap the CUDA extension for the CPU one, keeping what setuptools noted on it."""
            (cuda_ext,) = self.extensions
            cpu_ext = make_extension(cpp_extension, cuda=False)
            for name, value in vars(cuda_ext).items():
                if name.startswith("_"):
                    setattr(cpu_ext, name, value)
            self.extensions = [cpu_ext]

        def run(self):
            super().run()   # with --inplace / editable installs this also copies the .so into the tree
            folders = [os.path.join(self.build_lib, "fused_preact")]
            if self.inplace:
                folders.append(os.path.join(ROOT, "fused_preact"))
            for folder in folders:
                write_atomically(os.path.join(folder, os.path.basename(BUILD_INFO)),
                                 json.dumps(self.info, indent=1) + "\n")

        def get_outputs(self):
            return super().get_outputs() + [os.path.join(self.build_lib, BUILD_INFO)]

    return BuildExtension


def first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


def write_atomically(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{os.getpid()}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(temporary, path)


def extension_modules():
    """The extension and its build command when a setup.py command compiles it, else nothing (the
    metadata commands and sdist run without torch)."""
    if not BUILDING_COMMANDS & set(sys.argv[1:]):
        return [], {}
    cpp_extension = require_torch()
    put_ninja_on_path()
    plan = cuda_plan(cpp_extension)
    return [make_extension(cpp_extension, cuda=plan[0])], {"build_ext": build_ext_command(cpp_extension, plan)}


ext_modules, cmdclass = extension_modules()

setup(
    name="fused-preact",
    version="0.1.0",
    description="Pre-activation ResNets with fused BN-ReLU-conv units (Triton and C++/CUDA)",
    long_description=open(os.path.join(ROOT, "README.md"), encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.9",
    # fused_preact/kernels is a link to the top-level kernels/ folder: the Triton kernels are
    # installed, and imported in a source checkout, as fused_preact.kernels; no top-level package
    # `kernels` is installed (that name is taken on PyPI)
    packages=find_packages(include=["fused_preact", "fused_preact.*"]),
    install_requires=["torch>=2.4", "triton>=3.0,<4; platform_system=='Linux'", "numpy"],
    extras_require={"test": ["pytest", "pytest-benchmark"], "timm": ["timm"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
