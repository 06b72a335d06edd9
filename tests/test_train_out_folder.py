"""One run per ``--out``: a fresh run into a folder holding another run is refused (``--overwrite``
moves that run aside, nothing is deleted), and a lock keeps a second trainer out while one runs,
naming the holder's PID; the lock of a killed trainer is taken over."""
import csv
import os
import signal
import subprocess
import sys
import time

import pytest

from fused_preact.train import OutFolderError, main
from fused_preact.train.out_folder import LOCK_NAME, Refusal, RunLock
from trainer_args import tiny_argv

pytestmark = pytest.mark.usefixtures("one_cpu_thread", "no_training_plots")


def test_a_fresh_run_into_a_used_out_is_refused_and_overwrite_moves_the_old_run_aside(tmp_path, capsys):
    main(tiny_argv(tmp_path, "--iters", "4"))
    before = {name: (tmp_path / name).read_bytes() for name in ("checkpoint.pt", "log.csv", "metrics.json")}
    with pytest.raises(OutFolderError) as refused:
        main(tiny_argv(tmp_path, "--iters", "4", "--lr", "0.01"))
    assert refused.value.refusal is Refusal.HOLDS_RUN
    assert "checkpoint.pt, log.csv, metrics.json" in str(refused.value) and "--overwrite" in str(refused.value)
    assert {name: (tmp_path / name).read_bytes() for name in before} == before     # untouched, nothing appended

    main(tiny_argv(tmp_path, "--iters", "4", "--lr", "0.01", "--overwrite"))
    [aside] = [p for p in tmp_path.iterdir() if p.name.startswith("replaced-")]
    assert f"is now in {aside}" in capsys.readouterr().out
    assert {name: (aside / name).read_bytes() for name in before} == before        # the old run, whole
    assert (aside / "args.json").exists() and not (tmp_path / "diverged.json").exists()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [(r["iteration"], float(r["lr"])) for r in rows] == [("4", 0.01)]


def _hold_lock_in_a_child(folder):
    """Fork a process that takes ``folder``'s run lock through the trainer's own code and waits;
    returns its PID once it holds the lock."""
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:   # the child: no pytest, no torch work, just the lock
        try:
            RunLock(folder).acquire()
            os.write(ready_w, b"1")
            time.sleep(120)
        finally:
            os._exit(0)
    os.close(ready_w)
    assert os.read(ready_r, 1) == b"1"
    os.close(ready_r)
    return pid


def test_a_second_trainer_gets_the_lock_error_and_a_dead_holders_lock_is_taken_over(tmp_path, capsys):
    pid = _hold_lock_in_a_child(tmp_path)
    try:
        with pytest.raises(OutFolderError) as refused:
            main(tiny_argv(tmp_path, "--iters", "2"))
        assert refused.value.refusal is Refusal.IN_USE
        assert f"process {pid} on host" in str(refused.value) and LOCK_NAME in str(refused.value)
        assert not (tmp_path / "checkpoint.pt").exists()
    finally:
        os.kill(pid, signal.SIGKILL)    # dies holding the lock: a stale lock file names it
        os.waitpid(pid, 0)
    assert str(pid) in (tmp_path / LOCK_NAME).read_text()
    metrics = main(tiny_argv(tmp_path, "--iters", "2"))
    assert metrics["iterations"] == 2
    assert f"named process {pid} on host" in capsys.readouterr().out
    assert (tmp_path / LOCK_NAME).read_text() == ""          # released at the end of the run
    with RunLock(tmp_path) as lock:                          # and free again
        assert lock.stale is None


def test_without_flock_the_recorded_process_decides(tmp_path, monkeypatch):
    """On a file system without flock (some network mounts), a live recorded process holds the folder
    and a dead one left a stale lock."""
    import errno
    import fcntl
    import json
    import socket

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": sleeper.pid, "host": socket.gethostname()}))
        with pytest.raises(OutFolderError, match=f"process {sleeper.pid} on host"):
            RunLock(tmp_path).acquire()
    finally:
        sleeper.kill()
        sleeper.wait()
    with RunLock(tmp_path) as lock:
        assert lock.stale["pid"] == sleeper.pid
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert (tmp_path / LOCK_NAME).read_text() == ""


@pytest.mark.full   # two trainer processes (about 15 s of imports)
def test_two_trainer_processes_on_one_out(tmp_path):
    command = [sys.executable, "-m", "fused_preact.train", *tiny_argv(tmp_path, "--iters", "100000")]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    first = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while str(first.pid) not in ((tmp_path / LOCK_NAME).read_text() if (tmp_path / LOCK_NAME).exists() else ""):
            assert time.time() < deadline and first.poll() is None, first.communicate()
            time.sleep(0.2)
        second = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
        assert second.returncode == 2
        assert f"in use by another trainer: process {first.pid} on host" in second.stderr
        first.send_signal(signal.SIGINT)     # stops at its next window end, with a checkpoint
        out, err = first.communicate(timeout=300)
        assert first.returncode == 128 + signal.SIGINT, err
    finally:
        if first.poll() is None:
            first.kill()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert len({r["iteration"] for r in rows}) == len(rows)    # one run's rows only
