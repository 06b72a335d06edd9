"""ImageNet image transforms of the paper's Table 5, run in the DataLoader workers.

Training, ``"scale"`` (the augmentation of the original ResNet paper [1], Sec. 3.4,
which Table 5 names "scale"): resize the shorter side to a size drawn uniformly
from [256, 480], take a random 224x224 crop, flip it horizontally with
probability 1/2, and add AlexNet's PCA color noise (std 0.1 along the RGB
principal components of ImageNet, the standard color augmentation [1] uses).
``"resized_crop"`` is torchvision's RandomResizedCrop (scale and aspect ratio, as
Inception and fb.resnet.torch) plus flips, the trainer's default.

Evaluation: resize the shorter side to ``resize``, then a center ``crop`` x
``crop``: 256 -> 224 is the usual single crop, 320 -> 320 the paper's (Table 5).
Every transform yields a uint8 CHW tensor; normalization happens on the device.
"""
from __future__ import annotations

import random

import torch

IMAGENET_AUGMENTS = ("resized_crop", "scale")
# principal components of ImageNet's RGB pixels (in [0, 1] units), as published with AlexNet's color noise
PCA_EIGENVALUES = (0.2175, 0.0188, 0.0045)
PCA_EIGENVECTORS = ((-0.5675, 0.7192, 0.4009),
                    (-0.5808, -0.0045, -0.8140),
                    (-0.5836, -0.6948, 0.4203))


class RandomShorterSide:
    """Resize a PIL image so that its shorter side is uniform in [low, high] (integers)."""

    def __init__(self, low: int, high: int):
        if not 0 < low <= high:
            raise ValueError(f"scale range must satisfy 0 < low <= high, got [{low}, {high}]")
        self.low, self.high = low, high

    def __call__(self, image):
        from torchvision.transforms import functional
        return functional.resize(image, random.randint(self.low, self.high))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.low}, {self.high})"


class PCALighting:
    """AlexNet's color augmentation on a uint8 CHW tensor: add ``sum_i a_i * lambda_i * v_i`` to every
    pixel, ``a_i ~ N(0, std)``, rounded back to uint8."""

    def __init__(self, std: float = 0.1):
        self.std = std
        self.values = torch.tensor(PCA_EIGENVALUES)
        self.vectors = torch.tensor(PCA_EIGENVECTORS)

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.std == 0:
            return image
        alpha = torch.randn(3) * self.std
        shift = 255.0 * (self.vectors @ (alpha * self.values))            # (3,) in pixel units
        return (image.to(torch.float32) + shift[:, None, None]).round_().clamp_(0, 255).to(torch.uint8)


def train_transform(augment: str = "resized_crop", scale: tuple[int, int] = (256, 480), crop: int = 224):
    """The training transform of ``augment`` (see the module docstring)."""
    from torchvision import transforms
    if augment == "resized_crop":
        return transforms.Compose([transforms.RandomResizedCrop(crop), transforms.RandomHorizontalFlip(),
                                   transforms.PILToTensor()])
    if augment == "scale":
        if scale[0] < crop:
            raise ValueError(f"scale augmentation: the shorter side's range {tuple(scale)} must start at the "
                             f"crop size {crop} or above")
        return transforms.Compose([RandomShorterSide(*scale), transforms.RandomCrop(crop),
                                   transforms.RandomHorizontalFlip(), transforms.PILToTensor(), PCALighting(0.1)])
    raise ValueError(f"augment must be one of {IMAGENET_AUGMENTS}, got {augment!r}")


def eval_transform(resize: int = 256, crop: int = 224):
    """Shorter side to ``resize``, center ``crop`` x ``crop``, uint8 CHW."""
    from torchvision import transforms
    if not 0 < crop <= resize:
        raise ValueError(f"an evaluation crop needs 0 < crop <= resize, got resize {resize}, crop {crop}")
    return transforms.Compose([transforms.Resize(resize), transforms.CenterCrop(crop), transforms.PILToTensor()])


def parse_crop(text: str) -> tuple[int, int]:
    """``"320:320"`` or ``"320"`` -> (resize, crop)."""
    parts = text.split(":")
    try:
        values = [int(p) for p in parts]
    except ValueError:
        values = []
    if len(values) not in (1, 2) or any(v <= 0 for v in values):
        raise ValueError(f"--eval-crops: each crop is RESIZE:CROP (e.g. 256:224) or SIZE, got {text!r}")
    resize, crop = (values[0], values[0]) if len(values) == 1 else values
    if crop > resize:
        raise ValueError(f"--eval-crops: crop {crop} is larger than the resized side {resize} in {text!r}")
    return resize, crop
