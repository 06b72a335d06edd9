"""The contenders: who computes a case, and the one step that is timed.

- ``eager``: the reference modules, cuDNN, channels_last (bf16/fp16 under autocast).
- ``compile`` / ``compile-max-autotune``: ``torch.compile`` of the eager module.
- ``fused-triton`` / ``fused-cuda``: ``convert_to_fused(model, backend)`` for units and
  models; the ``conv_bnrelu`` operator of ``torch.ops.fused_preact_triton`` /
  ``torch.ops.fused_preact`` at the conv level.
- ``cudnn-fe``: cuDNN's fused scale-bias-ReLU-conv-genstats graph (conv level, fp16).
- ``eager+graph`` / ``fused-triton+graph`` / ``fused-cuda+graph`` (units and models, GPU
  only): the same step captured whole into one CUDA graph (``fused_preact.cuda_graph``)
  and replayed, as ``compile-max-autotune`` does with its own graphs: like with like
  where launches dominate. Same optimizer as the plain contender (foreach SGD, fixed lr).

``build_runner`` returns a ``Runner`` or the reason the contender cannot run here.
Steps: ``train`` = forward + backward + SGD step, ``infer`` = eval-mode forward
without autograd, ``pgd-train`` / ``pgd-eval`` = an attack's step, ``torch.autograd.grad(loss, x)``
with every parameter frozen, BN in training / eval mode, ``fwd`` (conv level) = BN-apply, ReLU,
conv and output statistics.
"""
from __future__ import annotations

import contextlib
import copy
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from fused_preact import dispatch
from fused_preact.convert import convert_to_fused
from fused_preact.cuda_graph import GraphedStep

from . import cudnn_fused
from .cases import Case

GRAPH = "+graph"
MODULE_CONTENDERS = ("eager", "eager+graph", "compile", "compile-max-autotune", "fused-triton",
                     "fused-triton+graph", "fused-cuda", "fused-cuda+graph")
CONV_CONTENDERS = ("eager", "compile", "compile-max-autotune", "fused-triton", "fused-cuda", "cudnn-fe")
CONTENDERS = tuple(dict.fromkeys(MODULE_CONTENDERS + CONV_CONTENDERS))
LEVEL_CONTENDERS = {"conv": CONV_CONTENDERS, "unit": MODULE_CONTENDERS, "model": MODULE_CONTENDERS}
GRAPH_WARMUP = 3          # eager steps on a side stream before the capture
GRAPH_CHECK_STEPS = 2     # replays compared with the same steps run eagerly
FUSED_BACKEND = {"fused-triton": "triton", "fused-cuda": "cuda"}
OP_NAMESPACE = {"fused-triton": "fused_preact_triton", "fused-cuda": "fused_preact"}
COMPILE_MODE = {"compile": "default", "compile-max-autotune": "max-autotune"}
INTERPRETER_MAX_BATCH = 8


@dataclass
class Runner:
    """A ready contender: ``step()`` runs what is timed and returns the output to compare
    (NCHW); ``forward()`` runs one autograd-recording forward (for saved-bytes counting);
    ``state`` holds the tensors that are not activations (parameters, buffers)."""
    step: Callable[[], torch.Tensor]
    forward: Optional[Callable[[], object]] = None
    state: list = field(default_factory=list)
    profiled: bool = False         # its fused operators are worth profiling
    peak_memory_bytes: Optional[int] = None   # measured while building (a graph's capture), if so
    notes: dict = field(default_factory=dict)  # extra figures for the result entry


@dataclass(frozen=True)
class Setting:
    """How the run is set up: device, dtype of the case, step kind, whether this is the CPU smoke run."""
    device: torch.device
    dtype: torch.dtype
    mode: str
    quick: bool
    smoke: bool
    named: frozenset = frozenset()   # contenders asked for by name (--contenders): no --quick skip


def graph_base(contender: str) -> Optional[str]:
    """The contender a ``<name>+graph`` contender captures; None for the others."""
    return contender[:-len(GRAPH)] if contender.endswith(GRAPH) else None


def autocast(setting: Setting):
    if setting.dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(setting.device.type, dtype=setting.dtype)


def static_reason(contender: str, case: Case, setting: Setting) -> Optional[str]:
    """Why ``contender`` is not run, known before building anything; None when it may run."""
    on_gpu = setting.device.type == "cuda"
    if graph_base(contender) is not None:
        if not on_gpu:
            return "not run without a GPU: a CUDA graph captures GPU work only"
        return static_reason(graph_base(contender), case, setting)
    if contender in COMPILE_MODE:
        if not on_gpu:
            return ("not run without a GPU: the CPU smoke run compares eager with the fused CPU paths "
                    "(torch.compile for the CPU takes minutes on a small machine)")
        if contender == "compile-max-autotune" and setting.quick and contender not in setting.named:
            return "skipped with --quick: max-autotune benchmarks every conv config (minutes per shape)"
    if contender == "fused-triton" and not on_gpu:
        if os.environ.get("TRITON_INTERPRET") != "1":
            return ("Triton kernels run on a CPU only in Triton's interpreter: set TRITON_INTERPRET=1 "
                    "before starting (tiny shapes only)")
        if case.batch > INTERPRETER_MAX_BATCH:
            return f"the Triton interpreter is kept to tiny shapes (batch <= {INTERPRETER_MAX_BATCH}) on a CPU"
    if contender == "cudnn-fe":
        return cudnn_fused.unavailable_reason(setting.device, setting.dtype)
    return None


def build_runner(contender: str, case: Case, setting: Setting, base: Optional[nn.Module],
                 inputs: dict) -> Union[Runner, str]:
    """A ready ``Runner``, or the reason ``contender`` cannot run this case."""
    reason = static_reason(contender, case, setting)
    if reason is not None:
        return reason
    if case.level == "conv":
        return _conv_runner(contender, case, setting, inputs)
    if graph_base(contender) is not None:
        return _graph_runner(graph_base(contender), case, setting, base, inputs)
    return _module_runner(contender, case, setting, base, inputs)


def _graph_runner(contender: str, case: Case, setting: Setting, base: nn.Module, inputs: dict):
    """``contender``'s step captured into one CUDA graph, checked against the same steps run eagerly.

    Built here: warm-up steps, the capture (peak memory taken over it: a replay allocates
    nothing, its memory is the graph's pool) and ``GRAPH_CHECK_STEPS`` replays, each
    compared with a twin of the contender stepped eagerly from the same start. The twin is
    built from ``base`` (which no step changes) only after the capture, so the peak counts
    the graphed contender alone, and is stepped as often as the graph was before the check.
    """
    runner = _module_runner(contender, case, setting, base, inputs)
    if isinstance(runner, str):
        return runner
    graphed = GraphedStep(runner.step, capture=True, warmup=GRAPH_WARMUP)
    for _ in range(GRAPH_WARMUP):
        graphed()
    device = setting.device
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    graphed()                                            # capture, then replay
    torch.cuda.synchronize(device)
    peak = int(torch.cuda.max_memory_allocated(device))
    twin = _module_runner(contender, case, setting, base, inputs)
    for _ in range(GRAPH_WARMUP + 1):                    # the warm-up steps and the captured one
        twin.step()
    worst = 0.0
    for _ in range(GRAPH_CHECK_STEPS):
        replayed, eager = graphed(), twin.step()
        worst = max(worst, float((replayed.double() - eager.double()).abs().max()))
    return Runner(graphed, forward=runner.forward, state=runner.state, peak_memory_bytes=peak,
                  notes={"graph_replay_max_abs_diff": worst})


# -- units and models ----------------------------------------------------------------
def _module_runner(contender: str, case: Case, setting: Setting, base: nn.Module, inputs: dict):
    x = inputs["x"]
    module = copy.deepcopy(base)
    if contender in FUSED_BACKEND:
        backend = FUSED_BACKEND[contender]
        probe = x if case.level == "unit" else inputs["unit_probe"]
        reason = dispatch.unavailable_reason(backend, probe)
        if reason is not None:
            return reason
        module = convert_to_fused(module, backend=backend)
    state = list(module.parameters()) + list(module.buffers())
    run = module
    if contender in COMPILE_MODE:
        torch._dynamo.reset()
        run = torch.compile(module, mode=COMPILE_MODE[contender])

    if setting.mode == "infer":
        module.eval()

        def step():
            with torch.no_grad(), autocast(setting):
                return run(x)
        return Runner(step, state=state, profiled=contender in FUSED_BACKEND)

    if setting.mode in ("pgd-train", "pgd-eval"):
        # an attack's step: the input gradient alone, every parameter frozen
        module.train(setting.mode == "pgd-train")
        module.requires_grad_(False)
        x_attack = x.detach().requires_grad_(True)

        def attack_forward():
            with autocast(setting):
                return run(x_attack)

        def attack_step():
            out = attack_forward()
            if case.level == "unit":
                loss = (out * inputs["dy"].to(out.dtype)).sum()
            else:
                loss = F.cross_entropy(out.float(), inputs["labels"])
            (grad,) = torch.autograd.grad(loss, x_attack)
            return grad
        return Runner(attack_step, forward=attack_forward, state=state, profiled=contender in FUSED_BACKEND)

    module.train()
    optimizer = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
    x_train = x.detach().requires_grad_(case.level == "unit")   # a unit's input gradient is part of its work

    def forward():
        with autocast(setting):
            return run(x_train)

    def step():
        optimizer.zero_grad(set_to_none=True)
        x_train.grad = None
        out = forward()
        if case.level == "unit":
            out.backward(inputs["dy"].to(out.dtype))
        else:
            F.cross_entropy(out.float(), inputs["labels"]).backward()
        optimizer.step()
        return out.detach()
    return Runner(step, forward=forward, state=state, profiled=contender in FUSED_BACKEND)


# -- conv level ------------------------------------------------------------------------
def eager_conv_bnrelu(x, weight, scale, shift, stride: int):
    """BN-apply, ReLU, conv and the batch statistics of its output, as eager PyTorch runs them."""
    c = x.shape[1]
    a = torch.relu_(torch.addcmul(shift.view(1, c, 1, 1).to(x.dtype), x, scale.view(1, c, 1, 1).to(x.dtype)))
    y = F.conv2d(a, weight.to(x.dtype), stride=stride, padding=weight.shape[-1] // 2)
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=0)
    return y, mean, var


def _fused_operator(contender: str):
    """The ``conv_bnrelu`` operator of a fused backend, or why it is not there."""
    namespace = OP_NAMESPACE[contender]
    try:
        if contender == "fused-triton":
            importlib.import_module("fused_preact.kernels.ops")
        else:
            from fused_preact import _extension
            if not _extension.available():
                return None, _extension.unavailable_reason()
    except Exception as error:   # noqa: BLE001 - a backend that fails to load says why
        return None, f"its operators failed to load: {type(error).__name__}: {error}"
    try:
        return getattr(getattr(torch.ops, namespace), "conv_bnrelu"), None
    except (AttributeError, RuntimeError):
        return None, f"torch.ops.{namespace}.conv_bnrelu is not registered in this version of fused-preact"


def _conv_runner(contender: str, case: Case, setting: Setting, inputs: dict):
    x, weight, scale, shift = inputs["x"], inputs["weight"], inputs["scale"], inputs["shift"]
    stride = case.conv.stride
    if contender == "eager":
        return Runner(lambda: eager_conv_bnrelu(x, weight, scale, shift, stride)[0])
    if contender in COMPILE_MODE:
        torch._dynamo.reset()
        compiled = torch.compile(eager_conv_bnrelu, mode=COMPILE_MODE[contender])
        return Runner(lambda: compiled(x, weight, scale, shift, stride)[0])
    if contender == "cudnn-fe":
        try:
            graph = cudnn_fused.ConvGenstats(x, weight, scale, shift, stride)
        except Exception as error:   # noqa: BLE001 - cuDNN says why it does not support the graph
            return f"cuDNN cannot build the graph: {type(error).__name__}: {error}"
        return Runner(lambda: graph()[0])
    op, reason = _fused_operator(contender)
    if op is None:
        return reason
    x_nhwc = x.permute(0, 2, 3, 1)       # channels_last NCHW is NHWC-contiguous
    return Runner(lambda: op(x_nhwc, weight, scale, shift, None, stride, True)[0].permute(0, 3, 1, 2))
