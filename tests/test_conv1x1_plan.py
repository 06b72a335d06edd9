"""The host side of the tensor-core 1x1 conv kernels, on the CPU (csrc/conv1x1_plan.h): the launch
geometry a GPU run uses and the checks that send a call to them or to the composite path.

- One statistics partial per kRowsPerPartial rows everywhere: the 1x1 GEMM wrote one per 128-row
  tile while the Meta kernel (whose shapes Inductor asserts under torch.compile) and the CPU kernels
  said one per 256 rows, so a compiled bf16 bottleneck net stopped on a size assertion.
- The stride-2 dgrad's fill kernel puts its pixel chunks on gridDim.x: on gridDim.y (at most
  65,535) an input over 33.5M pixels was an invalid launch.
- The fast path declines what it cannot run (non-float32 scale/shift, misaligned data) instead of
  raising where the composite path would have run it; the weight it reads is copied when not
  16-byte aligned (cp.async on a misaligned address is a sticky CUDA error).
"""
from __future__ import annotations

import json
import math

import pytest
import torch

from fused_preact import _extension

pytestmark = pytest.mark.skipif(not _extension.available(), reason=str(_extension.unavailable_reason()))


def _plan(rows, pixels, cin, cout, stride):
    return json.loads(torch.ops.fused_preact.conv1x1_plan(rows, pixels, cin, cout, stride))


@pytest.mark.parametrize("n,h,w,stride", [(1, 8, 16, 1), (3, 13, 11, 1), (2, 30, 31, 2), (5, 16, 16, 2),
                                          (1, 1, 129, 1)])
def test_partial_count_is_one_formula_for_meta_cpu_and_the_1x1_kernels(n, h, w, stride):
    """conv_bnrelu's statistics partials: the Meta kernel's count (what torch.compile's fake tensors
    promise), the CPU kernels' and the tensor-core GEMM's plan agree for rows around the tile size."""
    cin, cout = 16, 24
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    rows = n * ho * wo
    plan = _plan(rows, n * h * w, cin, cout, stride)
    args = lambda device, dtype: (torch.randn(n, h, w, cin, device=device, dtype=dtype),            # noqa: E731
                                  torch.randn(cout, cin, 1, 1, device=device),
                                  torch.rand(cin, device=device) + 0.5, torch.randn(cin, device=device),
                                  None, stride, True)
    meta = torch.ops.fused_preact.conv_bnrelu(*args("meta", torch.bfloat16))
    cpu = torch.ops.fused_preact.conv_bnrelu(*args("cpu", torch.bfloat16))
    assert meta[1].shape[0] == cpu[1].shape[0] == plan["partials"] == math.ceil(rows / plan["rows_per_partial"])
    assert plan["forward"]["x"] == plan["partials"]   # the GEMM writes one partial per row tile


def test_stride_2_dgrad_of_40m_pixels_fits_the_grid():
    """The input pixels no output reads, 40M of them: 78,125 chunks of 512 on gridDim.x (the
    old gridDim.y took at most 65,535, 33.5M pixels)."""
    pixels = 10 * 2000 * 2000
    plan = _plan(10 * 1000 * 1000, pixels, 64, 64, 2)
    assert plan["fill"]["x"] == math.ceil(pixels / 512) > 65535
    for kernel in ("forward", "dgrad", "fill", "wgrad"):
        assert plan[kernel]["fits"], (kernel, plan[kernel])
        assert plan[kernel]["y"] <= 65535 and plan[kernel]["z"] <= 65535
    assert _plan(100, 400, 64, 64, 1)["fill"]["x"] == 0     # stride 1: no fill launch


def _conv_args(dtype=torch.bfloat16, scale_dtype=torch.float32, residual=True, offset=0):
    """conv_bnrelu arguments of a 1x1 tensor-core conv on the CPU (what a GPU call would pass);
    ``offset`` elements shift the residual off its 16-byte alignment."""
    x = torch.randn(2, 5, 5, 16, dtype=dtype)
    res = None
    if residual:
        res = torch.randn(2 * 5 * 5 * 24 + offset, dtype=dtype)[offset:].view(2, 5, 5, 24)
    return (x, torch.randn(24, 16, 1, 1), torch.rand(16, dtype=scale_dtype) + 0.5,
            torch.randn(16, dtype=scale_dtype), res, 1, True)


def test_the_fast_path_declines_what_it_cannot_run_and_says_why():
    why = torch.ops.fused_preact.conv_bnrelu_tensor_cores
    assert why(*_conv_args()) == "the data is not on a CUDA device"   # everything else fits
    assert "scale is BFloat16, the kernels read float32" in why(*_conv_args(scale_dtype=torch.bfloat16))
    assert why(*_conv_args(offset=1)) == "residual data is not 16-byte aligned"
    x, w, scale, shift, res, stride, stats = _conv_args()
    assert why(x, torch.randn(24, 16, 3, 3), scale, shift, res, stride, stats) == "the kernel is 3x3"
    assert why(x, w, scale, shift, None, stride, stats, [0, 1, 0, 1]) == "the conv is padded"
    assert why(x, w, None, None, res, stride, stats) == "the conv has no BN-ReLU prologue (raw input)"
    assert "not a multiple of 8" in why(torch.randn(2, 5, 5, 12, dtype=torch.bfloat16), torch.randn(24, 12, 1, 1),
                                        torch.rand(12) + 0.5, torch.randn(12), res, 1, True)
    # a bf16 weight view at an odd offset (a flat parameter buffer): copied to an aligned matrix, so fine
    flat = torch.randn(24 * 16 + 1, dtype=torch.bfloat16)
    assert why(x, flat[1:].view(24, 16, 1, 1), scale, shift, res, stride, stats) == "the data is not on a CUDA device"
    # dgrad and wgrad: the same checks on their own tensors
    dy = torch.randn(2, 5, 5, 24, dtype=torch.bfloat16)
    h = torch.randn(2 * 5 * 5 * 16 + 1, dtype=torch.bfloat16)[1:].view(2, 5, 5, 16)
    mean, invstd = torch.randn(16), torch.rand(16) + 0.5
    assert torch.ops.fused_preact.conv_dgrad_tensor_cores(dy, w, h, scale, shift, mean, invstd, None, 1, 5, 5) \
        == "h data is not 16-byte aligned"
    assert "invstd is Double" in torch.ops.fused_preact.conv_dgrad_tensor_cores(
        dy, w, x, scale, shift, mean, invstd.double(), None, 1, 5, 5)
    assert torch.ops.fused_preact.conv_wgrad_tensor_cores(dy, x, scale, shift, w, 1) == "the data is not on a CUDA device"


def test_the_composite_path_runs_what_the_fast_path_declines():
    """Non-float32 scale/shift and a misaligned residual: the CPU path (the CUDA composite's twin)
    computes them, as the contract allows any floating per-channel vectors."""
    x, w, scale, shift, res, stride, stats = _conv_args(scale_dtype=torch.bfloat16, offset=1)
    y, *_ = torch.ops.fused_preact.conv_bnrelu(x, w, scale, shift, res, stride, stats)
    a = torch.relu(scale.float() * x.float() + shift.float()).bfloat16().float()
    expected = (torch.einsum("nhwc,oc->nhwo", a, w.flatten(1).bfloat16().float()) + res.float()).bfloat16()
    torch.testing.assert_close(y, expected, rtol=1e-2, atol=1e-2)
