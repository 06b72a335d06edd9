"""The one dispatch layer between fused units and their backends.

A fused unit asks ``resolve_backend(requested, x)`` which backend runs it, then
``run_unit(name, unit, x)``. Kernel backends (Triton in ``kernels/``, the C++/CUDA
extension in ``csrc/``) plug in with ``register_unit_backend``; nothing outside
this module and the backends' own wrappers touches a kernel.

``"auto"`` takes the first registered backend that can run the input, in the
order of ``AUTO_ORDER``, and otherwise the eager path with a single warning that
says why no kernel could run.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

BACKENDS = ("auto", "triton", "cuda", "eager")
AUTO_ORDER = ("cuda", "triton")

# Why a backend cannot run when it has not registered itself.
_NOT_REGISTERED = {
    "triton": "the Triton kernels of the pre-activation unit are not part of this version of fused-preact",
    "cuda": "the C++/CUDA extension provides no fused pre-activation unit in this version of fused-preact",
}


@dataclass(frozen=True)
class UnitBackend:
    """A backend that runs a whole fused unit.

    ``unavailable(x)`` returns why the backend cannot run input ``x`` (wrong
    device, missing build, ...) or ``None`` when it can; ``forward(unit, x)``
    computes the unit's output with autograd support.
    """
    name: str
    unavailable: Callable[[torch.Tensor], Optional[str]]
    forward: Callable[[nn.Module, torch.Tensor], torch.Tensor]


_registry: dict[str, UnitBackend] = {}
_warned: set[str] = set()


def register_unit_backend(backend: UnitBackend) -> None:
    check_backend(backend.name)
    if backend.name in ("auto", "eager"):
        raise ValueError(f"backend.name {backend.name!r} is reserved")
    _registry[backend.name] = backend


def check_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def unavailable_reason(name: str, x: torch.Tensor) -> Optional[str]:
    """Why backend ``name`` cannot run input ``x``; ``None`` when it can."""
    check_backend(name)
    if name in ("auto", "eager"):
        return None
    backend = _registry.get(name)
    if backend is None:
        return _NOT_REGISTERED[name]
    return backend.unavailable(x)


def available_backends(x: torch.Tensor) -> list[str]:
    """The concrete backends that can run ``x``, ``"eager"`` always last."""
    return [n for n in AUTO_ORDER if unavailable_reason(n, x) is None] + ["eager"]


def resolve_backend(requested: str, x: torch.Tensor) -> str:
    """The concrete backend that runs ``x`` for a unit built with ``backend=requested``.

    An explicit backend that cannot run raises; ``"auto"`` falls back to eager
    with one warning per distinct reason.
    """
    check_backend(requested)
    if requested == "auto":
        reasons = []
        for name in AUTO_ORDER:
            reason = unavailable_reason(name, x)
            if reason is None:
                return name
            reasons.append(f"{name}: {reason}")
        message = ("fused-preact: no fused kernel can run this input, so fused units run the eager "
                   "PyTorch path (" + "; ".join(reasons) + ")")
        # warn from eager code only: a warning would break a torch.compile(fullgraph=True) graph
        if message not in _warned and not torch.compiler.is_compiling():
            _warned.add(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        return "eager"
    reason = unavailable_reason(requested, x)
    if reason is not None:
        raise RuntimeError(f"backend={requested!r} cannot run here: {reason}. "
                           f"Use backend='auto' to pick what can run, or backend='eager'.")
    return requested


def run_unit(name: str, unit: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Run ``unit`` on ``x`` with the registered kernel backend ``name``."""
    return _registry[name].forward(unit, x)
