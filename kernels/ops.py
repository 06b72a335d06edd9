"""The Triton backend's operators: the eight of ``fused_preact.unit_ops``, as ``torch.ops.fused_preact_triton.*``.

Each operator is a ``torch.library.custom_op`` with exactly the schema in
``unit_ops.SCHEMAS`` (``bn_finalize`` declares that it mutates ``running_mean`` and
``running_var``) and a fake implementation that gives every output's shape and
dtype from the input shapes alone, so ``torch.compile(fullgraph=True)`` traces a
unit as a graph of opaque operators. ``custom_op`` rather than ``triton_op``: the
launchers check their arguments in Python and pick launch plans from shapes, run
the same way on a GPU and in Triton's CPU interpreter, and never read a device
value back to the host, so a compiled graph or a CUDA graph can call them as they are.

Importing this module needs only torch; the kernels (and triton) are imported the
first time an operator runs or is traced.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from fused_preact.unit_ops import SCHEMAS, padded_output_shape, statistics_dtype

NAMESPACE = "fused_preact_triton"


def _operator(name: str, mutates_args=()):
    return torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args, schema=SCHEMAS[name])


# ---- channel_stats ---------------------------------------------------------------
@_operator("channel_stats")
def channel_stats(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    from .channel_stats import channel_stats as launch
    return launch(x)


@channel_stats.register_fake
def _(x):
    from .channel_stats import partial_rows
    channels = x.shape[-1]
    t = partial_rows(x.numel() // channels, channels)
    dtype = statistics_dtype(x.dtype)
    return x.new_empty(t, channels, dtype=dtype), x.new_empty(t, channels, dtype=dtype), x.new_empty(t, dtype=dtype)


# ---- bn_finalize -----------------------------------------------------------------
@_operator("bn_finalize", mutates_args=("running_mean", "running_var"))
def bn_finalize(pmean: Tensor, pm2: Tensor, pcount: Tensor, weight: Tensor, bias: Tensor,
                running_mean: Optional[Tensor], running_var: Optional[Tensor],
                num_batches_tracked: Optional[Tensor], momentum: float,
                eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .bn_finalize import bn_finalize as launch
    return launch(pmean, pm2, pcount, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps)


@bn_finalize.register_fake
def _(pmean, pm2, pcount, weight, bias, running_mean, running_var, num_batches_tracked, momentum, eps):
    channels = pmean.shape[1]
    return tuple(pmean.new_empty(channels) for _ in range(4))


# ---- conv_bnrelu -----------------------------------------------------------------
@_operator("conv_bnrelu")
def conv_bnrelu(x: Tensor, weight: Tensor, scale: Optional[Tensor], shift: Optional[Tensor],
                residual: Optional[Tensor], stride: int, stats: bool,
                padding: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .conv_bnrelu_fwd import conv_bnrelu_fwd
    return conv_bnrelu_fwd(x, weight, scale, shift, residual, stride, stats, padding)


@conv_bnrelu.register_fake
def _(x, weight, scale, shift, residual, stride, stats, padding=None):
    from .conv_bnrelu_fwd import stats_rows
    n, height, width, _ = x.shape
    ho, wo = padded_output_shape(height, width, weight.shape[-1], stride, padding)
    cout = weight.shape[0]
    y = x.new_empty(n, ho, wo, cout)
    dtype = statistics_dtype(x.dtype)
    t = stats_rows(n, ho, wo) if stats else 0   # no statistics: partials with no rows
    return y, x.new_empty(t, cout, dtype=dtype), x.new_empty(t, cout, dtype=dtype), x.new_empty(t, dtype=dtype)


# ---- conv_dgrad ------------------------------------------------------------------
@_operator("conv_dgrad")
def conv_dgrad(dy: Tensor, weight: Tensor, h: Optional[Tensor], scale: Optional[Tensor],
               shift: Optional[Tensor], mean: Optional[Tensor], invstd: Optional[Tensor],
               add: Optional[Tensor], stride: int, height: int, width: int,
               padding: Optional[list[int]] = None) -> tuple[Tensor, Tensor, Tensor]:
    from .conv_dgrad import conv_dgrad as launch
    return launch(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width, padding)


@conv_dgrad.register_fake
def _(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width, padding=None):
    cin = weight.shape[1]
    g = dy.new_empty(dy.shape[0], height, width, cin)
    dtype = statistics_dtype(dy.dtype)
    sums = cin if h is not None else 0
    return g, dy.new_empty(sums, dtype=dtype), dy.new_empty(sums, dtype=dtype)


# ---- conv_wgrad ------------------------------------------------------------------
@_operator("conv_wgrad")
def conv_wgrad(dy: Tensor, x: Tensor, scale: Optional[Tensor], shift: Optional[Tensor], weight: Tensor,
               stride: int, padding: Optional[list[int]] = None) -> Tensor:
    from .conv_wgrad import conv_wgrad as launch
    return launch(dy, x, scale, shift, weight, stride, padding)


@conv_wgrad.register_fake
def _(dy, x, scale, shift, weight, stride, padding=None):
    return weight.new_empty(weight.shape)


# ---- bn_backward_finish ----------------------------------------------------------
@_operator("bn_backward_finish")
def bn_backward_finish(g: Tensor, h: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor, sum_g: Tensor,
                       sum_g_xhat: Tensor, count: float, add: Optional[Tensor], batch_stats: bool) -> Tensor:
    from .bn_backward_finish import bn_backward_finish as launch
    return launch(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, add, batch_stats)


@bn_backward_finish.register_fake
def _(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, add, batch_stats):
    return torch.empty_like(g)



# ---- bn_add_relu -----------------------------------------------------------------
@_operator("bn_add_relu")
def bn_add_relu(h: Tensor, scale: Tensor, shift: Tensor, residual: Tensor, residual_scale: Optional[Tensor],
                residual_shift: Optional[Tensor]) -> Tensor:
    from .bn_add_relu import bn_add_relu as launch
    return launch(h, scale, shift, residual, residual_scale, residual_shift)


@bn_add_relu.register_fake
def _(h, scale, shift, residual, residual_scale, residual_shift):
    return torch.empty_like(h)


# ---- bn_add_relu_backward --------------------------------------------------------
@_operator("bn_add_relu_backward")
def bn_add_relu_backward(dy: Tensor, y: Tensor, h: Tensor, mean: Tensor, invstd: Tensor, residual: Optional[Tensor],
                         residual_mean: Optional[Tensor],
                         residual_invstd: Optional[Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from .bn_add_relu import bn_add_relu_backward as launch
    return launch(dy, y, h, mean, invstd, residual, residual_mean, residual_invstd)


@bn_add_relu_backward.register_fake
def _(dy, y, h, mean, invstd, residual, residual_mean, residual_invstd):
    channels = dy.shape[-1]
    dtype = statistics_dtype(dy.dtype)
    return (torch.empty_like(dy), dy.new_empty(channels, dtype=dtype), dy.new_empty(channels, dtype=dtype),
            dy.new_empty(channels if residual is not None else 0, dtype=dtype))
