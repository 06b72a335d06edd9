"""Only the gradients asked for, and NaN as eager.

Gradient selection: the backend's operators are counted through a counting operator set (the unit
operators take their backend by name, so the test registers ``"counting-<backend>"`` around the real
one): with frozen parameters ``torch.autograd.grad(loss, x)`` runs no ``conv_wgrad``; with x needing
no gradient the first unit forms no input gradient; the gradients that are formed equal eager's.

NaN: one NaN pixel in x, fused against eager in float64 on both backends, train and eval: the output
is NaN exactly where eager's is, and every gradient equals eager's, NaN positions included (eager's
ReLU keeps a NaN and its backward passes the gradient where the ReLU's output is NaN).
"""
from __future__ import annotations

import collections
import copy

import pytest
import torch

from comparisons import perturb_bn
from fused_preact import dispatch
from fused_preact.fused import FusedOriginalBottleneck, FusedPreActBlock, FusedPreActBottleneck
from fused_preact import unit_function
from fused_preact.unit_ops import OPERATORS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "cuda"]

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


class CountingOps:
    """A backend's operators, each call counted by name."""

    def __init__(self, backend: str):
        self.backend, self.calls = backend, collections.Counter()

    def __getattr__(self, name):
        if name not in OPERATORS:
            raise AttributeError(name)
        op = getattr(dispatch._registry[self.backend].ops(), name)

        def counted(*args, **kwargs):
            self.calls[name] += 1
            return op(*args, **kwargs)
        return counted


@pytest.fixture
def counting(monkeypatch):
    """``counting(backend, x)``: the unit operators' backend ``backend`` with its operator calls counted
    (skips when the backend cannot run x)."""
    def install(backend: str, x) -> CountingOps:
        reason = dispatch.unavailable_reason(backend, x)
        if reason is not None:
            pytest.skip(reason)
        ops = CountingOps(backend)
        monkeypatch.setitem(unit_function._OPERATOR_SETS, backend, lambda: ops)
        return ops
    return install


UNITS = {
    "preact bottleneck B": (lambda b, m: FusedPreActBottleneck(8, 16, 2, backend=b, memory=m), 3),
    "original bottleneck B+bn": (lambda b, m: FusedOriginalBottleneck(8, 16, 2, backend=b, memory=m), 3),
}


def _pair(name, backend, memory, train):
    make, convs = UNITS[name]
    unit = perturb_bn(make(backend, memory)).double().train(train)
    eager = copy.deepcopy(unit)
    eager.backend = "eager"
    return unit, eager, convs


def _freeze(*modules):
    for module in modules:
        for p in module.parameters():
            p.requires_grad_(False)


# by default: both kinds on the C++ CPU kernels in both memory modes and BN modes, one Triton case
@pytest.mark.default_cases(keep=lambda p: p["backend"] == "cuda" or (p["memory"] == "min" and p["train"]
                                                                     and p["name"].startswith("preact")))
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", UNITS)
@pytest.mark.parametrize("memory", ["default", "min"])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_input_gradient_only_runs_no_weight_gradient(backend, name, memory, train, counting):
    """An attack's step: all parameters frozen, torch.autograd.grad(loss, x)."""
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    ops = counting(backend, x.to(DEVICE))
    unit, eager, convs = _pair(name, backend, memory, train)
    _freeze(unit, eager)
    unit.to(DEVICE)
    dy = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    xe, xf = x.clone().requires_grad_(True), x.to(DEVICE).requires_grad_(True)
    (dx_eager,) = torch.autograd.grad((eager(xe) * dy).sum(), xe)
    ops.calls.clear()
    (dx,) = torch.autograd.grad((unit(xf) * dy.to(DEVICE)).sum(), xf)
    assert ops.calls["conv_wgrad"] == 0, ops.calls
    assert ops.calls["conv_dgrad"] == convs + 1, ops.calls      # every conv and the projection
    torch.testing.assert_close(dx.cpu(), dx_eager, rtol=1e-10, atol=1e-10)


@pytest.mark.default_cases(keep=lambda p: p["backend"] == "cuda")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", UNITS)
@pytest.mark.parametrize("memory", ["default", "min"])
def test_without_an_input_gradient_the_first_unit_forms_none(backend, name, memory, counting):
    """x needs no gradient (the first unit after a frozen stem): no input gradient is formed, every
    parameter gradient is eager's."""
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    ops = counting(backend, x.to(DEVICE))
    unit, eager, convs = _pair(name, backend, memory, True)
    unit.to(DEVICE)
    dy = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    (eager(x) * dy).sum().backward()
    ops.calls.clear()
    (unit(x.to(DEVICE)) * dy.to(DEVICE)).sum().backward()
    if name.startswith("preact"):
        # BN 1 gets its weight gradient from conv 1's data gradient, and finishes no input gradient
        assert ops.calls["bn_backward_finish"] == convs - 1, ops.calls
        assert ops.calls["conv_dgrad"] == convs + 1, ops.calls   # the projection's joins conv 1's
    else:
        # conv 1 reads x: no data gradient, nor the projection's
        assert ops.calls["conv_dgrad"] == convs - 1, ops.calls
    assert ops.calls["conv_wgrad"] == convs + 1, ops.calls
    params = dict(unit.named_parameters())
    for n, p in eager.named_parameters():
        torch.testing.assert_close(params[n].grad.cpu(), p.grad, rtol=1e-10, atol=1e-10, msg=n)


@pytest.mark.default_cases(ids=["cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_convs_run_no_weight_gradient_and_frozen_bns_still_pass_gradients(backend, counting):
    """Fine-tuning the BNs alone: conv weights frozen, BN parameters trained; then the reverse."""
    x = torch.randn(2, 8, 8, 8, dtype=torch.float64)
    ops = counting(backend, x.to(DEVICE))
    unit, eager, convs = _pair("preact bottleneck B", backend, "default", True)
    unit.to(DEVICE)
    dy = torch.randn(2, 16, 4, 4, dtype=torch.float64)
    for frozen in ("conv", "bn"):
        for module in (unit, eager):
            module.zero_grad(set_to_none=True)
            for n, p in module.named_parameters():
                p.requires_grad_(not n.startswith(frozen) and not (frozen == "conv" and n.startswith("shortcut")))
        ops.calls.clear()
        (eager(x) * dy).sum().backward()
        (unit(x.to(DEVICE)) * dy.to(DEVICE)).sum().backward()
        assert ops.calls["conv_wgrad"] == (0 if frozen == "conv" else convs + 1), (frozen, ops.calls)
        params = dict(unit.named_parameters())
        for n, p in eager.named_parameters():
            assert (params[n].grad is None) == (p.grad is None), n
            if p.grad is not None:
                torch.testing.assert_close(params[n].grad.cpu(), p.grad, rtol=1e-10, atol=1e-10, msg=n)


# -- NaN ------------------------------------------------------------------------------------------
NAN_UNITS = [
    ("preact basic B", lambda b: FusedPreActBlock(4, 8, 2, backend=b)),
    ("preact bottleneck", lambda b: FusedPreActBottleneck(8, 8, backend=b)),
    ("original bottleneck B+bn", lambda b: FusedOriginalBottleneck(4, 8, 2, backend=b)),
]


# by default: every case on the C++ CPU kernels; on Triton's interpreter NaN through the original unit
# (the conv prologue of conv2 and conv3, their dgrad masks, bn_add_relu forward and backward)
@pytest.mark.default_cases(ids=["nan-train-original bottleneck B+bn-triton"],
                           keep=lambda p: p["backend"] == "cuda")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make", NAN_UNITS, ids=[u[0] for u in NAN_UNITS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_input_as_eager(backend, name, make, train, value):
    x = torch.randn(2, make("eager").in_channels, 8, 8, dtype=torch.float64)
    x[1, 0, 3, 5] = value
    reason = dispatch.unavailable_reason(backend, x.to(DEVICE))
    if reason is not None:
        pytest.skip(reason)
    unit = perturb_bn(make(backend)).double().train(train)
    eager = copy.deepcopy(unit)
    eager.backend = "eager"
    results = []
    for module, device in ((eager, "cpu"), (unit.to(DEVICE), DEVICE)):
        xd = x.to(device).requires_grad_(True)
        y = module(xd)
        dy = torch.linspace(-1, 1, y.numel(), dtype=torch.float64).reshape(y.shape).to(device)
        (y * dy).sum().backward()
        results.append((y.detach().cpu(), xd.grad.cpu()))
    (y_eager, dx_eager), (y, dx) = results
    assert torch.equal(torch.isnan(y), torch.isnan(y_eager))
    torch.testing.assert_close(y, y_eager, rtol=1e-10, atol=1e-10, equal_nan=True)
    torch.testing.assert_close(dx, dx_eager, rtol=1e-10, atol=1e-10, equal_nan=True)
    params = dict(unit.named_parameters())
    for n, p in eager.named_parameters():
        torch.testing.assert_close(params[n].grad.cpu(), p.grad, rtol=1e-10, atol=1e-10, equal_nan=True, msg=n)
    buffers = dict(unit.named_buffers())
    for n, b in eager.named_buffers():
        got = buffers[n].cpu()
        if value != value:
            torch.testing.assert_close(got, b, rtol=1e-10, atol=1e-10, equal_nan=True, msg=n)
        else:   # an infinite batch mean: eager's is +-inf, the partials' merge (Chan) may give NaN: both non-finite
            assert torch.equal(torch.isfinite(got), torch.isfinite(b)), n
            torch.testing.assert_close(got[torch.isfinite(b)], b[torch.isfinite(b)], rtol=1e-10, atol=1e-10, msg=n)
