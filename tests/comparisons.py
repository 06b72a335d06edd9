"""Helpers the unit tests share: non-trivial BN state, a relative error measure, one step of two models compared."""
from __future__ import annotations

import torch


def perturb_bn(module: torch.nn.Module) -> torch.nn.Module:
    """Non-trivial BN parameters and running statistics (never the init values), in place."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                if m.weight is not None:
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


def assert_same_step(reference: torch.nn.Module, converted: torch.nn.Module, x: torch.Tensor,
                     tolerance: float = 1e-10) -> None:
    """One forward and backward of both on ``x`` with the same output gradient (training: batch
    statistics and running updates; or eval): outputs, input and parameter gradients and buffers
    (running statistics) within ``tolerance`` (``relative_error``), all under the original
    state_dict names and in the same order."""
    results = []
    for model in (reference, converted):
        model.zero_grad(set_to_none=True)
        xd = x.clone().requires_grad_(True)
        y = model(xd)
        if not results:
            dy = torch.randn_like(y)
        (y * dy.to(y.device)).sum().backward()
        results.append((y.detach().cpu(), xd.grad.cpu(), model.state_dict(keep_vars=True)))
    (y0, dx0, state0), (y1, dx1, state1) = results
    assert relative_error(y1, y0) <= tolerance, "output"
    assert relative_error(dx1, dx0) <= tolerance, "input gradient"
    assert list(state1) == list(state0)
    for name, t0 in state0.items():
        t1 = state1[name]
        if isinstance(t0, torch.nn.Parameter):
            assert relative_error(t1.grad.cpu(), t0.grad.cpu()) <= tolerance, f"{name}.grad"
        elif t0.is_floating_point():
            assert relative_error(t1.detach().cpu(), t0.cpu()) <= tolerance, name
        else:
            assert torch.equal(t1.cpu(), t0.cpu()), name


def assert_processes_match_one(parts: list, y: torch.Tensor, dx: torch.Tensor, grads: dict, state: dict,
                               tol: float = 1e-9) -> None:
    """``parts[r] = (y, dx, grads, state)`` of rank r's shard of a synchronized-BN step against one
    process's whole-batch step: outputs and input gradients concatenate to it, local parameter
    gradients sum to it (DDP averages them), every rank's buffers equal it."""
    close = dict(rtol=tol, atol=tol)
    torch.testing.assert_close(torch.cat([p[0] for p in parts]), y, **close)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), dx, **close)
    for name, grad in grads.items():
        torch.testing.assert_close(sum(p[2][name] for p in parts), grad, **close, msg=lambda m: f"{name}: {m}")
    for name, value in state.items():
        for p in parts:
            torch.testing.assert_close(p[3][name], value, **close, msg=lambda m: f"{name}: {m}")
