"""What an experiment costs: multiply-accumulates of a forward pass, counted on the meta
device (no memory, no compute), and the training work of its recipe.

Training FLOPs are estimated as 3 x forward (backward ~ 2 x forward) x 2 FLOPs per
MAC x training images; time is that divided by a sustained rate the caller gives
(``--tflops``). This is an estimate from operation counts, not a measurement:
BN, ReLU and the residual adds are memory-bound and not counted.
"""
from __future__ import annotations

from functools import lru_cache

import torch
from torch import nn

from ..models import create_model
from .registry import Experiment

IMAGENET_TRAIN_IMAGES = 1_281_167
CIFAR_TRAIN_IMAGES = 50_000
IMAGE_SIZE = {"cifar10": 32, "cifar100": 32, "imagenet": 224}


@lru_cache(maxsize=None)
def forward_macs(arch: str, dataset: str, image_size: int) -> int:
    """Multiply-accumulates of convolutions and the classifier for one image."""
    classes = {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[dataset]
    with torch.device("meta"):
        model = create_model(arch, num_classes=classes)
    total = 0

    def count(module, inputs, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            total += output[0].numel() * (module.in_channels // module.groups) * kh * kw
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model(torch.empty(1, 3, image_size, image_size, device="meta"))
    for hook in hooks:
        hook.remove()
    return total


def training_images(experiment: Experiment) -> int:
    recipe = experiment.recipe
    if recipe.iters is not None:
        return recipe.iters * recipe.batch_size
    return recipe.epochs * IMAGENET_TRAIN_IMAGES


def training_flops(experiment: Experiment) -> float:
    macs = forward_macs(experiment.arch, experiment.dataset, IMAGE_SIZE[experiment.dataset])
    return 3 * 2 * macs * training_images(experiment)


def estimated_hours(experiment: Experiment, tflops: float) -> float:
    """Hours of one run at a sustained ``tflops`` (an estimate, see the module docstring)."""
    if not tflops > 0:
        raise ValueError(f"tflops must be positive, got {tflops}")
    return training_flops(experiment) / (tflops * 1e12) / 3600
