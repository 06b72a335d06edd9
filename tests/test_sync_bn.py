"""Synchronized BN statistics of fused units: two gloo processes, each with half the batch,
match one process with the whole batch (outputs, input and parameter gradients, running stats).

Two ways to ask for it: ``sync_batch_stats`` on fused units, and ``nn.SyncBatchNorm`` modules in a
converted model (``convert_sync_batchnorm`` after ``convert_to_fused``, or before it, before or after
``init_process_group``): the fused units then synchronize them through the same kernels, on the
C++ CPU kernels here (``backend="cuda"`` on CPU tensors), never per process.
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
from torch import nn

import foreign_models as fm
from fused_preact import reference_ops
from comparisons import assert_processes_match_one, perturb_bn
from fused_preact import convert_to_fused, dispatch, sync_batch_stats
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


# the ways a converted model gets nn.SyncBatchNorm modules (see the module docstring)
SYNC_ORDERS = ("convert, then convert_sync_batchnorm", "convert_sync_batchnorm, then convert",
               "convert_sync_batchnorm, init_process_group, then convert")


def _sync_model():
    """Units of other codebases, every BN inside a unit (a CPU SyncBatchNorm outside the fused units
    would refuse to run): a kuangliu unit with a projection, one without (handed the first one's
    output statistics), a torchvision BasicBlock; and an input of 8."""
    torch.manual_seed(0)
    from torchvision.models.resnet import BasicBlock
    model = nn.Sequential(fm.KLPreActBlock(4, 8, 2), fm.KLPreActBlock(8, 8), BasicBlock(8, 8))
    return perturb_bn(model.double()), torch.randn(8, 4, 9, 7, dtype=torch.float64) * 2 + 1


def _synchronized_models(initialize) -> list:
    """The converted model of ``_sync_model`` with SyncBatchNorms, made in each of ``SYNC_ORDERS``;
    ``initialize()`` starts the process group after the first two are made."""
    made = [nn.SyncBatchNorm.convert_sync_batchnorm(convert_to_fused(_sync_model()[0], "cuda")),
            convert_to_fused(nn.SyncBatchNorm.convert_sync_batchnorm(_sync_model()[0]), "cuda")]
    initialize()
    made.append(convert_to_fused(nn.SyncBatchNorm.convert_sync_batchnorm(_sync_model()[0]), "cuda"))
    return made


def _model_step(model, x):
    x = x.clone().requires_grad_(True)
    y = model(x)
    y.square().sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in model.named_parameters()}, model.state_dict()


def _worker(rank, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))

    def initialize():
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    if dispatch.unavailable_reason("cuda", torch.zeros(1, dtype=torch.float64)) is None:
        _, x = _sync_model()
        for i, model in enumerate(_synchronized_models(initialize)):
            calls = []
            real = dispatch.run_unit
            dispatch.run_unit = lambda *args: calls.append(args[1].stats_group is not None) or real(*args)
            result = _model_step(model, x[4 * rank:4 * rank + 4])
            dispatch.run_unit = real
            torch.save((result, calls, [type(m).__name__ for m in model.modules()]), f"{out_file}.sync{i}.{rank}")
    else:
        initialize()
    half = slice(2 * rank, 2 * rank + 2)
    for memory in MEMORY_MODES:   # memory="min" recomputes in the backward, with no collective
        unit, x, dy = _make_unit()
        unit._set_memory(memory)
        sync_batch_stats(unit)
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


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    """The folder with what each of two gloo processes computed on its half of the batch (one spawn
    for the tests below)."""
    folder = tmp_path_factory.mktemp("sync")
    mp.spawn(_worker, args=(str(folder / "init"), str(folder / "out")), nprocs=WORLD, join=True)
    return folder


def test_two_processes_equal_one_process_with_the_whole_batch(two_processes):
    for memory in MEMORY_MODES:
        unit, x, dy = _make_unit()
        y, dx, grads, state = _step(copy.deepcopy(unit), x, dy)
        parts = [torch.load(two_processes / f"out.{memory}.{r}") for r in range(WORLD)]
        assert_processes_match_one(parts, y, dx, grads, state)


def test_distributed_data_parallel_warns_of_no_gradient_strides(two_processes):
    for rank in range(WORLD):
        said = torch.load(two_processes / f"out.ddp.{rank}")
        assert said == [] or said is None, said


@pytest.mark.parametrize("index,order", list(enumerate(SYNC_ORDERS)), ids=SYNC_ORDERS)
def test_synchronized_batchnorms_in_a_converted_model_synchronize(two_processes, index, order):
    """Each order: every unit ran the fused kernels with a process group (counted), its BNs
    SyncBatchNorms, and the two halves equal the unconverted model with plain BNs on the whole batch."""
    if dispatch.unavailable_reason("cuda", torch.zeros(1, dtype=torch.float64)) is not None:
        pytest.skip("the C++ extension is not built")
    model, x = _sync_model()
    y, dx, grads, state = _model_step(model, x)
    parts = []
    for r in range(WORLD):
        result, calls, classes = torch.load(two_processes / f"out.sync{index}.{r}", weights_only=False)
        assert calls == [True, True, True], calls
        assert classes.count("ConvertedUnit") == 3 and classes.count("SyncBatchNorm") == 6
        parts.append(result)
    assert_processes_match_one(parts, y, dx, grads, state)


def test_convert_sync_batchnorm_after_conversion_keeps_the_units_fused():
    """Single process, no process group: the units stay fused, their SyncBatchNorms compute as plain
    BNs (as SyncBatchNorm does without a process group), and a unit whose BNs are only partly
    synchronized runs its eager computation, saying why, rather than synchronizing some BNs."""
    if dispatch.unavailable_reason("cuda", torch.zeros(1, dtype=torch.float64)) is not None:
        pytest.skip("the C++ extension is not built")
    model, x = _sync_model()
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = nn.SyncBatchNorm.convert_sync_batchnorm(convert_to_fused(model, "cuda"))
    assert [type(m).__name__ for m in model] == ["ConvertedUnit"] * 3
    assert all(unit.stats_group is None for unit in model)
    model[1].bn1 = nn.BatchNorm2d(8).double()
    reference[1].bn1 = copy.deepcopy(model[1].bn1)
    with pytest.warns(RuntimeWarning, match=r"KLPreActBlock \(fused\) runs its eager PyTorch computation.*1 of its 2 "
                                            r"BatchNorms are nn.SyncBatchNorm"):
        y = model(x)
    torch.testing.assert_close(y, reference(x), rtol=1e-12, atol=1e-12)


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
