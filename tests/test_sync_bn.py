"""Synchronized BN statistics of fused units: two gloo processes, each with half the batch,
match one process with the whole batch (outputs, input and parameter gradients, running stats).
The same two processes train a converted model under DistributedDataParallel, which warns of no
gradient whose strides differ from its bucket view's (the 1x1 projections' weight gradients did)."""
import copy
import os
import sys
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from fused_preact import reference_ops
from comparisons import assert_processes_match_one
from fused_preact import sync_batch_stats
from fused_preact.fused import FusedPreActBottleneck
from fused_preact.units import PreActBottleneck
from fused_preact.unit_function import MEMORY_MODES, run_fused_unit

WORLD = 2


def _make_unit():
    torch.manual_seed(0)
    unit = FusedPreActBottleneck(8, 16, stride=2, backend="eager").double()
    with torch.no_grad():
        for m in unit.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    x = torch.randn(4, 8, 9, 7, dtype=torch.float64) * 2 + 1
    dy = torch.randn(4, 16, 5, 4, dtype=torch.float64)
    return unit, x, dy


def _step(unit, x, dy):
    x = x.clone().requires_grad_(True)
    y, _ = run_fused_unit(reference_ops.REFERENCE_BACKEND, unit, x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in unit.named_parameters()}, unit.state_dict()


def _worker(rank, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    for memory in MEMORY_MODES:   # memory="min" recomputes in the backward, with no collective
        unit, x, dy = _make_unit()
        unit._set_memory(memory)
        sync_batch_stats(unit)
        half = slice(2 * rank, 2 * rank + 2)
        torch.save(_step(unit, x[half], dy[half]), f"{out_file}.{memory}.{rank}")
    torch.save(_ddp_stride_warnings(), f"{out_file}.ddp.{rank}")
    dist.destroy_process_group()


def _ddp_stride_warnings():
    """What DistributedDataParallel warns about gradient strides over a step of a converted CIFAR
    ResNet-8 (1x1 projections) on the C++ CPU kernels; None when the extension is not built.
    (channels_last models: tests/test_unit_interop.py compares every gradient's strides.)"""
    from torch.nn.parallel import DistributedDataParallel
    from fused_preact import convert_to_fused, dispatch, models
    if dispatch.unavailable_reason("cuda", torch.zeros(1, 1, 1, 1)) is not None:
        return None
    torch.manual_seed(0)
    ddp = DistributedDataParallel(convert_to_fused(models.cifar_resnet(8, num_classes=3), backend="cuda"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ddp(torch.randn(2, 3, 8, 8)).square().sum().backward()
    return [str(w.message) for w in caught if "strides" in str(w.message)]


def test_two_processes_equal_one_process_with_the_whole_batch(tmp_path):
    mp.spawn(_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    for memory in MEMORY_MODES:
        _compare_with_one_process(tmp_path, memory)
    for rank in range(WORLD):
        said = torch.load(tmp_path / f"out.ddp.{rank}")
        assert said == [] or said is None, said


def _compare_with_one_process(tmp_path, memory):
    unit, x, dy = _make_unit()
    y, dx, grads, state = _step(copy.deepcopy(unit), x, dy)
    parts = [torch.load(tmp_path / f"out.{memory}.{r}") for r in range(WORLD)]
    assert_processes_match_one(parts, y, dx, grads, state)


def test_needs_an_initialized_process_group():
    unit, _, _ = _make_unit()
    with pytest.raises(RuntimeError, match="torch.distributed is not initialized"):
        sync_batch_stats(unit)
    with pytest.raises(ValueError, match="no fused units"):
        sync_batch_stats(torch.nn.Linear(2, 2), process_group=object())


@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_the_eager_path_of_a_synchronized_unit_refuses_to_run_unsynchronized(backend, monkeypatch):
    """An eager forward would normalize with this process's statistics only."""
    from fused_preact import fused

    monkeypatch.setattr(fused, "process_count", lambda group: WORLD)   # as if in a 2-process group
    monkeypatch.setattr(fused.dispatch, "resolve_backend", lambda *args, **kwargs: "eager")
    unit = FusedPreActBottleneck(8, 8, backend=backend)
    sync_batch_stats(unit, process_group=object())
    x = torch.randn(4, 8, 5, 5)
    with pytest.raises(RuntimeError, match="synchronized across processes .*only the fused kernels"):
        unit(x)
    unit.eval()   # running statistics: nothing to synchronize, eager is exact
    torch.testing.assert_close(unit(x), PreActBottleneck.forward(unit, x))
