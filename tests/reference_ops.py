"""Plain-PyTorch implementations of the operator contract in ``fused_preact.unit_ops``.

Test oracle only (never a dispatch backend; registered as the unit operators' operator set
``"reference"``, ``REFERENCE_BACKEND``): every backend's operators are
compared with these, computed in float64, and ``unit_function`` is checked against
the eager units by running it on these.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fused_preact.unit_ops import statistics_dtype


def _nchw(x):
    return x.permute(0, 3, 1, 2)


def _nhwc(x):
    return x.permute(0, 2, 3, 1).contiguous()


def stat_dtype(x: torch.Tensor) -> torch.dtype:
    """The statistics dtype of activations like ``x`` (the one rule, ``unit_ops.statistics_dtype``)."""
    return statistics_dtype(x.dtype)


def _partials_of(x2d: torch.Tensor, rows_per_tile: int = 7):
    """Partials over tiles of ``rows_per_tile`` rows (an odd size, to exercise merging)."""
    m = x2d.shape[0]
    x = x2d.double()
    means, m2s, counts = [], [], []
    for start in range(0, m, rows_per_tile):
        tile = x[start:start + rows_per_tile]
        mean = tile.mean(0)
        means.append(mean)
        m2s.append(((tile - mean) ** 2).sum(0))
        counts.append(float(tile.shape[0]))
    dtype = stat_dtype(x2d)
    return (torch.stack(means).to(dtype), torch.stack(m2s).to(dtype), torch.tensor(counts, dtype=dtype))


def channel_stats(x):
    return _partials_of(x.reshape(-1, x.shape[-1]))


def merge_partials(pmean, pm2, pcount):
    """Chan's merge, in float64: (mean, M2, n) per channel."""
    pmean, pm2, pcount = pmean.double(), pm2.double(), pcount.double()
    n = pcount.sum()
    mean = (pmean * pcount[:, None]).sum(0) / n
    m2 = pm2.sum(0) + (pcount[:, None] * (pmean - mean) ** 2).sum(0)
    return mean, m2, n


def bn_finalize(pmean, pm2, pcount, weight, bias, running_mean, running_var, num_batches_tracked,
                momentum, eps):
    mean, m2, n = merge_partials(pmean, pm2, pcount)
    var = m2 / n
    invstd = torch.rsqrt(var + eps)
    scale = weight.double() * invstd
    shift = bias.double() - mean * scale
    if running_mean is not None:
        f = (1.0 / num_batches_tracked.double()) if momentum < 0 else momentum
        unbiased = m2 / (n - 1)
        running_mean.copy_((1 - f) * running_mean.double() + f * mean)
        running_var.copy_((1 - f) * running_var.double() + f * unbiased)
    return tuple(t.to(pmean.dtype) for t in (mean, invstd, scale, shift))


def _preact(x, scale, shift):
    """The conv input: relu(scale * x + shift), or x itself without a prologue (scale None)."""
    if scale is None:
        return x.double()
    return torch.relu(scale.to(torch.float64) * x.double() + shift.double())


def _padding(padding, k):
    """(left, right, top, bottom): the operators' ``padding``, K // 2 per side when None."""
    return tuple(padding) if padding is not None else (k // 2,) * 4


def _relu_mask(t, pre):
    """torch's threshold_backward: zero where ``pre`` <= 0, ``t`` elsewhere (a NaN passes)."""
    return torch.where(pre <= 0, torch.zeros_like(t), t)


def conv_bnrelu(x, weight, scale, shift, residual, stride, stats, padding=None):
    k = weight.shape[-1]
    a = _preact(x, scale, shift).to(x.dtype).double()
    y = F.conv2d(F.pad(_nchw(a), _padding(padding, k)), weight.to(x.dtype).double(), stride=stride)
    y = _nhwc(y)
    if residual is not None:
        y = y + residual.double()
    y = y.to(x.dtype)
    if stats:
        pmean, pm2, pcount = channel_stats(y)
    else:
        pmean, pm2, pcount = (torch.empty(0, dtype=stat_dtype(x)) for _ in range(3))
    return y, pmean, pm2, pcount


def conv_dgrad(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width, padding=None):
    n, _, _, cout = dy.shape
    cin, k = weight.shape[1], weight.shape[-1]
    left, right, top, bottom = _padding(padding, k)
    t = torch.nn.grad.conv2d_input((n, cin, height + top + bottom, width + left + right),
                                   weight.to(dy.dtype).double(), _nchw(dy.double()), stride=stride)
    t = _nhwc(t[:, :, top:top + height, left:left + width])
    if add is not None:
        t = t + add.double()
    dtype = stat_dtype(dy)
    if h is None:
        return t.to(dy.dtype), torch.empty(0, dtype=dtype), torch.empty(0, dtype=dtype)
    g = _relu_mask(t, scale.double() * h.double() + shift.double())
    xhat = (h.double() - mean.double()) * invstd.double()
    g_rounded = g.to(dy.dtype)
    return g_rounded, g.sum((0, 1, 2)).to(dtype), (g * xhat).sum((0, 1, 2)).to(dtype)


def conv_wgrad(dy, x, scale, shift, weight, stride, padding=None):
    k = weight.shape[-1]
    a = F.pad(_nchw(_preact(x, scale, shift).to(x.dtype).double()), _padding(padding, k))
    dw = torch.nn.grad.conv2d_weight(a, tuple(weight.shape), _nchw(dy.double()), stride=stride)
    return dw.to(weight.dtype).contiguous()


def bn_backward_finish(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, add, batch_stats):
    g64 = g.double()
    w = weight.double() * invstd.double()
    if batch_stats:
        xhat = (h.double() - mean.double()) * invstd.double()
        dh = w * (g64 - sum_g.double() / count - xhat * sum_g_xhat.double() / count)
    else:
        dh = w * g64
    if add is not None:
        dh = dh + add.double()
    return dh.to(g.dtype)


def bn_add_relu(h, scale, shift, residual, residual_scale, residual_shift):
    s = residual.double()
    if residual_scale is not None:
        s = residual_scale.double() * s + residual_shift.double()
    return torch.relu(scale.double() * h.double() + shift.double() + s).to(h.dtype)


def bn_add_relu_backward(dy, y, h, mean, invstd, residual, residual_mean, residual_invstd):
    g = _relu_mask(dy.double(), y.double())
    dtype = stat_dtype(dy)
    xhat = (h.double() - mean.double()) * invstd.double()
    residual_sum = torch.empty(0, dtype=dtype)
    if residual is not None:
        residual_xhat = (residual.double() - residual_mean.double()) * residual_invstd.double()
        residual_sum = (g * residual_xhat).sum((0, 1, 2)).to(dtype)
    return g.to(dy.dtype), g.sum((0, 1, 2)).to(dtype), (g * xhat).sum((0, 1, 2)).to(dtype), residual_sum


# The unit operators of fused_preact take their backend by name: these run as backend="reference".
REFERENCE_BACKEND = "reference"


def _register() -> None:
    import sys
    from fused_preact.unit_function import register_operator_set
    register_operator_set(REFERENCE_BACKEND, lambda: sys.modules[__name__])


_register()
