"""Divergence: a run whose loss, weights, gradients, BN running statistics or optimizer state
stopped being finite.

The loss alone does not tell: in training mode a BN normalizes with the batch's statistics,
so a run can show finite losses while its running variances overflowed to inf, and its
checkpoint then evaluates to garbage. So at each window end (``--print-freq``, where the loop
reads its losses back anyway) the trainer also screens every tensor a checkpoint holds:

- ``screen()``: on the device, one L1 norm per tensor (``torch._foreach_norm``) summed per
  group into a few scalars, which the loop reads back in the same transfer as the window's
  losses: no read per step. A NaN or inf anywhere makes its group's sum non-finite. (The
  sum can also overflow for huge finite values: the screen only raises a suspicion.)
- ``non_finite()``: the exact check on a suspicion (and before every checkpoint write): the
  names of the tensors holding a NaN or an inf, per group. Only this decides that a run
  diverged.

Gradients are screened as the last step of the window left them; a non-finite gradient of an
earlier step reached the weights or the momentum through the SGD update. With ``--amp fp16``
non-finite gradients are the GradScaler's business (it skips that step and lowers the
scale), so they are left out.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import TrainerError

GROUPS = ("weights", "gradients", "BN running statistics", "optimizer state")


class Diverged(TrainerError):
    """The run stopped being finite; ``record`` is what ``diverged.json`` holds."""
    exit_status = 3

    def __init__(self, message: str, record: dict):
        super().__init__(message)
        self.record = record


@dataclass
class Findings:
    """The tensors holding a NaN or an inf, by group (``GROUPS``)."""
    names: dict[str, list[str]] = field(default_factory=dict)

    def __bool__(self) -> bool:
        return any(self.names.values())

    def describe(self, shown: int = 3) -> str:
        parts = []
        for group, names in self.names.items():
            if names:
                more = f" and {len(names) - shown} more" if len(names) > shown else ""
                parts.append(f"{group} ({', '.join(names[:shown])}{more})")
        return "; ".join(parts)


class FinitenessProbe:
    """Screens and checks the tensors of ``model`` and ``optimizer`` (see the module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, *, gradients: bool):
        self.model, self.optimizer, self.gradients = model, optimizer, gradients

    def _named(self) -> dict[str, list[tuple[str, torch.Tensor]]]:
        """The tensors of each group of ``GROUPS``, with their names, as they are now (the optimizer
        creates its state at the first step; gradients live from one backward to the next step)."""
        weights, gradients, statistics, optimizer_state = GROUPS
        params = list(self.model.named_parameters())
        names = {id(p): name for name, p in params}
        groups: dict[str, list[tuple[str, torch.Tensor]]] = {group: [] for group in GROUPS}
        groups[weights] = [(n, p.detach()) for n, p in params]
        if self.gradients:
            groups[gradients] = [(n, p.grad) for n, p in params if p.grad is not None]
        groups[statistics] = [(n, b) for n, b in self.model.named_buffers() if b.is_floating_point()]
        for p, state in self.optimizer.state.items():
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0:
                    groups[optimizer_state].append((f"{names.get(id(p), '?')}:{key}", value))
        return groups

    def screen(self) -> torch.Tensor:
        """One float32 device scalar per group of ``GROUPS``: finite when the group is (a suspicion
        otherwise). Reads nothing back."""
        sums = []
        for group in self._named().values():
            tensors = [t for _, t in group if t.numel()]
            if tensors:
                sums.append(torch.stack(torch._foreach_norm(tensors, 1)).float().sum())
            else:
                sums.append(torch.zeros((), dtype=torch.float32, device=self._device()))
        return torch.stack(sums)

    def _device(self) -> torch.device:
        return next(self.model.parameters()).device

    def non_finite(self) -> Findings:
        """The exact check (reads back one flag per tensor)."""
        findings = Findings()
        for group, named in self._named().items():
            if not named:
                findings.names[group] = []
                continue
            finite = torch.stack([torch.isfinite(t).all() for _, t in named]).cpu().tolist()
            findings.names[group] = [name for (name, _), ok in zip(named, finite) if not ok]
        return findings
