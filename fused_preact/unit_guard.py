"""The exactness guard of ``convert_to_fused``: a fused replacement must compute what the original did.

``check_replacement(unit, build, in_channels, backend)`` copies ``unit`` to float64
on the CPU, gives its BatchNorms non-trivial parameters and running statistics
(so swapped BNs of equal width cannot pass), builds the fused twin from a second
copy with ``build``, and compares the two on a small random input in training and
in eval mode: output, input gradient, every parameter gradient and every buffer
(running statistics, ``num_batches_tracked``). The twin holds the second copy's
tensors, so the copy's own ``named_parameters`` pair them up.

The fused twin runs ``backend``: the C++ CPU kernels when the extension is built
(they take float64), else, in eager PyTorch, what the kernels would compute on the
modules the twin maps (``kernel_view.reference_forward``), which still proves the
mapping of weights, strides and shortcut. ``guard_backend()`` chooses explicitly, never
``"auto"`` (which may pick eager for small CPU inputs).
"""
from __future__ import annotations

import copy
from typing import Callable, Optional

import torch
from torch import nn

from . import dispatch, self_check

SAMPLE_SIZE = 5          # (2, C, 5, 5): odd, and 2 x 3 x 3 = 18 values per channel after a stride of 2
RELATIVE_TOLERANCE = 1e-8


def guard_backend() -> str:
    """The backend the guard's fused twin runs: ``"cuda"`` (C++ CPU kernels) if built, else ``"eager"``."""
    probe = torch.zeros(1, 1, 1, 1, dtype=torch.float64)
    return "cuda" if dispatch.unavailable_reason("cuda", probe) is None else "eager"


def describe_backend(backend: str) -> str:
    return ("the extension's C++ CPU kernels" if backend == "cuda"
            else "eager PyTorch computing what the fused kernels compute (the C++ extension is not built)")


# the forward and backward hooks (state_dict hooks stay: they keep the key names)
HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
              "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def float64_copy(module: nn.Module) -> nn.Module:
    """A float64 CPU copy of ``module`` without the user's hooks (they must not see the guard's runs),
    its ``nn.SyncBatchNorm`` modules as plain BatchNorms (see ``plain_batchnorms``)."""
    replica = plain_batchnorms(copy.deepcopy(module)).to("cpu", torch.float64)
    for m in replica.modules():
        for name in HOOK_DICTS:
            hooks = getattr(m, name, None)
            if hooks:
                hooks.clear()
    return replica


def plain_batchnorms(module: nn.Module) -> nn.Module:
    """``module`` with each ``nn.SyncBatchNorm`` inside replaced by an ``nn.BatchNorm2d`` holding its
    tensors and settings, in place: what one process computes with it, and what a copy on the CPU
    can run (a SyncBatchNorm refuses CPU inputs once a process group is initialized). The fused
    units synchronize SyncBatchNorms through the same kernels, so the mapping proven on plain BNs
    holds for them."""
    for parent in list(module.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.SyncBatchNorm:
                plain = nn.BatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                       child.track_running_stats, device="meta")
                for attribute in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
                    setattr(plain, attribute, getattr(child, attribute))
                plain.train(child.training)
                setattr(parent, name, plain)
    return module


def _perturb(module: nn.Module, generator: torch.Generator) -> None:
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                for name, low, high in (("weight", 0.5, 1.5), ("bias", -0.5, 0.5), ("running_mean", -0.3, 0.3),
                                        ("running_var", 0.5, 2.0)):
                    t = getattr(m, name)
                    if t is not None:
                        t.copy_(torch.rand(t.shape, generator=generator, dtype=t.dtype) * (high - low) + low)


def _error(got: torch.Tensor, expected: torch.Tensor) -> float:
    if got.shape != expected.shape:
        return float("inf")
    if not expected.is_floating_point():
        return 0.0 if torch.equal(got, expected) else float("inf")
    if not expected.numel():
        return 0.0
    return float((got - expected).abs().max() / expected.abs().max().clamp_min(1e-6))


def _step(module: nn.Module, x: torch.Tensor, dy: Optional[torch.Tensor], forward: Optional[Callable] = None):
    module.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_(True)
    y = (forward or module)(x)
    if dy is None:
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype)
    (y * dy).sum().backward()
    return y.detach(), x.grad, dy


def check_replacement(unit: nn.Module, build: Callable[[nn.Module], nn.Module], in_channels: int,
                      backend: str, size: int = SAMPLE_SIZE) -> Optional[str]:
    """None when ``build(copy of unit)`` computes what ``unit`` does, else what differs.
    ``size``: the sample's height and width (a unit that runs on even sizes only gets an even one)."""
    generator = torch.Generator().manual_seed(0)
    original = float64_copy(unit)
    _perturb(original, generator)
    source = copy.deepcopy(original)
    with torch.random.fork_rng(devices=[]), self_check.suspended():   # this is the check: no first-use one
        try:
            fused = build(source)
            fused._set_backend(backend)
        except Exception as error:   # a mapping the fused class cannot hold
            return f"the fused unit cannot be built ({type(error).__name__}: {error})"
        x = torch.randn(2, in_channels, size, size, generator=generator, dtype=torch.float64) * 1.5 + 0.3
        _, cannot = fused._kernel_view(x)
        if cannot is not None:      # it would run its eager computation: nothing to prove
            return f"the fused unit cannot run it ({cannot})"
        for training in (True, False):
            original.train(training)
            fused.train(training)
            source.train(training)
            y0, dx0, dy = _step(original, x, None)
            try:
                # without kernels: what they would compute, on the modules the twin maps
                y1, dx1, _ = _step(fused, x, dy, fused._reference_forward if backend == "eager" else None)
            except Exception as error:
                return f"the fused unit fails on a float64 sample ({type(error).__name__}: {error})"
            mode = "training" if training else "eval"
            pairs = [("output", y1, y0), ("input gradient", dx1, dx0)]
            theirs = dict(source.named_parameters())
            for name, p in original.named_parameters():
                q = theirs[name]
                if (p.grad is None) != (q.grad is None):
                    return f"{name} gets a gradient in one unit only ({mode})"
                if p.grad is not None:
                    pairs.append((f"{name}.grad", q.grad, p.grad))
            their_buffers = dict(source.named_buffers())
            pairs += [(name, their_buffers[name], b) for name, b in original.named_buffers()]
            for what, got, expected in pairs:
                error = _error(got.detach(), expected.detach())
                if not error <= RELATIVE_TOLERANCE:
                    return (f"the fused unit's {what} differs from the original's in {mode} mode "
                            f"(max error {error:.2g} relative to max |value|, float64)")
    return None
