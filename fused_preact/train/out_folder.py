"""The run's ``--out`` folder: one trainer at a time in it, and one run's outputs never mixed
into another's.

- ``RunLock``: an advisory lock (``fcntl.flock``) on ``<out>/train.lock``, held for the run's
  life and released on any exit; the kernel releases it too when the process dies (kill -9, a
  crash), so a dead trainer never keeps a folder locked. The file names the holder (PID, host,
  start time): a second trainer is refused with that PID, and a trainer that finds the name of a
  process which ended without releasing the lock (a stale lock) says that it takes it over. On
  a file system without ``flock`` the recorded PID decides: a live process on this host holds
  the folder, a dead one left a stale lock. A folder the lock created and the run left empty
  (it failed before writing anything) is removed with the lock.
- ``claim``: a folder holding another run's outputs (its checkpoint, log, metrics or divergence
  record) is refused for a fresh run; ``--overwrite`` moves those outputs aside into
  ``<out>/replaced-<time>/`` (nothing is deleted), ``--resume`` continues the run that is there
  (a divergence record of it becomes ``diverged-<iteration>.json``: the continued run is not
  diverged, e.g. after ``--override lr``). Temporary files of writes a killed trainer left
  are removed.
"""
from __future__ import annotations

import enum
import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Optional

from .errors import TrainerError

LOCK_NAME = "train.lock"
# what says a folder holds a run, and everything a run writes there (moved aside by --overwrite)
RUN_RECORDS = ("checkpoint.pt", "log.csv", "metrics.json", "diverged.json")
RUN_OUTPUTS = RUN_RECORDS + ("args.json", "curves.png", "signal.csv", "signal.png", "tensorboard", "eval.json")
_NO_FLOCK = {errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL}


class Refusal(enum.Enum):
    IN_USE = "in use by another trainer"
    HOLDS_RUN = "holds another run"


class OutFolderError(TrainerError):
    def __init__(self, folder: Path, refusal: Refusal, detail: str):
        self.folder, self.refusal = folder, refusal
        super().__init__(f"--out {str(folder)!r} {refusal.value}: {detail}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:    # someone else's live process
        return True
    return True


class RunLock:
    """``with RunLock(folder) as lock:`` holds ``folder/train.lock``; ``lock.stale`` is the record
    (pid, host, started) of a process that died holding it, when one was taken over."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.fd: Optional[int] = None
        self.stale: Optional[dict] = None
        self.created = False     # the folder did not exist before acquire()

    def _record(self) -> dict:
        try:
            text = os.pread(self.fd, 4096, 0).decode(errors="replace").strip()
            return json.loads(text) if text else {}
        except (OSError, ValueError):
            return {"pid": "unknown"}

    def _refuse(self, holder: dict) -> None:
        since = f", since {holder['started']}" if holder.get("started") else ""
        raise OutFolderError(self.folder, Refusal.IN_USE,
                             f"process {holder.get('pid', 'unknown')} on host {holder.get('host', 'unknown')}"
                             f"{since} holds {str(self.path)!r}; wait for it to end (or stop it), or give "
                             f"another --out")

    def acquire(self) -> "RunLock":
        self.created = not self.folder.exists()
        self.folder.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            self._lock()
            previous = self._record()
            if previous:     # a holder that ended without releasing: killed, crashed, powered off
                self.stale = previous
            me = {"pid": os.getpid(), "host": socket.gethostname(),
                  "started": time.strftime("%Y-%m-%d %H:%M:%S %z")}
            os.ftruncate(self.fd, 0)
            os.pwrite(self.fd, (json.dumps(me) + "\n").encode(), 0)
        except BaseException:
            os.close(self.fd)
            self.fd = None
            raise
        return self

    def _lock(self) -> None:
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._refuse(self._record())
        except OSError as error:
            if error.errno not in _NO_FLOCK:
                raise
            holder = self._record()    # no flock here: the recorded process decides
            pid = holder.get("pid")
            if isinstance(pid, int) and pid != os.getpid() and holder.get("host") == socket.gethostname() \
                    and _alive(pid):
                self._refuse(holder)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)     # an empty file: released, not stale
        except OSError:
            pass
        os.close(self.fd)                # closing releases the flock
        self.fd = None
        if self.created and [p.name for p in self.folder.iterdir()] == [LOCK_NAME]:
            # a run that failed before writing anything (bad data, a refusal) leaves no folder behind
            self.path.unlink(missing_ok=True)
            try:
                self.folder.rmdir()
            except OSError:
                pass

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds_run(folder: Path) -> list[str]:
    """The names of another run's records in ``folder``."""
    return [name for name in RUN_RECORDS if (Path(folder) / name).exists()]


def claim(folder: Path, *, continues: bool, overwrite: bool) -> Optional[Path]:
    """Make ``folder`` this run's: nothing to do when it holds no run or when this run ``continues``
    the one there; with ``overwrite`` the run there is moved aside (returns where to); otherwise
    ``OutFolderError``."""
    _remove_partial_writes(Path(folder))
    found = holds_run(folder)
    if continues:
        _retire_divergence_record(Path(folder))
        return None
    if not found:
        return None
    if not overwrite:
        raise OutFolderError(Path(folder), Refusal.HOLDS_RUN,
                             f"{', '.join(found)} of a run there. Continue that run with --resume, move it aside "
                             f"with --overwrite (into {folder}/replaced-<time>/, nothing is deleted), or give "
                             f"another --out")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    aside = Path(folder) / f"replaced-{stamp}"
    k = 1
    while aside.exists():
        k += 1
        aside = Path(folder) / f"replaced-{stamp}-{k}"
    aside.mkdir()
    for name in RUN_OUTPUTS:
        if (Path(folder) / name).exists():
            os.replace(Path(folder) / name, aside / name)
    return aside


def _remove_partial_writes(folder: Path) -> None:
    """Temporary files of checkpoint or log writes that a killed trainer left (under the lock no
    other trainer writes here): never a run's record, only space."""
    for pattern in (".checkpoint.pt.*.tmp", ".log.csv.*.tmp"):
        for path in folder.glob(pattern):
            path.unlink(missing_ok=True)


def _retire_divergence_record(folder: Path) -> None:
    """A diverged run that is continued (from its last finite checkpoint, usually with --override) is
    no longer diverged: its ``diverged.json`` becomes ``diverged-<iteration>.json``, kept as history."""
    record = folder / "diverged.json"
    if not record.exists():
        return
    try:
        iteration = json.loads(record.read_text()).get("iteration", "unknown")
    except ValueError:
        iteration = "unknown"
    target = folder / f"diverged-{iteration}.json"
    k = 1
    while target.exists():
        k += 1
        target = folder / f"diverged-{iteration}-{k}.json"
    os.replace(record, target)
