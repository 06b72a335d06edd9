"""Training recipes of the paper as flags of ``python -m fused_preact.train``.

CIFAR (paper appendix, as [1]): SGD, momentum 0.9, weight decay 1e-4, mini-batch
128, lr 0.1 divided by 10 at 32k and 48k iterations, stop at 64k ([1], Sec. 4.2);
"for all CIFAR experiments" a warm-up at lr 0.01 for the first 400 iterations.

CIFAR, mini-batch 64 (Table 4's dagger, the authors' Torch code resnet-1k-layers on
fb.resnet.torch): 200 epochs, lr 0.1 divided by 10 at the start of epochs 81 and
122 (fb.resnet.torch's CIFAR schedule), no warm-up. In iterations of 781 batches
per epoch (50,000 // 64, the trainer drops the last partial batch): 156,200
iterations, milestones 62,480 and 94,501.

ImageNet (appendix): mini-batch 256, lr 0.1 (no warm-up) divided by 10 at epochs
30 and 60, the same weight decay and momentum. The paper does not say when
training ends; Table 5's nets are trained "using the same hyper-parameters ...
as [1]", which trains "for up to 60 x 10^4 iterations": 120 epochs of 256
images (fb.resnet.torch, whose ResNet-200 is Table 5's dagger row, defaults to
90).

``scale`` multiplies every iteration count (iterations, milestones, warm-up),
rounded, at least one training iteration: ``0.001`` gives a smoke run of 64
iterations. An epoch-based recipe at a scale other than 1 becomes iterations of
the given training set's size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class Recipe:
    name: str
    batch_size: int
    iters: Optional[int] = None                     # CIFAR recipes count iterations ...
    milestones: tuple[int, ...] = ()
    epochs: Optional[int] = None                    # ... ImageNet's count epochs
    milestone_epochs: tuple[int, ...] = ()
    warmup_iters: int = 0
    warmup_lr: float = 0.01
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 1e-4

    def describe(self) -> str:
        if self.iters is not None:
            span = f"{self.iters:,} it, lr/10 at {'/'.join(f'{m:,}' for m in self.milestones)}"
        else:
            span = f"{self.epochs} ep, lr/10 at ep {'/'.join(map(str, self.milestone_epochs))}"
        warmup = f", warm-up {self.warmup_lr:g} x {self.warmup_iters} it" if self.warmup_iters else ""
        return f"batch {self.batch_size}, lr {self.lr:g}, {span}{warmup}"

    def total_iterations(self, train_images: Optional[int] = None) -> int:
        """Iterations at scale 1 (``train_images`` is needed by epoch-based recipes)."""
        if self.iters is not None:
            return self.iters
        return self.epochs * _batches_per_epoch(train_images, self.batch_size)

    def flags(self, scale: float = 1.0, train_images: Optional[int] = None) -> list[str]:
        """Trainer flags of this recipe at ``scale``."""
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        flags = ["--batch-size", str(self.batch_size), "--lr", repr(self.lr), "--momentum", repr(self.momentum),
                 "--weight-decay", repr(self.weight_decay), "--warmup-lr", repr(self.warmup_lr)]
        if self.iters is None and scale == 1:
            return flags + ["--epochs", str(self.epochs), "--milestone-epochs", *map(str, self.milestone_epochs),
                            "--warmup-iters", str(self.warmup_iters)]
        if self.iters is not None:
            iters, milestones = self.iters, self.milestones
        else:
            per_epoch = _batches_per_epoch(train_images, self.batch_size)
            iters, milestones = self.epochs * per_epoch, tuple(e * per_epoch for e in self.milestone_epochs)
        total = max(1, round(iters * scale))
        scaled = [round(m * scale) for m in milestones]
        return flags + ["--iters", str(total), "--milestones", *map(str, scaled),
                        "--warmup-iters", str(round(self.warmup_iters * scale))]


def _batches_per_epoch(train_images: Optional[int], batch_size: int) -> int:
    if train_images is None:
        raise ValueError("an epoch-based recipe needs the number of training images")
    if train_images < batch_size:
        raise ValueError(f"the training set holds {train_images} images, fewer than one batch of {batch_size}")
    return train_images // batch_size


CIFAR = Recipe("cifar", batch_size=128, iters=64000, milestones=(32000, 48000), warmup_iters=400)
CIFAR_BATCH64 = Recipe("cifar-batch64", batch_size=64, iters=200 * 781, milestones=(80 * 781, 121 * 781))
IMAGENET = Recipe("imagenet", batch_size=256, epochs=120, milestone_epochs=(30, 60))
