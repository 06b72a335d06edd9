"""Synchronized batch statistics for fused units (the fused counterpart of ``nn.SyncBatchNorm``).

``sync_batch_stats(model, group)`` makes every fused unit of ``model`` normalize with
the statistics of the whole global batch: its forward all-gathers each BN's partial
statistics (one row of mean, M2 and count per process) and merges them before the
finalize, its backward all-reduces the two per-channel sums of BN backward. BN
modules outside fused units (a model's stem or final norm) are not touched: convert
them with ``nn.SyncBatchNorm.convert_sync_batchnorm`` (CUDA) or your own.

Without it, a fused unit whose BatchNorms are ``nn.SyncBatchNorm`` (from
``convert_sync_batchnorm``, before or after ``convert_to_fused``) synchronizes over their
process group through the same kernels, as eager SyncBatchNorm would (``fused`` and
``kernel_view``): ``sync_batch_stats`` is for plain BatchNorms, or to choose the group.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .fused import _FusedUnitMixin


def sync_batch_stats(model: nn.Module, process_group: Optional[object] = None) -> nn.Module:
    """Synchronize the BN statistics of every fused unit in ``model`` over ``process_group``
    (default: the whole world). Returns ``model``; ``process_group=False`` turns it off."""
    if process_group is None:
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            raise RuntimeError("sync_batch_stats: torch.distributed is not initialized; call "
                               "torch.distributed.init_process_group first or pass process_group")
        process_group = torch.distributed.group.WORLD
    units = [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]
    if not units:
        raise ValueError("sync_batch_stats: model has no fused units; run convert_to_fused(model) first")
    for unit in units:
        unit.stats_group = None if process_group is False else process_group
    return model
