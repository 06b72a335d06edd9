"""Micro-benchmarks of the contract operators, per backend and device, against eager PyTorch.

Each benchmark is grouped by operator, device and shape, so pytest-benchmark's
table puts ``eager``, ``triton`` (``torch.ops.fused_preact_triton``) and ``cuda``
(``torch.ops.fused_preact``, the extension, which also has CPU kernels) side by side,
and ``--benchmark-compare`` catches a regression of any of them. An operator a
backend does not provide, or a device it cannot reach, is skipped with the reason.

Shapes: on a GPU an ImageNet stage-1 layer (batch 32, 56x56, 64 channels; 1x1 from
256); on the CPU a tiny one that the Triton interpreter gets through in seconds.
"""
from __future__ import annotations

import importlib
import os

import pytest
import torch
import torch.nn.functional as F

from bench.contenders import eager_conv_bnrelu

OPS = ("channel_stats", "bn_finalize", "conv_bnrelu", "conv_dgrad", "conv_wgrad", "bn_backward_finish",
       "bn_relu_apply")
NAMESPACE = {"triton": "fused_preact_triton", "cuda": "fused_preact"}
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}
SHAPE = {"cpu": (2, 8, 8, 16), "cuda": (32, 56, 56, 64)}       # N, H, W, C (NHWC)
ROUNDS = {"cpu": 3, "cuda": 20}


def _operator(provider: str, op: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here")
    if provider == "eager":
        return None
    if provider == "triton" and device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on a CPU needs TRITON_INTERPRET=1")
    try:
        if provider == "triton":
            importlib.import_module("fused_preact.kernels.ops")
        else:
            from fused_preact import _extension
            if not _extension.available():
                pytest.skip(_extension.unavailable_reason())
        return getattr(getattr(torch.ops, NAMESPACE[provider]), op)
    except (ImportError, AttributeError, RuntimeError) as error:
        pytest.skip(f"torch.ops.{NAMESPACE[provider]}.{op} is not available: {error}")


def _arguments(op: str, device: str, kernel: int) -> list:
    """Valid arguments of ``op`` (fresh random data; activations NHWC)."""
    n, h, w, c = SHAPE[device]
    cin = c * 4 if kernel == 1 else c        # a bottleneck's first 1x1 reads 4x the channels
    dtype = DTYPE[device]

    def act(channels):
        return torch.randn(n, h, w, channels, device=device).to(dtype)

    def vec(channels, low=0.0):
        return (low + torch.rand(channels, device=device)).float()

    weight = torch.randn(c, cin, kernel, kernel, device=device) * (2.0 / (cin * kernel * kernel)) ** 0.5
    if op == "channel_stats":
        return [act(c)]
    if op == "bn_finalize":
        rows = 64
        return [torch.randn(rows, c, device=device), 1.0 + torch.rand(rows, c, device=device),
                torch.full((rows,), float(n * h * w // rows), device=device), vec(c, 0.5), vec(c),
                torch.zeros(c, device=device), torch.ones(c, device=device),
                torch.tensor(1, device=device), 0.1, 1e-5]
    if op == "conv_bnrelu":
        return [act(cin), weight, vec(cin, 0.5), vec(cin) - 0.5, None, 1, True]
    if op == "conv_dgrad":
        return [act(c), weight, act(cin), vec(cin, 0.5), vec(cin) - 0.5, vec(cin) - 0.5, vec(cin, 0.5),
                None, 1, h, w]
    if op == "conv_wgrad":
        return [act(c), act(cin), vec(cin, 0.5), vec(cin) - 0.5, weight, 1]
    if op == "bn_backward_finish":
        return [act(c), act(c), vec(c) - 0.5, vec(c, 0.5), vec(c, 0.5), torch.randn(c, device=device),
                torch.randn(c, device=device), float(n * h * w), None, True]
    if op == "bn_relu_apply":
        return [act(c), vec(c, 0.5), vec(c) - 0.5, act(c)]
    raise ValueError(f"op must be one of {OPS}, got {op!r}")


def _nchw(t):
    return t.permute(0, 3, 1, 2)


def _eager(op: str):
    """What eager PyTorch runs for the same work (NHWC tensors viewed as channels_last NCHW)."""
    def preact(x, scale, shift):
        return torch.relu(x * scale.to(x.dtype) + shift.to(x.dtype))

    if op == "channel_stats":
        return lambda x: torch.var_mean(x, dim=(0, 1, 2), correction=0)
    if op == "bn_finalize":
        return lambda pmean, pm2, pcount, w, b, rm, rv, nbt, momentum, eps: (
            pmean.mean(0), torch.rsqrt(pm2.sum(0) / pcount.sum() + eps), rm.lerp_(pmean.mean(0), momentum))
    if op == "conv_bnrelu":
        return lambda x, w, scale, shift, residual, stride, stats: eager_conv_bnrelu(
            _nchw(x), w, scale, shift, stride)
    if op == "conv_dgrad":
        def dgrad(dy, w, h, scale, shift, mean, invstd, add, stride, height, width):
            t = torch.nn.grad.conv2d_input((dy.shape[0], w.shape[1], height, width), w.to(dy.dtype), _nchw(dy),
                                           stride=stride, padding=w.shape[-1] // 2)
            g = t * (_nchw(h) * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1) > 0)
            xhat = (_nchw(h).float() - mean.view(1, -1, 1, 1)) * invstd.view(1, -1, 1, 1)
            return g, g.float().sum((0, 2, 3)), (g.float() * xhat).sum((0, 2, 3))
        return dgrad
    if op == "conv_wgrad":
        return lambda dy, x, scale, shift, w, stride: torch.nn.grad.conv2d_weight(
            _nchw(preact(x, scale, shift)), w.shape, _nchw(dy), stride=stride, padding=w.shape[-1] // 2)
    if op == "bn_backward_finish":
        def finish(g, h, mean, invstd, w, sum_g, sum_g_xhat, count, add, batch_stats):
            xhat = (h.float() - mean) * invstd
            return (w * invstd * (g.float() - sum_g / count - xhat * sum_g_xhat / count)).to(g.dtype)
        return finish
    if op == "bn_relu_apply":
        return lambda x, scale, shift, residual: F.relu(x * scale.to(x.dtype) + shift.to(x.dtype)) + residual
    raise ValueError(op)


CASES = [(op, kernel) for op in OPS for kernel in ((1, 3) if op.startswith("conv_") else (3,))]


@pytest.mark.parametrize("op, kernel", CASES, ids=[f"{op}-{k}x{k}" if op.startswith("conv_") else op
                                                   for op, k in CASES])
@pytest.mark.parametrize("provider", ["eager", "triton", "cuda"])
@pytest.mark.parametrize("device", ["cpu", "cuda"])
def test_operator(benchmark, device, provider, op, kernel):
    fn = _operator(provider, op, device) or _eager(op)
    args = _arguments(op, device, kernel)
    suffix = f"-{kernel}x{kernel}" if op.startswith("conv_") else ""
    benchmark.group = f"{op}{suffix} {device} {'x'.join(map(str, SHAPE[device]))} {DTYPE[device]}"
    benchmark.extra_info.update(provider=provider, device=device)

    def run():
        out = fn(*args)
        if device == "cuda":
            torch.cuda.synchronize()
        return out

    out = benchmark.pedantic(run, rounds=ROUNDS[device], warmup_rounds=1, iterations=1)
    first = out[0] if isinstance(out, (tuple, list)) else out
    assert torch.isfinite(first.float()).all()
