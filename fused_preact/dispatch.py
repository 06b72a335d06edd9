"""The one dispatch layer between fused units and their backends.

A fused unit asks ``resolve_backend(requested, x)`` which backend runs it, then
``run_unit(name, unit, x, stats_in, want_stats)``. A backend is a namespace of the
operators of ``unit_ops`` (same schemas everywhere) plus a check of what it can
run; ``unit_function`` computes the unit with whichever namespace it is given.
Nothing outside this module touches ``kernels/`` or the extension's kernels.

- ``"triton"``: ``torch.ops.fused_preact_triton`` (``kernels/ops.py``); CUDA tensors,
  or CPU tensors in Triton's interpreter (``TRITON_INTERPRET=1``).
- ``"cuda"``: ``torch.ops.fused_preact`` (the C++/CUDA extension ``csrc/``); CUDA
  tensors when built with CUDA, and CPU tensors through its C++ CPU kernels.

``"auto"`` takes the first backend that can run the input, in the order of
``AUTO_ORDER``, and is not slower than eager there, and otherwise the eager path with a
single warning that says why; on a GPU, passing over a backend that cannot run there (the
extension built without code for this compute capability, say) is one warning too, naming
the backend it runs instead. A backend runs only where it has code: the ``cuda`` backend
reports itself unavailable on a GPU its build has neither machine code nor PTX for
(``_extension.capability_problem``), Triton below compute capability 8.0. On CPU tensors that excludes Triton's interpreter (a
correctness tool, far slower than eager) and the C++ CPU kernels outside the sizes where
``bench/unit_cpu.py`` measured them not slower than eager (``CPU_AUTO_MIN_ELEMENTS``:
none so far, figures in ``notes/cpp_ops.md``). An explicit backend always runs as asked.
"""
from __future__ import annotations

import importlib
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import nn

from . import _extension
from .unit_function import Partials, register_operator_set, run_fused_unit
from .unit_ops import OPERATORS

BACKENDS = ("auto", "triton", "cuda", "eager")
AUTO_ORDER = ("cuda", "triton")
# "auto" runs a CPU tensor with the C++ CPU kernels only when it is channels_last (the fused unit
# copies NCHW input to channels_last and back) and has at least this many elements (N*C*H*W of the
# unit's input); None: never. bench/unit_cpu.py measured the whole unit's training step, fused against
# eager, at 2k to 2M elements (basic and bottleneck units, 16 to 256 channels, float32 and bf16
# autocast) on the 2-core dev VM: no size at which the fused step was reliably not slower (three quiet
# runs, float32: mostly 0.8-0.99x, 0.48-1.30x in all, no win repeated; bf16: 0.64-0.99x;
# notes/cpp_ops.md, "auto on CPU tensors"), so "auto" runs CPU tensors eager; backend="cuda" runs the
# C++ CPU kernels.
CPU_AUTO_MIN_ELEMENTS: Optional[int] = None

@dataclass(frozen=True)
class UnitBackend:
    """A backend that runs a whole fused unit.

    ``unavailable(x)`` returns why the backend cannot run input ``x`` (wrong
    device, missing build, unsupported dtype) or ``None`` when it can; ``ops()``
    returns the namespace holding its ``unit_ops`` operators, loading them first (the unit
    operators call it by the backend's name, also in a process that loaded an exported program).
    """
    name: str
    unavailable: Callable[[torch.Tensor], Optional[str]]
    ops: Callable[[], Any]


_registry: dict[str, UnitBackend] = {}
_warned: set[str] = set()


def register_unit_backend(backend: UnitBackend) -> None:
    check_backend(backend.name)
    if backend.name in ("auto", "eager"):
        raise ValueError(f"backend.name {backend.name!r} is reserved")
    _registry[backend.name] = backend
    register_operator_set(backend.name, backend.ops)


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def unavailable_reason(name: str, x: torch.Tensor) -> Optional[str]:
    """Why backend ``name`` cannot run input ``x``; ``None`` when it can."""
    check_backend(name)
    if name in ("auto", "eager"):
        return None
    return _registry[name].unavailable(x)


def available_backends(x: torch.Tensor) -> list[str]:
    """The concrete backends that can run ``x``, ``"eager"`` always last."""
    return [n for n in AUTO_ORDER if unavailable_reason(n, x) is None] + ["eager"]


def slower_than_eager(name: str, x: torch.Tensor) -> Optional[str]:
    """Why ``"auto"`` leaves backend ``name`` out for input ``x`` although it can run it (it measured
    slower than eager there); ``None`` when it does not."""
    if x.device.type != "cpu":
        return None
    if name == "triton":
        return ("on CPU tensors the Triton kernels run in Triton's interpreter, far slower than eager "
                "(backend='triton' runs them)")
    if name == "cuda" and CPU_AUTO_MIN_ELEMENTS is None:
        return ("the C++ extension's CPU kernels measured slower than eager on CPU tensors "
                "(backend='cuda' runs them)")
    if name == "cuda" and (x.numel() < CPU_AUTO_MIN_ELEMENTS
                           or not x.is_contiguous(memory_format=torch.channels_last)):
        return (f"the C++ extension's CPU kernels measured slower than eager on CPU inputs under "
                f"{CPU_AUTO_MIN_ELEMENTS:,} elements or not channels_last (backend='cuda' runs them)")
    return None


def describe_backend(name: str, device) -> str:
    """What runs when backend ``name`` runs a tensor on ``device``, in words (for messages)."""
    check_backend(name)
    cpu = torch.device(device).type == "cpu"
    if name == "cuda":
        return f"cuda backend: C++ extension, {'CPU' if cpu else 'CUDA'} kernels"
    if name == "triton":
        return "triton backend: Triton kernels" + (" in Triton's interpreter on the CPU" if cpu else " on the GPU")
    return "eager PyTorch" if name == "eager" else "auto: chosen per input"


def describe_auto(x: torch.Tensor) -> str:
    """What ``"auto"`` runs for inputs like ``x`` (its device and dtype), in words, with the CPU size
    rule when it applies."""
    for name in AUTO_ORDER:
        if unavailable_reason(name, x) is None:
            if x.device.type == "cpu" and name == "cuda" and CPU_AUTO_MIN_ELEMENTS is not None:
                return (f"{describe_backend(name, x.device)} for channels_last inputs of at least "
                        f"{CPU_AUTO_MIN_ELEMENTS:,} elements, eager PyTorch below")
            if slower_than_eager(name, x) is None:
                return describe_backend(name, x.device)
    return describe_backend("eager", x.device)


def resolve_backend(requested: str, x: torch.Tensor, *, synchronized: bool = False) -> str:
    """The concrete backend that runs ``x`` for a unit built with ``backend=requested``.

    An explicit backend that cannot run raises; ``"auto"`` falls back to eager with one warning
    per distinct reason. ``synchronized``: the unit's BN statistics are synchronized across
    processes (``sync_batch_stats``), which only the fused path does, so "auto" then takes any
    fused backend that can run, slower or not.
    """
    check_backend(requested)
    if requested == "auto":
        reasons = []
        for name in AUTO_ORDER:
            reason = unavailable_reason(name, x)
            if reason is None:
                reason = None if synchronized else slower_than_eager(name, x)
                if reason is None:
                    if reasons and x.device.type == "cuda":   # a GPU input passed over a backend: say so
                        _warn_once(f"fused-preact: 'auto' runs this input with the {describe_backend(name, x.device)} "
                                   f"({'; '.join(reasons)})")
                    return name
            reasons.append(f"{name}: {reason}")
        _warn_once("fused-preact: 'auto' runs this input on the eager PyTorch path: no fused kernel runs it "
                   "faster, or at all (" + "; ".join(reasons) + ")")
        return "eager"
    reason = unavailable_reason(requested, x)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} cannot run here: {reason}. "
                           f"Use backend='auto' to pick what can run, or backend='eager'.")
    return requested


def _warn_once(message: str) -> None:
    # warn from eager code only: a warning would break a torch.compile(fullgraph=True) graph
    if message not in _warned and not torch.compiler.is_compiling():
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=4)


def backend_ops(name: str):
    """The namespace of backend ``name``'s ``unit_ops`` operators (``torch.ops.fused_preact_triton``,
    ``torch.ops.fused_preact``), as ``run_unit`` uses it."""
    check_backend(name)
    if name not in _registry:
        raise ValueError(f"backend {name!r} has no operators (it is not a kernel backend)")
    return _registry[name].ops()


def run_unit(name: str, unit: nn.Module, x: torch.Tensor, stats_in: Optional[Partials] = None,
             want_stats: bool = False) -> tuple[torch.Tensor, Optional[Partials]]:
    """Run ``unit`` on ``x`` with kernel backend ``name``; see ``unit_function.run_fused_unit``."""
    return run_fused_unit(name, unit, x, stats_in, want_stats)


# -- the two kernel backends ------------------------------------------------------
_FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _mark_constant(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result``: evaluated once while tracing, never traced into. Done
    as torch's decorator does it (torch 2.4 to 2.14: one attribute, which dynamo reads when it meets a
    call) without importing ``torch._dynamo`` (1.7 s of every ``import fused_preact`` here);
    tests/test_triton_ops.py checks that torch's decorator sets nothing else."""
    fn._dynamo_marked_constant = True
    return fn


@_mark_constant   # evaluated once while tracing, never traced into
def _triton_import_error() -> Optional[str]:
    try:
        importlib.import_module("fused_preact.kernels.ops")   # imports triton, registers torch.ops.fused_preact_triton
    except ImportError as error:
        return f"the Triton kernels cannot be imported ({error})"
    return None


@_mark_constant
def _triton_interpreting() -> bool:
    return importlib.import_module("fused_preact.kernels.runtime").interpreting()


def device_capability(device: torch.device) -> tuple[int, int]:
    """The compute capability of CUDA ``device`` (one place, so tests can fake another GPU)."""
    return tuple(torch.cuda.get_device_capability(device))


def _triton_unavailable(x: torch.Tensor) -> Optional[str]:
    error = _triton_import_error()
    if error is not None:
        return error
    if x.device.type == "cuda":
        if device_capability(x.device) < (8, 0):
            return f"the Triton kernels need compute capability 8.0 or newer, {x.device} has less"
    elif x.device.type != "cpu" or not _triton_interpreting():
        return (f"x is on {x.device}: the Triton kernels run on CUDA tensors (CPU tensors only in "
                f"Triton's interpreter, TRITON_INTERPRET=1 set before triton is imported)")
    if x.dtype not in _FLOAT_DTYPES:
        return f"the Triton kernels take float32, float64, float16 and bfloat16, not {x.dtype}"
    return None


def _triton_ops():
    importlib.import_module("fused_preact.kernels.ops")   # registers torch.ops.fused_preact_triton
    return torch.ops.fused_preact_triton


@_mark_constant
def _extension_error() -> Optional[str]:
    if not _extension.available():
        return _extension.unavailable_reason()
    if not all(hasattr(torch.ops.fused_preact, name) for name in OPERATORS):
        return "the built extension predates the fused-unit operators; rebuild it (`pip install -e .`)"
    if not any(a.name == "padding" for a in torch.ops.fused_preact.conv_bnrelu.default._schema.arguments):
        return ("the built extension predates the conv operators' padding argument, which every fused unit "
                "passes; rebuild it (`pip install -e .`)")
    return None


@_mark_constant
def _extension_has_cuda() -> bool:
    """Built with CUDA *and* the fused-unit operators have CUDA kernels registered."""
    return _extension.built_with_cuda() and all(
        torch._C._dispatch_has_kernel_for_dispatch_key(f"fused_preact::{name}", "CUDA") for name in OPERATORS)


def _cuda_unavailable(x: torch.Tensor) -> Optional[str]:
    error = _extension_error()
    if error is not None:
        return error
    if x.device.type == "cuda" and not _extension_has_cuda():
        return ("the extension has no CUDA kernels for the fused-unit operators (built without its CUDA "
                "part, or a version whose CUDA operators are not written yet)")
    if x.device.type == "cuda":
        problem = _extension.capability_problem(device_capability(x.device))
        if problem is not None:
            return problem
    if x.device.type not in ("cpu", "cuda"):
        return f"the extension has CPU and CUDA kernels, x is on {x.device}"
    return None


def _cuda_ops():
    if not _extension.available():
        raise RuntimeError(f"the cuda backend cannot run: {_extension.unavailable_reason()}")
    return torch.ops.fused_preact


register_unit_backend(UnitBackend("triton", _triton_unavailable, _triton_ops))
register_unit_backend(UnitBackend("cuda", _cuda_unavailable, _cuda_ops))
