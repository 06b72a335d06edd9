"""Checkpoints written atomically: a temporary file in the same folder, flushed to
disk, then ``os.replace``d over the old one, so a crash or a second signal while
saving never leaves a half-written checkpoint behind."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """``torch.save(state, path)`` that either fully happens or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path: str | os.PathLike) -> dict:
    """A checkpoint written by ``save_atomic``, on the CPU."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    # our own files: optimizer and RNG states need more than tensors, so weights_only=False
    return torch.load(path, map_location="cpu", weights_only=False)
