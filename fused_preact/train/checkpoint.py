"""Checkpoints: written atomically, read back with errors that name the file and the cause.

Writing: a temporary file in the same folder, flushed and fsynced, then ``os.replace``d over
the old checkpoint (and the folder fsynced), so a crash, a kill or a full disk while saving
leaves the previous checkpoint as it was, never half a file. The file gets the mode the
user's umask gives (``open(..., 0o666)``), as any other file the run writes. A failed write
(disk full, quota, read-only folder) raises ``CheckpointError`` with the errno's reason:
``torch.save`` itself reports those as "[enforce fail at inline_container.cc] unexpected pos",
so the file object it writes to keeps the ``OSError`` it saw.

Reading: ``load`` tells apart a missing, unreadable, empty, truncated or damaged file, a file
that ``torch.save`` did not write, and a PyTorch file that is not a checkpoint of this trainer.
"""
from __future__ import annotations

import enum
import errno
import os
import secrets
import zipfile
from pathlib import Path
from typing import BinaryIO, Optional

import torch

from .errors import RunFailed, TrainerError

FORMAT = 2          # 2: the run's configuration, overrides, the epoch's partial sums and the log rows
EVAL_FORMATS = (1, 2)   # what --eval-only reads (the model and the flags that built it)
_ZIP_MAGIC = b"PK\x03\x04"     # torch.save's zip archive
_PICKLE_PROTOCOL = 0x80        # torch.save's legacy (pre-1.6) format starts with a pickle


class Problem(enum.Enum):
    MISSING = "does not exist"
    UNREADABLE = "cannot be read"
    EMPTY = "is empty (0 bytes)"
    TRUNCATED = "is truncated"
    DAMAGED = "is damaged"
    NOT_PYTORCH = "is not a file torch.save wrote"
    FOREIGN = "is not a checkpoint of this trainer"
    OLD_FORMAT = "is of another checkpoint format"
    WRITE_FAILED = "could not be written"


class CheckpointError(TrainerError):
    """A checkpoint that cannot be read or written; ``problem`` says which way."""

    def __init__(self, path: str | os.PathLike, problem: Problem, detail: str):
        self.path, self.problem = Path(path), problem
        super().__init__(f"checkpoint {str(path)!r} {problem.value}: {detail}")


class CheckpointWriteError(CheckpointError, RunFailed):
    """The checkpoint could not be written; the previous one (if any) is unchanged."""


# -- writing ------------------------------------------------------------------------------------------
class _ErrorKeepingWriter:
    """The file object ``torch.save`` writes to: keeps the ``OSError`` of a failed write, which
    torch's archive writer replaces by an assertion about the stream position."""

    def __init__(self, file: BinaryIO):
        self.file, self.error = file, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as error:
            self.error = error
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as error:
            self.error = error
            raise


def _open_for_writing(fd: int) -> BinaryIO:
    """The temporary file as a Python file object (tests put a full disk here)."""
    return os.fdopen(fd, "wb")


def _reason(error: OSError) -> str:
    code = error.errno
    name = errno.errorcode.get(code, str(code)) if code is not None else "no errno"
    return f"{os.strerror(code) if code is not None else error} ({name})"


def save_atomic(state: dict, path: str | os.PathLike) -> None:
    """``torch.save(state, path)`` that either fully happens or not at all; a failed write raises
    ``CheckpointWriteError`` (the file at ``path`` is then the previous one, or absent)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    writer: Optional[_ErrorKeepingWriter] = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)   # the umask applies
        with _open_for_writing(fd) as file:
            writer = _ErrorKeepingWriter(file)
            torch.save(state, writer)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
        _fsync_folder(path.parent)
    except BaseException as error:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        cause = error if isinstance(error, OSError) else writer.error if writer is not None else None
        if cause is None:
            raise
        kept = "the previous checkpoint there is unchanged" if path.exists() else "no checkpoint is there"
        raise CheckpointWriteError(path, Problem.WRITE_FAILED, f"{_reason(cause)}; {kept}") from error


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable (a folder fsync; not every file system allows one)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# -- reading ------------------------------------------------------------------------------------------
def _head(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except IsADirectoryError:
        raise CheckpointError(path, Problem.UNREADABLE, "it is a folder (give the checkpoint file in it)")
    except OSError as error:
        raise CheckpointError(path, Problem.UNREADABLE, _reason(error)) from error


def load(path: str | os.PathLike) -> dict:
    """A checkpoint of this trainer, on the CPU. Raises ``CheckpointError`` naming the file and the
    problem; the caller checks ``state["format"]`` against what it can use."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(path, Problem.MISSING, "no such file")
    head = _head(path)
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(path, Problem.EMPTY, "nothing was ever written into it (this trainer "
                                                   "replaces its checkpoints whole, so it did not leave it so)")
    if head.startswith(_ZIP_MAGIC):
        if not zipfile.is_zipfile(path):
            raise CheckpointError(path, Problem.TRUNCATED, f"{size:,} bytes of a zip archive without its end "
                                                           f"(cut short: an interrupted copy or transfer)")
    elif not head or head[0] != _PICKLE_PROTOCOL:
        raise CheckpointError(path, Problem.NOT_PYTORCH, f"it starts with {head!r}")
    try:
        # our own files: optimizer and RNG states need more than tensors, so weights_only=False
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:   # torch.load raises RuntimeError, EOFError, pickle errors...
        raise CheckpointError(path, Problem.DAMAGED, f"{type(error).__name__}: {error}") from error
    if not isinstance(state, dict) or not isinstance(state.get("format"), int) or "model" not in state:
        what = f"a dict with keys {', '.join(map(repr, list(state)[:5]))}{', ...' if len(state) > 5 else ''}" \
            if isinstance(state, dict) else f"a {type(state).__name__}"
        raise CheckpointError(path, Problem.FOREIGN, f"it holds {what}, not the format/model/optimizer record "
                                                     f"python -m fused_preact.train writes")
    return state


def require_format(state: dict, path: str | os.PathLike, formats: tuple[int, ...], use: str) -> None:
    """Refuse a checkpoint whose format is not one of ``formats`` (``use``: what it was loaded for)."""
    if state["format"] not in formats:
        raise CheckpointError(path, Problem.OLD_FORMAT,
                              f"format {state['format']}, and {use} needs format {' or '.join(map(str, formats))} "
                              f"(written by {'an older' if state['format'] < max(formats) else 'a newer'} trainer)")
