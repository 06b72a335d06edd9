"""Trainer of the paper's CIFAR and ImageNet experiments: ``python -m fused_preact.train --help``.

Files: ``cli`` (flags), ``data`` (datasets, folder checks), ``augment`` (batch
augmentation on the device), ``imagenet_transforms`` (ImageNet crops, the paper's
scale augmentation), ``crop_eval`` (top-1/top-5 at several test crops),
``streams`` (batches and their resumable state),
``loop`` (the run), ``checkpoint`` (atomic saves, readable errors), ``run_config``
(what a run is: ``--resume`` and ``--override``), ``out_folder`` (the lock of
``--out``, one run per folder), ``divergence`` (non-finite loss or tensors),
``errors`` (the kinds of refusal and failure), ``distributed`` (DDP,
synchronized BN), ``signal_log`` (residual-stream norms), ``plots``, ``records``
(CSV, JSON, git commit).
"""
from .checkpoint import CheckpointError
from .cli import main, parse_args
from .data import DatasetError, load_cifar
from .divergence import Diverged
from .errors import TrainerError
from .loop import run
from .out_folder import OutFolderError
from .run_config import ConfigurationMismatch

__all__ = ["CheckpointError", "ConfigurationMismatch", "DatasetError", "Diverged", "OutFolderError", "TrainerError",
           "load_cifar", "main", "parse_args", "run"]
