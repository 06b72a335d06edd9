"""Trainer of the paper's CIFAR and ImageNet experiments: ``python -m fused_preact.train --help``.

Files: ``cli`` (flags), ``data`` (datasets, folder checks), ``augment`` (batch
augmentation on the device), ``imagenet_transforms`` (ImageNet crops, the paper's
scale augmentation), ``crop_eval`` (top-1/top-5 at several test crops),
``streams`` (batches and their resumable state),
``loop`` (the run), ``checkpoint`` (atomic saves), ``distributed`` (DDP,
synchronized BN), ``signal_log`` (residual-stream norms), ``plots``, ``records``
(CSV, JSON, git commit).
"""
from .cli import main, parse_args
from .data import DatasetError, load_cifar
from .loop import NonFiniteLoss, run

__all__ = ["DatasetError", "NonFiniteLoss", "load_cifar", "main", "parse_args", "run"]
