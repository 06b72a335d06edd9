"""Training batches and evaluation batches, with the state a checkpoint needs.

A training stream hands out this process's slice of each *global* batch:
``next()`` returns normalized float images on the device and their labels. Every
process draws the same shuffle and augmentation numbers (one seeded CPU
generator) and keeps its slice, so a data-parallel run sees exactly the batches
of a single-process run. ``state_dict()`` holds all that decides the next batches.

- ``DeviceStream``: CIFAR and synthetic data held on the device, augmented there.
  Resuming is exact, also in the middle of an epoch.
- ``LoaderStream``: ImageNet through DataLoader workers. The shuffle and the
  position in the epoch resume exactly; the workers' crop and flip draws are
  seeded per (epoch, start position), so a resumed epoch draws different crops.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from .augment import BatchAugment
from .data import ImageSet


def _local_size(global_batch: int, world_size: int) -> int:
    if global_batch % world_size:
        raise ValueError(f"batch_size {global_batch} (the global batch) must be divisible by "
                         f"the number of processes, {world_size}")
    return global_batch // world_size


class DeviceStream:
    """Shuffled, augmented batches of an on-device ``ImageSet`` (incomplete last batches dropped)."""

    def __init__(self, data: ImageSet, augment: BatchAugment, global_batch: int, *, seed: int,
                 rank: int = 0, world_size: int = 1):
        self.local_batch = _local_size(global_batch, world_size)
        if len(data) < global_batch:
            raise ValueError(f"batch_size {global_batch} is larger than the training set ({len(data)} images)")
        self.data, self.augment, self.global_batch = data, augment, global_batch
        self.rank = rank
        self.batches_per_epoch = len(data) // global_batch
        self.generator = torch.Generator().manual_seed(seed)
        self.order: Optional[torch.Tensor] = None
        self.position = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.order is None or self.position == self.batches_per_epoch:
            self.order = torch.randperm(len(self.data), generator=self.generator)
            self.position = 0
        start = self.position * self.global_batch
        index = self.order[start:start + self.global_batch]
        params = self.augment.draw(self.global_batch, self.generator)
        self.position += 1
        mine = slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)
        index = index[mine].to(self.data.images.device)
        return self.augment(self.data.images[index], params[mine]), self.data.labels[index]

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "order": self.order, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"], state["position"]


class _EpochBatches(Sampler):
    """This process's slice of each global batch of one epoch's shuffle, from batch ``start`` on."""

    def __init__(self, size: int, global_batch: int, local_batch: int, rank: int, seed: int, epoch: int,
                 start: int):
        self.size, self.global_batch, self.local_batch = size, global_batch, local_batch
        self.rank, self.seed, self.epoch, self.start = rank, seed, epoch, start

    def __len__(self) -> int:
        return self.size // self.global_batch - self.start

    def __iter__(self) -> Iterator[list[int]]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.size, generator=generator)
        for k in range(self.start, self.size // self.global_batch):
            first = k * self.global_batch + self.rank * self.local_batch
            yield order[first:first + self.local_batch].tolist()


class LoaderStream:
    """Batches of a map-style dataset of uint8 images, loaded by ``workers`` processes."""

    def __init__(self, dataset: Dataset, normalize: BatchAugment, global_batch: int, device: torch.device, *,
                 seed: int, workers: int, rank: int = 0, world_size: int = 1):
        self.local_batch = _local_size(global_batch, world_size)
        if len(dataset) < global_batch:
            raise ValueError(f"batch_size {global_batch} is larger than the training set ({len(dataset)} images)")
        self.dataset, self.normalize, self.global_batch, self.device = dataset, normalize, global_batch, device
        self.seed, self.workers, self.rank = seed, workers, rank
        self.batches_per_epoch = len(dataset) // global_batch
        self.epoch, self.position = 0, 0
        self._iterator = None

    def _start(self) -> None:
        sampler = _EpochBatches(len(self.dataset), self.global_batch, self.local_batch, self.rank, self.seed,
                                self.epoch, self.position)
        generator = torch.Generator().manual_seed((self.seed * 1_000_003 + self.epoch) * 1_000_003 + self.position)
        loader = DataLoader(self.dataset, batch_sampler=sampler, num_workers=self.workers,
                            pin_memory=self.device.type == "cuda", generator=generator,
                            persistent_workers=False, prefetch_factor=4 if self.workers else None)
        self._iterator = iter(loader)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        if self.position == self.batches_per_epoch:
            self.epoch, self.position, self._iterator = self.epoch + 1, 0, None
        if self._iterator is None:
            self._start()
        images, labels = next(self._iterator)
        self.position += 1
        images = images.to(self.device, non_blocking=True)
        return self.normalize(images), labels.to(self.device, non_blocking=True)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.position, self._iterator = state["epoch"], state["position"], None


def shard(size: int, rank: int, world_size: int) -> range:
    """The contiguous part of ``range(size)`` that process ``rank`` evaluates."""
    return range(rank * size // world_size, (rank + 1) * size // world_size)


def device_eval_batches(data: ImageSet, normalize: BatchAugment, batch: int, rank: int = 0,
                        world_size: int = 1) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalized, un-augmented batches of this process's shard of an on-device set."""
    part = shard(len(data), rank, world_size)
    for start in range(part.start, part.stop, batch):
        stop = min(start + batch, part.stop)
        yield normalize(data.images[start:stop]), data.labels[start:stop]


def loader_eval_batches(dataset: Dataset, normalize: BatchAugment, batch: int, device: torch.device,
                        workers: int, rank: int = 0, world_size: int = 1):
    """Normalized batches of this process's shard of a map-style dataset."""
    subset = Subset(dataset, list(shard(len(dataset), rank, world_size)))
    loader = DataLoader(subset, batch_size=batch, num_workers=workers, pin_memory=device.type == "cuda")
    for images, labels in loader:
        yield normalize(images.to(device, non_blocking=True)), labels.to(device, non_blocking=True)
