"""Checkpoints: errors that name the file and the cause (missing, empty, truncated, text, foreign,
a folder, another format, a full disk), the mode the umask gives, and a failed write that leaves
the previous checkpoint and ``log.csv`` as they were (no row without its checkpoint)."""
import csv
import errno
import io
import os

import pytest
import torch

from fused_preact.train import CheckpointError, main
from fused_preact.train import checkpoint
from fused_preact.train.checkpoint import CheckpointWriteError, Problem
from trainer_args import ITERS_PER_EPOCH, one_thread, tiny_argv

pytestmark = pytest.mark.usefixtures("one_cpu_thread", "no_training_plots")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A real checkpoint of a tiny run (stopped after iteration 2)."""
    out = tmp_path_factory.mktemp("run")
    with one_thread():
        main(tiny_argv(out, "--iters", "4", "--stop-after-iters", "2"))
    return out / "checkpoint.pt"


def _damage(kind, saved, path):
    data = saved.read_bytes()
    if kind == "truncated":
        path.write_bytes(data[:len(data) // 2])
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "text":
        path.write_text("epoch,iteration\n1,4\n")
    elif kind == "foreign":
        torch.save({"conv.weight": torch.zeros(3), "conv.bias": torch.zeros(3)}, path)
    elif kind == "other format":
        state = torch.load(saved, weights_only=False)
        torch.save({**state, "format": 99}, path)
    elif kind == "folder":
        path.mkdir()


CASES = {"missing": Problem.MISSING, "empty": Problem.EMPTY, "truncated": Problem.TRUNCATED,
         "text": Problem.NOT_PYTORCH, "foreign": Problem.FOREIGN, "folder": Problem.UNREADABLE,
         "other format": Problem.OLD_FORMAT}


@pytest.mark.parametrize("kind", list(CASES))
def test_a_bad_checkpoint_is_refused_naming_the_file_and_the_cause(saved, tmp_path, kind):
    path = tmp_path / "checkpoint.pt"
    _damage(kind, saved, path)
    with pytest.raises(CheckpointError) as refused:
        main(tiny_argv(tmp_path / "out", "--iters", "4", "--resume", str(path)))
    assert refused.value.problem is CASES[kind] and refused.value.path == path
    assert str(path) in str(refused.value) and CASES[kind].value in str(refused.value)
    assert refused.value.exit_status == 2


def test_the_checkpoint_gets_the_mode_the_umask_gives(tmp_path):
    for umask, mode in ((0o022, 0o644), (0o027, 0o640)):
        previous = os.umask(umask)
        try:
            checkpoint.save_atomic({"format": checkpoint.FORMAT, "model": {}}, tmp_path / f"{umask:o}.pt")
        finally:
            os.umask(previous)
        assert (tmp_path / f"{umask:o}.pt").stat().st_mode & 0o777 == mode


class _FullDisk(io.FileIO):
    """A file on a disk that has room for ``room`` more bytes."""
    room = 0

    def write(self, data):
        if len(data) > _FullDisk.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _FullDisk.room -= len(data)
        return super().write(data)


def test_a_full_disk_is_named_and_leaves_the_previous_checkpoint(saved, tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(saved.read_bytes())
    monkeypatch.setattr(checkpoint, "_open_for_writing", lambda fd: _FullDisk(fd, "wb"))
    _FullDisk.room = 1000
    with pytest.raises(CheckpointWriteError) as failed:
        checkpoint.save_atomic(torch.load(saved, weights_only=False), path)
    assert f"checkpoint '{path}' could not be written: No space left on device (ENOSPC); the previous " \
           f"checkpoint there is unchanged" == str(failed.value)
    assert failed.value.exit_status == 1
    assert path.read_bytes() == saved.read_bytes() and os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file


def test_partial_writes_of_a_killed_trainer_are_removed_at_the_next_start(saved, tmp_path):
    (tmp_path / ".checkpoint.pt.4242.ab12cd34.tmp").write_bytes(saved.read_bytes()[:1000])   # kill -9 while saving
    (tmp_path / "checkpoint.pt").write_bytes(saved.read_bytes())
    main(tiny_argv(tmp_path, "--iters", "4", "--resume"))
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_a_failed_checkpoint_write_writes_no_row_and_the_resume_duplicates_none(tmp_path, monkeypatch):
    """The epoch-2 checkpoint cannot be written: log.csv keeps epoch 1's row only, the resume from
    epoch 1 writes epochs 2 and 3 once, as the uninterrupted run does."""
    main(tiny_argv(tmp_path / "whole", "--iters", "12"))
    saves = []
    real_open = checkpoint._open_for_writing

    def full_at_the_second_save(fd):
        saves.append(1)
        _FullDisk.room = 0
        return _FullDisk(fd, "wb") if len(saves) == 2 else real_open(fd)

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "_open_for_writing", full_at_the_second_save)
        with pytest.raises(CheckpointWriteError, match="No space left on device"):
            main(tiny_argv(tmp_path / "parts", "--iters", "12"))
    assert torch.load(tmp_path / "parts" / "checkpoint.pt", weights_only=False)["iteration"] == ITERS_PER_EPOCH
    rows = lambda run: [{k: v for k, v in r.items() if k not in ("images_per_s", "elapsed_s")}
                        for r in csv.DictReader(open(tmp_path / run / "log.csv"))]
    assert [r["iteration"] for r in rows("parts")] == ["4"]
    main(tiny_argv(tmp_path / "parts", "--iters", "12", "--resume"))
    assert [r["iteration"] for r in rows("parts")] == ["4", "8", "12"]
    assert rows("parts") == rows("whole")
