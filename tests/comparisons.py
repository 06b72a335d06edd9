"""Helpers the unit tests share: non-trivial BN state and a relative error measure."""
from __future__ import annotations

import torch


def perturb_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN parameters and running statistics (never the init values), in place."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                if m.running_mean is not None:
                    m.running_mean.uniform_(-0.3, 0.3)
                    m.running_var.uniform_(0.5, 2.0)
    return module


def relative_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    """Largest absolute difference relative to the largest magnitude of ``expected``."""
    scale = expected.double().abs().max().clamp_min(1e-6)
    return ((got.double() - expected.double()).abs().max() / scale).item()
