"""Loads the C++/CUDA extension ``fused_preact._C`` (built from ``csrc/`` by ``pip install -e .``).

Importing the module registers the ``torch.ops.fused_preact`` operators. A missing
build is not an error here: ``available()`` says whether it loaded and
``unavailable_reason()`` why not; callers that need it raise with that reason.
"""
from __future__ import annotations

import importlib
from typing import Optional

import torch  # the extension links against torch's libraries: load them first

from . import cpu_instructions

_module = None
_reason: Optional[str] = None
_tried = False


def load():
    """The imported extension module, or None when it is not built (see ``unavailable_reason``)."""
    global _module, _reason, _tried
    if not _tried:
        _tried = True
        try:
            module = importlib.import_module("fused_preact._C")
        except ImportError as error:
            _reason = (f"the C++ extension fused_preact._C is not built ({error}); "
                       "run `pip install --no-build-isolation -e .`")
        else:
            missing = cpu_instructions.missing_flags(str(torch.ops.fused_preact.cpu_simd()))
            if missing:
                _reason = (f"the C++ extension fused_preact._C was built for "
                           f"{torch.ops.fused_preact.cpu_simd()} CPU code on another machine and this "
                           f"CPU lacks {', '.join(sorted(missing))}; rebuild it here (or build with "
                           "FUSED_PREACT_CPU_SIMD=avx2 or generic for other machines)")
            else:
                _module = module
    return _module


def available() -> bool:
    return load() is not None


def unavailable_reason() -> Optional[str]:
    load()
    return _reason


def built_with_cuda() -> bool:
    """Whether the extension was compiled with its CUDA kernels."""
    return available() and bool(torch.ops.fused_preact.built_with_cuda())


def cpu_simd() -> Optional[str]:
    """The instruction set of the extension's CPU kernels ("avx512", "avx2", "generic"), or None."""
    return str(torch.ops.fused_preact.cpu_simd()) if available() else None


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of a 4-D tensor (N, C, H, W), in one read pass.

    Accepts contiguous NCHW or channels_last float32/float64/float16/bfloat16 tensors on the CPU
    (or on a GPU when built with CUDA); returns float32 statistics (float64 for float64 input).
    """
    if not available():
        raise RuntimeError(f"batch_stats needs the C++ extension: {_reason}")
    return torch.ops.fused_preact.batch_stats(x)
