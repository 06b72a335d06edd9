"""The unit operators' forward in standard ATen ops: what exporters (ONNX, TorchScript) record.

A converted model's graph holds one ``fused_preact_unit`` operator per unit (``unit_function``),
which no exporter knows. ``preact`` and ``original`` below compute the same outputs as those
operators' forward, argument for argument, with ``conv2d``, ``pad``, elementwise ops and
reductions only: the math of ``unit_ops``'s contract, nothing of a backend.

- Eval (running statistics): each BN is ``scale = weight * rsqrt(running_var + eps)``, ``shift =
  bias - running_mean * scale``, as the fused kernels apply it.
- Training (batch statistics): the batch mean and biased variance over N, H, W (merged from the
  caller's partials when given, as the operator does) and the new running statistics, returned
  (``nn.BatchNorm2d``'s update: unbiased variance, ``momentum=None`` a cumulative average). Two
  refusals, each with what to do: under ``torch.onnx.export`` (an ONNX model is an inference graph,
  ``ONNX_TRAINING_MESSAGE``), and for synchronized statistics (``group``: a collective,
  ``SYNCHRONIZED_MESSAGE``).
- Roundings as the contract prescribes: arithmetic in the statistics dtype (float32; float64 for
  float64 activations), the pre-activation and the weight rounded to the activation dtype before
  each conv, each output rounded once. With float32 or float64 activations no cast is recorded.
- Partials of y (``want_stats``) are one row per channel (``[1, C]``, ``[1, C]``, ``[1]``: T is the
  implementation's choice); outputs nobody reads (saved tensors, partials in eval) are dead code
  that the exporters drop.

Two routes use them, both set up by ``import fused_preact``:

1. While an exporter traces a model (``unit_function.run_fused_unit``: the TorchScript tracer --
   ``torch.jit.trace``, ``torch.onnx.export(..., dynamo=False)`` -- or ``torch.onnx.export(...,
   dynamo=True)``), the unit records these functions instead of its operator, so the traced graph
   holds standard ops only: the TorchScript tracer cannot record an operator with ``Tensor?[]``
   arguments, and the ONNX exporter's dynamic shapes then need no backend's fake implementation.
2. For a graph that already holds the operators (``torch.onnx.export(exported_program)``,
   ``ExportedProgram.run_decompositions(torch._decomp.decomposition_table)``): registered in torch's
   global decomposition table (``register_decompositions``), which the ONNX exporter decomposes
   every operator without an ONNX function with (``torch/onnx/_internal/exporter/_decomp.py``, torch
   2.5 to 2.14). The default tables of ``torch.export`` (``run_decompositions()``) and of inductor do
   not read it: ``torch.export`` keeps the trainable fused operators, ``torch.compile`` runs them.

One other reader of that table: FakeTensorMode, for an operator call with symbolic sizes (a dynamic
``torch.compile``, ``torch.export`` with ``dynamic_shapes``), takes the output's metadata from the
table's decomposition before the operator's own fake implementation. The operator stays in the
graph, but its metadata would be the decomposition's (one-row partials where the backend has T rows).
So the table's entry decomposes only where a tracer asks for a decomposition (a proxy mode traces
the call: ``run_decompositions``, the ONNX exporter) or on real tensors, and on fake tensors without a
tracer returns the operator's fake implementation: as if the table had no entry. What was measured:
``notes/onnx_export.md``.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .unit_ops import statistics_dtype
from .unit_plan import BatchNormParams, ConvSpec, UnitPlan, bn_params, decode_plan

ONNX_TRAINING_MESSAGE = (
    "fused-preact: torch.onnx.export of a fused unit in training mode (its BNs normalize with batch "
    "statistics): call model.eval() before exporting to ONNX. (An ONNX model is an inference graph; "
    "for a training-mode graph of the fused model use torch.export.export, which keeps the trainable "
    "fused operators.)")
SYNCHRONIZED_MESSAGE = (
    "fused-preact: a unit whose BN statistics are synchronized across processes (sync_batch_stats) "
    "cannot be decomposed into standard ops in training mode (its statistics need a collective); "
    "export it in eval mode (model.eval()), or without sync_batch_stats")


def _as(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype``, with no cast op when it has it already (the TorchScript tracer records even
    a no-op ``to``)."""
    return t if t.dtype == dtype else t.to(dtype)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 3, 1, 2)


def _nhwc(t: torch.Tensor) -> torch.Tensor:
    return t.permute(0, 2, 3, 1)


def _per_channel(t: torch.Tensor) -> torch.Tensor:
    """A ``[C]`` tensor shaped to broadcast over NCHW."""
    return t[None, :, None, None]


class BatchNormStats(NamedTuple):
    """What one BN applies (statistics dtype, ``[C]`` each): ``h * scale + shift``."""
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor

    def affine(self, h: torch.Tensor) -> torch.Tensor:
        return h * _per_channel(self.scale) + _per_channel(self.shift)


class _Decomposition:
    """One call: the plan, the activation and statistics dtypes, and the steps both kinds share.
    Tensors are NCHW inside (the operators take and return NHWC)."""

    def __init__(self, plan: UnitPlan, dtype: torch.dtype, group: Optional[str]):
        self.plan = plan
        self.dtype = dtype                          # the activations'
        self.compute = statistics_dtype(dtype)      # arithmetic and statistics
        batch_stats = any(mode.batch_stats for mode in plan.bn)
        if batch_stats and torch.onnx.is_in_onnx_export():
            raise RuntimeError(ONNX_TRAINING_MESSAGE)
        if batch_stats and group is not None:
            raise RuntimeError(SYNCHRONIZED_MESSAGE)

    # ---- BN ----
    def statistics(self, j: int, h, params: BatchNormParams, partials=None):
        """``(BatchNormStats, new running (mean, var) or None)`` of BN ``j`` reading NCHW ``h``: the
        running statistics (eval) or the batch's (from ``partials`` when given)."""
        mode = self.plan.bn[j]
        c = self.compute
        if not mode.batch_stats:
            mean = _as(params.running_mean, c)
            invstd = torch.rsqrt(_as(params.running_var, c) + mode.eps)
        else:
            mean, m2, count = self._merge(partials) if partials is not None else self._moments(h)
            invstd = torch.rsqrt(m2 / count + mode.eps)
        scale = _as(params.weight, c) * invstd
        stats = BatchNormStats(mean, invstd, scale, _as(params.bias, c) - mean * scale)
        if not mode.update_running:
            return stats, None
        f = 1.0 / _as(params.num_batches_tracked, c) if mode.momentum < 0 else mode.momentum
        new_mean = (1 - f) * _as(params.running_mean, c) + f * mean
        new_var = (1 - f) * _as(params.running_var, c) + f * (m2 / (count - 1))   # unbiased, as nn.BatchNorm2d
        return stats, (_as(new_mean, params.running_mean.dtype), _as(new_var, params.running_var.dtype))

    def _moments(self, h):
        """Mean, sum of squared deviations (M2) and count per channel of NCHW ``h`` (two passes)."""
        values = _as(h, self.compute)
        mean = values.mean(dim=(0, 2, 3))
        m2 = (values - _per_channel(mean)).square().sum(dim=(0, 2, 3))
        count = torch.ones_like(values[:, :1]).sum()   # N * H * W, a tensor (no size specialization)
        return mean, m2, count

    def _merge(self, partials):
        """Chan's merge of partials ``(pmean [T, C], pm2 [T, C], pcount [T])`` into mean, M2, count."""
        pmean, pm2, pcount = (_as(t, self.compute) for t in partials)
        count = pcount.sum()
        mean = (pmean * pcount[:, None]).sum(0) / count
        m2 = pm2.sum(0) + (pcount[:, None] * (pmean - mean).square()).sum(0)
        return mean, m2, count

    def partials(self, h):
        """One-row partials of NCHW ``h`` (``want_stats``)."""
        mean, m2, count = self._moments(h)
        return mean[None], m2[None], count.reshape(1)

    def empty_partials(self, like):
        return tuple(like.new_empty(0, dtype=self.compute) for _ in range(3))

    # ---- the conv, with its prologue ----
    def preactivation(self, h, stats: Optional[BatchNormStats]):
        """``relu(scale * h + shift)`` in the statistics dtype, rounded to the activation dtype (h as
        it is without a prologue, ``stats`` None)."""
        if stats is None:
            return h
        return _as(torch.relu(stats.affine(_as(h, self.compute))), self.dtype)

    def conv(self, spec: ConvSpec, a, weight, residual=None):
        """The conv of the activated NCHW input ``a`` with the conv's stride and zero padding, on
        operands rounded to the activation dtype, accumulated in the statistics dtype; ``residual``
        added before the one rounding of the output."""
        left, right, top, bottom = spec.padding
        a = _as(a, self.compute)
        if left == right and top == bottom:
            padding = (top, left)
        else:
            a, padding = F.pad(a, (left, right, top, bottom)), (0, 0)
        w = _as(_as(weight, self.dtype), self.compute)
        y = F.conv2d(a, w, stride=spec.stride, padding=padding)
        if residual is not None:
            y = y + _as(residual, self.compute)
        return _as(y, self.dtype)

    def padded_shortcut(self, x):
        """Option A: x subsampled by the stride, zero channels before and after."""
        plan, s = self.plan, self.plan.shortcut_stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, plan.pad_front, plan.pad_back))


def _stats_lists(stats: list[BatchNormStats]) -> tuple[list, list, list, list]:
    return [s.mean for s in stats], [s.invstd for s in stats], [s.scale for s in stats], [s.shift for s in stats]


def _running_lists(running: list) -> tuple[list, list]:
    kept = [r for r in running if r is not None]
    return [r[0] for r in kept], [r[1] for r in kept]


def preact(x, x_mean, x_m2, x_count, conv_weights, bn_weights, bn_biases, running_means, running_vars,
           batches_tracked, shortcut_weight, plan, backend, group, want_stats):
    """The ``fused_preact_unit::preact`` operator in standard ops (same arguments and outputs;
    ``backend`` is not used)."""
    plan = decode_plan(plan)
    d = _Decomposition(plan, x.dtype, group)
    bns = bn_params(bn_weights, bn_biases, running_means, running_vars, batches_tracked)
    x = _nchw(x)
    x_partials = (x_mean, x_m2, x_count) if x_mean is not None and plan.bn[0].batch_stats else None
    h, residual = x, None
    hs, stats, running = [], [], []
    for i, spec in enumerate(plan.convs):
        bn_stats, new_running = d.statistics(i, h, bns[i], x_partials if i == 0 else None)
        stats.append(bn_stats)
        running.append(new_running)
        a = d.preactivation(h, bn_stats)
        if i == 0:   # the shortcut: of the first pre-activation, of x, or x itself
            if plan.shortcut == "projection":
                residual = d.conv(plan.shortcut_conv, a, shortcut_weight)
            elif plan.shortcut == "raw_projection":
                residual = d.conv(plan.shortcut_conv, x, shortcut_weight)
            else:
                residual = d.padded_shortcut(x) if plan.shortcut == "pad" else x
        hs.append(h)
        h = d.conv(spec, a, conv_weights[i], residual if i == plan.num_convs - 1 else None)
    y_partials = d.partials(h) if want_stats else d.empty_partials(x)
    saved_h = [] if plan.recompute else [_nhwc(t) for t in hs[1:]]
    return (_nhwc(h), *y_partials, *_running_lists(running), saved_h, *_stats_lists(stats))


def original(x, conv_weights, bn_weights, bn_biases, running_means, running_vars, batches_tracked,
             shortcut_weight, plan, backend, group):
    """The ``fused_preact_unit::original`` operator in standard ops."""
    plan = decode_plan(plan)
    d = _Decomposition(plan, x.dtype, group)
    bns = bn_params(bn_weights, bn_biases, running_means, running_vars, batches_tracked)
    x = _nchw(x)
    hs, stats, running = [], [], []
    h = x
    for i, spec in enumerate(plan.convs):   # conv i reads x (i = 0) or relu(bn_{i-1}(h_i))
        h = d.conv(spec, d.preactivation(h, stats[i - 1] if i > 0 else None), conv_weights[i])
        bn_stats, new_running = d.statistics(i, h, bns[i])
        hs.append(h)
        stats.append(bn_stats)
        running.append(new_running)
    if plan.shortcut_conv is not None:
        residual = d.conv(plan.shortcut_conv, x, shortcut_weight)
    else:
        residual = d.padded_shortcut(x) if plan.shortcut == "pad" else x
    s = _as(residual, d.compute)
    if plan.shortcut_bn is not None:   # the projection's own BN
        j = plan.shortcut_bn
        bn_stats, new_running = d.statistics(j, residual, bns[j])
        stats.append(bn_stats)
        running.append(new_running)
        hs.append(residual)
        s = bn_stats.affine(s)
    branch = stats[plan.num_convs - 1].affine(_as(hs[plan.num_convs - 1], d.compute))
    y = _as(torch.relu(branch + s), d.dtype)   # relu(bn_k(h_k) + s), rounded once
    saved_h = [] if plan.recompute else [_nhwc(t) for t in hs]
    return (_nhwc(y), *_running_lists(running), saved_h, *_stats_lists(stats))


DECOMPOSITIONS: dict[str, Callable] = {"preact": preact, "original": original}


# -- registration in torch's decomposition table --------------------------------------------------------
def _tracer_decomposing() -> bool:
    """Whether a proxy mode (make_fx: ``run_decompositions``, the ONNX exporter) is tracing this call,
    which it does only when it looked the operator up in its decomposition table. A torch without the
    (private) lookup: True, so the table decomposes as registered."""
    get_mode = getattr(torch._C, "_get_dispatch_mode", None)
    key = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "PROXY", None)
    return get_mode is None or key is None or get_mode(key) is not None


def _fake_without_tracer(args) -> bool:
    fake = torch._subclasses.FakeTensor
    return any(isinstance(a, fake) for a in args) and not _tracer_decomposing()


def _table_entry(decomposition: Callable, fake_impl: Callable) -> Callable:
    """What the table holds for an operator: the decomposition, except where FakeTensorMode asks the
    table for an operator's output metadata (see the module docstring): there the operator's fake."""
    def entry(*args, **kwargs):
        if _fake_without_tracer(list(args) + list(kwargs.values())):
            return fake_impl(*args, **kwargs)
        return decomposition(*args, **kwargs)
    entry.__name__ = entry.__qualname__ = f"{decomposition.__name__}_decomposition"
    entry.__module__ = __name__
    return entry


def register_decompositions(namespace: str, fake_impls: dict[str, Callable]) -> None:
    """Register ``DECOMPOSITIONS`` for the forward operators ``namespace::<kind>`` (``fake_impls``:
    each operator's fake implementation, by kind) in ``torch._decomp``'s global table."""
    from torch._decomp import global_decomposition_table, register_decomposition
    for kind, decomposition in DECOMPOSITIONS.items():
        overload = getattr(getattr(torch.ops, namespace), kind).default
        if overload not in global_decomposition_table["post_autograd"]:
            register_decomposition(overload)(_table_entry(decomposition, fake_impls[kind]))
