"""Data-parallel runs (``torchrun`` or any launcher that sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``) and synchronized
batch normalization.

``--sync-bn`` normalizes with the statistics of the *global* batch:
- fused units synchronize through their own statistics hook,
  ``fused_preact.sync_batch_stats(model, process_group)`` (all-gather of the BN
  partial sums in forward, all-reduce of the BN backward sums), so the fused
  kernels keep running;
- every other BatchNorm (the model's final ``norm``, the units of variants that
  are not fused, the BNs of fused units built with ``backend="eager"``, which run
  the eager unit's BatchNorm modules) becomes ``nn.SyncBatchNorm`` on CUDA, or, on the CPU where
  SyncBatchNorm does not run, ``ProcessGroupBatchNorm`` below.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from ..fused import _FusedUnitMixin


@dataclass(frozen=True)
class Processes:
    """Where this process stands in the run."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup(device_kind: str) -> Processes:
    """Join the process group described by the environment (NCCL on CUDA, gloo on the CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Processes()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device_kind == "cuda":
        torch.cuda.set_device(local_rank)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device_kind == "cuda" else "gloo")
    return Processes(rank, world_size, local_rank)


def teardown(processes: Processes) -> None:
    if processes.distributed and dist.is_initialized():
        dist.destroy_process_group()


def all_sum(values: list[float], device: torch.device, processes: Processes) -> list[float]:
    """Element-wise sum of ``values`` over all processes (float64)."""
    return _all_reduce(values, device, processes, dist.ReduceOp.SUM, torch.float64)


def all_min(values: list[int], device: torch.device, processes: Processes) -> list[int]:
    """Element-wise minimum of integer ``values`` over all processes."""
    return _all_reduce(values, device, processes, dist.ReduceOp.MIN, torch.int64)


def _all_reduce(values, device, processes, op, dtype) -> list:
    if not processes.distributed:
        return list(values)
    tensor = torch.tensor(values, dtype=dtype, device=device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


# -- synchronized batch normalization ---------------------------------------------
class _SyncBatchNormFunction(torch.autograd.Function):
    """Training-mode BN over the union of the processes' batches (float64 sums)."""

    @staticmethod
    def forward(ctx, x, weight, bias, eps, group):
        dims = (0, 2, 3)
        x64 = x.to(torch.float64)
        local = torch.cat([x64.sum(dims), x64.square().sum(dims),
                           torch.tensor([x.numel() // x.shape[1]], dtype=torch.float64, device=x.device)])
        dist.all_reduce(local, group=group)
        channels = x.shape[1]
        count = local[-1]
        mean = local[:channels] / count
        var = (local[channels:2 * channels] / count - mean.square()).clamp_min(0)
        invstd = torch.rsqrt(var + eps)
        x_hat = (x64 - mean[:, None, None]) * invstd[:, None, None]
        ctx.save_for_backward(x_hat, weight, invstd)
        ctx.group, ctx.count = group, count
        y = x_hat * weight.to(torch.float64)[:, None, None] + bias.to(torch.float64)[:, None, None]
        return y.to(x.dtype), mean, var, count

    @staticmethod
    def backward(ctx, grad_y, _mean, _var, _count):
        x_hat, weight, invstd = ctx.saved_tensors
        g = grad_y.to(torch.float64)
        dims = (0, 2, 3)
        sum_g, sum_g_xhat = g.sum(dims), (g * x_hat).sum(dims)
        grad_weight, grad_bias = sum_g_xhat.to(weight.dtype), sum_g.to(weight.dtype)
        sums = torch.cat([sum_g, sum_g_xhat])
        dist.all_reduce(sums, group=ctx.group)
        channels = weight.shape[0]
        mean_g, mean_g_xhat = sums[:channels] / ctx.count, sums[channels:] / ctx.count
        scale = (weight.to(torch.float64) * invstd)[:, None, None]
        grad_x = scale * (g - mean_g[:, None, None] - x_hat * mean_g_xhat[:, None, None])
        return grad_x.to(grad_y.dtype), grad_weight, grad_bias, None, None


class ProcessGroupBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` whose training statistics span every process of ``group``;
    works on any backend (gloo on the CPU). Same state names as ``BatchNorm2d``."""

    def __init__(self, *args, process_group=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.process_group = process_group

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, process_group=None) -> "ProcessGroupBatchNorm":
        sync = cls(bn.num_features, bn.eps, bn.momentum, bn.affine, bn.track_running_stats,
                   process_group=process_group, device="meta")
        for name, tensor in list(bn.named_parameters(recurse=False)) + list(bn.named_buffers(recurse=False)):
            setattr(sync, name, tensor)
        sync.train(bn.training)
        return sync

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_initialized()) or not self.affine:
            return super().forward(x)
        y, mean, var, count = _SyncBatchNormFunction.apply(x, self.weight, self.bias, self.eps,
                                                            self.process_group)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked += 1
                momentum = (1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum)
                unbiased = var * count / (count - 1).clamp_min(1)
                self.running_mean.lerp_(mean.to(self.running_mean.dtype), momentum)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), momentum)
        return y


def _runs_kernels(module: nn.Module) -> bool:
    """A fused unit (pre-activation or original, built or converted) whose backend may run a kernel
    (not explicitly ``"eager"``): its BNs are synchronized by ``sync_batch_stats``, and must stay
    plain BatchNorms the kernels read."""
    return isinstance(module, _FusedUnitMixin) and module.backend != "eager"


def _outside_fused_units(model: nn.Module):
    """(parent, child name, child) for every BatchNorm2d that no kernel-running fused unit owns."""
    found = []

    def visit(module: nn.Module) -> None:
        for name, child in module.named_children():
            if _runs_kernels(child):
                continue
            if isinstance(child, nn.BatchNorm2d) and not isinstance(child, nn.SyncBatchNorm):
                found.append((module, name, child))
            else:
                visit(child)

    visit(model)
    return found


def synchronize_batch_norm(model: nn.Module, device_kind: str, process_group=None) -> nn.Module:
    """Make every BatchNorm of ``model`` use the global batch's statistics (see module docstring)."""
    if any(_runs_kernels(m) for m in model.modules()):
        import fused_preact
        sync_batch_stats = getattr(fused_preact, "sync_batch_stats", None)
        if sync_batch_stats is None:
            raise RuntimeError("--sync-bn needs fused_preact.sync_batch_stats(model, process_group) to "
                               "synchronize the statistics of the fused units, and this version of "
                               "fused_preact has none")
        model = sync_batch_stats(model, process_group=process_group)
    for parent, name, bn in _outside_fused_units(model):
        if device_kind == "cuda":
            sync = nn.SyncBatchNorm.convert_sync_batchnorm(bn, process_group)
        else:
            sync = ProcessGroupBatchNorm.from_batchnorm(bn, process_group)
        setattr(parent, name, sync)
    return model


def batch_norm_group(processes: Processes) -> Optional[dist.ProcessGroup]:
    """A process group of its own for BN statistics, so that their collectives never
    interleave with DDP's gradient all-reduce on the CPU (gloo)."""
    if not processes.distributed:
        return None
    return dist.new_group(list(range(processes.world_size)))
