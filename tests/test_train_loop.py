"""Trainer runs on the CPU: learning, outputs, exact resume, interruption by signal,
non-finite losses, evaluation of a checkpoint and residual-signal logging."""
import csv
import json
import math
import os
import signal

import pytest
import torch

from cifar_folder import random_cifar
from fused_preact.train import Diverged, main
from fused_preact.train import loop

ITERS_PER_EPOCH = 6     # 96 training images, batch 16


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return random_cifar(tmp_path_factory.mktemp("cifar"), 96, 40, seed=4).parent


def _argv(data, out, *extra):
    return ["--data", str(data), "--arch", "cifar_resnet8", "--batch-size", "16", "--warmup-iters", "0",
            "--lr", "0.05", "--out", str(out), "--no-progress", "--device", "cpu", "--backend", "eager",
            "--print-freq", "2", *extra]


def _weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


def test_two_epochs_learn_and_write_every_output(data, tmp_path, capsys):
    metrics = main(_argv(data, tmp_path, "--epochs", "2", "--log-signal", "--log-signal-every", "5"))
    losses = [loss for _, loss in metrics["train_curve"]]
    assert len(losses) == 2 * ITERS_PER_EPOCH // 2
    assert sum(losses[-2:]) / 2 < 0.7 * sum(losses[:2]) / 2, losses
    assert metrics["iterations"] == 2 * ITERS_PER_EPOCH and 0 <= metrics["test_error"] <= 1
    for name in ("checkpoint.pt", "log.csv", "curves.png", "metrics.json", "args.json", "signal.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [ITERS_PER_EPOCH, 2 * ITERS_PER_EPOCH]
    assert all(0 <= float(r["test_error"]) <= 1 and float(r["images_per_s"]) > 0 for r in rows)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["backend"] == "eager" and saved["peak_memory_bytes"] > 0 and saved["wall_time_s"] > 0
    assert saved["git_commit"] is None or len(saved["git_commit"]) >= 40
    assert saved["units_fused"] == [3, 3]   # cifar_resnet8: one full pre-activation unit per stage
    assert "convert_to_fused: 3 of 3 residual units fused" in capsys.readouterr().out

    # signal: every unit's input norm and gradient norm at iterations 1, 6 and 11
    signal_rows = list(csv.DictReader(open(tmp_path / "signal.csv")))
    units = 3    # cifar_resnet8: one unit per stage
    assert sorted({int(r["iteration"]) for r in signal_rows}) == [1, 6, 11]
    assert len(signal_rows) == 3 * units
    assert all(float(r["x_norm"]) > 0 and 0 < float(r["grad_norm"]) < math.inf for r in signal_rows)


def test_log_signal_works_with_other_unit_variants(data, tmp_path, capsys, recwarn):
    metrics = main(_argv(data, tmp_path, "--iters", "2", "--activation", "original",
                         "--shortcut", "exclusive_gating", "--log-signal", "--log-signal-every", "1"))
    # the units that have no fused form are named in the start line, not in a stray warning
    assert "0 of 3 residual units fused; left eager: VariantUnit x3" in capsys.readouterr().out
    assert not [w for w in recwarn if "convert_to_fused" in str(w.message)]
    rows = list(csv.DictReader(open(tmp_path / "signal.csv")))
    assert len(rows) == 2 * 3 and all(float(r["grad_norm"]) > 0 for r in rows)
    assert metrics["iterations"] == 2


def _interrupt_by_signal(monkeypatch, at_call, signum=signal.SIGTERM):
    """Make the loss computation send ``signum`` to this process during iteration ``at_call``."""
    calls = []

    def loss_then_signal(logits, labels):
        calls.append(1)
        if len(calls) == at_call:
            os.kill(os.getpid(), signum)
        return loop.F.cross_entropy(logits.float(), labels)

    monkeypatch.setattr(loop, "compute_loss", loss_then_signal)


TIMING_FIELDS = ("images_per_s", "elapsed_s")


def _rows(out):
    return [{k: v for k, v in row.items() if k not in TIMING_FIELDS} for row in csv.DictReader(open(out / "log.csv"))]


@pytest.mark.parametrize("interruption", ["flag", "sigint"])
def test_interrupted_and_resumed_run_ends_bit_exact(data, tmp_path, monkeypatch, interruption):
    """Weights, momentum and every log.csv row as in the uninterrupted run (the interrupted epoch's
    row averages all of its iterations: its partial sums travel in the checkpoint)."""
    args = ("--epochs", "2", "--shortcut", "dropout", "--dropout", "0.3")   # dropout: global RNG matters too
    main(_argv(data, tmp_path / "whole", *args))
    if interruption == "flag":
        stopped = main(_argv(data, tmp_path / "parts", *args, "--stop-after-iters", "7"))
        assert stopped == {"interrupted": "--stop-after-iters", "iteration": 7, "exit_code": 0}
    else:
        with monkeypatch.context() as patch:
            _interrupt_by_signal(patch, at_call=3, signum=signal.SIGINT)
            stopped = main(_argv(data, tmp_path / "parts", *args))
        # the signal is honored at the end of the window (iterations 3-4), in the middle of epoch 1
        assert stopped == {"interrupted": "SIGINT", "iteration": 4, "exit_code": 128 + signal.SIGINT}
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert not (tmp_path / "parts" / "log.csv").exists()     # no epoch ended: no row yet
    assert _weights(tmp_path / "parts")["iteration"] == stopped["iteration"]
    main(_argv(data, tmp_path / "parts", *args, "--resume"))
    whole, parts = _weights(tmp_path / "whole"), _weights(tmp_path / "parts")
    assert whole["iteration"] == parts["iteration"] == 2 * ITERS_PER_EPOCH
    for key, value in whole["model"].items():
        assert torch.equal(value, parts["model"][key]), key
    for index, state in whole["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], parts["optimizer"]["state"][index]["momentum_buffer"])
    assert len(_rows(tmp_path / "whole")) == 2
    assert _rows(tmp_path / "parts") == _rows(tmp_path / "whole")


def test_stop_after_iters_stops_a_run_resumed_past_it_at_its_first_iteration(data, tmp_path, capsys):
    first = main(_argv(data, tmp_path, "--iters", "9", "--stop-after-iters", "4"))
    assert first == {"interrupted": "--stop-after-iters", "iteration": 4, "exit_code": 0}
    capsys.readouterr()
    resumed = main(_argv(data, tmp_path, "--iters", "9", "--stop-after-iters", "3", "--resume"))
    assert resumed == {"interrupted": "--stop-after-iters", "iteration": 5, "exit_code": 0}
    assert _weights(tmp_path)["iteration"] == 5
    assert ("stopped by --stop-after-iters 3 (resumed at iteration 4, at or past it: stopped at its first "
            "iteration) after iteration 5") in capsys.readouterr().out


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch):
    calls = []

    def loss_nan_from_8(logits, labels):
        calls.append(1)
        loss = loop.F.cross_entropy(logits.float(), labels)
        return loss * float("nan") if len(calls) >= 8 else loss

    monkeypatch.setattr(loop, "compute_loss", loss_nan_from_8)
    with pytest.raises(Diverged, match=r"diverged by iteration 8 \(of 18\): the training loss is not finite from "
                                       r"iteration 8; .*kept: the checkpoint '.*checkpoint.pt' of iteration 6"):
        main(_argv(data, tmp_path, "--epochs", "3"))
    kept = _weights(tmp_path)
    assert kept["iteration"] == ITERS_PER_EPOCH
    assert all(torch.isfinite(v).all() for v in kept["model"].values() if v.is_floating_point())


def test_eval_only_reproduces_the_final_test_error(data, tmp_path):
    trained = main(_argv(data, tmp_path / "run", "--iters", "4"))
    evaluated = main(["--data", str(data), "--eval-only", "--resume", str(tmp_path / "run" / "checkpoint.pt"),
                      "--out", str(tmp_path / "eval"), "--device", "cpu", "--backend", "eager"])
    assert evaluated["arch"] == "cifar_resnet8" and evaluated["iteration"] == 4
    assert evaluated["test_error"] == trained["test_error"]
    assert json.loads((tmp_path / "eval" / "eval.json").read_text())["test_error"] == trained["test_error"]


@pytest.mark.parametrize("argv, message", [
    (["--synthetic", "--iters", "5", "--epochs", "2"], "give --iters or --epochs, not both"),
    ([], "--data FOLDER is required"),
    (["--synthetic", "--eval-only"], "--eval-only needs a checkpoint"),
    (["--synthetic", "--batch-size", "0"], "--batch-size must be positive"),
    (["--synthetic", "--milestones", "-5"], "--milestones must be > 0, got -5"),
    (["--synthetic", "--milestones", "30", "30"], "--milestones must be distinct"),
    (["--synthetic", "--milestone-epochs", "0"], "--milestone-epochs must be > 0"),
    (["--synthetic", "--momentum", "2"], "--momentum must be in [0, 1)"),
    (["--synthetic", "--momentum", "1"], "--momentum must be in [0, 1)"),
    (["--synthetic", "--weight-decay=-1e-4"], "--weight-decay must be finite and >= 0"),
    (["--synthetic", "--lr", "nan"], "--lr must be finite and > 0, got nan"),
    (["--synthetic", "--lr", "0"], "--lr must be finite and > 0"),
    (["--synthetic", "--warmup-lr", "inf"], "--warmup-lr must be finite and > 0"),
    (["--synthetic", "--warmup-iters", "-1"], "--warmup-iters, --pad and --workers must be >= 0"),
    (["--synthetic", "--lr-factor", "0"], "--lr-factor must be finite and > 0"),
    (["--synthetic", "--resume", "--overwrite"], "leave out --overwrite"),
])
def test_bad_flag_combinations_exit_with_a_message(argv, message, capsys):
    with pytest.raises(SystemExit):
        main(argv)
    assert message in capsys.readouterr().err
