"""``to_eager``: the inverse of ``convert_to_fused``, back to plain PyTorch modules.

For export (``torch.onnx``, ``torch.jit``), deployment without this package's operators,
sharing a model with code that does not know fused units, and tools that walk modules
(thop, fvcore, torchinfo count what the modules would run). Each fused unit is replaced by
the eager module it stands for: the user's own module that ``convert_to_fused`` fused
(a ``converted.ConvertedUnit`` keeps it), or this project's eager unit class for a
``FusedPreActBlock`` and its siblings. They hold the very same submodules, parameters,
buffers and hooks, so names, tensors, an optimizer's references and state_dicts stay as
they were; ``convert_to_fused`` can fuse the model again.
"""
from __future__ import annotations

from torch import nn

from .fused import _FusedUnitMixin


def to_eager(model: nn.Module) -> nn.Module:
    """Replace every fused unit of ``model`` by its plain PyTorch module, in place.

    Returns the model, or, when ``model`` is itself a fused unit, its eager module."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if isinstance(model, _FusedUnitMixin):
        return model.eager_module()
    for name, child in list(model.named_children()):
        if isinstance(child, _FusedUnitMixin):
            setattr(model, name, child.eager_module())
        else:
            to_eager(child)
    return model
