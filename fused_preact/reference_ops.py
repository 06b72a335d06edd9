"""Plain-PyTorch implementations of the operator contract in ``fused_preact.unit_ops``.

The yardsticks of every backend's operators (never a dispatch backend; registered as the unit
operators' operator set ``"reference"``, ``REFERENCE_BACKEND``, so tests can run the fused unit's
code on them): the tests and ``python -m fused_preact.check`` compare each operator with these.

``eager=False`` (the default): the oracle, the contract computed in float64 with the roundings it
prescribes (the pre-activation rounded to the activation dtype before the product, each output
rounded once to its dtype). ``eager=True``: what an eager PyTorch program computes for the same
operator in the activation dtype -- per-element math in fp32 (fp64 for float64 data) rounded
after each eager op (BatchNorm's output, a conv's output before a residual is added, the sum),
convolutions in the activation dtype, statistics in fp32 -- so its distance from the oracle is
eager's own error in that dtype, the unit ``fused_preact.accuracy`` measures a backend's error in.
The conv operators take ``padding`` ([left, right, top, bottom], ``None``: K // 2 each side).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from .unit_ops import conv_padding, statistics_dtype


def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous()


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The statistics dtype of activations like ``x`` (the one rule, ``unit_ops.statistics_dtype``)."""
    return statistics_dtype(x.dtype)


def _relu_mask(t: torch.Tensor, pre: torch.Tensor) -> torch.Tensor:
    """torch's threshold_backward: zero where ``pre`` <= 0, ``t`` elsewhere (a NaN ``pre`` passes ``t``)."""
    return torch.where(pre <= 0, torch.zeros_like(t), t)


class _Math:
    """Where the oracle and eager differ: the type arithmetic runs in, and eager's extra roundings."""

    def __init__(self, dtype: torch.dtype, eager: bool):
        self.dtype, self.eager = dtype, eager
        self.compute = torch.float32 if eager and dtype != torch.float64 else torch.float64

    def up(self, t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if t is None else t.to(self.compute)

    def eager_round(self, t: torch.Tensor) -> torch.Tensor:
        """An intermediate result eager PyTorch stores in the activation dtype (the oracle keeps it)."""
        return t.to(self.dtype).to(self.compute) if self.eager else t

    def conv_operands(self, *tensors):
        """The operands of a conv, rounded to the activation dtype: eager convolves in that dtype
        (its output rounded once), the oracle in float64."""
        kind = self.dtype if self.eager else torch.float64
        return [t.to(self.dtype).to(kind) for t in tensors]


def _partials_of(x2d: torch.Tensor, rows_per_tile: int = 7, compute: torch.dtype = torch.float64):
    """Partials over tiles of ``rows_per_tile`` rows (an odd size, to exercise merging)."""
    m = x2d.shape[0]
    x = x2d.to(compute)
    means, m2s, counts = [], [], []
    for start in range(0, m, rows_per_tile):
        tile = x[start:start + rows_per_tile]
        mean = tile.mean(0)
        means.append(mean)
        m2s.append(((tile - mean) ** 2).sum(0))
        counts.append(float(tile.shape[0]))
    dtype = stat_dtype(x2d)
    return (torch.stack(means).to(dtype), torch.stack(m2s).to(dtype),
            torch.tensor(counts, dtype=dtype, device=x2d.device))


def channel_stats(x, *, eager: bool = False):
    rows = x.reshape(-1, x.shape[-1])
    if not eager:
        return _partials_of(rows)
    # eager BatchNorm: the batch's mean and variance over all rows in one go, in fp32
    math = _Math(x.dtype, eager)
    var, mean = torch.var_mean(math.up(rows), dim=0, correction=0)
    dtype = stat_dtype(x)
    n = rows.shape[0]
    return (mean[None].to(dtype), (var * n)[None].to(dtype), torch.tensor([float(n)], dtype=dtype, device=x.device))


def merge_partials(pmean, pm2, pcount, compute: torch.dtype = torch.float64):
    """Chan's merge (float64 by default): (mean, M2, n) per channel."""
    pmean, pm2, pcount = pmean.to(compute), pm2.to(compute), pcount.to(compute)
    n = pcount.sum()
    mean = (pmean * pcount[:, None]).sum(0) / n
    m2 = pm2.sum(0) + (pcount[:, None] * (pmean - mean) ** 2).sum(0)
    return mean, m2, n


def bn_finalize(pmean, pm2, pcount, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps, *, eager: bool = False):
    compute = pmean.dtype if eager else torch.float64
    mean, m2, n = merge_partials(pmean, pm2, pcount, compute)
    var = m2 / n
    invstd = torch.rsqrt(var + eps)
    scale = weight.to(compute) * invstd
    shift = bias.to(compute) - mean * scale
    if running_mean is not None:
        f = (1.0 / num_batches_tracked.to(compute)) if momentum < 0 else momentum
        unbiased = m2 / (n - 1)
        running_mean.copy_((1 - f) * running_mean.to(compute) + f * mean)
        running_var.copy_((1 - f) * running_var.to(compute) + f * unbiased)
    return tuple(t.to(pmean.dtype) for t in (mean, invstd, scale, shift))


def _preact(x, scale, shift, math: Optional[_Math] = None):
    """The conv input: relu(scale * x + shift), or x itself without a prologue (scale None)."""
    math = math or _Math(x.dtype, False)
    if scale is None:
        return math.up(x)
    return torch.relu(math.up(scale) * math.up(x) + math.up(shift))


def _pad_arguments(padding, k: int):
    """(F.pad's (left, right, top, bottom), the symmetric conv padding) of the operators' ``padding``."""
    left, right, top, bottom = conv_padding(padding, k)
    if left == right and top == bottom:
        return None, (top, left)
    return (left, right, top, bottom), (0, 0)


def conv_bnrelu(x, weight, scale, shift, residual, stride, stats, padding=None, *, eager: bool = False):
    math = _Math(x.dtype, eager)
    k = weight.shape[-1]
    a = _preact(x, scale, shift, math).to(x.dtype)
    pad, conv_pad = _pad_arguments(padding, k)
    a, w = math.conv_operands(_nchw(a), weight)
    if pad is not None:
        a = F.pad(a, pad)
    y = _nhwc(math.up(F.conv2d(a, w, stride=stride, padding=conv_pad)))
    if residual is not None:
        y = math.eager_round(y) + math.up(residual)
    y = y.to(x.dtype)
    if stats:
        pmean, pm2, pcount = channel_stats(y, eager=eager)
    else:
        pmean, pm2, pcount = (torch.empty(0, dtype=stat_dtype(x), device=x.device) for _ in range(3))
    return y, pmean, pm2, pcount


def _conv_input_grad(dy, weight, stride, height, width, padding, math: _Math):
    """The gradient of a conv's unpadded input (NHWC) from dy (``torch.nn.grad``: no autograd, so it
    also runs inside an operator's implementation, where nothing records a graph)."""
    k = weight.shape[-1]
    pad, conv_pad = _pad_arguments(padding, k)
    n, cin = dy.shape[0], weight.shape[1]
    dy_, w = math.conv_operands(_nchw(dy), weight)
    if pad is None:
        t = torch.nn.grad.conv2d_input((n, cin, height, width), w, dy_, stride=stride, padding=conv_pad)
    else:   # the gradient of the padded input, cropped to the input
        left, right, top, bottom = pad
        t = torch.nn.grad.conv2d_input((n, cin, height + top + bottom, width + left + right), w, dy_,
                                       stride=stride)[:, :, top:top + height, left:left + width]
    return _nhwc(math.up(t))


def conv_dgrad(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width, padding=None, *,
               eager: bool = False):
    math = _Math(dy.dtype, eager)
    t = _conv_input_grad(dy, weight, stride, height, width, padding, math)
    if add is not None:
        t = math.eager_round(t) + math.up(add)
    if h is None:
        empty = torch.empty(0, dtype=stat_dtype(dy), device=dy.device)
        return t.to(dy.dtype), empty, empty.clone()
    g = _relu_mask(t, math.up(scale) * math.up(h) + math.up(shift))
    xhat = (math.up(h) - math.up(mean)) * math.up(invstd)
    g_rounded = g.to(dy.dtype)
    if eager:   # eager sums the gradient it stored
        g = math.up(g_rounded)
    dtype = stat_dtype(dy)
    return g_rounded, g.sum((0, 1, 2)).to(dtype), (g * xhat).sum((0, 1, 2)).to(dtype)


def conv_wgrad(dy, x, scale, shift, weight, stride, padding=None, *, eager: bool = False):
    math = _Math(x.dtype, eager)
    k = weight.shape[-1]
    pad, conv_pad = _pad_arguments(padding, k)
    a, dy_, w = math.conv_operands(_nchw(_preact(x, scale, shift, math).to(x.dtype)), _nchw(dy), weight)
    if pad is not None:
        a = F.pad(a, pad)
    dw = torch.nn.grad.conv2d_weight(a, tuple(w.shape), dy_, stride=stride, padding=conv_pad)
    return dw.to(weight.dtype).contiguous()


def bn_backward_finish(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, add, batch_stats, *,
                       eager: bool = False):
    math = _Math(g.dtype, eager)
    g64 = math.up(g)
    w = math.up(weight) * math.up(invstd)
    if batch_stats:
        xhat = (math.up(h) - math.up(mean)) * math.up(invstd)
        dh = w * (g64 - math.up(sum_g) / count - xhat * math.up(sum_g_xhat) / count)
    else:
        dh = w * g64
    if add is not None:
        dh = math.eager_round(dh) + math.up(add)
    return dh.to(g.dtype)


def bn_add_relu(h, scale, shift, residual, residual_scale, residual_shift, *, eager: bool = False):
    math = _Math(h.dtype, eager)
    s = math.up(residual)
    if residual_scale is not None:
        s = math.eager_round(math.up(residual_scale) * s + math.up(residual_shift))
    return torch.relu(math.eager_round(math.up(scale) * math.up(h) + math.up(shift)) + s).to(h.dtype)


def bn_add_relu_backward(dy, y, h, mean, invstd, residual, residual_mean, residual_invstd, *,
                         eager: bool = False):
    math = _Math(dy.dtype, eager)
    g = _relu_mask(math.up(dy), math.up(y))
    dtype = stat_dtype(dy)
    xhat = (math.up(h) - math.up(mean)) * math.up(invstd)
    residual_sum = torch.empty(0, dtype=dtype, device=dy.device)
    if residual is not None:
        residual_xhat = (math.up(residual) - math.up(residual_mean)) * math.up(residual_invstd)
        residual_sum = (g * residual_xhat).sum((0, 1, 2)).to(dtype)
    return g.to(dy.dtype), g.sum((0, 1, 2)).to(dtype), (g * xhat).sum((0, 1, 2)).to(dtype), residual_sum


# The unit operators of fused_preact take their backend by name: these run as backend="reference".
REFERENCE_BACKEND = "reference"


def _register() -> None:
    import sys
    from .unit_function import register_operator_set
    register_operator_set(REFERENCE_BACKEND, lambda: sys.modules[__name__])


_register()
