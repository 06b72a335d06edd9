"""The conv composites' dtype rule (csrc/conv_ops.cpp, conv_dtype), checked on the C++ CPU path under
the CUDA rule (``set_conv_dtype_rule("cuda")``): on a GPU a bf16/fp16 conv runs in its own dtype,
but where a residual (conv_bnrelu) or a joining gradient (conv_dgrad's ``add``) is added to its
output it writes float32, so the sum is formed in fp32 and rounded once, as the contract says and the
1x1 kernels and Triton do. (The CUDA path let cuDNN round y to bf16, added the residual and rounded
again: double rounding.)"""
from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fused_preact import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason=str(_extension.unavailable_reason()))


@contextlib.contextmanager
def cuda_rule():
    previous = torch.ops.fused_preact.set_conv_dtype_rule("cuda")
    try:
        yield
    finally:
        torch.ops.fused_preact.set_conv_dtype_rule(previous)


def _nchw(t):
    return t.permute(0, 3, 1, 2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_residual_is_added_in_fp32_and_rounded_once_under_the_cuda_rule(dtype):
    x = torch.randn(2, 9, 9, 16, dtype=dtype)
    w = torch.randn(24, 16, 3, 3) / 12
    scale, shift = torch.rand(16) + 0.5, torch.randn(16) * 0.3
    residual = torch.randn(2, 9, 9, 24, dtype=dtype) * 4   # large next to y: rounding y first matters
    a = torch.relu(scale * x.float() + shift).to(dtype)
    conv32 = F.conv2d(_nchw(a).float(), w.to(dtype).float(), padding=1).permute(0, 2, 3, 1)
    once = (conv32 + residual.float()).to(dtype)
    twice = (conv32.to(dtype).float() + residual.float()).to(dtype)
    assert (once != twice).float().mean() > 0.01     # the two roundings differ here
    with cuda_rule():
        y, *_ = torch.ops.fused_preact.conv_bnrelu(x, w, scale, shift, residual, 1, True)
        # without a residual the CUDA rule convolves in the data's dtype (the rule is in force)
        plain, *_ = torch.ops.fused_preact.conv_bnrelu(x, w, scale, shift, None, 1, False)
    torch.testing.assert_close(y.float(), once.float(), rtol=0, atol=0)
    bf16_conv = F.conv2d(_nchw(a), w.to(dtype), padding=1).permute(0, 2, 3, 1)
    torch.testing.assert_close(plain.float(), bf16_conv.float(), rtol=0, atol=0)


def test_dgrad_adds_the_joining_gradient_in_fp32_under_the_cuda_rule():
    dtype = torch.bfloat16
    dy = torch.randn(2, 5, 5, 24, dtype=dtype)
    w = torch.randn(24, 16, 3, 3) / 12
    add = torch.randn(2, 9, 9, 16, dtype=dtype) * 4
    t32 = torch.nn.grad.conv2d_input((2, 16, 9, 9), w.to(dtype).float(), _nchw(dy).float(), stride=2,
                                     padding=1).permute(0, 2, 3, 1)
    with cuda_rule():
        g, _, _ = torch.ops.fused_preact.conv_dgrad(dy, w, None, None, None, None, None, add, 2, 9, 9)
    torch.testing.assert_close(g.float(), (t32 + add.float()).to(dtype).float(), rtol=0, atol=0)


def test_the_rule_is_per_thread_and_checked():
    with pytest.raises(RuntimeError, match="device must be '', 'cpu' or 'cuda'"):
        torch.ops.fused_preact.set_conv_dtype_rule("tpu")
    assert torch.ops.fused_preact.set_conv_dtype_rule("") == ""
