"""bench/memory.py: its CPU run (JSON and PNG, the four contenders' saved bytes) and the largest-batch search."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import memory  # noqa: E402
from fused_preact import dispatch  # noqa: E402


@pytest.mark.usefixtures("one_cpu_thread")
def test_cpu_run_writes_json_and_png(tmp_path):
    if dispatch.unavailable_reason("cuda", torch.empty(1, 4, 4, 4)) is not None:
        pytest.skip("the C++ extension is not built")
    run = memory.main(["--models", "cifar_resnet8", "--dtypes", "fp32", "--batch", "2", "--device", "cpu",
                       "--out", str(tmp_path)])
    saved = json.loads((tmp_path / memory.JSON_NAME).read_text())
    assert saved["results"] == run["results"] and saved["info"]["git_commit"]
    assert (tmp_path / memory.CHART_NAME).read_bytes()[:4] == b"\x89PNG"
    by = {e["contender"]: e for e in saved["results"]}
    assert list(by) == list(memory.CONTENDERS)
    assert by["eager"]["ratio_vs_eager"] == 1.0
    # a checkpointed unit and a memory="min" unit both keep the unit's input alone
    assert by["fused-min"]["saved_bytes"] == by["eager+checkpoint"]["saved_bytes"]
    assert by["fused-min"]["saved_bytes"] < by["fused"]["saved_bytes"] < by["eager"]["saved_bytes"]
    assert "peak_step_bytes" not in by["fused"]     # GPU figures only on a GPU
    assert "| cifar_resnet8 | fp32 |" in memory.ratio_table(saved["results"])


def test_largest_batch_doubles_then_bisects(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(memory.gc, "collect", lambda: 0)     # 0.5 s a call with the test session's heap
    tried = []

    def step(batch):
        tried.append(batch)
        if batch > 37:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (test)")
    found = memory.largest_batch(step, 4, seconds=60)
    assert found["largest_batch"] == 37 and found["first_failing_batch"] == 38 and found["exact"]
    assert tried[:5] == [4, 8, 16, 32, 64]
    assert memory.largest_batch(step, 4, seconds=0) == {"largest_batch": 0, "first_failing_batch": None,
                                                         "exact": False, "trials": 0, "seconds_limit": 0}
