"""``python -m fused_preact.check`` on the CPU (the extension's C++ kernels, Triton's interpreter on the
smallest shapes): every row passes, the JSON is written, the exit code is 0; a backend with one
operator made wrong fails and exits 1."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from fused_preact import _extension, accuracy, check
from fused_preact.operator_check import Shape
from wrong_ops import make_wrong


@pytest.fixture(scope="module")
def quick_cpu_report(tmp_path_factory):
    path = tmp_path_factory.mktemp("check") / "check.json"
    code = check.main(["--device", "cpu", "--quick", "--json", str(path)])
    return code, json.loads(path.read_text())


def test_quick_cpu_check_passes_every_row_and_writes_json(quick_cpu_report):
    code, report = quick_cpu_report
    failed = [row for row in report["rows"] if row["status"] == "FAIL"]
    assert code == 0 and report["passed"] and report["complete"] and not failed, failed
    env = report["environment"]
    assert env["torch"] == torch.__version__ and set(env["auto"]) == {"fp32", "bf16", "fp16"}
    assert env["auto"]["fp32"]["backend"] == "eager" and "cuda" in env["auto"]["fp32"]["passed_over"]
    sections = {(row["section"], row["backend"]) for row in report["rows"]}
    if _extension.available():
        assert env["extension"]["available"]
        operators = {row["case"].split(" ")[0] for row in report["rows"]
                     if row["section"] == "operator" and row["backend"] == "cuda"}
        assert operators == {"channel_stats", "bn_finalize", "conv_bnrelu", "conv_dgrad", "conv_wgrad",
                             "bn_backward_finish", "bn_add_relu", "bn_add_relu_backward"}
        dtypes = {row["dtype"] for row in report["rows"] if row["section"] == "operator" and row["backend"] == "cuda"}
        assert dtypes == {"fp32", "bf16", "fp16", "fp64"}
        assert {("unit", "cuda"), ("time", "cuda")} <= sections
        assert {row["dtype"] for row in report["rows"] if row["section"] == "unit"} == {"fp32", "bf16 autocast"}
    assert ("operator", "triton") in sections   # Triton's interpreter, the smallest shape
    ratios = [row["ratio"] for row in report["rows"] if row["ratio"] is not None]
    assert ratios and max(ratios) <= accuracy.FACTOR


@pytest.mark.skipif(not _extension.available(), reason=str(_extension.unavailable_reason()))
def test_a_wrong_operator_fails_the_check_and_exits_1(monkeypatch, tmp_path, capsys):
    make_wrong(monkeypatch, "cuda", "bn_add_relu")
    small = check.Plan(((Shape("small", 2, 5, 7, 8, 8, 3, 1), ("fp32", "bf16"), None),), (),
                       (("original basic s2 B+BN", ("fp32",)), ("preact basic s2 B", ("fp32",))), (), False, ())
    monkeypatch.setattr(check, "plan", lambda device, quick: small)
    path = tmp_path / "check.json"
    assert check.main(["--device", "cpu", "--quick", "--backends", "cuda", "--json", str(path)]) == 1
    report = json.loads(path.read_text())
    failed = {row["case"].split(" ")[0] for row in report["rows"] if row["status"] == "FAIL"}
    assert "bn_add_relu" in failed and not report["passed"]
    units = {row["case"].split(" train")[0]: row["status"] for row in report["rows"] if row["section"] == "unit"}
    assert units == {"original basic s2 B+BN": "FAIL", "preact basic s2 B": "PASS"}   # the unit that uses it fails
    out = capsys.readouterr().out
    assert "check: FAIL" in out and "FAIL  bn_add_relu (residual BN)" in out


def test_bad_arguments_are_refused():
    with pytest.raises(SystemExit) as exit_:
        check.main(["--device", "tpu"])
    assert exit_.value.code == 2
    with pytest.raises(SystemExit):
        check.main(["--device", "cpu", "--backends", "eager"])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            check.main(["--device", "cuda"])


@pytest.mark.full
@pytest.mark.slow
def test_full_cpu_check_as_a_command(tmp_path):
    """``python -m fused_preact.check --device cpu`` (not quick: more shapes, every unit form, eval,
    Triton's interpreter on units too), as a user runs it."""
    path = tmp_path / "check.json"
    done = subprocess.run([sys.executable, "-m", "fused_preact.check", "--device", "cpu", "--json", str(path)],
                          capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    report = json.loads(path.read_text())
    assert report["passed"] and "check: PASS" in done.stdout
    forms = {row["case"].rsplit(" train", 1)[0].rsplit(" eval", 1)[0] for row in report["rows"]
             if row["section"] == "unit" and row["backend"] == "cuda"}
    assert forms == set(check.UNIT_FORMS)
