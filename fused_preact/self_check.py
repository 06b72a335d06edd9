"""Fused units verify themselves on the device they run on, once per configuration.

The first time a fused unit configuration (its structure and shapes, the backend, the device, the
activation dtype and autocast dtype, training or eval, the memory mode) is about to run fused, the
library runs it once on a small sample on that device -- fused, eager PyTorch in the same dtype, and
eager float64 -- and judges every result with ``accuracy.judge`` (the rule of ``python -m
fused_preact.check``: the fused error at most ``accuracy.FACTOR`` times eager's own). A
configuration that fails runs eager PyTorch from then on, with one warning that gives the measured
errors; one that passes runs fused with no further cost. Units of one configuration share the
verdict.

What it costs: nothing per step once a configuration is known (``checked_backend`` looks up a small
key in the unit's own dict: no tensor is read back to the host). The check itself runs in plain
eager execution only: never while torch.compile or the TorchScript tracer traces, a CUDA graph
captures, a torch.func transform, a TorchDispatchMode or saved-tensor hooks are active (then the unit runs as resolved and
is checked at a later plain call). It works on deep copies of the unit without the user's hooks: parameters, running
statistics and the autograd graph of the real call are untouched.

Turned off by ``FUSED_PREACT_SELF_CHECK=0`` in the environment or ``set_enabled(False)`` (for users
who ran ``python -m fused_preact.check`` on the machine); ``convert_to_fused`` of a model already
on its device runs the same check there (``check_replacement_on_device``), under the same switch.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import threading
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import accuracy, dispatch

ENVIRONMENT_VARIABLE = "FUSED_PREACT_SELF_CHECK"
# the values per channel each BN sees in the sample at least (well-conditioned batch statistics)
VALUES_PER_CHANNEL = 16
MAX_SAMPLE_BATCH = 64

_enabled: Optional[bool] = None        # set_enabled(); None: the environment decides
_verdicts: dict[tuple, "UnitCheck"] = {}   # configuration -> its check (shared by equal units)
_warned: set[tuple] = set()
_state = threading.local()             # .checking: a check is running on this thread (its copies run unchecked)
# the forward and backward hooks a copy drops (state_dict hooks stay)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")
_CACHE = "_fused_preact_checked"       # the unit's own {local key: passed} (not state)


def enabled() -> bool:
    """Whether units check themselves: ``set_enabled``'s choice, else FUSED_PREACT_SELF_CHECK != "0"."""
    if _enabled is not None:
        return _enabled
    return os.environ.get(ENVIRONMENT_VARIABLE, "1").strip() != "0"


def set_enabled(flag: Optional[bool]) -> None:
    """Turn the first-use check on or off for this process (None: the environment variable decides)."""
    global _enabled
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"flag must be True, False or None, got {flag!r}")
    _enabled = flag


def forget() -> None:
    """Forget every verdict of this process (units already told keep theirs)."""
    _verdicts.clear()
    _warned.clear()


@dataclass
class UnitCheck:
    """One configuration's check: per row (output, input gradient, parameter gradients, running
    statistics) the fused and eager errors against float64 (``accuracy.Verdict``), or why the fused
    run failed outright."""
    description: str
    verdicts: dict = field(default_factory=dict)
    failure: Optional[str] = None

    @property
    def passed(self) -> bool:
        return self.failure is None and all(v.passed for v in self.verdicts.values())

    def errors(self) -> str:
        """The measured errors, worst first, in words."""
        if self.failure is not None:
            return self.failure
        rows = sorted(self.verdicts.items(), key=lambda kv: -kv[1].ratio)
        return "; ".join(f"{name} {verdict}" for name, verdict in rows)


# -- the one call in the fused unit's forward ------------------------------------------------------
def checked_backend(unit: nn.Module, x: torch.Tensor, name: str) -> str:
    """The backend ``unit`` runs ``x`` with: ``name`` (as resolved), or ``"eager"`` when this
    configuration failed its check. Checks it first when it has not been checked and a check can
    run now (see the module docstring)."""
    if name == "eager":
        return name
    if torch.compiler.is_compiling():   # traced: honour a verdict already known, check nothing
        known = getattr(unit, _CACHE, None)
        return name if not known or known.get(_local_key(unit, x, name), True) else "eager"
    if getattr(_state, "checking", False):
        return name
    local = _local_key(unit, x, name)
    known = getattr(unit, _CACHE, None)
    if known is not None and local in known:
        return name if known[local] else "eager"
    if not enabled() or not _plain_execution(x):
        return name
    key = (configuration_key(unit), local)
    check = _verdicts.get(key)
    if check is None:
        check = run_check(unit, x, name)
        if check is None:            # the yardsticks could not run (out of memory...): not judged
            return name
        _verdicts[key] = check
    if not check.passed and key not in _warned:
        _warned.add(key)
        warnings.warn(f"fused-preact: {check.description} failed its first-use check against eager PyTorch on "
                      f"{x.device} ({check.errors()}; the rule: at most {accuracy.FACTOR:g}x eager's error in that "
                      f"dtype). This configuration runs eager PyTorch from now on ({ENVIRONMENT_VARIABLE}=0 turns "
                      f"the check off).", RuntimeWarning, stacklevel=3)
    if known is None:
        known = {}
        object.__setattr__(unit, _CACHE, known)   # a plain attribute: not a submodule, not state
    known[local] = check.passed
    return name if check.passed else "eager"


def _local_key(unit: nn.Module, x: torch.Tensor, name: str) -> tuple:
    device_type = x.device.type
    autocast = torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    return (x.device, x.dtype, autocast, name, unit.training, getattr(unit, "memory", "default"))


def _plain_execution(x: torch.Tensor) -> bool:
    """No tracing (torch.compile, torch.export, the TorchScript tracer), capture, functorch transform,
    dispatch mode or saved-tensor hooks (offloading, a measurement of what autograd saves: the check's
    own backward would run through them): a check may run now."""
    if torch.compiler.is_compiling() or torch.jit.is_tracing():
        return False
    saved_tensor_hooks = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    if saved_tensor_hooks is not None and saved_tensor_hooks(False) is not None:
        return False
    if x.device.type == "cuda" and torch.cuda.is_current_stream_capturing():
        return False
    from torch.utils._python_dispatch import _get_current_dispatch_mode
    if _get_current_dispatch_mode() is not None:
        return False
    transforms_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
    if torch._C._functorch.is_functorch_wrapped_tensor(x) or transforms_active():
        return False
    return not isinstance(x, torch._subclasses.FakeTensor)


def configuration_key(unit: nn.Module) -> tuple:
    """What decides a unit's computation: classes, scalar settings and parameter / buffer shapes and
    dtypes of the unit and its submodules. Units with equal keys compute alike."""
    parts = []
    for path, m in unit.named_modules():
        settings = tuple(sorted((k, v if isinstance(v, (bool, int, float, str, type(None))) else repr(v))
                                for k, v in vars(m).items()
                                if not k.startswith("_") and k != "training"
                                and isinstance(v, (bool, int, float, str, tuple, list, type(None)))))
        tensors = tuple((k, None if t is None else (tuple(t.shape), t.dtype))
                        for k, t in list(m._parameters.items()) + list(m._buffers.items()))
        parts.append((path, type(m), settings, tensors))
    return (getattr(unit, "conv_padding", None), tuple(parts))


# -- the check -------------------------------------------------------------------------------------
@contextlib.contextmanager
def suspended():
    """Units run unchecked inside (the check's own copies; ``unit_guard``'s float64 proof, which
    compares with eager itself)."""
    previous = getattr(_state, "checking", False)
    _state.checking = True
    try:
        yield
    finally:
        _state.checking = previous


def _copy(unit: nn.Module) -> nn.Module:
    """A deep copy without the user's hooks, unsynchronized (the check is local to this process)."""
    replica = copy.deepcopy(unit)
    for m in replica.modules():
        for name in _HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks:
                hooks.clear()
    if getattr(replica, "stats_group", None) is not None:
        replica.stats_group = None
    replica.__dict__.pop(_CACHE, None)
    return replica


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype the unit's convolutions run in: autocast's, else x's."""
    device_type = x.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else x.dtype


def sample_like(unit: nn.Module, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A random input of x's device, dtype, memory format, channels and spatial size, with a batch
    just large enough that every BN sees ``VALUES_PER_CHANNEL`` values per channel after the unit's
    stride. Under autocast its values are those of the autocast dtype: a fused unit rounds a
    float32 input to it before its first BN (and computes what eager computes on the rounded
    input), so eager and float64 must start from the same values."""
    _, channels, height, width = x.shape
    stride = int(getattr(unit, "stride", 1) or 1)
    per_image = max(1, math.ceil(height / stride) * math.ceil(width / stride))
    batch = min(MAX_SAMPLE_BATCH, max(2, math.ceil(VALUES_PER_CHANNEL / per_image)))
    sample = torch.randn(batch, channels, height, width, generator=generator, dtype=torch.float64) * 1.5 + 0.3
    fmt = torch.channels_last if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous() \
        else torch.contiguous_format
    rounded = compute_dtype(x)
    if rounded != x.dtype and rounded.itemsize < x.dtype.itemsize:
        sample = sample.to(rounded)
    return sample.to(device=x.device, dtype=x.dtype).contiguous(memory_format=fmt)


@dataclass
class _Step:
    """What one forward and backward of a copy gives, by name."""
    tensors: dict          # output, input gradient, parameter gradients ("<name>.grad")
    statistics: dict       # floating buffers after the step (running statistics)
    counters: dict         # integer buffers (num_batches_tracked)


def _step(unit: nn.Module, x: torch.Tensor, dy, forward: Callable) -> tuple[_Step, torch.Tensor]:
    """One forward and backward; ``dy``: the output gradient, or a generator to draw it from (float64,
    on x's device). Returns the step and the dy used."""
    x = x.detach().clone().requires_grad_(True)
    y = forward(unit, x)
    if isinstance(dy, torch.Generator):
        dy = torch.randn(y.shape, generator=dy, dtype=torch.float64).to(y.device)
    y.backward(dy.to(y.dtype))
    tensors = {"output": y.detach(), "input gradient": x.grad}
    tensors.update({f"{n}.grad": p.grad for n, p in unit.named_parameters() if p.grad is not None})
    statistics = {n: b.detach().clone() for n, b in unit.named_buffers() if b.is_floating_point()}
    counters = {n: b.detach().clone() for n, b in unit.named_buffers() if not b.is_floating_point()}
    return _Step(tensors, statistics, counters), dy


def _errors(step: _Step, exact: _Step) -> dict:
    """{row: error} of one run against the float64 run: the largest error over each row's tensors."""
    rows = {"output": [], "input gradient": [], "parameter gradients": [], "running statistics": []}
    for name, t in step.tensors.items():
        row = name if name in rows else "parameter gradients"
        rows[row].append(accuracy.normwise_error(t, exact.tensors.get(name, t.new_empty(0))))
    for name, t in step.statistics.items():
        variance = name[:-len("running_mean")] + "running_var" if name.endswith("running_mean") else None
        rows["running statistics"].append(
            accuracy.error_of_mean(t, exact.statistics[name], exact.statistics[variance])
            if variance in exact.statistics else accuracy.normwise_error(t, exact.statistics[name]))
    for name, t in step.counters.items():
        rows["running statistics"].append(0.0 if torch.equal(t.cpu(), exact.counters[name].cpu()) else math.inf)
    return {row: max(values) for row, values in rows.items() if values}


def describe(unit: nn.Module, x: torch.Tensor, name: str) -> str:
    """The configuration in words, for messages."""
    autocast = compute_dtype(x)
    precision = str(x.dtype).replace("torch.", "") + (
        f" under autocast to {str(autocast).replace('torch.', '')}" if autocast != x.dtype else "")
    return (f"{type(unit).__name__}({getattr(unit, 'in_channels', '?')} channels in, stride "
            f"{getattr(unit, 'stride', '?')}, memory={getattr(unit, 'memory', 'default')!r}, "
            f"{'training' if unit.training else 'eval'}) with the {dispatch.describe_backend(name, x.device)} "
            f"in {precision}")


def compare_unit(unit: nn.Module, x: torch.Tensor, name: str, seed: int = 0) -> UnitCheck:
    """``unit``'s configuration run with backend ``name`` against eager PyTorch on a sample like ``x``
    (see ``sample_like``): the rows of errors judged by ``accuracy.judge``. Raises what the eager or
    float64 runs raise; a failure of the fused run is recorded as the check's failure."""
    description = describe(unit, x, name)
    device = x.device
    generator = torch.Generator().manual_seed(seed)
    dtype = compute_dtype(x)
    eager_forward = lambda m, v: m._eager_forward(v)   # noqa: E731
    with suspended(), torch.inference_mode(False), torch.enable_grad():
        sample = sample_like(unit, x, generator)
        fused, eager, exact = _copy(unit), _copy(unit), _copy(unit).double()
        fused._set_backend(name)
        with torch.autocast(device.type, enabled=False):   # the float64 yardstick runs without autocast
            reference, dy = _step(exact, sample.double(), generator, eager_forward)
        baseline, _ = _step(eager, sample, dy, eager_forward)
        try:
            result, _ = _step(fused, sample, dy, lambda m, v: m(v))
        except Exception as error:   # a kernel that cannot run here: the unit must not run it either
            return UnitCheck(description, failure=f"the fused run raised {type(error).__name__}: {error}")
    fused_errors, eager_errors = _errors(result, reference), _errors(baseline, reference)
    verdicts = {row: accuracy.judge(error, eager_errors.get(row, 0.0), dtype) for row, error in fused_errors.items()}
    return UnitCheck(description, verdicts)


def run_check(unit: nn.Module, x: torch.Tensor, name: str) -> Optional[UnitCheck]:
    """``compare_unit`` for the first use of a configuration, or None when its eager yardsticks
    cannot run (the unit is then not judged)."""
    try:
        return compare_unit(unit, x, name)
    except Exception:   # eager or float64 failed (out of memory, an input eager refuses): not judged
        return None


# -- convert_to_fused -------------------------------------------------------------------------------
def _fused_backend_for(requested: str, probe: torch.Tensor) -> Optional[str]:
    """The fused backend ``requested`` ("auto" or explicit) would run ``probe`` with, quietly (no
    warning); None for eager."""
    if requested == "eager":
        return None
    if requested != "auto":
        return requested if dispatch.unavailable_reason(requested, probe) is None else None
    for name in dispatch.AUTO_ORDER:
        if dispatch.unavailable_reason(name, probe) is None and dispatch.slower_than_eager(name, probe) is None:
            return name
    return None


def check_replacement_on_device(unit: nn.Module, build: Callable[[nn.Module], nn.Module], in_channels: int,
                                backend: str, size: int) -> Optional[str]:
    """For ``convert_to_fused``: None when the fused twin ``build(copy of unit)`` passes the check on
    ``unit``'s own device and parameter dtype with the backend it would run there (nothing to check
    when that is eager, or the check is off), else what differs, with the measured errors. The
    verdict is remembered for the converted units' first call."""
    if not enabled():
        return None
    parameter = next(unit.parameters(), None)
    if parameter is None:
        return None
    probe = torch.empty(2, in_channels, size, size, device=parameter.device, dtype=parameter.dtype)
    name = _fused_backend_for(backend, probe)
    if name is None or not _plain_execution(probe):
        return None
    with suspended():
        try:
            twin = build(_copy(unit))
        except Exception:   # the float64 guard reports a mapping the fused class cannot hold
            return None
    twin.train(unit.training)
    check = run_check(twin, probe, name)
    if check is None:
        return None
    _verdicts[(configuration_key(twin), _local_key(twin, probe, name))] = check
    if check.passed:
        return None
    return (f"on {parameter.device} ({str(parameter.dtype).replace('torch.', '')}, "
            f"{dispatch.describe_backend(name, parameter.device)}) the fused unit is further from float64 "
            f"than eager PyTorch: {check.errors()} (the rule: at most {accuracy.FACTOR:g}x eager's error)")
