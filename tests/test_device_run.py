"""bench/device_run.sh and bench/pack_outputs.py: the one GPU command, dry-run here (no GPU:
the GPU steps are left out), its packed outputs within the device tool's rules (at most 8 files,
16 MiB each, 2 folders deep, plain names), and tests/conftest.py's per-test alarm and sampling."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import device_budget, pack_outputs  # noqa: E402


def _tree_ok(out: Path):
    assert pack_outputs.check(out) == []
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8
    for path in files:
        assert path.stat().st_size <= 16 * 2 ** 20 and len(path.relative_to(out).parts) <= 3


ORDER = ["environment", "build", "check", "memcheck", "racecheck", "tests", "memory", "benchmark"]


def test_the_budget_fits_nine_minutes_and_every_step_gets_its_minimum():
    """bench/device_budget.py's plan at 540 s: even when every step runs as long as it may, the steps
    (in the order of issue 30: build, check, sanitizers, tests, benchmark) end inside the budget less
    the packing reserve and the kill grace, and each gets at least its minimum: the sanitizers too
    (the old plan, --full sweeps and a 150 s benchmark reserve, left them 0 s)."""
    assert [step.name for step in device_budget.STEPS] == ORDER
    worst = device_budget.worst_case(540)
    assert sum(worst.values()) <= 540 - device_budget.PACK_RESERVE - device_budget.GRACE
    for step in device_budget.STEPS:
        assert worst[step.name] >= step.minimum, (step.name, worst)
    assert worst["memcheck"] >= 20 and worst["racecheck"] >= 10 and worst["benchmark"] >= 90
    # the script runs its steps in the plan's order, each with the plan's cap and reserve
    script = (REPO / "bench" / "device_run.sh").read_text()
    planned = [line.split()[1] for line in script.splitlines() if line.strip().startswith("planned ")]
    assert planned == [name for name in ORDER if name != "benchmark"], planned
    assert "--full" not in script.split("FULL=(--full)")[1].split("pytest_cmd()")[0]   # only without a budget


@pytest.mark.slow
@pytest.mark.full   # the whole script, its pytest, check and benchmark processes: about 90 s here
def test_dry_run_ends_in_time_and_packs_everything_within_the_rules(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the dry run is what a machine without a GPU does")
    out, work = tmp_path / "out", tmp_path / "work"
    env = {**os.environ, "OUT": str(out), "WORK": str(work), "PYTHONPATH": str(REPO),
           "FUSED_PREACT_GIT_COMMIT": "0" * 40}
    env.pop("TRITON_INTERPRET", None)
    done = subprocess.run(["bash", str(REPO / "bench" / "device_run.sh"), "--budget"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    _tree_ok(out)
    assert sorted(p.name for p in out.iterdir()) == ["check.json", "device_run.tar.gz", "memory.json", "memory.png",
                                                      "report.md", "results.json", "speedup.png", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "DRY RUN" in summary and "budget 540 s" in summary
    ran = [line.split()[1] for line in summary.splitlines() if line.startswith("== ") and " (at " in line]
    assert ran == ["environment", "check", "memcheck", "racecheck", "tests", "memory", "benchmark", "pack"], ran
    for step in ran:
        assert f"   {step}: exit 0 after " in summary, step      # every step ran and logged its time
    assert "== build: skipped (dry run)" in summary
    pytest_steps = [line for line in summary.splitlines() if " -m pytest " in line]
    assert len(pytest_steps) == 3 and not any(" --full " in line for line in pytest_steps), pytest_steps
    assert "junit-gpu.xml:" in summary and "skipped" in summary
    assert "check.json: PASS" in summary and "auto for bf16:" in summary
    assert json.loads((out / "check.json").read_text())["passed"]
    with tarfile.open(out / "device_run.tar.gz") as tar:
        names = set(tar.getnames())
    for name in ("steps.txt", "environment.log", "check.log", "check.json", "junit-gpu.xml", "junit-memcheck.xml",
                 "benchmark/results.json", "benchmark/report.md", "benchmark.log"):
        assert f"device_run/{name}" in names, name
    results = json.loads((out / "results.json").read_text())
    contenders = {e["contender"]: e for e in results["results"]}
    assert contenders["eager"]["status"] == "measured"
    assert "GPU" in contenders["eager+graph"]["reason"] and results["args"]["mode"] == "train"
    elapsed = int(summary.rsplit("after ", 1)[1].split(" s")[0])
    assert elapsed < 540
    assert summary in done.stdout                               # the reply's output tail shows it


def test_steps_end_at_the_deadline_even_when_they_hang(tmp_path):
    """bench/device_steps.sh with a 6 s budget: a hang is cut at its cap or at the deadline, a command
    that ignores SIGINT is killed after the grace, a background step too, and a step with no time left
    is skipped; every one's status and seconds are in the steps file."""
    script = textwrap.dedent(f"""
        set -uo pipefail
        WORK={tmp_path}; OUT={tmp_path}/out; STEPS={tmp_path}/steps.txt; mkdir -p "$OUT"; : > "$STEPS"
        START=$SECONDS; BUDGET_S=6; PACK_RESERVE=0; GRACE=1; MIN_STEP=1
        . bench/device_steps.sh
        step quick 30 true
        step_background sleeper 2 sleep 60
        step stubborn 1 bash -c 'trap "" INT; sleep 60'
        finish_background
        step hang 30 sleep 60
        step late 30 true
        echo "total $((SECONDS - START))"
    """)
    done = subprocess.run(["bash", "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    steps = (tmp_path / "steps.txt").read_text()
    assert "   quick: exit 0 after 0 s" in steps
    assert "   stubborn: exit 137 (killed after timing out)" in steps
    assert "   sleeper: exit 124 (timed out)" in steps and "   hang: exit 124 (timed out)" in steps
    assert "== late: skipped, no time left in the 6 s budget" in steps
    assert int(done.stdout.split("total ")[1]) <= 7
    assert (tmp_path / "out" / "summary.txt").read_text() == steps


def test_pack_cuts_what_is_too_large_and_keeps_the_rules(tmp_path, monkeypatch):
    monkeypatch.setattr(pack_outputs, "ARCHIVE_BUDGET", 300_000)
    monkeypatch.setattr(pack_outputs, "CUT_BYTES", 20_000)
    work, out = tmp_path / "work", tmp_path / "out"
    (work / "benchmark" / "deep" / "deeper").mkdir(parents=True)
    (work / "steps.txt").write_text("== build\n   build: exit 0 after 3 s\n")
    (work / "huge.log").write_bytes(os.urandom(600_000))           # incompressible: must be cut
    (work / "benchmark" / "deep" / "deeper" / "note.txt").write_text("deep but inside the archive")
    for i in range(12):                                              # more files than may come back
        (work / f"part{i}.log").write_text(f"log {i}\n" * 100)
    (work / "junit-a.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1" time="2.5">'
        '<testcase classname="t" name="ok"/><testcase classname="t" name="bad"><failure message="boom"/></testcase>'
        '<testcase classname="t" name="skip"><skipped/></testcase></testsuite></testsuites>')
    (work / "memcheck.log").write_text("========= Invalid __global__ write of size 4 bytes\n"
                                       "========= ERROR SUMMARY: 1 error\n")
    assert pack_outputs.main([str(work), str(out)]) == 0
    _tree_ok(out)
    assert sorted(p.name for p in out.iterdir()) == ["device_run.tar.gz", "summary.txt"]
    summary = (out / "summary.txt").read_text()
    assert "junit-a.xml: 3 tests, 1 passed, 1 failed, 0 errors, 1 skipped" in summary
    assert "FAILED t::bad: boom" in summary
    assert "memcheck.log: ERROR SUMMARY: 1 error" in summary and "Invalid __global__ write" in summary
    assert "cut to head and tail in device_run.tar.gz (too large): huge.log" in summary
    with tarfile.open(out / "device_run.tar.gz") as tar:
        huge = tar.extractfile("device_run/huge.log").read()
        assert b"bytes cut by pack_outputs.py" in huge and len(huge) < 25_000
        assert tar.extractfile("device_run/benchmark/deep/deeper/note.txt").read() == b"deep but inside the archive"
        assert len(tar.getnames()) == 17


def test_check_names_every_broken_rule(tmp_path):
    for i in range(9):
        (tmp_path / f"f{i}.txt").write_text("x")
    (tmp_path / "a" / "b" / "c").mkdir(parents=True)
    (tmp_path / "a" / "b" / "c" / "deep.txt").write_text("x")
    (tmp_path / "bad name.txt").write_text("x")
    with open(tmp_path / "big.bin", "wb") as f:
        f.truncate(16 * 2 ** 20 + 1)
    problems = "\n".join(pack_outputs.check(tmp_path))
    assert "12 files, more than 8" in problems
    assert "a/b/c/deep.txt: more than 2 folders down" in problems
    assert "bad name.txt: a name outside letters" in problems
    assert "big.bin: 16777217 bytes, over 16777216" in problems


# -- tests/conftest.py: the per-test alarm and the sample, in a pytest of their own ----------------
def _pytest_in(folder: Path, test_source: str, **env_vars) -> subprocess.CompletedProcess:
    (folder / "conftest.py").write_text(textwrap.dedent(f"""\
        import importlib.util   # the project's conftest by path: no package named `tests` is imported
        spec = importlib.util.spec_from_file_location("project_conftest", {str(REPO / "tests" / "conftest.py")!r})
        project = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(project)
        globals().update({{k: v for k, v in vars(project).items() if not k.startswith("__")}})
    """))
    (folder / "test_subject.py").write_text(textwrap.dedent(test_source))
    env = {**os.environ, "PYTHONPATH": str(REPO), **env_vars}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:timeout",
                           "--rootdir", str(folder), str(folder)], cwd=folder, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_test_over_its_time_fails_the_run_goes_on_and_a_sample_keeps_spaced_cases(tmp_path):
    """The device run's two controls of a pytest step, in one pytest process (each costs ~5 s here):
    FUSED_PREACT_TEST_TIMEOUT fails a test that hangs and the run goes on; FUSED_PREACT_SAMPLE_PER_TEST=3
    keeps 3 evenly spaced cases of each test function (the others deselected)."""
    done = _pytest_in(tmp_path, """
        import time
        import pytest
        def test_hangs():
            time.sleep(60)
        def test_after():
            assert True
        @pytest.mark.parametrize("i", range(10))
        def test_many(i):
            print("ran", i)
    """, FUSED_PREACT_TEST_TIMEOUT="1", FUSED_PREACT_SAMPLE_PER_TEST="3")
    assert "the test ran over FUSED_PREACT_TEST_TIMEOUT=1 s" in done.stdout, done.stdout[-2000:]
    assert "1 failed, 4 passed, 7 deselected" in done.stdout, done.stdout[-2000:]


@pytest.mark.parametrize("value", ["0", "-2", "three"])
def test_a_sample_size_that_is_not_a_positive_integer_is_named(value, monkeypatch):
    import conftest
    monkeypatch.setenv("FUSED_PREACT_SAMPLE_PER_TEST", value)
    monkeypatch.delenv("FUSED_PREACT_FULL_TESTS", raising=False)
    config = type("Config", (), {"getoption": staticmethod(lambda name: False if name == "--full" else "")})()
    with pytest.raises(pytest.UsageError, match="FUSED_PREACT_SAMPLE_PER_TEST must be a positive integer"):
        conftest.pytest_collection_modifyitems(config, [])
