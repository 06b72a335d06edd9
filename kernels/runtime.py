"""What every Triton launcher needs to know about where it runs.

- ``interpreting()``: kernels run in Triton's CPU interpreter (``TRITON_INTERPRET=1``).
  The interpreter multiplies the raw bits of bf16/fp16 ``tl.dot`` operands, so
  launchers pass ``UPCAST_DOT=interpreting()`` and kernels upcast dot operands to
  fp32 under that constexpr.
- ``dot_precision(dtype)``: the ``input_precision`` of fp32 products. Eager convs use
  TF32 only when ``torch.backends.cudnn.allow_tf32`` says so, and so do we.
- ``check_device(name, tensor)``: a clear error when a tensor cannot reach a kernel.
"""
from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_precision(dtype: torch.dtype) -> str:
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def check_device(name: str, tensor: torch.Tensor) -> None:
    if tensor.device.type == "cuda":
        return
    if tensor.device.type == "cpu" and interpreting():
        return
    raise RuntimeError(f"{name} is on {tensor.device}; the Triton kernels need a CUDA tensor "
                       f"(or a CPU tensor with TRITON_INTERPRET=1 set before triton is imported)")
