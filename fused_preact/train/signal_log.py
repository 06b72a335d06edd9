"""Signal propagation through the residual stream (paper Sec. 3: x_L = x_l + sum F).

At the iterations it is asked to record, ``SignalRecorder`` keeps, for every
residual unit l in order of depth, the norm of the unit's input x_l and of the
gradient dL/dx_l. Both are root-mean-square norms per image: ``||x||_F /
sqrt(batch)``. It uses a forward pre-hook on each unit and a gradient hook on
each input tensor, so it works with every unit variant and with fused units
alike. Norms stay on the device until ``collect()``, one transfer per record.

The gradient is of the loss that ``backward()`` saw: the caller passes the loss
scale of fp16 training so that recorded gradients are unscaled.
"""
from __future__ import annotations

import torch
from torch import nn

from ..units import ResidualUnit


class SignalRecorder:
    """Records ||x_l|| and ||dL/dx_l|| at every residual unit of ``model`` when armed."""

    def __init__(self, model: nn.Module):
        self.units = [m for m in model.modules() if isinstance(m, ResidualUnit)]
        if not self.units:
            raise ValueError("log_signal: the model has no residual units to record")
        self.armed = False
        self._x_norms: dict[int, torch.Tensor] = {}
        self._grad_norms: dict[int, torch.Tensor] = {}
        self._handles = [unit.register_forward_pre_hook(self._make_hook(depth))
                         for depth, unit in enumerate(self.units)]

    def _make_hook(self, depth: int):
        def hook(module, args):
            if not self.armed:
                return None
            x = args[0]
            scale = x.shape[0] ** -0.5
            self._x_norms[depth] = x.detach().float().norm() * scale
            if x.requires_grad:
                def grad_hook(grad):
                    self._grad_norms[depth] = grad.detach().float().norm() * scale
                x.register_hook(grad_hook)
            return None
        return hook

    def arm(self) -> None:
        """Record during the next forward and backward pass."""
        self._x_norms.clear()
        self._grad_norms.clear()
        self.armed = True

    def collect(self, loss_scale: float = 1.0) -> list[tuple[int, float, float]]:
        """(depth, ||x_l||, ||dL/dx_l||) of the armed pass, and disarm."""
        self.armed = False
        depths = sorted(self._x_norms)
        if not depths:
            return []
        x = torch.stack([self._x_norms[d] for d in depths]).cpu().tolist()
        nan = torch.tensor(float("nan"), device=self._x_norms[depths[0]].device)
        g = (torch.stack([self._grad_norms.get(d, nan) for d in depths]) / loss_scale).cpu().tolist()
        return list(zip(depths, x, g))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
