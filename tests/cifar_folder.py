"""Test helper: CIFAR-10/100 folders in the real python-pickle format, written by tests.

``write_cifar10`` / ``write_cifar100`` take uint8 images (N, 3, 32, 32) and labels;
``random_cifar`` fills a folder with random images; ``digits_cifar`` writes
scikit-learn's 8x8 digits, upsampled to 32x32 RGB, as a CIFAR-10 folder.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def _dump(path: Path, entry: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(entry, f, protocol=2)


def _batch(images: np.ndarray, labels: np.ndarray, label_key: bytes, name: bytes) -> dict:
    images = np.ascontiguousarray(images, dtype=np.uint8)
    if images.ndim != 4 or images.shape[1:] != (3, 32, 32):
        raise ValueError(f"images must be uint8 (N, 3, 32, 32), got {images.shape}")
    return {b"batch_label": name, b"data": images.reshape(len(images), 3072),
            label_key: [int(v) for v in labels], b"filenames": [b"img%d.png" % i for i in range(len(images))]}


def write_batch(path: Path, images, labels, label_key: bytes = b"labels") -> None:
    """One pickle file of a CIFAR folder (``label_key``: b"labels" or b"fine_labels")."""
    _dump(Path(path), _batch(images, np.asarray(labels), label_key, Path(path).name.encode()))


def write_cifar10(root: Path, train_images, train_labels, test_images, test_labels) -> Path:
    """``root/cifar-10-batches-py`` with the training set split over data_batch_1..5."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    parts = np.array_split(np.arange(len(train_labels)), 5)
    for i, part in enumerate(parts, start=1):
        _dump(folder / f"data_batch_{i}",
              _batch(train_images[part], np.asarray(train_labels)[part], b"labels", b"training batch %d of 5" % i))
    _dump(folder / "test_batch", _batch(test_images, test_labels, b"labels", b"testing batch 1 of 1"))
    _dump(folder / "batches.meta", {b"label_names": [b"class%d" % i for i in range(10)],
                                    b"num_cases_per_batch": len(parts[0]), b"num_vis": 3072})
    return folder


def write_cifar100(root: Path, train_images, train_labels, test_images, test_labels) -> Path:
    """``root/cifar-100-python`` with ``train``, ``test`` and ``meta``."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, images, labels in (("train", train_images, train_labels), ("test", test_images, test_labels)):
        entry = _batch(images, labels, b"fine_labels", name.encode())
        entry[b"coarse_labels"] = [int(v) // 5 for v in labels]
        _dump(folder / name, entry)
    _dump(folder / "meta", {b"fine_label_names": [b"fine%d" % i for i in range(100)],
                            b"coarse_label_names": [b"coarse%d" % i for i in range(20)]})
    return folder


def random_cifar(root: Path, n_train: int, n_test: int, *, num_classes: int = 10, seed: int = 0) -> Path:
    """A CIFAR-10 (``num_classes=10``) or CIFAR-100 folder of random images whose
    label is learnable: each class has its own mean color."""
    rng = np.random.default_rng(seed)

    def make(n):
        labels = rng.integers(0, num_classes, n)
        colors = rng.integers(40, 216, (num_classes, 3)) if not hasattr(make, "colors") else make.colors
        make.colors = colors
        noise = rng.normal(0, 30, (n, 3, 32, 32))
        images = np.clip(colors[labels][:, :, None, None] + noise, 0, 255).astype(np.uint8)
        return images, labels

    train, test = make(n_train), make(n_test)
    writer = write_cifar10 if num_classes == 10 else write_cifar100
    return writer(root, *train, *test)


def digits_cifar(root: Path, n_test: int = 297, seed: int = 0) -> Path:
    """scikit-learn's 1,797 handwritten 8x8 digits, upsampled to 32x32 gray-as-RGB
    (nearest neighbor, 4x), shuffled and split into train and ``n_test`` test images."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255.0 / 16.0)).round().astype(np.uint8)            # (N, 8, 8)
    images = images.repeat(4, axis=1).repeat(4, axis=2)                            # (N, 32, 32)
    images = np.repeat(images[:, None], 3, axis=1)                                 # (N, 3, 32, 32)
    order = np.random.default_rng(seed).permutation(len(images))
    images, labels = images[order], digits.target[order]
    return write_cifar10(root, images[n_test:], labels[n_test:], images[:n_test], labels[:n_test])
