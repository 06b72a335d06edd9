"""memory="min" for the fused original (post-activation) units: the unit saves x, its output y (the
ReLU mask; the next unit's input in a chain) and per-channel statistics, and its backward recomputes
h_1 .. h_k and the projection's h_s with the forward's own calls.

- the two modes give the same outputs, input and parameter gradients and running statistics (float64:
  1e-12 relative), every original form, on the C++ CPU kernels (backend="cuda" on CPU tensors) and in
  Triton's interpreter; bf16 autocast bitwise on the C++ CPU kernels;
- the running statistics are updated once (num_batches_tracked 1 after a step, eager's values);
- what is saved: x and y alone per unit; torchvision's ResNet-50 (its 16 Bottlenecks replaced by
  fused by convert_to_fused) saves at most 0.6x eager's activation bytes;
- the constructors and convert_to_fused take ``memory``; torch.compile(fullgraph=True) runs the recompute.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from comparisons import perturb_bn, relative_error
from fused_preact import (FusedOriginalBlock, FusedOriginalBottleneck, OriginalBlock, OriginalBottleneck,
                          convert_to_fused, dispatch)
from fused_preact.fused import _FusedUnitMixin

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import memory as memory_bench  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = 1e-12    # float64, relative to the largest magnitude

# name, constructor (backend, memory), input shape; every BN normalizes >= 16 values per channel
UNITS = [
    ("basic identity", lambda b, m: FusedOriginalBlock(5, 5, backend=b, memory=m), (3, 5, 7, 9)),
    ("basic s2 A", lambda b, m: FusedOriginalBlock(4, 6, stride=2, projection="A", backend=b, memory=m),
     (3, 4, 9, 7)),
    ("basic s2 B+BN", lambda b, m: FusedOriginalBlock(3, 7, stride=2, backend=b, memory=m), (2, 3, 9, 7)),
    ("bottleneck s2 3x3 B+BN", lambda b, m: FusedOriginalBottleneck(6, 12, stride=2, backend=b, memory=m),
     (2, 6, 9, 11)),
    ("bottleneck s2 1x1 B+BN",
     lambda b, m: FusedOriginalBottleneck(5, 8, stride=2, stride_on="1x1", backend=b, memory=m), (2, 5, 9, 11)),
]
MORE_UNITS = [
    ("basic s2 B", lambda b, m: FusedOriginalBlock(3, 7, stride=2, shortcut_bn=False, backend=b, memory=m),
     (2, 3, 9, 11)),
    ("basic conv1x1", lambda b, m: FusedOriginalBlock(4, 4, shortcut="conv1x1", backend=b, memory=m),
     (2, 4, 5, 7)),
    ("bottleneck identity", lambda b, m: FusedOriginalBottleneck(8, 8, backend=b, memory=m), (2, 8, 5, 7)),
    ("bottleneck s2 1x1 A",
     lambda b, m: FusedOriginalBottleneck(4, 8, stride=2, projection="A", stride_on="1x1", backend=b, memory=m),
     (3, 4, 7, 9)),
]
# the default run: the five forms on the C++ CPU kernels, the projection with its BN (h_s recomputed)
# in Triton's interpreter
DEFAULT_CASES = [("cuda", u) for u in UNITS] + [("triton", UNITS[2])]
FULL_CASES = ([("cuda", u) for u in MORE_UNITS]
              + [("triton", u) for u in UNITS + MORE_UNITS if u is not UNITS[2]])


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


def _step(unit, x, dy, autocast_dtype=None):
    """One step of ``unit`` on ``x``: output, input gradient, parameter gradients, buffers (by name)."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y = unit(x)
    (y * dy.to(y.dtype)).sum().backward()
    return ({"output": y.detach(), "input grad": x.grad}
            | {f"{n}.grad": p.grad for n, p in unit.named_parameters()}
            | {n: b.clone() for n, b in unit.named_buffers()})


def _both_modes(make, backend, shape, dtype, train=True, autocast_dtype=None):
    """The results of one step in the default mode and in memory="min", same weights and data."""
    torch.manual_seed(0)
    unit = perturb_bn(make(backend, "default")).to(DEVICE, dtype).train(train)
    low = copy.deepcopy(unit)
    low._set_memory("min")
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(DEVICE, dtype)
    _need(backend, x)
    with torch.no_grad():
        out_shape = copy.deepcopy(unit)(x).shape
    dy = torch.randn(out_shape, dtype=torch.float64).to(DEVICE)
    return [_step(module, x, dy, autocast_dtype) for module in (unit, low)]


def _assert_same(default, low, name, exact=False):
    assert default.keys() == low.keys()
    for key, a in default.items():
        b = low[key]
        if exact:
            assert torch.equal(a, b), f"{name}: {key} differs"
        else:
            error = relative_error(b.cpu(), a.cpu())
            assert error <= EXACT, f"{name}: {key} differs by {error:.3g} relative"


# with --full: the default run has this in tests/test_unit_cross_product.py
# (memory="min" against eager, every shortcut form, both backends)
@pytest.mark.full
@pytest.mark.parametrize("backend,case", DEFAULT_CASES, ids=[f"{b}-{u[0]}" for b, u in DEFAULT_CASES])
def test_min_equals_default_in_float64(backend, case):
    name, make, shape = case
    default, low = _both_modes(make, backend, shape, torch.float64)
    assert default["output"].abs().max() > 0 and low["input grad"].abs().max() > 0
    _assert_same(default, low, name)


@pytest.mark.full
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,case", DEFAULT_CASES + FULL_CASES,
                         ids=[f"{b}-{u[0]}" for b, u in DEFAULT_CASES + FULL_CASES])
def test_min_equals_default_every_form_and_mode(backend, case, train):
    name, make, shape = case
    dtype = torch.float64 if backend == "cuda" or DEVICE == "cpu" else torch.float32
    default, low = _both_modes(make, backend, shape, dtype, train)
    if dtype == torch.float64:
        _assert_same(default, low, name)
    else:   # float32 on a GPU's Triton kernels: the same kernels on the same inputs, the same bits
        _assert_same(default, low, name, exact=True)


@pytest.mark.parametrize("precision", ["bf16 autocast", pytest.param("fp16", marks=pytest.mark.full)])
def test_min_equals_default_bitwise_in_half_precision(precision):
    """The backward recomputes h_i and h_s with the forward's kernel on the forward's inputs: the same bits."""
    for name, make, shape in (UNITS[2], UNITS[4]):
        if precision == "fp16":
            default, low = _both_modes(make, "cuda", shape, torch.float16)
        else:
            default, low = _both_modes(make, "cuda", shape, torch.float32, autocast_dtype=torch.bfloat16)
        _assert_same(default, low, name, exact=True)


def test_running_statistics_are_updated_once():
    """One training step with memory="min": every BN (the projection's too) counts one batch and holds
    eager's running statistics (the recompute never finalizes a BN again)."""
    torch.manual_seed(0)
    eager = perturb_bn(OriginalBottleneck(6, 12, stride=2)).double()
    fused = convert_to_fused(copy.deepcopy(eager), "cuda", memory="min")
    assert isinstance(fused, FusedOriginalBottleneck) and fused.memory == "min"
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64) * 2 + 1
    _need("cuda", x)
    for module in (eager, fused):
        xi = x.clone().requires_grad_(True)
        module(xi).square().sum().backward()
    names = ("bn1", "bn2", "bn3", "shortcut_bn")
    for name in names:
        ours, reference = getattr(fused, name), getattr(eager, name)
        assert int(ours.num_batches_tracked) == 1, name
        for stat in ("running_mean", "running_var"):
            error = relative_error(getattr(ours, stat), getattr(reference, stat))
            assert error <= 1e-12, f"{name}.{stat}: {error:.3g}"


def test_min_saves_the_input_and_output_only():
    """Saved activations of one training forward (bench/memory.py's count): default x, h_1 .. h_k, h_s
    and y; memory="min" x and y."""
    x = torch.randn(2, 8, 9, 11)
    _need("cuda", x)
    x = x.contiguous(memory_format=torch.channels_last)    # the unit keeps x itself, no NHWC copy
    sizes = {}
    for memory in ("default", "min"):
        torch.manual_seed(0)
        unit = FusedOriginalBottleneck(8, 16, stride=2, backend="cuda", memory=memory)
        xi = x.clone().requires_grad_(True)
        seen = memory_bench.saved_storages(lambda: unit(xi), list(unit.parameters()) + list(unit.buffers()),
                                           x.shape[0])
        sizes[memory] = sorted(s.nbytes for s in seen.values() if s.activation)
    x_bytes = x.numel() * 4
    y_bytes = 2 * 16 * 5 * 6 * 4
    assert sizes["min"] == sorted([x_bytes, y_bytes]), sizes
    # h_1 (4 channels, full size), h_2 (4, subsampled), h_3 and h_s (16, subsampled)
    assert sizes["default"] == sorted([x_bytes, x_bytes // 2, y_bytes // 4, y_bytes, y_bytes, y_bytes]), sizes


def _torchvision_resnet50_fused(model: nn.Module, memory: str) -> nn.Module:
    """A converted copy of torchvision's ``model`` (C++ backend): all 16 Bottlenecks fused."""
    fused, report = convert_to_fused(copy.deepcopy(model), "cuda", memory=memory, return_report=True)
    assert report.num_fused == report.num_units == 16, report.summary()
    return fused


@pytest.mark.full   # about 5 s here; the memory modes of original units run by default on the nets above
def test_torchvision_resnet50_saves_at_most_0_6x_eagers_activations():
    """Saved activation bytes of one training forward of the real torchvision ResNet-50 (64 px, batch 2,
    float32, fused units on the C++ CPU kernels), counted as bench/memory.py counts them."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.resnet50().train()
    x = torch.randn(2, 3, 64, 64)
    _need("cuda", x)
    eager = memory_bench.saved_bytes(model, x, None)["saved_bytes"]
    ratios = {memory: memory_bench.saved_bytes(_torchvision_resnet50_fused(model, memory), x, None)["saved_bytes"]
              / eager for memory in ("default", "min")}
    print(f"torchvision resnet50, 64 px, batch 2, fp32: saved activations vs eager's {eager / 2**20:.2f} MiB: "
          f"fused {ratios['default']:.3f}x, fused memory='min' {ratios['min']:.3f}x")
    assert ratios["min"] <= 0.6, ratios
    assert ratios["min"] < ratios["default"] < 1.0, ratios


def test_constructors_and_convert_take_memory():
    assert FusedOriginalBlock(4, 4, memory="min").memory == "min"
    assert FusedOriginalBottleneck(4, 8, memory="min").memory == "min"
    assert FusedOriginalBlock(4, 4).memory == "default"
    for make in (lambda: FusedOriginalBlock(4, 4, memory="low"), lambda: FusedOriginalBottleneck(4, 8, memory=1)):
        with pytest.raises(ValueError, match=r"memory must be one of \('default', 'min'\), got"):
            make()
    model = nn.Sequential(OriginalBlock(4, 4), OriginalBottleneck(4, 8, stride=2))
    convert_to_fused(model, "cuda", memory="min")
    units = [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]
    assert len(units) == 2 and all(u.memory == "min" for u in units)
    assert "memory=min" in repr(units[1])


def test_training_step_compiles_without_graph_breaks():
    """torch.compile(fullgraph=True) of an original unit with memory="min" (the recompute in the backward)."""
    x = torch.randn(4, 8, 6, 6, device=DEVICE)
    _need("cuda", x)
    torch.manual_seed(0)
    model = perturb_bn(FusedOriginalBottleneck(8, 16, stride=2, backend="cuda", memory="min")).to(DEVICE)
    uncompiled = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    dy = torch.randn(4, 16, 3, 3, device=DEVICE)
    (compiled(x) * dy).sum().backward()
    (uncompiled(x) * dy).sum().backward()
    for (name, p), q in zip(model.named_parameters(), uncompiled.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")
    for (name, b), c in zip(model.named_buffers(), uncompiled.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=lambda m: f"{name}: {m}")
    assert all(int(bn.num_batches_tracked) == 1 for bn in (model.bn1, model.bn2, model.bn3, model.shortcut_bn))
