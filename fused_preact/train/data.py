"""Datasets of the trainer: CIFAR-10/100 from their python-pickle folders, ImageNet
from ``train/`` and ``val/`` class folders, and synthetic data of the right shapes.

CIFAR lives on the training device as one uint8 tensor (150 MB for 50,000 images)
and is augmented there in whole batches (``augment.py``), so no loader process
stands between the data and fast kernels. ImageNet is decoded by DataLoader
workers (RandomResizedCrop 224 + flip, or the paper's scale augmentation; resize
256, center crop 224; see ``imagenet_transforms``) into uint8 tensors that are
normalized on the device.

Verification of a CIFAR folder: its structure is always checked (every file
present and unpickling to the expected keys, uint8 images of 3,072 bytes, labels
in range). The published md5 sum of a file is checked when the file claims to be
the official one, i.e. holds the official number of images (10,000 per CIFAR-10
batch; 50,000 / 10,000 in CIFAR-100's train / test); the meta file is checked
when all data files are official. ``verify_md5=False`` (``--no-verify``) skips
the md5 sums, e.g. for a re-pickled copy. Any problem raises one
``DatasetError`` that says what was expected where.
"""
from __future__ import annotations

import hashlib
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch

CIFAR_IMAGE_BYTES = 3 * 32 * 32
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class CifarLayout:
    """What a CIFAR python-pickle folder holds (names and md5 sums as published)."""
    name: str
    folder: str
    archive: str
    train_files: tuple[tuple[str, str, int], ...]   # (file, md5, official image count)
    test_files: tuple[tuple[str, str, int], ...]
    meta_file: tuple[str, str]
    label_key: bytes
    meta_key: bytes
    num_classes: int


CIFAR_LAYOUTS = {
    "cifar10": CifarLayout(
        "CIFAR-10", "cifar-10-batches-py", "cifar-10-python.tar.gz",
        (("data_batch_1", "c99cafc152244af753f735de768cd75f", 10000),
         ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec", 10000),
         ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751", 10000),
         ("data_batch_4", "634d18415352ddfa80567beed471001a", 10000),
         ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb", 10000)),
        (("test_batch", "40351d587109b95175f43aff81a1287e", 10000),),
        ("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
        b"labels", b"label_names", 10),
    "cifar100": CifarLayout(
        "CIFAR-100", "cifar-100-python", "cifar-100-python.tar.gz",
        (("train", "16019d7e3df5f24257cddd939b257f8d", 50000),),
        (("test", "f0ef6b0ae62326f3e7ffdfab6717acfc", 10000),),
        ("meta", "7973b15100ade9c7d40fb424638fde48"),
        b"fine_labels", b"fine_label_names", 100),
}


class DatasetError(ValueError):
    """A data folder is missing or does not hold what it should."""


@dataclass
class ImageSet:
    """Images as uint8 (N, 3, H, W) and int64 labels (N,)."""
    images: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return self.labels.numel()

    def to(self, device) -> "ImageSet":
        return ImageSet(self.images.to(device), self.labels.to(device))


# -- CIFAR -----------------------------------------------------------------------
def cifar_folder(data: str | os.PathLike, dataset: str) -> Path:
    """The pickle folder of ``dataset`` under ``data`` (or ``data`` itself when it is that folder)."""
    layout = CIFAR_LAYOUTS[dataset]
    data = Path(data)
    return data if data.name == layout.folder else data / layout.folder


def _expected(layout: CifarLayout, folder: Path) -> str:
    files = [f for f, _, _ in layout.train_files + layout.test_files] + [layout.meta_file[0]]
    return (f"{layout.name}: expected the python-pickle folder {str(folder)!r} (extracted from "
            f"{layout.archive}) holding {', '.join(files)}")


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _unpickle(path: Path, fail) -> dict:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="bytes")
    except Exception as error:   # any unpickling failure means a corrupt file
        fail(f"{path.name} is not a readable pickle ({type(error).__name__}: {error})")
    if not isinstance(entry, dict):
        fail(f"{path.name} holds a {type(entry).__name__}, not a dict")
    return entry


def _read_batch(path: Path, layout: CifarLayout, md5: str, official_count: int, verify_md5: bool,
                fail) -> tuple[np.ndarray, np.ndarray, bool]:
    entry = _unpickle(path, fail)
    for key in (b"data", layout.label_key):
        if key not in entry:
            fail(f"{path.name} has no key {key!r} (keys: {sorted(entry)})")
    images = entry[b"data"]
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim != 2 \
            or images.shape[1] != CIFAR_IMAGE_BYTES:
        shape = getattr(images, "shape", None)
        dtype = getattr(images, "dtype", type(images).__name__)
        fail(f"{path.name}: b'data' must be a uint8 array of shape (n, {CIFAR_IMAGE_BYTES}), "
             f"got {dtype} of shape {shape}")
    labels = np.asarray(entry[layout.label_key])
    if labels.ndim != 1 or labels.shape[0] != images.shape[0] or not np.issubdtype(labels.dtype, np.integer):
        fail(f"{path.name}: {layout.label_key!r} must hold one integer label per image "
             f"({images.shape[0]}), got {labels.dtype} of shape {labels.shape}")
    if labels.size and (labels.min() < 0 or labels.max() >= layout.num_classes):
        fail(f"{path.name}: labels must lie in [0, {layout.num_classes}), "
             f"got [{labels.min()}, {labels.max()}]")
    official = images.shape[0] == official_count
    if official and verify_md5 and _md5(path) != md5:
        fail(f"{path.name} holds the official {official_count} images but its md5 sum is not the "
             f"published {md5}: the file is corrupt (use --no-verify for a re-pickled copy)")
    return images, labels.astype(np.int64), official


def load_cifar(data: str | os.PathLike, dataset: str, verify_md5: bool = True) -> tuple[ImageSet, ImageSet]:
    """(train, test) of CIFAR-10 (``dataset="cifar10"``) or CIFAR-100 (``"cifar100"``)."""
    if dataset not in CIFAR_LAYOUTS:
        raise ValueError(f"dataset must be one of {sorted(CIFAR_LAYOUTS)}, got {dataset!r}")
    layout = CIFAR_LAYOUTS[dataset]
    folder = cifar_folder(data, dataset)

    def fail(problem: str):
        raise DatasetError(f"{_expected(layout, folder)}; {problem}")

    if not folder.is_dir():
        fail("that folder does not exist (nothing is downloaded: extract the archive under --data)")
    names = [f for f, _, _ in layout.train_files + layout.test_files] + [layout.meta_file[0]]
    missing = [n for n in names if not (folder / n).is_file()]
    if missing:
        fail(f"missing: {', '.join(missing)}")

    def read(files) -> tuple[ImageSet, bool]:
        parts = [_read_batch(folder / f, layout, md5, count, verify_md5, fail) for f, md5, count in files]
        images = np.concatenate([p[0] for p in parts]).reshape(-1, 3, 32, 32)
        labels = np.concatenate([p[1] for p in parts])
        return ImageSet(torch.from_numpy(images), torch.from_numpy(labels)), all(p[2] for p in parts)

    train, train_official = read(layout.train_files)
    test, test_official = read(layout.test_files)
    meta_name, meta_md5 = layout.meta_file
    meta = _unpickle(folder / meta_name, fail)
    if layout.meta_key not in meta or len(meta[layout.meta_key]) != layout.num_classes:
        fail(f"{meta_name} must list {layout.num_classes} class names under {layout.meta_key!r}")
    if train_official and test_official and verify_md5 and _md5(folder / meta_name) != meta_md5:
        fail(f"{meta_name}: md5 sum is not the published {meta_md5}")
    if len(train) == 0 or len(test) == 0:
        fail("the training or test files hold no images")
    return train, test


def channel_stats(images: torch.Tensor, chunk: int = 4096) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and standard deviation of uint8 images (N, C, H, W), in [0, 1] units."""
    total = torch.zeros(images.shape[1], dtype=torch.float64, device=images.device)
    total_sq = torch.zeros_like(total)
    for start in range(0, images.shape[0], chunk):
        x = images[start:start + chunk].to(torch.float64).div_(255)
        total += x.sum(dim=(0, 2, 3))
        total_sq += x.square().sum(dim=(0, 2, 3))
    count = images.shape[0] * images.shape[2] * images.shape[3]
    mean = total / count
    std = (total_sq / count - mean.square()).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


# -- synthetic ---------------------------------------------------------------------
def synthetic_images(count: int, image_size: int, num_classes: int, seed: int) -> ImageSet:
    """Random uint8 images and labels of the right shapes, for speed runs."""
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, 3, image_size, image_size), dtype=torch.uint8, generator=generator)
    labels = torch.randint(0, num_classes, (count,), generator=generator)
    return ImageSet(images, labels)


# -- ImageNet ------------------------------------------------------------------------
def imagenet_folders(data: str | os.PathLike) -> tuple[Path, Path]:
    """``data/train`` and ``data/val``, each with one sub-folder of images per class."""
    root = Path(data)
    train, val = root / "train", root / "val"
    for split in (train, val):
        if not split.is_dir() or not any(p.is_dir() for p in split.iterdir()):
            raise DatasetError(f"ImageNet: expected class folders under {str(split)!r} "
                               f"(the usual layout: {root}/train/<class>/*.JPEG and {root}/val/<class>/*.JPEG)")
    return train, val


def imagenet_datasets(data: str | os.PathLike, augment: str = "resized_crop", scale: tuple[int, int] = (256, 480)):
    """(train, val) torchvision ``ImageFolder``s yielding uint8 CHW tensors of 224x224; ``augment``
    and ``scale``: the training transform (``imagenet_transforms.train_transform``)."""
    from torchvision import datasets

    from .imagenet_transforms import eval_transform, train_transform

    train_dir, val_dir = imagenet_folders(data)
    train = datasets.ImageFolder(train_dir, train_transform(augment, scale))
    val = datasets.ImageFolder(val_dir, eval_transform(256, 224))
    if train.classes != val.classes:
        raise DatasetError(f"ImageNet: {str(train_dir)!r} and {str(val_dir)!r} must hold the same class folders")
    return train, val


def num_classes_of(dataset: str) -> int:
    return {"cifar10": 10, "cifar100": 100, "imagenet": 1000}[dataset]


def describe(dataset: str, data: Optional[str]) -> str:
    return f"{dataset} ({'synthetic' if data is None else data})"
