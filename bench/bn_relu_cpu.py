"""CPU benchmark: the fused BN-ReLU(-add) forward + backward of the C++ operators vs eager PyTorch.

    python bench/bn_relu_cpu.py [--batch 32] [--channels 64] [--size 32] [--repeats 30]

Both sides run a training step of out = relu(BN(x)) + residual on an NHWC (channels_last) tensor
and its backward for a given d_out (dx, d_residual, d_weight, d_bias):
  eager  nn.BatchNorm2d -> relu -> add, autograd backward
  fused  channel_stats -> bn_finalize (running stats) -> bn_relu_apply(+ residual);
         bn_relu_backward_reduce (ReLU mask, BN sums) -> bn_backward_finish
Prints the median of `repeats` timings of each, the two steps alternating in this one run (the
dev VM's speed drifts within seconds), the versions, the extension's CPU vector code and thread
count, and each side's largest dx error against the BN-ReLU backward written out in float64
numpy, over the elements whose float64 pre-activation is at least 1e-5 from ReLU's kink at 0:
the derivative jumps there, and an element a float32 BN output rounds across 0 (measured: one or
two of the 2M, |pre| ~ 1e-7, in about a third of the processes) makes a dx error of up to |d_out|
whatever the kernel. Nothing here is a test.
"""
import argparse
import platform
import statistics
import subprocess
import time

import numpy as np
import torch

from fused_preact import _extension

ops = torch.ops.fused_preact


def eager_step(bn, x, residual, d_out):
    x = x.detach().requires_grad_()
    out = torch.relu(bn(x)) + residual
    out.backward(d_out)
    return out, x.grad


def fused_step(weight, bias, running_mean, running_var, tracked, x, residual, d_out):
    """x, residual, d_out: NHWC. Returns out, dx, d_weight, d_bias (d_residual is d_out itself)."""
    partials = ops.channel_stats(x)
    mean, invstd, scale, shift = ops.bn_finalize(*partials, weight, bias, running_mean, running_var,
                                                 tracked, 0.1, 1e-5)
    out = ops.bn_relu_apply(x, scale, shift, residual)
    g, sum_g, sum_g_xhat = ops.bn_relu_backward_reduce(d_out, x, scale, shift, mean, invstd, None)
    count = float(x.numel() // x.shape[-1])
    dx = ops.bn_backward_finish(g, x, mean, invstd, weight, sum_g, sum_g_xhat, count, None, True)
    return out, dx, sum_g_xhat, sum_g


def reference_dx(x, d_out, weight, bias, eps):
    """dx of relu(BN(x)) + residual, written out in float64 numpy (independent of torch's kernels),
    and where the pre-activation is at least 1e-5 from 0 (the elements an error is measured on)."""
    c = x.shape[-1]
    x64, d64 = x.double().numpy().reshape(-1, c), d_out.double().numpy().reshape(-1, c)
    w64, b64 = weight.double().numpy(), bias.double().numpy()
    invstd = 1 / np.sqrt(x64.var(0) + eps)
    xhat = (x64 - x64.mean(0)) * invstd
    dy = d64 * (w64 * xhat + b64 > 0)
    dx = w64 * invstd * (dy - dy.mean(0) - xhat * (dy * xhat).mean(0))
    away_from_kink = np.abs(w64 * xhat + b64) >= 1e-5
    return torch.from_numpy(dx.reshape(x.shape)), torch.from_numpy(away_from_kink.reshape(x.shape))


def median_seconds(fns, repeats):
    """Median seconds of each function, run in turn `repeats` times after a warm-up call."""
    times = [[] for _ in fns]
    for fn in fns:
        fn()
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            start = time.perf_counter()
            fn()
            spent.append(time.perf_counter() - start)
    return [statistics.median(spent) for spent in times]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    if not _extension.available():
        raise SystemExit(_extension.unavailable_reason())
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{torch.get_num_threads()} threads (fused kernels on {ops.cpu_threads()}), "
          f"CPU kernels {_extension.cpu_simd()}, commit {commit}")
    print(f"shape N={args.batch} C={args.channels} H=W={args.size} (NHWC), median of {args.repeats}")
    print(f"{'dtype':10s} {'eager ms':>9s} {'fused ms':>9s} {'speedup':>8s} {'eager dx err':>13s} "
          f"{'fused dx err':>13s}")
    c = args.channels
    for name in args.dtypes.split(","):
        dtype = getattr(torch, name)
        shape = (args.batch, args.size, args.size, c)
        x = (torch.randn(shape) * 2 + 1).to(dtype)
        residual, d_out = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
        nchw = lambda t: t.permute(0, 3, 1, 2)  # noqa: E731  channels_last views
        bn = torch.nn.BatchNorm2d(c).to(dtype)
        weight, bias = bn.weight.detach().float(), bn.bias.detach().float()
        running_mean, running_var = torch.zeros(c), torch.ones(c)
        tracked = torch.tensor(0)

        eager, fused = median_seconds(
            [lambda: eager_step(bn, nchw(x), nchw(residual), nchw(d_out)),
             lambda: fused_step(weight, bias, running_mean, running_var, tracked, x, residual, d_out)],
            args.repeats)
        _, dx_eager = eager_step(bn, nchw(x), nchw(residual), nchw(d_out))
        _, dx_fused, _, _ = fused_step(weight, bias, running_mean, running_var, tracked, x, residual, d_out)
        dx_ref, measured = reference_dx(x, d_out, weight, bias, bn.eps)
        eager_err = (dx_eager.permute(0, 2, 3, 1).double() - dx_ref)[measured].abs().max().item()
        fused_err = (dx_fused.double() - dx_ref)[measured].abs().max().item()
        print(f"{name:10s} {eager * 1e3:9.2f} {fused * 1e3:9.2f} {eager / fused:7.2f}x {eager_err:13.3g} "
              f"{fused_err:13.3g}")

if __name__ == "__main__":
    main()
