"""Data-parallel training with 2 gloo processes on the CPU equals one process with the
same global batch (``--sync-bn``: batch statistics over both processes)."""
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from cifar_folder import random_cifar
from fused_preact.train import main


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _argv(data, out, backend):
    return ["--data", str(data), "--arch", "cifar_resnet8", "--batch-size", "16", "--iters", "6",
            "--warmup-iters", "0", "--lr", "0.05", "--out", str(out), "--no-progress", "--device", "cpu",
            "--backend", backend, "--sync-bn", "--print-freq", "3"]


def _worker(rank, world_size, port, argv):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    main(argv)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return random_cifar(tmp_path_factory.mktemp("cifar"), 64, 24, seed=7).parent


# "eager": every BN (inside the units too) is synchronized by the trainer's ProcessGroupBatchNorm;
# "auto": fused units synchronize through fused_preact.sync_batch_stats (the integrator's hook).
# by default "eager"; "auto"'s sync_batch_stats path also runs in test_sync_bn's two processes
@pytest.mark.slow
@pytest.mark.default_cases(ids=["eager"])
@pytest.mark.parametrize("backend", ["eager", "auto"])
@pytest.mark.usefixtures("one_cpu_thread")
def test_two_gloo_processes_match_one_process(data, tmp_path, backend):
    single = main(_argv(data, tmp_path / "single", backend))
    mp.spawn(_worker, args=(2, _free_port(), _argv(data, tmp_path / "ddp", backend)), nprocs=2, join=True)

    one = torch.load(tmp_path / "single" / "checkpoint.pt", weights_only=False)
    two = torch.load(tmp_path / "ddp" / "checkpoint.pt", weights_only=False)
    assert one["iteration"] == two["iteration"] == 6 and len(two["rng"]) == 2
    assert one["model"].keys() == two["model"].keys()
    for key, value in one["model"].items():
        if value.is_floating_point():
            torch.testing.assert_close(two["model"][key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(two["model"][key], value), key
    losses_one = torch.tensor([loss for _, loss in one["history"]["train"]])
    losses_two = torch.tensor([loss for _, loss in two["history"]["train"]])
    torch.testing.assert_close(losses_two, losses_one, rtol=1e-4, atol=1e-5)
    assert single["world_size"] == 1


@pytest.mark.parametrize("activation", ["full_preact", "original"])
def test_sync_bn_leaves_every_fused_units_batchnorms_to_the_fused_kernels(activation):
    """--sync-bn gives fused units (pre-activation and original, built or converted) sync_batch_stats
    and other BNs a synchronized class; a fused unit's own BNs stay plain BatchNorms, which its kernels
    read (a ProcessGroupBatchNorm inside it made the unit run eager)."""
    from torch import nn
    from fused_preact import convert_to_fused, models
    from fused_preact.fused import _FusedUnitMixin
    from fused_preact.train.distributed import ProcessGroupBatchNorm, synchronize_batch_norm
    model = convert_to_fused(models.cifar_resnet(8, num_classes=3, activation=activation), backend="cuda")
    group = object()      # any non-None group: sync_batch_stats records it, nothing runs a collective here
    synchronize_batch_norm(model, "cpu", process_group=group)
    units = [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]
    assert len(units) == 3 and all(u._stats_group is group for u in units)
    inside = {id(bn) for u in units for bn in u.modules() if isinstance(bn, nn.BatchNorm2d)}
    for bn in model.modules():
        if isinstance(bn, nn.BatchNorm2d):
            assert isinstance(bn, ProcessGroupBatchNorm) == (id(bn) not in inside)
