"""The paper's CIFAR augmentation on whole batches, on the device that trains.

For a uint8 batch (N, C, H, W): zero-pad ``pad`` pixels on each side, crop a
random H x W window, flip horizontally with probability 1/2, and normalize each
channel: ``(x / 255 - mean_c) / std_c``. With ``pad=0`` and no flip it is the
test-time normalization alone.

Random parameters (crop offsets, flips) are drawn on the CPU from the caller's
``torch.Generator``, for the whole *global* batch: every process of a
data-parallel run draws the same numbers and keeps its own slice, so one process
and many see the very same images, and a checkpoint that saves the generator
resumes the same augmentation. The crop is two gathers on the device.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F


@dataclass
class AugmentParams:
    """Per-image crop offsets (top, left) in the padded image and flip flags."""
    top: torch.Tensor
    left: torch.Tensor
    flip: torch.Tensor

    def __getitem__(self, index) -> "AugmentParams":
        return AugmentParams(self.top[index], self.left[index], self.flip[index])

    def to(self, device) -> "AugmentParams":
        return AugmentParams(self.top.to(device), self.left.to(device), self.flip.to(device))


class BatchAugment:
    """Pad-crop-flip-normalize of uint8 image batches (see the module docstring).

    Args:
        mean, std: per-channel statistics in [0, 1] units.
        pad: zero padding before the random crop (4 in the paper; 0: no crop).
        flip: random horizontal flips.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], pad: int = 4, flip: bool = True):
        if len(mean) != len(std):
            raise ValueError(f"mean and std must have one value per channel, got {len(mean)} and {len(std)}")
        if any(s <= 0 for s in std):
            raise ValueError(f"std must be positive, got {tuple(std)}")
        if pad < 0:
            raise ValueError(f"pad must be >= 0, got {pad}")
        self.mean, self.std, self.pad, self.flip = tuple(mean), tuple(std), pad, flip

    def draw(self, count: int, generator: torch.Generator) -> AugmentParams:
        """Random parameters of ``count`` images (CPU tensors)."""
        span = 2 * self.pad + 1
        top = torch.randint(0, span, (count,), generator=generator)
        left = torch.randint(0, span, (count,), generator=generator)
        if self.flip:
            flip = torch.rand(count, generator=generator) < 0.5
        else:
            flip = torch.zeros(count, dtype=torch.bool)
        return AugmentParams(top, left, flip)

    def __call__(self, images: torch.Tensor, params: AugmentParams | None = None,
                 dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Augmented (or, without ``params``, only normalized) float images."""
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != len(self.mean):
            raise ValueError(f"images must be uint8 of shape (N, {len(self.mean)}, H, W), "
                             f"got {images.dtype} of shape {tuple(images.shape)}")
        if params is not None:
            images = self.crop_flip(images, params.to(images.device))
        return self.normalize(images, dtype)

    def crop_flip(self, images: torch.Tensor, params: AugmentParams) -> torch.Tensor:
        n, c, h, w = images.shape
        if params.top.shape != (n,):
            raise ValueError(f"params must hold {n} images, got {params.top.shape[0]}")
        if self.pad:
            padded = F.pad(images, (self.pad,) * 4)
            rows = params.top[:, None] + torch.arange(h, device=images.device)        # (N, H)
            cols = params.left[:, None] + torch.arange(w, device=images.device)       # (N, W)
            padded = padded.gather(2, rows[:, None, :, None].expand(n, c, h, w + 2 * self.pad))
            images = padded.gather(3, cols[:, None, None, :].expand(n, c, h, w))
        if self.flip:
            images = torch.where(params.flip[:, None, None, None], images.flip(3), images)
        return images

    def normalize(self, images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        mean = torch.tensor(self.mean, dtype=torch.float32, device=images.device)[:, None, None]
        std = torch.tensor(self.std, dtype=torch.float32, device=images.device)[:, None, None]
        scale = 1.0 / (255.0 * std)
        return (images.to(torch.float32) * scale - mean / std).to(dtype)
