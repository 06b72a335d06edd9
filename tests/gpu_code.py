"""Ahead-of-time checks of GPU code on a machine without a GPU.

``compile_triton`` builds a real cubin for an explicit target (sm_80, sm_90) with
``triton.compile``; ``resource_usage`` and ``sass`` read it back with cuobjdump (the
CUDA toolkit's, or the copy triton ships), so tests can assert that no kernel spills
to local memory and that the conv kernels use tensor-core instructions.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile

import pytest

ARCHS = (80, 90)
# tensor-core matrix instructions: HMMA (Ampere mma.sync), HGMMA (Hopper wgmma)
TENSOR_CORE_OPCODES = ("HMMA", "HGMMA")


def cuobjdump() -> str:
    """Path of cuobjdump; skips the calling test when there is none."""
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


def compile_triton(kernel, signature: dict, constexprs: dict, arch: int, num_warps: int = 4,
                   num_stages: int = 3) -> bytes:
    """The cubin of a ``@triton.jit`` kernel for ``sm_<arch>``.

    ``signature`` maps every argument name to a Triton type (``"*bf16"``, ``"i32"``,
    ``"fp32"``) or ``"constexpr"``; ``constexprs`` gives the constexpr values.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    while not isinstance(kernel, triton.runtime.JITFunction):  # unwrap @triton.autotune / @heuristics
        kernel = kernel.fn
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": num_warps, "num_stages": num_stages})
    return compiled.asm["cubin"]


def _dump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([cuobjdump(), flag, f.name], capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict:
    """``{kernel name: {"REG": .., "STACK": .., "SHARED": .., "LOCAL": ..}}`` of a cubin or .so."""
    text = _dump(cubin, "--dump-resource-usage")
    usage = {}
    for name, fields in re.findall(r"Function (\S+):\s*\n\s*((?:\w+:\d+\s*)+)", text):
        usage[name] = {k: int(v) for k, v in re.findall(r"(\w+):(\d+)", fields)}
    assert usage, text
    return usage


def sass(cubin: bytes) -> str:
    """The disassembly of a cubin."""
    return _dump(cubin, "--dump-sass")


def assert_no_spills(cubin: bytes, what: str) -> None:
    for name, fields in resource_usage(cubin).items():
        assert fields.get("LOCAL", 0) == 0 and fields.get("STACK", 0) == 0, f"{what}: {name} spills: {fields}"


def assert_tensor_cores(cubin: bytes, what: str) -> None:
    code = sass(cubin)
    assert any(op in code for op in TENSOR_CORE_OPCODES), f"{what}: no HMMA/HGMMA in the disassembly"
