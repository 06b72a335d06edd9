"""What a run writes besides checkpoints: the per-epoch CSV (and TensorBoard
scalars when tensorboard is installed), the signal CSV, the final metrics JSON."""
from __future__ import annotations

import csv
import json
import os
import subprocess
from pathlib import Path
from typing import Optional

EPOCH_FIELDS = ("epoch", "iteration", "lr", "train_loss", "train_error", "test_loss", "test_error",
                "images_per_s", "elapsed_s", "overrides")
SCALAR_FIELDS = ("lr", "train_loss", "train_error", "test_loss", "test_error", "images_per_s", "elapsed_s")
SIGNAL_FIELDS = ("iteration", "unit", "x_norm", "grad_norm")


class EpochLog:
    """``log.csv``, one row per epoch, as the last checkpoint holds them: rewritten whole (atomically)
    after each checkpoint write, so a row is there exactly when a checkpoint holding it is, and a
    resumed run neither repeats nor loses one. New rows also go to TensorBoard, when installed."""

    def __init__(self, out: Path):
        self.path = out / "log.csv"
        self.tensorboard = None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:   # tensorboard is optional
            SummaryWriter = None
        if SummaryWriter is not None:
            self.tensorboard = SummaryWriter(str(out / "tensorboard"))

    def rewrite(self, rows: list[dict], new: tuple[dict, ...] | list[dict] = ()) -> None:
        """``log.csv`` holding ``rows``; ``new``: the rows not written before (for TensorBoard)."""
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=EPOCH_FIELDS)
            writer.writeheader()
            for row in rows:
                writer.writerow({k: row.get(k, "") for k in EPOCH_FIELDS})
        os.replace(tmp, self.path)
        if self.tensorboard is not None and new:
            for row in new:
                for key in SCALAR_FIELDS:
                    if isinstance(row.get(key), (int, float)):
                        self.tensorboard.add_scalar(key, row[key], row["iteration"])
            self.tensorboard.flush()

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()


def write_signal_csv(path: Path, records: list[tuple[int, int, float, float]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(SIGNAL_FIELDS)
        writer.writerows(records)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def _git(*args: str) -> Optional[str]:
    """What ``git *args`` prints in this package's checkout, or None where it fails."""
    try:
        done = subprocess.run(["git", *args], cwd=Path(__file__).resolve().parent, capture_output=True,
                              text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> Optional[str]:
    """The commit of the checkout this package runs from (``+dirty`` when tracked files differ from it);
    where there is no checkout (a copied tree on a device machine), ``FUSED_PREACT_GIT_COMMIT`` as
    given; None when neither is there."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        given = os.environ.get("FUSED_PREACT_GIT_COMMIT", "").strip()
        if given:
            return f"{given} (from FUSED_PREACT_GIT_COMMIT: no git checkout here)"
        return None
    dirty = _git("status", "--porcelain", "--untracked-files=no")
    return commit + ("+dirty" if dirty else "")
