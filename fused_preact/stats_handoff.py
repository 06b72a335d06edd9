"""Statistics handed from one fused unit to the next on the tensor they describe.

A pre-activation unit's first BN needs the batch statistics of its input x. When x is
the output of the previous fused unit, that unit's last conv computed them in its
epilogue for free (``want_stats``); handing them over saves the next unit a pass over x.
They travel as an attribute of the output tensor itself, and the next unit takes them
only when its input IS that tensor, unchanged:

- a forward pre-hook that returns another input (``x * 2``), or a forward hook that
  returns another output, gives a tensor without them: the statistics are computed from it;
- an in-place change (``x.mul_(2)``, ``relu_``) bumps the tensor's version counter, which
  is recorded with them: not taken either;
- they live and die with the tensor (no model-level state, nothing held between steps), and
  the units are called as ``unit(x)``, so hooks on a unit see tensors.

Which units compute output statistics is decided once, by ``convert_to_fused``
(``link_units``): those followed by a fused pre-activation unit in an ``nn.Sequential``
chain; computing them for a unit whose output goes elsewhere only wastes the epilogue's
work, never changes a result.

CUDA graph capture runs this Python code as is. ``torch.compile`` cannot read version
counters while it traces (they become unknown runtime values), so there the unit relies on
how it is called instead (``FusedUnitMixin.forward``): statistics are handed over only
between two units that are neighbours in one ``nn.Sequential`` (nothing runs between their
calls but hooks), the first without forward hooks and the second without forward pre-hooks.
Code that calls such neighbours by hand and changes the first one's output in place between
them, inside a compiled region, would not be seen.
"""
from __future__ import annotations

from typing import Optional

import torch

_ATTRIBUTE = "_fused_preact_statistics"


def _inference(t: torch.Tensor) -> bool:
    """An inference tensor (made under ``torch.inference_mode``): it has no version counter."""
    return t.is_inference()


def attach(y: torch.Tensor, partials) -> None:
    """Record ``partials`` (per-channel statistics of ``y``'s values now) on ``y``."""
    if torch.compiler.is_compiling():
        setattr(y, _ATTRIBUTE, (partials, None))
    elif not _inference(y):
        setattr(y, _ATTRIBUTE, (partials, y._version))


def partials_of(x: torch.Tensor) -> Optional[tuple]:
    """The statistics recorded on ``x``, if ``x`` has not changed since (while compiling: if it
    is that tensor, see the module docstring); else None."""
    entry = getattr(x, _ATTRIBUTE, None)
    if entry is None:
        return None
    if torch.compiler.is_compiling():
        return entry[0]
    if entry[1] is None or _inference(x) or entry[1] != x._version:
        return None
    return entry[0]
