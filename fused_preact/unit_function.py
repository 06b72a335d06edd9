"""Forward and backward of a fused full pre-activation unit, written once for every backend.

A unit is a chain of BN-ReLU-conv triples (basic: 3x3, 3x3; bottleneck: 1x1, 3x3,
1x1) plus a shortcut: identity, the 1x1 projection of the first pre-activation
(projection "B"), the 1x1 projection of the raw input (projection "raw"), or the
subsampled, zero-padded input (projection "A"). The
autograd Function below runs it with the operators of ``unit_ops`` taken from
a backend's namespace (``torch.ops.fused_preact_triton`` or ``torch.ops.fused_preact``):

forward, per triple i with input h (h_0 = x)::

    partials(h)   from the previous conv's epilogue, the caller (``stats_in``) or channel_stats(x)
    scale, shift  = bn_finalize(partials, bn_i ...)    # updates running stats like nn.BatchNorm2d
    h_{i+1}       = conv_bnrelu(h, w_i, scale, shift, residual if last, stats of h_{i+1})

backward, last triple first, with g the gradient reaching the triple's output::

    dw_i              = conv_wgrad(g, h, scale, shift)         # pre-activation recomputed from h
    g', sum, sum_xhat = conv_dgrad(g, w_i, h, ...)             # ReLU mask recomputed from h
    g                 = bn_backward_finish(g', h, ...)         # + the identity shortcut's dy on the first

The pre-activation unit's raw-input projection is a matrix product over the
subsampled NHWC rows, ``x[:, ::s, ::s, :] @ W^T`` (a 1x1 conv without padding;
written before ``conv_bnrelu``'s prologue became optional, which the original
unit's projection uses), and so is its weight gradient;
its data gradient is ``conv_dgrad`` without ``h`` and joins the input gradient in
the first ``bn_backward_finish`` (as the identity shortcut's dy does).

Original (post-activation) units (``UnitPlan.post_activation``) run the same operators
in the other order: each conv is followed by its BN, the first conv reads the raw input
(``conv_bnrelu`` without prologue), the later ones take ``relu(bn_i(h_i))`` in their
prologue, and the unit ends with ``bn_add_relu``::

    h_1      = conv_bnrelu(x, w_1, None, None, stats of h_1)
    h_{i+1}  = conv_bnrelu(h_i, w_{i+1}, scale_i, shift_i, stats of h_{i+1})
    s        = x | padA(x) | h_s = conv_bnrelu(x, w_s, None, None, stats of h_s if it has a BN)
    y        = bn_add_relu(h_k, scale_k, shift_k, s, [scale_s, shift_s])

and backward ``g, sums = bn_add_relu_backward(dy, y, h_k, ...)`` (the mask from the saved
output y), ``bn_backward_finish`` per BN (h_k and the shortcut's h_s), the inner triples
as above, and conv_1's ``conv_dgrad`` without ``h``, to which the shortcut's gradient is
added (identity: g; A: g subsampled back; B: the projection's ``conv_dgrad``). Saved: x,
h_1 .. h_k, h_s, y and the statistics. ``_PostActivation`` holds that path.

The backward is first-order only: differentiating it again (``create_graph=True``,
gradient penalties) raises an error that says to use ``backend="eager"``.

Saved for backward: x, the raw conv outputs that feed a BN (h_1 .. h_{n-1}) and
per-channel statistics; no BN or ReLU output. Activations are NHWC inside; the
unit takes and returns ``[N, C, H, W]`` tensors, the output in channels_last
memory format (an NCHW-contiguous input is converted once).

Synchronized BN (``stats_group``): the forward all-gathers each BN's merged
statistics over the process group before finalizing; the backward all-reduces the
two per-channel sums before finishing. BN weight and bias gradients stay local
(DistributedDataParallel averages them), as in ``nn.SyncBatchNorm``.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn


Partials = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class BatchNormMode:
    """How one BN of the unit behaves in this call, as ``nn.BatchNorm2d.forward`` decides it."""
    batch_stats: bool       # normalize with batch statistics (training, or no running stats)
    update_running: bool    # update running_mean / running_var
    momentum: float         # -1.0 for momentum=None (cumulative average)
    eps: float


@dataclass(frozen=True)
class UnitPlan:
    """The static structure of one call of a fused unit."""
    kernel_sizes: tuple[int, ...]
    strides: tuple[int, ...]
    shortcut: str               # "identity" | "projection" (of relu(bn1(x))) | "raw_projection" (of x) | "pad"
    shortcut_stride: int
    pad_channels: int           # zero channels after x's (option A)
    bn: tuple[BatchNormMode, ...]
    post_activation: bool = False                  # the original unit: conv -> BN order, relu(bn_k(h_k) + s)
    shortcut_bn: Optional[BatchNormMode] = None     # the projection's own BN (post-activation units)
    pad_front: int = 0                              # zero channels before x's (option A as CIFAR ports pad)


def batchnorm_mode(bn: nn.BatchNorm2d) -> BatchNormMode:
    batch_stats = bn.training or bn.running_mean is None
    return BatchNormMode(batch_stats=batch_stats,
                         update_running=bn.training and bn.running_mean is not None,
                         momentum=-1.0 if bn.momentum is None else float(bn.momentum),
                         eps=float(bn.eps))


def unit_plan(unit: nn.Module) -> UnitPlan:
    convs = [getattr(unit, f"conv{i}") for i in range(1, unit.num_convs + 1)]
    bns = [getattr(unit, f"bn{i}") for i in range(1, unit.num_convs + 1)]
    post_activation = not unit.preact
    shortcut_bn = getattr(unit, "shortcut_bn", None)
    pad_front = 0
    if unit.shortcut is not None:
        shortcut, pad_channels = ("projection" if unit.shares_preact else "raw_projection"), 0
    elif unit.pad_shortcut is not None:
        pad_front = getattr(unit.pad_shortcut, "front_channels", 0)
        shortcut, pad_channels = "pad", unit.pad_shortcut.extra_channels - pad_front
    else:
        shortcut, pad_channels = "identity", 0
    return UnitPlan(kernel_sizes=tuple(c.kernel_size[0] for c in convs),
                    strides=tuple(c.stride[0] for c in convs),
                    shortcut=shortcut, shortcut_stride=unit.stride, pad_channels=pad_channels,
                    pad_front=pad_front,
                    bn=tuple(batchnorm_mode(bn) for bn in bns), post_activation=post_activation,
                    shortcut_bn=batchnorm_mode(shortcut_bn) if shortcut_bn is not None else None)


# -- synchronized statistics ---------------------------------------------------
def process_count(group) -> int:
    """Processes in ``group`` (1 without an initialized process group)."""
    if group is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def _gather_partials(partials: Partials, group) -> Partials:
    """Merge local partials (Chan, float64) and all-gather one row per process."""
    dtype = partials[0].dtype
    pmean, pm2, pcount = (t.double() for t in partials)
    n = pcount.sum()
    mean = (pmean * pcount[:, None]).sum(0) / n
    m2 = pm2.sum(0) + (pcount[:, None] * (pmean - mean) ** 2).sum(0)
    local = torch.cat([mean, m2, n.reshape(1)]).to(dtype)
    rows = [torch.empty_like(local) for _ in range(process_count(group))]
    torch.distributed.all_gather(rows, local, group=group)
    table = torch.stack(rows)
    channels = mean.numel()
    return table[:, :channels].contiguous(), table[:, channels:2 * channels].contiguous(), table[:, -1].contiguous()


def _all_reduce_sum(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    torch.distributed.all_reduce(t, group=group)
    return t


# -- the raw-input projection -------------------------------------------------------
def _raw_projection(x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """1x1 conv (no padding) of NHWC ``x``: a product over the subsampled rows, NHWC out."""
    rows = x[:, ::stride, ::stride, :]
    return torch.matmul(rows, weight.reshape(weight.shape[0], -1).t().to(x.dtype)).contiguous()


def _raw_projection_wgrad(dy: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: int) -> torch.Tensor:
    """Weight gradient of ``_raw_projection``, accumulated in fp32 (fp64 for fp64), in weight's dtype."""
    acc = torch.promote_types(dy.dtype, torch.float32)
    rows = x[:, ::stride, ::stride, :].reshape(-1, x.shape[3]).to(acc)
    return (dy.reshape(-1, dy.shape[3]).to(acc).t() @ rows).reshape(weight.shape).to(weight.dtype)


DOUBLE_BACKWARD_MESSAGE = (
    "fused-preact: the fused unit's backward is not differentiable, so double backward "
    "(create_graph=True, e.g. a gradient penalty) cannot run through it; build or convert the "
    "model with backend='eager' for that (convert_to_fused(model, backend='eager'))")


def _first_order_backward(backward):
    """``once_differentiable`` with a message that names the way out: the backward runs under
    no_grad, and only differentiating its outputs again (not a ``create_graph=True`` pass that
    never goes back through them) raises ``DOUBLE_BACKWARD_MESSAGE``."""
    from torch._C import _functions

    @functools.wraps(backward)
    def wrapper(ctx, *grads):
        with torch.no_grad():
            outputs = backward(ctx, *grads)
        if not torch.is_grad_enabled() or not any(g is not None and g.requires_grad for g in grads):
            return outputs
        error = _functions.DelayedError(DOUBLE_BACKWARD_MESSAGE.encode(), len(outputs))
        return error(*[None if t is None else t.detach().requires_grad_() for t in outputs])
    return wrapper


# -- the original (post-activation) unit ------------------------------------------
def _batchnorm_statistics(ops: Any, mode: BatchNormMode, partials: Optional[Partials], params, count: int,
                          group, stat_dtype: torch.dtype, shape: torch.Size) -> tuple:
    """``(mean, invstd, scale, shift)`` of one BN as ``nn.BatchNorm2d`` uses them in this call: batch
    statistics from ``partials`` (running statistics updated) or the running statistics (eval).
    ``params``: ``(weight, bias, running_mean, running_var, num_batches_tracked)``; ``shape``:
    the NHWC shape of the BN's input (for the error message)."""
    weight, bias, running_mean, running_var, nbt = params
    if not mode.batch_stats:
        mean = running_mean.to(stat_dtype)
        invstd = torch.rsqrt(running_var.to(stat_dtype) + mode.eps)
        scale = weight.to(stat_dtype) * invstd
        return mean, invstd, scale, bias.to(stat_dtype) - mean * scale
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                         f"{(shape[0], shape[3], shape[1], shape[2])}")
    if process_count(group) > 1:
        partials = _gather_partials(partials, group)
    update = mode.update_running
    return ops.bn_finalize(*partials, weight, bias, running_mean if update else None,
                           running_var if update else None, nbt if update else None, mode.momentum, mode.eps)


class _PostActivation:
    """Forward and backward of ``FusedUnitFunction`` for an original unit (``plan.post_activation``).

    ``params``: per conv ``bn_weight, bn_bias, running_mean, running_var, num_batches_tracked,
    conv_weight`` (the BN that follows the conv), then ``shortcut_weight`` and the shortcut BN's
    ``weight, bias, running_mean, running_var, num_batches_tracked`` (all None when absent).
    """

    @staticmethod
    def forward(ctx, plan: UnitPlan, ops: Any, group, x: torch.Tensor, params):
        n = len(plan.kernel_sizes)
        triples = [params[6 * i:6 * i + 6] for i in range(n)]
        shortcut_weight, shortcut_bn = params[6 * n], params[6 * n + 1:6 * n + 6]
        world = process_count(group)
        stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32

        def conv_and_bn(h_in, conv_weight, stride, prologue, mode, bn_params):
            """h = conv(h_in) (with the previous BN-ReLU as prologue) and its BN's statistics."""
            h, pmean, pm2, pcount = ops.conv_bnrelu(h_in, conv_weight, *prologue, None, stride, mode.batch_stats)
            count = h.shape[0] * h.shape[1] * h.shape[2] * world
            stats = _batchnorm_statistics(ops, mode, (pmean, pm2, pcount), bn_params, count, group, stat_dtype,
                                          h.shape)
            return h, stats, count

        hs, stats, counts = [], [], []
        prologue = (None, None)            # the first conv reads x as it is
        h = x
        for i, (*bn_params, conv_weight) in enumerate(triples):
            h, bn_stats, count = conv_and_bn(h, conv_weight, plan.strides[i], prologue, plan.bn[i], bn_params)
            hs.append(h)
            stats.append(bn_stats)
            counts.append(count)
            prologue = bn_stats[2:]

        residual, residual_affine, shortcut_saved = x, (None, None), []
        if plan.shortcut == "pad":
            s = plan.shortcut_stride
            residual = F.pad(x[:, ::s, ::s, :], (plan.pad_front, plan.pad_channels)).contiguous()
        elif plan.shortcut == "raw_projection":
            if plan.shortcut_bn is not None:
                residual, s_stats, s_count = conv_and_bn(x, shortcut_weight, plan.shortcut_stride, (None, None),
                                                         plan.shortcut_bn, shortcut_bn)
                residual_affine = s_stats[2:]
                stats.append(s_stats)
                counts.append(s_count)
                shortcut_saved = [residual]
            else:
                residual = ops.conv_bnrelu(x, shortcut_weight, None, None, None, plan.shortcut_stride, False)[0]
        elif plan.shortcut != "identity":
            raise ValueError(f"an original unit has an identity, option-A or projection shortcut, "
                             f"not {plan.shortcut!r}")
        y = ops.bn_add_relu(hs[-1], *stats[n - 1][2:], residual, *residual_affine)

        ctx.plan, ctx.ops, ctx.group, ctx.counts = plan, ops, group, counts
        ctx.n_params = len(params)
        flat_stats = [t for st in stats for t in st[:2]]          # mean, invstd per BN
        conv_weights = [t[5] for t in triples]
        bn_weights = [t[0] for t in triples] + ([shortcut_bn[0]] if shortcut_saved else [])
        ctx.save_for_backward(x, *hs, *shortcut_saved, y, *flat_stats, *[st[2] for st in stats],
                              *[st[3] for st in stats], *conv_weights, *bn_weights, shortcut_weight)
        empty = tuple(y.new_empty(0, dtype=stat_dtype) for _ in range(3))
        ctx.mark_non_differentiable(*empty)
        return (y, *empty)

    @staticmethod
    def backward(ctx, dy):
        plan, ops, group = ctx.plan, ctx.ops, ctx.group
        n = len(plan.kernel_sizes)
        has_shortcut_bn = plan.shortcut == "raw_projection" and plan.shortcut_bn is not None
        n_bn = n + has_shortcut_bn
        saved = list(ctx.saved_tensors)
        x, hs = saved[0], saved[1:1 + n]
        pos = 1 + n
        h_s = saved[pos] if has_shortcut_bn else None
        pos += has_shortcut_bn
        y = saved[pos]
        pos += 1
        means, invstds = saved[pos:pos + 2 * n_bn:2], saved[pos + 1:pos + 2 * n_bn:2]
        pos += 2 * n_bn
        scales, shifts = saved[pos:pos + n_bn], saved[pos + n_bn:pos + 2 * n_bn]
        pos += 2 * n_bn
        conv_weights, bn_weights = saved[pos:pos + n], saved[pos + n:pos + n + n_bn]
        shortcut_weight = saved[pos + n + n_bn]
        world = process_count(group)
        dy = dy.contiguous()
        grads: list[Optional[torch.Tensor]] = [None] * ctx.n_params

        def finish(index, g, h, sum_g, sum_g_xhat, mode, grad_slot):
            """BN ``index``'s weight / bias gradients into ``grad_slot`` and its input gradient."""
            grads[grad_slot] = sum_g_xhat.to(bn_weights[index].dtype)
            grads[grad_slot + 1] = sum_g.to(bn_weights[index].dtype)
            if mode.batch_stats and world > 1:
                sum_g, sum_g_xhat = _all_reduce_sum(sum_g, group), _all_reduce_sum(sum_g_xhat, group)
            return ops.bn_backward_finish(g, h, means[index], invstds[index], bn_weights[index], sum_g, sum_g_xhat,
                                          float(ctx.counts[index]), None, mode.batch_stats)

        # ---- the end: relu(bn_k(h_k) + s) ----
        g, sum_g, sum_g_xhat, s_sum_g_xhat = ops.bn_add_relu_backward(
            dy, y, hs[-1], means[n - 1], invstds[n - 1], h_s,
            means[n] if has_shortcut_bn else None, invstds[n] if has_shortcut_bn else None)
        dh = finish(n - 1, g, hs[-1], sum_g, sum_g_xhat, plan.bn[n - 1], 6 * (n - 1))

        # ---- the shortcut's gradient, joining conv_1's data gradient ----
        height, width = x.shape[1], x.shape[2]
        if plan.shortcut == "raw_projection":
            d_s = finish(n, g, h_s, sum_g, s_sum_g_xhat, plan.shortcut_bn, 6 * n + 1) if has_shortcut_bn else g
            grads[6 * n] = ops.conv_wgrad(d_s, x, None, None, shortcut_weight, plan.shortcut_stride)
            shortcut_grad = ops.conv_dgrad(d_s, shortcut_weight, None, None, None, None, None, None,
                                           plan.shortcut_stride, height, width)[0]
        elif plan.shortcut == "pad":
            s = plan.shortcut_stride
            shortcut_grad = g.new_zeros(x.shape)
            shortcut_grad[:, ::s, ::s, :] = g[..., plan.pad_front:plan.pad_front + x.shape[3]]
        else:
            shortcut_grad = g

        # ---- the convs, last first: conv_i reads relu(bn_{i-1}(h_{i-1})), conv_1 reads x ----
        for i in reversed(range(n)):
            h_in = hs[i - 1] if i > 0 else x
            prologue = (scales[i - 1], shifts[i - 1]) if i > 0 else (None, None)
            grads[6 * i + 5] = ops.conv_wgrad(dh, h_in, *prologue, conv_weights[i], plan.strides[i])
            if i > 0:
                g_in, sum_g, sum_g_xhat = ops.conv_dgrad(dh, conv_weights[i], h_in, *prologue, means[i - 1],
                                                         invstds[i - 1], None, plan.strides[i], h_in.shape[1],
                                                         h_in.shape[2])
                dh = finish(i - 1, g_in, h_in, sum_g, sum_g_xhat, plan.bn[i - 1], 6 * (i - 1))
            else:
                dh = ops.conv_dgrad(dh, conv_weights[0], None, None, None, None, None, shortcut_grad,
                                    plan.strides[0], height, width)[0]
        return (dh, None, None, None, *grads)


# -- the autograd Function -----------------------------------------------------
class FusedUnitFunction(torch.autograd.Function):
    """One fused pre-activation unit; see the module docstring.

    ``apply(plan, ops, group, want_stats, x, pmean, pm2, pcount, *triples, shortcut_weight)``
    with ``x`` NHWC, the input partials possibly None, and per triple
    ``bn_weight, bn_bias, running_mean, running_var, num_batches_tracked, conv_weight``.
    Returns ``y`` (NHWC) and the partials of y (empty unless ``want_stats``).
    An original unit (``plan.post_activation``) takes the shortcut BN's ``weight, bias,
    running_mean, running_var, num_batches_tracked`` after ``shortcut_weight`` (see
    ``_PostActivation``).
    """

    @staticmethod
    def forward(ctx, plan: UnitPlan, ops: Any, group, want_stats: bool, x, in_pmean, in_pm2, in_pcount,
                *params):
        if plan.post_activation:
            return _PostActivation.forward(ctx, plan, ops, group, x, params)
        n_triples = len(plan.kernel_sizes)
        triples = [params[6 * i:6 * i + 6] for i in range(n_triples)]
        shortcut_weight = params[6 * n_triples]
        world = process_count(group)

        h = x
        partials = (in_pmean, in_pm2, in_pcount) if in_pmean is not None else None
        inputs, stats, counts = [], [], []
        residual = None
        for i, (bn_weight, bn_bias, running_mean, running_var, nbt, conv_weight) in enumerate(triples):
            mode = plan.bn[i]
            count = h.shape[0] * h.shape[1] * h.shape[2] * world
            if mode.batch_stats:
                if count <= 1:
                    raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                                     f"{tuple(h.permute(0, 3, 1, 2).shape)}")
                if partials is None:
                    partials = ops.channel_stats(h)
                if world > 1:
                    partials = _gather_partials(partials, group)
                update = mode.update_running
                mean, invstd, scale, shift = ops.bn_finalize(
                    *partials, bn_weight, bn_bias, running_mean if update else None,
                    running_var if update else None, nbt if update else None, mode.momentum, mode.eps)
            else:
                stat_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
                mean = running_mean.to(stat_dtype)
                invstd = torch.rsqrt(running_var.to(stat_dtype) + mode.eps)
                scale = bn_weight.to(stat_dtype) * invstd
                shift = bn_bias.to(stat_dtype) - mean * scale

            if i == 0:
                if plan.shortcut == "projection":
                    residual = ops.conv_bnrelu(x, shortcut_weight, scale, shift, None, plan.shortcut_stride,
                                               False)[0]
                elif plan.shortcut == "raw_projection":
                    residual = _raw_projection(x, shortcut_weight, plan.shortcut_stride)
                elif plan.shortcut == "pad":
                    s = plan.shortcut_stride
                    residual = F.pad(x[:, ::s, ::s, :], (plan.pad_front, plan.pad_channels)).contiguous()
                else:
                    residual = x
            last = i == n_triples - 1
            emit_stats = want_stats if last else plan.bn[i + 1].batch_stats
            h_next, pmean, pm2, pcount = ops.conv_bnrelu(h, conv_weight, scale, shift,
                                                         residual if last else None, plan.strides[i], emit_stats)
            inputs.append(h)
            stats.append((mean, invstd, scale, shift))
            counts.append(count)
            partials = (pmean, pm2, pcount) if emit_stats else None
            h = h_next

        y = h
        out_stats = partials if want_stats else tuple(y.new_empty(0, dtype=torch.float32) for _ in range(3))
        ctx.plan, ctx.ops, ctx.group, ctx.counts = plan, ops, group, counts
        ctx.n_params = len(params)
        flat_stats = [t for s in stats for t in s]
        conv_weights = [t[5] for t in triples]
        bn_weights = [t[0] for t in triples]
        ctx.save_for_backward(*inputs, *flat_stats, *conv_weights, *bn_weights, shortcut_weight)
        ctx.mark_non_differentiable(*out_stats)
        return (y, *out_stats)

    @staticmethod
    @_first_order_backward
    def backward(ctx, dy, _dpmean, _dpm2, _dpcount):
        if ctx.plan.post_activation:
            return (None, None, None, None, *_PostActivation.backward(ctx, dy))
        plan, ops, group = ctx.plan, ctx.ops, ctx.group
        n = len(plan.kernel_sizes)
        saved = ctx.saved_tensors
        inputs = saved[:n]
        stats = [saved[n + 4 * i:n + 4 * i + 4] for i in range(n)]
        conv_weights = saved[5 * n:6 * n]
        bn_weights = saved[6 * n:7 * n]
        shortcut_weight = saved[7 * n]
        world = process_count(group)
        x = inputs[0]
        dy = dy.contiguous()

        grads: list[Optional[torch.Tensor]] = [None] * ctx.n_params
        g = dy
        for i in reversed(range(n)):
            h, (mean, invstd, scale, shift) = inputs[i], stats[i]
            mode = plan.bn[i]
            height, width = h.shape[1], h.shape[2]
            dweight = ops.conv_wgrad(g, h, scale, shift, conv_weights[i], plan.strides[i])
            joining, shortcut_grad = None, None
            if i == 0:
                if plan.shortcut == "projection":
                    joining = ops.conv_dgrad(dy, shortcut_weight, None, None, None, None, None, None,
                                             plan.shortcut_stride, height, width)[0]
                    grads[6 * n] = ops.conv_wgrad(dy, x, scale, shift, shortcut_weight, plan.shortcut_stride)
                elif plan.shortcut == "raw_projection":
                    shortcut_grad = ops.conv_dgrad(dy, shortcut_weight, None, None, None, None, None, None,
                                                   plan.shortcut_stride, height, width)[0]
                    grads[6 * n] = _raw_projection_wgrad(dy, x, shortcut_weight, plan.shortcut_stride)
                elif plan.shortcut == "pad":
                    s = plan.shortcut_stride
                    shortcut_grad = dy.new_zeros(x.shape)
                    shortcut_grad[:, ::s, ::s, :] = dy[..., plan.pad_front:plan.pad_front + x.shape[3]]
                else:
                    shortcut_grad = dy
            g_masked, sum_g, sum_g_xhat = ops.conv_dgrad(g, conv_weights[i], h, scale, shift, mean, invstd,
                                                         joining, plan.strides[i], height, width)
            bn_weight = bn_weights[i]
            grads[6 * i + 0] = sum_g_xhat.to(bn_weight.dtype)
            grads[6 * i + 1] = sum_g.to(bn_weight.dtype)
            grads[6 * i + 5] = dweight
            if mode.batch_stats and world > 1:
                sum_g, sum_g_xhat = _all_reduce_sum(sum_g, group), _all_reduce_sum(sum_g_xhat, group)
            g = ops.bn_backward_finish(g_masked, h, mean, invstd, bn_weight, sum_g, sum_g_xhat,
                                       float(ctx.counts[i]), shortcut_grad, mode.batch_stats)
        return (None, None, None, None, g, None, None, None, *grads)


# -- the entry point used by the dispatch layer ----------------------------------
def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolutions run in: autocast's when it is on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return x.dtype


def run_fused_unit(ops: Any, unit: nn.Module, x: torch.Tensor, stats_in: Optional[Partials] = None,
                   want_stats: bool = False) -> tuple[torch.Tensor, Optional[Partials]]:
    """Run ``unit`` (full pre-activation, or original post-activation) on ``x`` with a backend's operators.

    ``stats_in``: partials of x's per-channel statistics (from the previous fused
    unit's epilogue), so the first BN needs no pass over x. ``want_stats``: also
    return the partials of the output for the next unit. An original unit has no BN
    that reads x or y: it ignores ``stats_in`` and returns None partials. Returns ``(y, partials)``
    with y ``[N, C, H, W]`` in channels_last memory format.
    """
    dtype = compute_dtype(x)
    bns = [getattr(unit, f"bn{i}") for i in range(1, unit.num_convs + 1)]
    convs = [getattr(unit, f"conv{i}") for i in range(1, unit.num_convs + 1)]
    plan = unit_plan(unit)
    for bn in bns:  # as nn.BatchNorm2d.forward, before the statistics are used
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)

    x_nhwc = x.to(dtype).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    if stats_in is None or not plan.bn[0].batch_stats:
        stats_in = (None, None, None)
    params: list[Optional[torch.Tensor]] = []
    for bn, conv in zip(bns, convs):
        params += [bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked, conv.weight]
    params.append(unit.shortcut.weight if unit.shortcut is not None else None)
    if plan.post_activation:   # the shortcut's BN, and no statistics of x in or y out (no BN reads them)
        shortcut_bn = unit.shortcut_bn
        if shortcut_bn is not None and shortcut_bn.training and shortcut_bn.track_running_stats \
                and shortcut_bn.num_batches_tracked is not None:
            shortcut_bn.num_batches_tracked.add_(1)
        params += ([shortcut_bn.weight, shortcut_bn.bias, shortcut_bn.running_mean, shortcut_bn.running_var,
                    shortcut_bn.num_batches_tracked] if shortcut_bn is not None else [None] * 5)
        stats_in, want_stats = (None, None, None), False
    group = getattr(unit, "stats_group", None)

    y, pmean, pm2, pcount = FusedUnitFunction.apply(plan, ops, group, want_stats, x_nhwc, *stats_in, *params)
    out = y.permute(0, 3, 1, 2)
    if plan.shortcut in ("identity", "pad") and x.dtype != dtype:
        out = out.to(torch.promote_types(x.dtype, dtype))   # eager adds the shortcut in x's dtype
    return out, ((pmean, pm2, pcount) if want_stats else None)
