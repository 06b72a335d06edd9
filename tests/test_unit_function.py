"""The fused unit's forward/backward decomposition, run on the float64 reference operators,
against the eager units: output, every gradient, running statistics, BN modes, chaining."""
import copy

import pytest
import torch

from fused_preact import reference_ops
from fused_preact.unit_function import run_fused_unit
from fused_preact.units import PreActBlock, PreActBottleneck
from comparisons import perturb_bn

TOL = dict(rtol=1e-9, atol=1e-9)


def run_both(unit, x, *, fused_ops=reference_ops.REFERENCE_BACKEND):
    eager = copy.deepcopy(unit)
    fused = copy.deepcopy(unit)
    x_e = x.clone().requires_grad_(True)
    x_f = x.clone().requires_grad_(True)
    y_e = eager(x_e)
    y_f, _ = run_fused_unit(fused_ops, fused, x_f)
    dy = torch.randn_like(y_e)
    (y_e * dy).sum().backward()
    (y_f * dy).sum().backward()
    return eager, fused, (x_e, y_e), (x_f, y_f)


def assert_same(eager, fused, e, f):
    torch.testing.assert_close(f[1], e[1], **TOL)
    assert f[1].is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(f[0].grad, e[0].grad, **TOL)
    named = dict(fused.named_parameters())
    for name, p in eager.named_parameters():
        torch.testing.assert_close(named[name].grad, p.grad, **TOL, msg=lambda m: f"{name}: {m}")
    buffers = dict(fused.named_buffers())
    for name, b in eager.named_buffers():
        torch.testing.assert_close(buffers[name], b, **TOL, msg=lambda m: f"{name}: {m}")


UNITS = [
    ("basic identity", lambda: PreActBlock(5, 5), (3, 5, 7, 9)),
    ("basic stride2 B", lambda: PreActBlock(3, 6, stride=2), (2, 3, 9, 7)),
    ("basic stride2 A", lambda: PreActBlock(4, 6, stride=2, projection="A"), (3, 4, 9, 9)),
    ("basic widen B", lambda: PreActBlock(3, 5), (1, 3, 7, 7)),
    ("bottleneck identity", lambda: PreActBottleneck(8, 8), (3, 8, 7, 9)),
    ("bottleneck stride 1x1", lambda: PreActBottleneck(4, 12, stride=2), (2, 4, 9, 7)),
    ("bottleneck stride 3x3", lambda: PreActBottleneck(4, 12, stride=2, stride_on="3x3"), (2, 4, 15, 9)),
    ("basic stride2 raw", lambda: PreActBlock(3, 6, stride=2, projection="raw"), (2, 3, 9, 7)),
    ("basic widen raw", lambda: PreActBlock(3, 5, projection="raw"), (1, 3, 7, 7)),
    ("bottleneck stride 3x3 raw", lambda: PreActBottleneck(4, 12, stride=2, projection="raw", stride_on="3x3"),
     (2, 4, 9, 7)),
]


@pytest.mark.parametrize("name,make,shape", UNITS, ids=[u[0] for u in UNITS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_matches_eager_in_float64(name, make, shape, train):
    unit = perturb_bn(make().double()).train(train)
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3
    assert_same(*run_both(unit, x))


@pytest.mark.parametrize("momentum", [None, 0.3])
def test_running_statistics_over_several_steps(momentum):
    unit = perturb_bn(PreActBlock(4, 4).double())
    for m in unit.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = momentum
    eager, fused = copy.deepcopy(unit), copy.deepcopy(unit)
    for _ in range(3):
        x = torch.randn(2, 4, 5, 5, dtype=torch.float64) * 3 + 1
        eager(x)
        run_fused_unit(reference_ops.REFERENCE_BACKEND, fused, x)
    for (name, b), f in zip(eager.named_buffers(), fused.buffers()):
        torch.testing.assert_close(f, b, **TOL, msg=lambda m: f"{name}: {m}")
    assert int(fused.bn1.num_batches_tracked) == 3


def test_without_running_statistics_uses_batch_statistics_in_eval():
    unit = PreActBlock(3, 3).double()
    for m in unit.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.track_running_stats = False
            m.running_mean = m.running_var = m.num_batches_tracked = None
    unit.eval()
    assert_same(*run_both(unit, torch.randn(2, 3, 7, 7, dtype=torch.float64)))


def test_chained_statistics_equal_a_fresh_pass():
    first, second = PreActBlock(4, 4).double(), perturb_bn(PreActBlock(4, 4).double())
    x = torch.randn(3, 4, 7, 7, dtype=torch.float64) + 2
    y, stats = run_fused_unit(reference_ops.REFERENCE_BACKEND, copy.deepcopy(first), x, want_stats=True)
    chained, _ = run_fused_unit(reference_ops.REFERENCE_BACKEND, copy.deepcopy(second), y, stats_in=stats)
    fresh, _ = run_fused_unit(reference_ops.REFERENCE_BACKEND, copy.deepcopy(second), y)
    torch.testing.assert_close(chained, fresh, **TOL)
    mean, m2, n = reference_ops.merge_partials(*stats)
    y64 = y.double()
    torch.testing.assert_close(mean, y64.mean((0, 2, 3)), **TOL)
    torch.testing.assert_close(m2 / n, y64.var((0, 2, 3), unbiased=False), **TOL)


def test_nchw_input_and_autocast_dtypes():
    unit = perturb_bn(PreActBlock(4, 4))
    x = torch.randn(2, 4, 7, 7)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y_e = copy.deepcopy(unit)(x)
        y_f, _ = run_fused_unit(reference_ops.REFERENCE_BACKEND, copy.deepcopy(unit), x)
    assert y_f.dtype == y_e.dtype == torch.float32   # bf16 branch + fp32 identity shortcut
    torch.testing.assert_close(y_f, y_e, rtol=0.05, atol=0.05)


def test_training_with_one_value_per_channel_raises_like_batchnorm():
    with pytest.raises(ValueError, match="Expected more than 1 value per channel when training"):
        run_fused_unit(reference_ops.REFERENCE_BACKEND, PreActBlock(3, 3).double(), torch.randn(1, 3, 1, 1, dtype=torch.float64))
