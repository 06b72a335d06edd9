"""Hooks a fused unit must honour: inner-module hooks switch the unit to its eager computation.

A fused unit runs its convs and BNs inside fused kernels, not as module calls, so a hook
registered on one of them (Grad-CAM on a conv, activation statistics of a BN, a feature
extractor; forward, pre-forward or backward; before or after conversion) would never
fire. ``inner_hook`` finds such a hook; the unit then runs its eager computation, which
calls those modules, so the hook fires exactly as it would have, and warns once that the
unit runs eager, and why. Once the hook is removed the unit runs fused again.

Hooks on the fused unit itself need nothing: ``nn.Module.__call__`` runs them around the
unit's forward, fused or not, with the tensors the original module would have given them.

Global module hooks (``torch.nn.modules.module.register_module_forward_hook`` and its
siblings) fire for every module call: tools install them (``FlopCounterMode`` and
``torch.utils.module_tracker.ModuleTracker``, memory trackers) to observe what runs. A fused
unit keeps running fused under them, so they see the fused unit, not its inner modules:
forcing the eager path would make such tools measure a computation the model does not run.
``global_hooks`` says they are there, so the unit can warn once per process.

The check walks the unit's submodules' hook dictionaries (a few dict lookups per module, a
few microseconds per unit call; measured in the tests' notes); under ``torch.compile``
dynamo guards on what it reads, so adding a hook later recompiles into the eager path.
"""
from __future__ import annotations

from typing import Optional

from torch import nn
from torch.nn.modules import module as module_globals

# the dictionaries that hold a module's forward and backward hooks (the *_with_kwargs and
# *_always_called ones only flag entries of these)
HOOK_KINDS = (("_forward_pre_hooks", "forward pre-hook"), ("_forward_hooks", "forward hook"),
              ("_backward_pre_hooks", "backward pre-hook"), ("_backward_hooks", "backward hook"))
_GLOBAL_HOOKS = ("_global_forward_pre_hooks", "_global_forward_hooks", "_global_backward_pre_hooks",
                 "_global_backward_hooks")


def _has_hooks(module: nn.Module) -> bool:
    d = module.__dict__
    return bool(d.get("_forward_pre_hooks") or d.get("_forward_hooks") or d.get("_backward_pre_hooks")
                or d.get("_backward_hooks"))


def _any_hooked(modules: dict) -> bool:
    for child in modules.values():
        if child is not None and (_has_hooks(child) or _any_hooked(child.__dict__.get("_modules", {}))):
            return True
    return False


def inner_hook(unit: nn.Module) -> Optional[str]:
    """None when no module inside ``unit`` (``unit`` itself excluded) has a forward or backward
    hook; else which one has which hook, in words."""
    if not _any_hooked(unit.__dict__.get("_modules", {})):
        return None
    for name, m in unit.named_modules():
        if m is unit:
            continue
        for attribute, kind in HOOK_KINDS:
            if getattr(m, attribute):
                return f"{name} ({type(m).__name__}) has a {kind}"
    return None


def global_hooks() -> Optional[str]:
    """Which global module hooks are registered, in words; None when none is."""
    kinds = [name[len("_global_"):-1].replace("_", " ") for name in _GLOBAL_HOOKS
             if getattr(module_globals, name, None)]
    return ", ".join(f"global module {kind}" for kind in kinds) or None
