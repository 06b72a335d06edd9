"""One accuracy rule for every comparison with float64: a result is as good as eager's when its error
is at most ``FACTOR`` times eager PyTorch's own error in the same dtype.

Both ``python -m fused_preact.check`` (every operator and unit form on a device) and the units'
self-check (``fused_preact.self_check``, once per configuration on its device) judge with
``judge``: the fused result's error against the float64 reference, divided by the error eager
PyTorch makes in that dtype against the same reference (floored at ``rounding_unit``: a result eager
gets exactly, e.g. a count or a float64 sum, is no division by zero, and float32 errors of a few
dozen rounding steps are summation order, not a wrong kernel), must be at most ``FACTOR``. Errors are norm-wise relative, ``||a - exact|| / ||exact||`` in float64: one
number per tensor that rounding moves by about the dtype's epsilon and a wrong result by far more
(a running mean against the spread of what it averages: ``error_of_mean``). NaN or a wrong shape
is an infinite error.

Why a factor and not a tolerance: the same kernel is right at 4e-3 in bf16 and wrong at 4e-3 in
float32; eager's error in the same dtype, on the same input, says which. The fused kernels round
at the same points as eager or fewer (one rounding after an fp32 residual add where eager rounds
twice), so on a correct backend the ratio stays near 1; but a one-pass float32 variance is a few
rounding steps worse than eager's. Measured with the C++ CPU kernels and Triton's interpreter
(``python -m fused_preact.check --device cpu``, 256 rows): at most 2.5 with the floors below; a
unit's float32 running variance once 4.5 and a small original bottleneck's float32 output 8 over
eager's own error before the float32 floor took 64 rounding steps (both false failures). An operator
off by 1% gives ratios of 10^2 to 10^12. ``FACTOR`` = 8.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

# a result passes when its error is at most this many times eager's (see the module docstring)
FACTOR = 8.0


# Rounding steps (machine epsilons) under which an error is never a wrong kernel, per dtype. float32:
# a one-pass float32 variance (the C++ CPU kernels') and another summation order cost a few steps,
# and through a unit's BN normalisations several (measured: 8 steps of output error on the CPU
# kernels for a 6-channel original bottleneck, eager 1): 64 steps, 7.6e-6, far under the 1e-3 and
# more of a wrong kernel. float64: eager computes with the reference's own float64 arithmetic (error
# 0), so the floor covers a reordered long sum. bf16 / fp16: one step (eager's own error is about
# that anyway).
FLOOR_STEPS = {torch.float32: 64, torch.float64: 64}


def rounding_unit(dtype: torch.dtype) -> float:
    """The floor of eager's error in ``dtype``: ``FLOOR_STEPS`` machine epsilons (float32's for
    non-float types)."""
    dtype = dtype if dtype.is_floating_point else torch.float32
    return FLOOR_STEPS.get(dtype, 1) * torch.finfo(dtype).eps


def normwise_error(got: torch.Tensor, exact: torch.Tensor) -> float:
    """``||got - exact|| / ||exact||`` (Frobenius norms, in float64); 0 for two zero tensors, inf for
    a NaN, an infinity or a shape that differs."""
    if tuple(got.shape) != tuple(exact.shape):
        return math.inf
    got, exact = got.detach().double(), exact.detach().to(device=got.device, dtype=torch.float64)
    if not bool(torch.isfinite(got).all()) and bool(torch.isfinite(exact).all()):
        return math.inf
    difference, norm = (got - exact).norm().item(), exact.norm().item()
    if norm == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / norm


def error_of_mean(mean: torch.Tensor, exact_mean: torch.Tensor, exact_var: torch.Tensor) -> float:
    """``||mean - exact_mean|| / ||sqrt(exact_var)||``: a (running) mean's error in units of the spread
    of what it averages. Relative to the mean itself it would measure how close to 0 the mean is (a
    running mean of zero-mean data is all rounding), not how well it was computed."""
    if tuple(mean.shape) != tuple(exact_mean.shape):
        return math.inf
    mean = mean.detach().double()
    exact_mean = exact_mean.detach().to(device=mean.device, dtype=torch.float64)
    spread = exact_var.detach().to(device=mean.device, dtype=torch.float64).clamp_min(0).sqrt().norm().item()
    difference = (mean - exact_mean).norm().item()
    if not math.isfinite(difference):
        return math.inf
    return (0.0 if difference == 0.0 else math.inf) if spread == 0.0 else difference / spread


@dataclass(frozen=True)
class Verdict:
    """A fused result's error and eager's against the same float64 reference, in ``dtype``;
    ``condition``: how much the problem itself magnifies a rounding of its inputs (1 for most
    results; a variance of data with mean m and variance v: 1 + m^2 / v, since a one-pass fp32
    variance loses that many rounding steps however it is merged)."""
    error: float
    eager_error: float
    dtype: torch.dtype
    condition: float = 1.0

    @property
    def floor(self) -> float:
        return rounding_unit(self.dtype) * self.condition

    @property
    def ratio(self) -> float:
        """The error as a multiple of eager's (eager's floored at ``floor``)."""
        return self.error / max(self.eager_error, self.floor) if math.isfinite(self.error) else math.inf

    @property
    def passed(self) -> bool:
        return self.ratio <= FACTOR

    def __str__(self) -> str:
        floored = "" if self.eager_error >= self.floor else f", floored at {self.floor:.1e}"
        return f"{self.error:.2e} = {self.ratio:.2f}x eager's {self.eager_error:.2e}{floored}"


def judge(error: float, eager_error: float, dtype: torch.dtype, condition: float = 1.0) -> Verdict:
    """The rule: ``error <= FACTOR * max(eager_error, rounding_unit(dtype) * condition)``
    (``Verdict.passed``)."""
    return Verdict(float(error), float(eager_error), dtype, max(1.0, float(condition)))


def variance_condition(mean: torch.Tensor, var: torch.Tensor) -> float:
    """``1 + m^2 / v`` of the worst channel: how many rounding steps a float32 variance of data with
    per-channel mean m and variance v loses to the offset (1 for centred data)."""
    mean, var = mean.detach().double(), var.detach().to(device=mean.device, dtype=torch.float64)
    ratio = mean.square() / var.clamp_min(torch.finfo(torch.float64).tiny)
    return 1.0 + float(ratio.max()) if ratio.numel() else 1.0


def worst(verdicts: dict) -> Optional[tuple[str, Verdict]]:
    """The (name, verdict) of the largest ratio in ``{name: Verdict}``; None when empty."""
    if not verdicts:
        return None
    name = max(verdicts, key=lambda k: verdicts[k].ratio)
    return name, verdicts[name]
