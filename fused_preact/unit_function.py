"""Forward and backward of the fused units, written once for every backend, as ``torch.library`` operators.

Two unit kinds, each one functional operator pair in the ``fused_preact_unit`` namespace, registered
when this module is imported (so by ``import fused_preact``; see ``unit_ops``'s docstring for the
design and why):

- ``preact`` / ``preact_backward``: the full pre-activation unit, a chain of BN-ReLU-conv triples
  (basic: 3x3, 3x3; bottleneck: 1x1, 3x3, 1x1) plus a shortcut: identity, the 1x1 projection of
  the first pre-activation (``projection``), the 1x1 projection of the raw input
  (``raw_projection``) or the subsampled, zero-padded input (``pad``, option A);
- ``original`` / ``original_backward``: the original (post-activation) unit, conv -> BN order,
  ending with ``relu(bn_k(h_k) + s)``.

Each forward operator has ``register_autograd`` (its backward calls the backward operator) and a
fake implementation (the same Python forward on fake tensors: every backend operator has one).
The operators take the backend as a string (``backend``: an operator set registered with
``register_operator_set``; ``dispatch`` registers ``"triton"`` and ``"cuda"``), the static
structure as a string (``plan``: ``unit_plan.UnitPlan.encode``), the process group of
synchronized BN by name (``group``), and return the new running statistics instead of mutating
the buffers (``register_autograd`` takes functional operators only): ``run_fused_unit`` copies them
into the BN buffers.

forward, pre-activation, per triple i with input h (h_0 = x)::

    partials(h)   from the previous conv's epilogue, the caller (``stats_in``) or channel_stats(x)
    scale, shift  = bn_finalize(partials, bn_i ...)    # new running statistics returned
    h_{i+1}       = conv_bnrelu(h, w_i, scale, shift, residual if last, stats of h_{i+1}, padding_i)

original::

    h_1      = conv_bnrelu(x, w_1, None, None, stats of h_1, padding_1)
    h_{i+1}  = conv_bnrelu(h_i, w_{i+1}, scale_i, shift_i, stats of h_{i+1}, padding_{i+1})
    s        = x | padA(x) | h_s = conv_bnrelu(x, w_s, None, None, stats of h_s if it has a BN)
    y        = bn_add_relu(h_k, scale_k, shift_k, s, [scale_s, shift_s])

backward, last conv first: ``conv_wgrad`` (the pre-activation recomputed from the conv's input),
``conv_dgrad`` (ReLU mask recomputed from h; BN-backward sums), ``bn_backward_finish``; the original
unit starts with ``bn_add_relu_backward`` (the mask from the saved output y). Only what a requested
gradient needs runs (``unit_plan.backward_work``): no ``conv_wgrad`` for a frozen conv, no data
gradient below the last point anything is asked for (an input-gradient-only backward, an attack's
``torch.autograd.grad(loss, x)``, runs no ``conv_wgrad``; with x needing no gradient the first
unit forms no input gradient).

Shared by both kinds (``_UnitRun``): BN statistics (one rule, ``statistics``), the shortcut's
forward and its gradient to x, ONE conv call per operator that always passes the conv's padding
(``conv`` / ``dgrad`` / ``wgrad`` take a ``ConvSpec``), the BN-backward finish, and one recompute
for ``memory="min"``. Parameters, saved tensors and gradients travel as named records (the
operators' argument names; ``pytree`` packs and unpacks ``ctx``'s saved tensors once).

Saved for backward (``memory="default"``): x, the raw conv outputs that feed a BN (pre-activation:
h_1 .. h_{n-1}; original: h_1 .. h_k and the projection's h_s when it has a BN, and y) and per BN
mean, invstd, scale and shift; no BN or ReLU output. ``memory="min"`` saves x (and y) and the
statistics; the backward recomputes the h's with the forward's own calls (``_UnitRun.recompute``:
``branch_conv``, the same helper, arguments and ``stats`` flags as the forward, from the saved
scale and shift; no batch statistics recomputed, no running statistic touched, no collective), so
both modes give the same bits; the cost is one more forward of those convs.

Synchronized BN (``group``): the forward all-gathers each BN's merged statistics over the process
group before finalizing; the backward all-reduces the two per-channel sums before finishing. BN
weight and bias gradients stay local (DistributedDataParallel averages them), as in
``nn.SyncBatchNorm``.

The backward is first-order only: differentiating it again (``create_graph=True``, gradient
penalties) raises an error that says to use ``backend="eager"``.

torch.func: ``torch.library``'s generated autograd Function cannot run under torch.func (it has no
``setup_context``), so under a torch.func transform the same operators run through
``_FunctorchUnit``, an autograd Function in the ``forward`` + ``setup_context`` style around the
same setup and backward; ``grad``, ``vjp`` and ``jacrev`` work (the backward operators have a
vmap rule that loops over the batch), ``vmap`` of a fused forward raises ``VMAP_MESSAGE``.

Exporters: while the TorchScript tracer or ``torch.onnx.export`` traces, ``run_fused_unit`` records
the forward operator's decomposition into standard ops (``unit_decomposition``) instead of the
operator; the decompositions are also in torch's decomposition table (registered below).

Activations are NHWC inside; ``run_fused_unit`` takes and returns ``[N, C, H, W]`` tensors, the
output in channels_last memory format (an NCHW-contiguous input is converted once).
"""
from __future__ import annotations

import sys
from typing import Any, Callable, NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree

from .unit_decomposition import DECOMPOSITIONS, register_decompositions
from .unit_ops import statistics_dtype
from .unit_plan import (MEMORY_MODES, BackwardWork, BatchNormParams, ConvSpec, GradNeeds, UnitPlan, backward_work,
                        bn_params, check_branch_shape, check_memory, decode_plan, unit_plan)

__all__ = ["DOUBLE_BACKWARD_MESSAGE", "MEMORY_MODES", "NAMESPACE", "Partials", "VMAP_MESSAGE", "check_memory",
           "compute_dtype", "process_count", "register_operator_set", "run_fused_unit", "unit_plan"]

Partials = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
NAMESPACE = "fused_preact_unit"

DOUBLE_BACKWARD_MESSAGE = (
    "fused-preact: the fused unit's backward is not differentiable, so double backward "
    "(create_graph=True, e.g. a gradient penalty) cannot run through it; build or convert the "
    "model with backend='eager' for that (convert_to_fused(model, backend='eager'))")
VMAP_MESSAGE = (
    "fused-preact: torch.func.vmap cannot batch a fused unit's forward (its kernels and BN statistics "
    "work on the whole batch); run the model with backend='eager' for vmap "
    "(convert_to_fused(model, backend='eager')). torch.func.grad, vjp and jacrev run fused.")


# -- operator sets, by name ---------------------------------------------------------------------
_OPERATOR_SETS: dict[str, Callable[[], Any]] = {}


def register_operator_set(name: str, get_ops: Callable[[], Any]) -> None:
    """Make ``backend=name`` of the unit operators run the operators ``get_ops()`` returns (a
    namespace with the eight operators of ``unit_ops``, loaded on first use)."""
    _OPERATOR_SETS[name] = get_ops


def operator_set(name: str) -> Any:
    try:
        get_ops = _OPERATOR_SETS[name]
    except KeyError:
        raise ValueError(f"backend {name!r} is no registered operator set (registered: "
                         f"{sorted(_OPERATOR_SETS)})") from None
    return get_ops()


# -- synchronized statistics: the process group by name -----------------------------------------
_GROUPS: dict[str, Any] = {}


def process_count(group) -> int:
    """Processes in ``group`` (1 without an initialized process group)."""
    if group is None or not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 1
    return torch.distributed.get_world_size(group)


def group_name(group) -> Optional[str]:
    """The ``group`` argument of the unit operators: None when the statistics are not synchronized
    (no group, or a group of one process), else the group's name (remembered for ``_process_group``)."""
    if group is None or process_count(group) <= 1:
        return None
    name = group.group_name
    _GROUPS[name] = group
    return name


def _process_group(name: Optional[str]):
    if name is None:
        return None
    group = _GROUPS.get(name)
    if group is None:   # a graph loaded in another process: torch's own registry of named groups
        from torch.distributed.distributed_c10d import _resolve_process_group
        group = _GROUPS[name] = _resolve_process_group(name)
    return group


class _Collectives:
    """The collectives of synchronized BN over the named group, or their shapes alone (fake)."""

    def __init__(self, name: Optional[str], fake: bool):
        self.group = _process_group(name)
        self.world = process_count(self.group)
        self.fake = fake

    def gather_partials(self, partials: Partials) -> Partials:
        """Merge local partials (Chan, float64) and all-gather one row per process."""
        if self.world <= 1:
            return partials
        dtype = partials[0].dtype
        pmean, pm2, pcount = (t.double() for t in partials)
        n = pcount.sum()
        mean = (pmean * pcount[:, None]).sum(0) / n
        m2 = pm2.sum(0) + (pcount[:, None] * (pmean - mean) ** 2).sum(0)
        local = torch.cat([mean, m2, n.reshape(1)]).to(dtype)
        if self.fake:
            table = local.new_empty(self.world, local.numel())
        else:
            rows = [torch.empty_like(local) for _ in range(self.world)]
            torch.distributed.all_gather(rows, local, group=self.group)
            table = torch.stack(rows)
        channels = mean.numel()
        return (table[:, :channels].contiguous(), table[:, channels:2 * channels].contiguous(),
                table[:, -1].contiguous())

    def all_reduce(self, t: torch.Tensor) -> torch.Tensor:
        t = t.clone()
        if not self.fake:
            torch.distributed.all_reduce(t, group=self.group)
        return t


# -- records ------------------------------------------------------------------------------------
class BatchNormStats(NamedTuple):
    """What one BN used in the forward (statistics dtype, [C] each)."""
    mean: torch.Tensor
    invstd: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor


def _count(h: torch.Tensor, world: int) -> int:
    """Values per channel a BN normalizes over: N * H * W of its NHWC input, over every process."""
    return h.shape[0] * h.shape[1] * h.shape[2] * world


def _like_parameter(grad: torch.Tensor, parameter: torch.Tensor) -> torch.Tensor:
    """``grad`` with ``parameter``'s strides (DistributedDataParallel copies a gradient whose strides
    differ from its bucket view's, with a warning; a 1x1 weight's channels_last and contiguous
    strides differ although both are 'contiguous')."""
    if grad.stride() == parameter.stride():
        return grad
    return torch.empty_strided(parameter.shape, parameter.stride(), dtype=grad.dtype,
                               device=grad.device).copy_(grad)


# -- what both unit kinds share -------------------------------------------------------------------
class _UnitRun:
    """One call of a unit: its plan, the backend's operators and the collectives, with the helpers
    every path uses (so no call site passes a conv's padding, BN rule or flag by hand)."""

    def __init__(self, plan: UnitPlan, backend: str, group: Optional[str], fake: bool):
        self.plan = plan
        self.ops = operator_set(backend)
        self.collectives = _Collectives(group, fake)

    # ---- the three conv operators, always with the conv's stride and padding ----
    def conv(self, spec: ConvSpec, h, weight, prologue: Optional[BatchNormStats], residual=None,
             emit_stats: bool = False):
        scale, shift = (prologue.scale, prologue.shift) if prologue is not None else (None, None)
        return self.ops.conv_bnrelu(h, weight, scale, shift, residual, spec.stride, emit_stats, list(spec.padding))

    def dgrad(self, spec: ConvSpec, g, weight, h, bn: Optional[BatchNormStats], add, height: int, width: int):
        if bn is None:
            masked = (None, None, None, None, None)
        else:
            masked = (h, bn.scale, bn.shift, bn.mean, bn.invstd)
        return self.ops.conv_dgrad(g, weight, *masked, add, spec.stride, height, width, list(spec.padding))

    def wgrad(self, spec: ConvSpec, g, h, prologue: Optional[BatchNormStats], weight):
        scale, shift = (prologue.scale, prologue.shift) if prologue is not None else (None, None)
        return _like_parameter(self.ops.conv_wgrad(g, h, scale, shift, weight, spec.stride, list(spec.padding)),
                               weight)

    # ---- the branch ----
    def branch_conv(self, i: int, h, weights, stats, residual=None, emit_stats: Optional[bool] = None):
        """Branch conv ``i`` of ``h``: its prologue is the BN the plan says, its statistics flag
        whether the BN reading its output normalizes with batch statistics (``emit_stats`` for the
        pre-activation unit's last conv). The forward and the recompute both call this."""
        j = self.plan.prologue_bn(i)
        if emit_stats is None:
            emit_stats = self.plan.bn[self.plan.output_bn(i)].batch_stats
        return self.conv(self.plan.convs[i], h, weights[i], stats[j] if j is not None else None, residual,
                         emit_stats)

    def shortcut(self, x, weight, prologue: Optional[BatchNormStats] = None, emit_stats: bool = False):
        """``(s, partials)``: the shortcut's value (the projection's raw output h_s, before any BN of
        its own); partials of h_s when ``emit_stats``."""
        plan = self.plan
        if plan.shortcut in ("projection", "raw_projection"):
            s, *partials = self.conv(plan.shortcut_conv, x, weight, prologue, None, emit_stats)
            return s, (tuple(partials) if emit_stats else None)
        if plan.shortcut == "pad":
            stride = plan.shortcut_stride
            return F.pad(x[:, ::stride, ::stride, :], (plan.pad_front, plan.pad_back)).contiguous(), None
        return x, None

    def shortcut_input_grad(self, g, x, weight):
        """The gradient reaching x through the shortcut from the gradient ``g`` of its value
        (identity, option A, or the projection's data gradient)."""
        plan = self.plan
        if plan.shortcut in ("projection", "raw_projection"):
            return self.dgrad(plan.shortcut_conv, g, weight, None, None, None, x.shape[1], x.shape[2])[0]
        if plan.shortcut == "pad":
            stride = plan.shortcut_stride
            grad = g.new_zeros(x.shape)
            grad[:, ::stride, ::stride, :] = g[..., plan.pad_front:plan.pad_front + x.shape[3]]
            return grad
        return g

    # ---- BN ----
    def statistics(self, j: int, partials: Optional[Partials], params: BatchNormParams, h):
        """``(BatchNormStats, new running (mean, var) or None)`` of BN ``j`` reading NHWC ``h``, as
        ``nn.BatchNorm2d`` uses them in this call: batch statistics (from ``partials``, or a pass over
        h when None) or the running statistics (eval)."""
        mode = self.plan.bn[j]
        dtype = statistics_dtype(h.dtype)
        if not mode.batch_stats:
            mean = params.running_mean.to(dtype, copy=True)
            invstd = torch.rsqrt(params.running_var.to(dtype) + mode.eps)
            scale = params.weight.to(dtype) * invstd
            return BatchNormStats(mean, invstd, scale, params.bias.to(dtype) - mean * scale), None
        if _count(h, self.collectives.world) <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got input size "
                             f"{(h.shape[0], h.shape[3], h.shape[1], h.shape[2])}")
        if partials is None:
            partials = self.ops.channel_stats(h)
        partials = self.collectives.gather_partials(partials)
        running = (params.running_mean.clone(), params.running_var.clone()) if mode.update_running else None
        stats = self.ops.bn_finalize(*partials, params.weight, params.bias, *(running or (None, None)),
                                     params.num_batches_tracked if running else None, mode.momentum, mode.eps)
        return BatchNormStats(*stats), running

    def finish(self, j: int, g, h, stats: BatchNormStats, bn_weight, sum_g, sum_g_xhat, add=None):
        """BN ``j``'s input gradient from the masked gradient ``g`` of its output and its two sums
        (all-reduced over the group first when it normalized with batch statistics)."""
        mode = self.plan.bn[j]
        world = self.collectives.world
        if mode.batch_stats and world > 1:
            sum_g, sum_g_xhat = self.collectives.all_reduce(sum_g), self.collectives.all_reduce(sum_g_xhat)
        return self.ops.bn_backward_finish(g, h, stats.mean, stats.invstd, bn_weight, sum_g, sum_g_xhat,
                                           float(_count(h, world)), add, mode.batch_stats)

    # ---- memory="min" ----
    def recompute(self, x, weights, stats, shortcut_weight) -> list:
        """The ``saved_h`` of ``memory="default"``, as the forward computed them, bit for bit: the
        pre-activation unit's h_1 .. h_{n-1}, the original unit's h_1 .. h_k and its projection's h_s
        when that has a BN. The same calls as the forward (``branch_conv``, ``shortcut``: same
        arguments, the saved scale and shift as prologue, the same ``stats`` flags, which select the
        kernel variant and on a GPU the autotuned tile, whose summation order decides the last bits);
        the partials they emit are dropped."""
        plan = self.plan
        hs, h = [], x
        for i in range(plan.num_convs - 1 if plan.kind == "preact" else plan.num_convs):
            h = self.branch_conv(i, h, weights, stats)[0]
            hs.append(h)
        if plan.shortcut_bn is not None:
            hs.append(self.shortcut(x, shortcut_weight, None, plan.bn[plan.shortcut_bn].batch_stats)[0])
        return hs


def _stats_lists(stats: list[BatchNormStats]) -> tuple[list, list, list, list]:
    return ([s.mean for s in stats], [s.invstd for s in stats], [s.scale for s in stats],
            [s.shift for s in stats])


def _running_lists(running: list) -> tuple[list, list]:
    kept = [r for r in running if r is not None]
    return [r[0] for r in kept], [r[1] for r in kept]


class _Grads:
    """The gradients a backward operator returns, by name; empty tensors where none was asked for."""

    def __init__(self, x, conv_weights, bn_weights):
        self.conv_weights, self.bn_weights = conv_weights, bn_weights
        self.dx = x.new_empty(0)
        self.conv = [w.new_empty(0) for w in conv_weights]
        self.bn_weight = [w.new_empty(0) for w in bn_weights]
        self.bn_bias = [w.new_empty(0) for w in bn_weights]
        self.shortcut = x.new_empty(0)

    def set_bn(self, j: int, needs: GradNeeds, sum_g, sum_g_xhat) -> None:
        """BN j's weight and bias gradients from its local sums (distinct tensors: an operator's
        outputs may not alias each other)."""
        dtype = self.bn_weights[j].dtype
        if needs.bn_weight[j]:
            self.bn_weight[j] = sum_g_xhat.to(dtype, copy=True)
        if needs.bn_bias[j]:
            self.bn_bias[j] = sum_g.to(dtype, copy=True)

    def outputs(self):
        return self.dx, self.conv, self.bn_weight, self.bn_bias, self.shortcut


# -- the pre-activation unit ----------------------------------------------------------------------
PREACT_SCHEMA = (
    "(Tensor x, Tensor? x_mean, Tensor? x_m2, Tensor? x_count, Tensor[] conv_weights, Tensor[] bn_weights, "
    "Tensor[] bn_biases, Tensor?[] running_means, Tensor?[] running_vars, Tensor?[] batches_tracked, "
    "Tensor? shortcut_weight, str plan, str backend, str? group, bool want_stats) "
    "-> (Tensor y, Tensor y_mean, Tensor y_m2, Tensor y_count, Tensor[] new_running_means, "
    "Tensor[] new_running_vars, Tensor[] saved_h, Tensor[] means, Tensor[] invstds, Tensor[] scales, "
    "Tensor[] shifts)")
PREACT_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor[] saved_h, Tensor[] means, Tensor[] invstds, Tensor[] scales, "
    "Tensor[] shifts, Tensor[] conv_weights, Tensor[] bn_weights, Tensor? shortcut_weight, str plan, "
    "str backend, str? group, bool[] needs) "
    "-> (Tensor dx, Tensor[] conv_weight_grads, Tensor[] bn_weight_grads, Tensor[] bn_bias_grads, "
    "Tensor shortcut_weight_grad)")


def preact_forward(x, x_mean, x_m2, x_count, conv_weights, bn_weights, bn_biases, running_means, running_vars,
                   batches_tracked, shortcut_weight, plan, backend, group, want_stats, *, fake=False):
    """The ``preact`` operator (``fake``: on fake tensors, collectives by shape only)."""
    plan = decode_plan(plan)
    run = _UnitRun(plan, backend, group, fake)
    bns = bn_params(bn_weights, bn_biases, running_means, running_vars, batches_tracked)
    partials = (x_mean, x_m2, x_count) if x_mean is not None else None
    h, residual = x, None
    hs, stats, running = [], [], []
    for i in range(plan.num_convs):
        bn_stats, new_running = run.statistics(i, partials, bns[i], h)
        stats.append(bn_stats)
        running.append(new_running)
        if i == 0:
            residual = run.shortcut(x, shortcut_weight, bn_stats if plan.shortcut == "projection" else None)[0]
        last = i == plan.num_convs - 1
        emit_stats = want_stats if last else None
        h_next, *next_partials = run.branch_conv(i, h, conv_weights, stats, residual if last else None,
                                                 emit_stats)
        hs.append(h)
        emitted = want_stats if last else plan.bn[i + 1].batch_stats
        partials = tuple(next_partials) if emitted else None
        h = h_next
    y = h
    dtype = statistics_dtype(x.dtype)
    y_partials = partials if want_stats else tuple(x.new_empty(0, dtype=dtype) for _ in range(3))
    saved_h = [] if plan.recompute else hs[1:]      # the inputs of triples 1 .. n-1 (x is an input)
    return (y, *y_partials, *_running_lists(running), saved_h, *_stats_lists(stats))


class _BackwardStart(NamedTuple):
    """What both backward operators start from."""
    plan: UnitPlan
    needs: GradNeeds             # the gradients asked for
    work: BackwardWork           # the convs and reductions they take
    run: "_UnitRun"
    stats: list[BatchNormStats]  # the forward's, per BN


def _backward_start(plan, needs, backend, group, fake, means, invstds, scales, shifts) -> _BackwardStart:
    plan = decode_plan(plan)
    needs = GradNeeds.from_flags(needs, plan)
    return _BackwardStart(plan, needs, backward_work(plan, needs), _UnitRun(plan, backend, group, fake),
                          [BatchNormStats(*s) for s in zip(means, invstds, scales, shifts)])


def preact_backward(dy, x, saved_h, means, invstds, scales, shifts, conv_weights, bn_weights, shortcut_weight,
                    plan, backend, group, needs, *, fake=False):
    """The ``preact_backward`` operator."""
    plan, needs, work, run, stats = _backward_start(plan, needs, backend, group, fake, means, invstds, scales, shifts)
    hs = [x, *(run.recompute(x, conv_weights, stats, shortcut_weight) if plan.recompute else saved_h)]
    grads = _Grads(x, conv_weights, bn_weights)
    dy = dy.contiguous()
    # the projection's weight gradient needs dy and x alone
    if work.shortcut_wgrad:
        prologue = stats[0] if plan.shortcut == "projection" else None
        grads.shortcut = run.wgrad(plan.shortcut_conv, dy, x, prologue, shortcut_weight)
    g = dy
    for i in reversed(range(plan.num_convs)):
        h, spec = hs[i], plan.convs[i]
        if work.wgrad[i]:
            grads.conv[i] = run.wgrad(spec, g, h, stats[i], conv_weights[i])
        if not work.dgrad[i]:
            break                      # nothing at or below this triple needs a gradient
        joining = shortcut_grad = None
        if i == 0 and plan.shortcut == "projection":   # joins conv 0's data gradient before the mask
            joining = run.shortcut_input_grad(dy, x, shortcut_weight) if work.shortcut_dgrad else None
        elif i == 0 and work.finish[0]:                 # joins the input gradient after BN 0
            shortcut_grad = run.shortcut_input_grad(dy, x, shortcut_weight)
        g_masked, sum_g, sum_g_xhat = run.dgrad(spec, g, conv_weights[i], h, stats[i], joining, h.shape[1],
                                                h.shape[2])
        grads.set_bn(i, needs, sum_g, sum_g_xhat)
        if work.finish[i]:
            g = run.finish(i, g_masked, h, stats[i], bn_weights[i], sum_g, sum_g_xhat, shortcut_grad)
            if i == 0:
                grads.dx = g
    return grads.outputs()


# -- the original (post-activation) unit ------------------------------------------------------------
ORIGINAL_SCHEMA = (
    "(Tensor x, Tensor[] conv_weights, Tensor[] bn_weights, Tensor[] bn_biases, Tensor?[] running_means, "
    "Tensor?[] running_vars, Tensor?[] batches_tracked, Tensor? shortcut_weight, str plan, str backend, "
    "str? group) -> (Tensor y, Tensor[] new_running_means, Tensor[] new_running_vars, Tensor[] saved_h, "
    "Tensor[] means, Tensor[] invstds, Tensor[] scales, Tensor[] shifts)")
ORIGINAL_BACKWARD_SCHEMA = (
    "(Tensor dy, Tensor x, Tensor y, Tensor[] saved_h, Tensor[] means, Tensor[] invstds, Tensor[] scales, "
    "Tensor[] shifts, Tensor[] conv_weights, Tensor[] bn_weights, Tensor? shortcut_weight, str plan, "
    "str backend, str? group, bool[] needs) "
    "-> (Tensor dx, Tensor[] conv_weight_grads, Tensor[] bn_weight_grads, Tensor[] bn_bias_grads, "
    "Tensor shortcut_weight_grad)")


def original_forward(x, conv_weights, bn_weights, bn_biases, running_means, running_vars, batches_tracked,
                     shortcut_weight, plan, backend, group, *, fake=False):
    """The ``original`` operator."""
    plan = decode_plan(plan)
    run = _UnitRun(plan, backend, group, fake)
    bns = bn_params(bn_weights, bn_biases, running_means, running_vars, batches_tracked)
    hs, stats, running = [], [], []
    h = x
    for i in range(plan.num_convs):
        h, *partials = run.branch_conv(i, h, conv_weights, stats)
        bn_stats, new_running = run.statistics(i, tuple(partials) if plan.bn[i].batch_stats else None, bns[i], h)
        hs.append(h)
        stats.append(bn_stats)
        running.append(new_running)
    s = plan.shortcut_bn
    emit = s is not None and plan.bn[s].batch_stats
    residual, partials = run.shortcut(x, shortcut_weight, None, emit)
    residual_affine = (None, None)
    if s is not None:
        bn_stats, new_running = run.statistics(s, partials, bns[s], residual)
        stats.append(bn_stats)
        running.append(new_running)
        residual_affine = (bn_stats.scale, bn_stats.shift)
        hs.append(residual)
    last = stats[plan.num_convs - 1]
    y = run.ops.bn_add_relu(hs[plan.num_convs - 1], last.scale, last.shift, residual, *residual_affine)
    saved_h = [] if plan.recompute else hs
    return (y, *_running_lists(running), saved_h, *_stats_lists(stats))


def original_backward(dy, x, y, saved_h, means, invstds, scales, shifts, conv_weights, bn_weights, shortcut_weight,
                      plan, backend, group, needs, *, fake=False):
    """The ``original_backward`` operator."""
    plan, needs, work, run, stats = _backward_start(plan, needs, backend, group, fake, means, invstds, scales, shifts)
    hs = run.recompute(x, conv_weights, stats, shortcut_weight) if plan.recompute else list(saved_h)
    n, s = plan.num_convs, plan.shortcut_bn
    h_s = hs[n] if s is not None else None
    grads = _Grads(x, conv_weights, bn_weights)
    dy = dy.contiguous()

    # ---- the end: relu(bn_k(h_k) + s) ----
    k = n - 1
    g, sum_g, sum_g_xhat, s_sum_g_xhat = run.ops.bn_add_relu_backward(
        dy, y, hs[k], stats[k].mean, stats[k].invstd, h_s, stats[s].mean if s is not None else None,
        stats[s].invstd if s is not None else None)
    grads.set_bn(k, needs, sum_g, sum_g_xhat)

    # ---- the shortcut, whose gradient to x joins conv 1's data gradient ----
    shortcut_grad = None
    if plan.shortcut_conv is not None:
        d_s = g
        if s is not None:
            grads.set_bn(s, needs, sum_g, s_sum_g_xhat)
            if work.finish[s]:
                d_s = run.finish(s, g, h_s, stats[s], bn_weights[s], sum_g, s_sum_g_xhat)
        if work.shortcut_wgrad:
            grads.shortcut = run.wgrad(plan.shortcut_conv, d_s, x, None, shortcut_weight)
        if work.shortcut_dgrad:
            shortcut_grad = run.shortcut_input_grad(d_s, x, shortcut_weight)
    elif needs.x:
        shortcut_grad = run.shortcut_input_grad(g, x, shortcut_weight)

    # ---- the convs, last first: conv i reads relu(bn_{i-1}(h_i)), conv 0 reads x; dh: gradient of h_{i+1} ----
    dh = run.finish(k, g, hs[k], stats[k], bn_weights[k], sum_g, sum_g_xhat) if work.finish[k] else None
    for i in reversed(range(n)):
        if not work.finish[i]:
            break                      # nothing at or below conv i needs a gradient
        h_in, spec = (hs[i - 1] if i > 0 else x), plan.convs[i]
        prologue = stats[i - 1] if i > 0 else None
        if work.wgrad[i]:
            grads.conv[i] = run.wgrad(spec, dh, h_in, prologue, conv_weights[i])
        if not work.dgrad[i]:
            break
        if i > 0:
            g_in, sum_g, sum_g_xhat = run.dgrad(spec, dh, conv_weights[i], h_in, prologue, None, h_in.shape[1],
                                                h_in.shape[2])
            grads.set_bn(i - 1, needs, sum_g, sum_g_xhat)
            if work.finish[i - 1]:
                dh = run.finish(i - 1, g_in, h_in, stats[i - 1], bn_weights[i - 1], sum_g, sum_g_xhat)
        else:
            grads.dx = run.dgrad(spec, dh, conv_weights[0], None, None, shortcut_grad, x.shape[1], x.shape[2])[0]
    return grads.outputs()


# -- the operators ----------------------------------------------------------------------------------
def _define(name: str, schema: str, impl: Callable):
    op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=(), schema=schema)(
        lambda *args: impl(*args))
    op.register_fake(lambda *args: impl(*args, fake=True))
    return op


_preact_op = _define("preact", PREACT_SCHEMA, preact_forward)
_preact_backward_op = _define("preact_backward", PREACT_BACKWARD_SCHEMA, preact_backward)
_original_op = _define("original", ORIGINAL_SCHEMA, original_forward)
_original_backward_op = _define("original_backward", ORIGINAL_BACKWARD_SCHEMA, original_backward)


def _operator(name: str):
    return getattr(getattr(torch.ops, NAMESPACE), name)


def _argument_names(op_name: str) -> list[str]:
    return [a.name for a in _operator(op_name).default._schema.arguments]


def _return_names(op_name: str) -> list[str]:
    return [r.name for r in _operator(op_name).default._schema.returns]


class _Kind(NamedTuple):
    """A unit kind's operators and the names of their arguments and results."""
    forward: str
    backward: str
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    backward_inputs: tuple[str, ...]


_KINDS = {kind: _Kind(kind, f"{kind}_backward", tuple(_argument_names(kind)), tuple(_return_names(kind)),
                      tuple(_argument_names(f"{kind}_backward")))
          for kind in ("preact", "original")}
# what the backward operator takes from the forward's inputs and outputs (the rest: dy and needs)
_SAVED_FROM_INPUTS = ("x", "conv_weights", "bn_weights", "shortcut_weight", "plan", "backend", "group")
_SAVED_FROM_OUTPUTS = ("y", "saved_h", "means", "invstds", "scales", "shifts")
_DIFFERENTIABLE = ("x", "conv_weights", "bn_weights", "bn_biases", "shortcut_weight")


def _setup_context(ctx, kind: str, inputs: dict, outputs: dict) -> None:
    """Shared by the operators' autograd and ``_FunctorchUnit``: save what the backward operator
    takes (named, packed once with pytree) and mark every output but y non-differentiable."""
    spec = _KINDS[kind]
    saved = {name: inputs[name] for name in _SAVED_FROM_INPUTS}
    saved.update({name: outputs[name] for name in _SAVED_FROM_OUTPUTS if name in spec.backward_inputs})
    tensors = {name: value for name, value in saved.items() if name not in ("plan", "backend", "group")}
    leaves, ctx.saved_spec = pytree.tree_flatten(tensors)
    ctx.save_for_backward(*leaves)
    ctx.kind, ctx.plan, ctx.backend, ctx.group = kind, saved["plan"], saved["backend"], saved["group"]
    ctx.mark_non_differentiable(*[t for name in spec.outputs if name != "y"
                                  for t in pytree.tree_leaves(outputs[name])])


def _needs(value) -> Any:
    """A gradient flag or a list of them (autograd's needs_input_grad of a tensor list)."""
    return [bool(v) for v in value] if isinstance(value, (list, tuple)) else bool(value)


def _unit_backward(ctx, needs_by_name: dict, dy, guard_second_order: bool = True) -> dict:
    """Shared backward: the backward operator for the gradients asked for, by input name (None where
    none was asked for); double backward raises ``DOUBLE_BACKWARD_MESSAGE`` (``guard_second_order``;
    under torch.func, ``_check_first_order_transforms`` refuses nested gradient transforms instead)."""
    saved = pytree.tree_unflatten(list(ctx.saved_tensors), ctx.saved_spec)
    conv = needs_by_name["conv_weights"]
    bn_weight, bn_bias = needs_by_name["bn_weights"], needs_by_name["bn_biases"]
    needs = GradNeeds(x=bool(needs_by_name["x"]), conv=tuple(conv), bn_weight=tuple(bn_weight),
                      bn_bias=tuple(bn_bias), shortcut=bool(needs_by_name["shortcut_weight"])
                      and saved["shortcut_weight"] is not None)
    kind = _KINDS[ctx.kind]
    arguments = dict(saved, dy=dy, plan=ctx.plan, backend=ctx.backend, group=ctx.group, needs=needs.flags())
    with torch.no_grad():
        dx, conv_grads, bn_weight_grads, bn_bias_grads, shortcut_grad = _operator(
            kind.backward)(*[arguments[name] for name in kind.backward_inputs])
    grads = {
        "x": dx if needs.x else None,
        "conv_weights": [g if asked else None for g, asked in zip(conv_grads, needs.conv)],
        "bn_weights": [g if asked else None for g, asked in zip(bn_weight_grads, needs.bn_weight)],
        "bn_biases": [g if asked else None for g, asked in zip(bn_bias_grads, needs.bn_bias)],
        "shortcut_weight": shortcut_grad if needs.shortcut else None,
    }
    if guard_second_order and torch.is_grad_enabled():   # a create_graph=True pass
        grads = _raise_when_differentiated(grads)
    return grads


def _raise_when_differentiated(grads: dict) -> dict:
    """The gradients behind a node that raises ``DOUBLE_BACKWARD_MESSAGE`` when differentiated (a
    ``create_graph=True`` pass still gives them; only going back through them raises)."""
    from torch._C import _functions
    leaves, spec = pytree.tree_flatten(grads)
    tensors = [t for t in leaves if t is not None]
    error = _functions.DelayedError(DOUBLE_BACKWARD_MESSAGE.encode(), len(tensors))
    wrapped = iter(error(*[t.detach().requires_grad_() for t in tensors]))
    return pytree.tree_unflatten([next(wrapped) if t is not None else None for t in leaves], spec)


def _register_autograd(kind: str) -> None:
    spec = _KINDS[kind]

    def setup_context(ctx, inputs, output):
        _setup_context(ctx, kind, dict(zip(spec.inputs, inputs)), dict(zip(spec.outputs, output)))

    def backward(ctx, dy, *_):
        needs = {name: _needs(flag) for name, flag in zip(spec.inputs, ctx.needs_input_grad)
                 if name in _DIFFERENTIABLE}
        grads = _unit_backward(ctx, needs, dy)
        flags = dict(zip(spec.inputs, ctx.needs_input_grad))
        # None for the rest: a list of them for a tensor list (one flag per tensor), as autograd expects
        return tuple(grads[name] if name in grads else ([None] * len(flag) if isinstance(flag, (list, tuple))
                                                        else None)
                     for name, flag in flags.items())

    (_preact_op if kind == "preact" else _original_op).register_autograd(backward, setup_context=setup_context)


for _kind in _KINDS:
    _register_autograd(_kind)

# the forward operators in standard ops, in torch's decomposition table (ONNX export, TorchScript tracing)
register_decompositions(NAMESPACE, {"preact": lambda *args: preact_forward(*args, fake=True),
                                    "original": lambda *args: original_forward(*args, fake=True)})


# -- torch.func ---------------------------------------------------------------------------------------
def _functorch_transform_active() -> bool:
    """Whether a torch.func transform (grad, vjp, jacrev, vmap...) is running this call."""
    if torch.compiler.is_compiling():
        return False
    peek = getattr(torch._C._functorch, "peek_interpreter_stack", None)
    return peek is not None and peek() is not None


def _check_first_order_transforms() -> None:
    """The torch.func transforms a fused forward runs under: one reverse-mode gradient transform (grad,
    vjp, jacrev). vmap of the forward raises ``VMAP_MESSAGE``; a second gradient transform (grad of
    grad, a Hessian) or a forward-mode one would differentiate the backward, which is not
    differentiable."""
    from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters
    from torch._C._functorch import TransformType
    interpreters = retrieve_all_functorch_interpreters()
    if any(i.key() == TransformType.Vmap for i in interpreters):
        raise RuntimeError(VMAP_MESSAGE)
    differentiating = [i for i in interpreters if i.key() in (TransformType.Grad, TransformType.Jvp)]
    if len(differentiating) > 1 or any(i.key() == TransformType.Jvp for i in differentiating):
        raise RuntimeError(DOUBLE_BACKWARD_MESSAGE + " (here: nested or forward-mode torch.func transforms)")


class _OutputSpec:
    """Where ``_FunctorchUnit.forward`` leaves the structure of its flattened outputs."""
    spec = None


class _FunctorchUnit(torch.autograd.Function):
    """The unit operators under torch.func (see the module docstring): the forward operator, the
    running statistics stored into their buffers here (at the transform's lower level, where they
    are plain tensors), and the shared setup and backward."""

    @staticmethod
    def forward(kind, holder, in_spec, *leaves):
        inputs = pytree.tree_unflatten(list(leaves), in_spec)
        outputs = dict(zip(_KINDS[kind].outputs, _operator(kind)(**inputs)))
        _store_running(decode_plan(inputs["plan"]), inputs, outputs)
        flat, holder.spec = pytree.tree_flatten(outputs)
        return tuple(flat)

    @staticmethod
    def setup_context(ctx, inputs, output):
        kind, holder, in_spec, *leaves = inputs
        _setup_context(ctx, kind, pytree.tree_unflatten(list(leaves), in_spec),
                       pytree.tree_unflatten(list(output), holder.spec))
        ctx.in_spec = in_spec

    @staticmethod
    def backward(ctx, dy, *_):
        flags = pytree.tree_unflatten(list(ctx.needs_input_grad[3:]), ctx.in_spec)
        needs = {name: _needs(flags[name]) if flags[name] is not None else False for name in _DIFFERENTIABLE}
        grads = _unit_backward(ctx, needs, dy, guard_second_order=False)
        flat = []
        for path, _ in pytree.tree_flatten_with_path(flags)[0]:
            value = grads.get(path[0].key)
            if isinstance(value, list):
                value = value[path[1].idx]
            flat.append(value)
        return (None, None, None, *flat)

    @staticmethod
    def vmap(info, in_dims, *args):
        raise RuntimeError(VMAP_MESSAGE)


def _loop_over_batch(op_name: str):
    """A vmap rule for a backward operator: the operator once per batch entry, results stacked (what
    ``jacrev`` needs; the kernels take one batch at a time)."""
    def rule(info, in_dims, *args):
        def entry(value, dim, b):
            if isinstance(value, list):
                return [entry(v, d, b) for v, d in zip(value, dim or [None] * len(value))]
            return value if dim is None else value.select(dim, b)

        op = _operator(op_name)
        results = [op(*[entry(a, d, b) for a, d in zip(args, in_dims)]) for b in range(info.batch_size)]
        stacked = tuple(torch.stack(parts) if isinstance(parts[0], torch.Tensor)
                        else [torch.stack(column) for column in zip(*parts)]
                        for parts in zip(*results))
        return stacked, tuple(0 if isinstance(v, torch.Tensor) else [0] * len(v) for v in stacked)
    return rule


for _kind in _KINDS.values():
    torch.library.register_vmap(f"{NAMESPACE}::{_kind.backward}", _loop_over_batch(_kind.backward))


# -- the entry point used by the dispatch layer ---------------------------------------------------------
def _store_running(plan: UnitPlan, inputs: dict, outputs: dict) -> None:
    """Copy the new running statistics into the BN buffers (the BNs that update, in BN order)."""
    updating = [j for j, mode in enumerate(plan.bn) if mode.update_running]
    for j, mean, var in zip(updating, outputs["new_running_means"], outputs["new_running_vars"]):
        inputs["running_means"][j].copy_(mean)
        inputs["running_vars"][j].copy_(var)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the convolutions run in: autocast's when it is on, else x's."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        return torch.get_autocast_dtype(device)
    return x.dtype


def _unit_bns(unit: nn.Module, plan: UnitPlan) -> list[nn.Module]:
    """The unit's BNs in BN order (``unit_plan``)."""
    bns = [getattr(unit, f"bn{i}") for i in range(1, unit.num_convs + 1)]
    return bns + ([unit.shortcut_bn] if plan.shortcut_bn is not None else [])


def _exporter_tracing() -> bool:
    """Whether an exporter traces this call: the TorchScript tracer (``torch.jit.trace``, the legacy
    ONNX exporter), which cannot record an operator with ``Tensor?[]`` arguments, or the ONNX exporter,
    which would decompose the operator anyway and whose dynamic shapes then need no backend's fake
    implementation. ``torch.compile`` sees False (dynamo folds ``is_in_onnx_export``)."""
    if torch.jit.is_tracing():
        return True
    onnx = sys.modules.get("torch.onnx")   # torch imports it lazily: not imported, not exporting
    return onnx is not None and onnx.is_in_onnx_export()


def run_fused_unit(backend: str, unit: nn.Module, x: torch.Tensor, stats_in: Optional[Partials] = None,
                   want_stats: bool = False) -> tuple[torch.Tensor, Optional[Partials]]:
    """Run ``unit`` (full pre-activation, or original post-activation) on ``x`` with the operator set
    ``backend`` (a name registered with ``register_operator_set``: ``"triton"``, ``"cuda"``).

    ``stats_in``: partials of x's per-channel statistics (from the previous fused unit's epilogue), so
    the first BN needs no pass over x. ``want_stats``: also return the partials of the output for the
    next unit. An original unit has no BN that reads x or y: it ignores ``stats_in`` and returns None
    partials. Returns ``(y, partials)`` with y ``[N, C, H, W]`` in channels_last memory format.
    """
    if not isinstance(backend, str):
        raise TypeError(f"backend must be the name of a registered operator set, got {type(backend).__name__}")
    under_functorch = _functorch_transform_active()
    if under_functorch:
        _check_first_order_transforms()
    dtype = compute_dtype(x)
    plan = unit_plan(unit)
    check_branch_shape(plan, x.shape[2], x.shape[3], type(unit).__name__, unit.conv_padding is not None)
    bns = _unit_bns(unit, plan)
    for bn in bns:  # as nn.BatchNorm2d.forward, before the statistics are used
        if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
    convs = [getattr(unit, f"conv{i}") for i in range(1, unit.num_convs + 1)]
    inputs = dict(
        x=(x if x.dtype == dtype else x.to(dtype)).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1),
        conv_weights=[c.weight for c in convs],
        bn_weights=[bn.weight for bn in bns], bn_biases=[bn.bias for bn in bns],
        running_means=[bn.running_mean for bn in bns], running_vars=[bn.running_var for bn in bns],
        batches_tracked=[bn.num_batches_tracked for bn in bns],
        shortcut_weight=unit.shortcut.weight if unit.shortcut is not None else None,
        plan=plan.encode(), backend=backend, group=group_name(getattr(unit, "stats_group", None)))
    if plan.kind == "preact":
        use_stats_in = stats_in is not None and plan.bn[0].batch_stats
        x_mean, x_m2, x_count = stats_in if use_stats_in else (None, None, None)
        inputs.update(x_mean=x_mean, x_m2=x_m2, x_count=x_count, want_stats=want_stats)
    else:
        want_stats = False
    kind = _KINDS[plan.kind]
    ordered = {name: inputs[name] for name in kind.inputs}
    if under_functorch:
        holder = _OutputSpec()
        leaves, in_spec = pytree.tree_flatten(ordered)
        flat = _FunctorchUnit.apply(plan.kind, holder, in_spec, *leaves)
        outputs = pytree.tree_unflatten(list(flat), holder.spec)
    elif _exporter_tracing():
        # the exporters record the operator's decomposition into standard ops (unit_decomposition)
        outputs = dict(zip(kind.outputs, DECOMPOSITIONS[kind.forward](**ordered)))
        _store_running(plan, ordered, outputs)
    else:
        outputs = dict(zip(kind.outputs, _operator(kind.forward)(**ordered)))
        _store_running(plan, ordered, outputs)
    out = outputs["y"].permute(0, 3, 1, 2)
    if plan.shortcut in ("identity", "pad") and x.dtype != dtype:
        out = out.to(torch.promote_types(x.dtype, dtype))   # eager adds the shortcut in x's dtype
    if not want_stats:
        return out, None
    return out, (outputs["y_mean"], outputs["y_m2"], outputs["y_count"])


from . import unit_flops  # noqa: E402,F401  (FLOP formulas of the operators above)
