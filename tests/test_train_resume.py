"""``--resume`` continues one run: the checkpoint records the run's configuration, other values are
refused with each difference listed, and ``--override`` changes recipe values for real (the
optimizer and the schedule use them) and records the change."""
import csv
import json
import shutil

import pytest
import torch

from fused_preact.train import ConfigurationMismatch, loop, main
from fused_preact.train.cli import build_parser
from fused_preact.train.run_config import DEFINING, OVERRIDABLE, RUN_ONLY
from trainer_args import one_thread, tiny_argv

pytestmark = pytest.mark.usefixtures("one_cpu_thread", "no_training_plots")


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A run of 12 iterations stopped after iteration 6 (mid-epoch 2)."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    with one_thread():
        stopped = main(tiny_argv(out, "--iters", "12", "--stop-after-iters", "6"))
    assert stopped["iteration"] == 6
    return out


def test_every_flag_is_classified_once():
    dests = {a.dest for a in build_parser()._actions if a.dest != "help"}
    assert set(DEFINING) | set(RUN_ONLY) == dests
    assert not set(DEFINING) & set(RUN_ONLY)
    assert set(OVERRIDABLE) <= set(DEFINING)


@pytest.mark.parametrize("changed, difference", [
    (["--lr", "0.001"], "--lr 0.05 -> 0.001"),
    (["--activation", "original"], "--activation (not set) -> original"),
    (["--batch-size", "32"], "--batch-size 16 -> 32"),
    (["--arch", "cifar_resnet14"], "--arch cifar_resnet8 -> cifar_resnet14"),
])
def test_resume_with_other_values_is_refused_listing_each_difference(stopped_run, changed, difference):
    before = (stopped_run / "checkpoint.pt").read_bytes()
    with pytest.raises(ConfigurationMismatch) as refused:
        main(tiny_argv(stopped_run, "--iters", "12", "--resume", *changed))
    message = str(refused.value)
    assert str(stopped_run / "checkpoint.pt") in message and difference in message, message
    if changed[0] == "--lr":
        assert "--override lr" in message
    else:
        assert "cannot change within a run" in message
    assert (stopped_run / "checkpoint.pt").read_bytes() == before


def test_several_differences_are_all_listed(stopped_run):
    with pytest.raises(ConfigurationMismatch) as refused:
        main(tiny_argv(stopped_run, "--iters", "16", "--momentum", "0.5", "--resume"))
    assert [str(d) for d in refused.value.differences] == ["--iters 12 -> 16", "--momentum 0.9 -> 0.5"]


def _weights(out):
    return torch.load(out / "checkpoint.pt", weights_only=False)


def test_override_reaches_the_optimizer_and_the_schedule_and_is_recorded(stopped_run, tmp_path, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(stopped_run, run)
    at_stop = _weights(run)["model"]
    lrs = []
    step = loop.Trainer.step

    def recording_step(self, images, labels):
        lrs.append(self.optimizer.param_groups[0]["lr"])
        return step(self, images, labels)

    monkeypatch.setattr(loop.Trainer, "step", recording_step)
    # lr 1e-9 from iteration 7 on, divided by 10 from the new milestone 10 on (iterations 11, 12) instead of 9
    metrics = main(tiny_argv(run, "--iters", "12", "--lr", "1e-9", "--milestones", "10", "--resume",
                             "--override", "lr", "milestones"))
    assert lrs == pytest.approx([1e-9] * 4 + [1e-10] * 2, rel=1e-12)
    # the weights follow the tiny lr: they barely move (a resume at lr 0.05 moves them by ~1e-2)
    after = _weights(run)
    for name, value in after["model"].items():
        if value.is_floating_point() and "running" not in name:
            torch.testing.assert_close(value, at_stop[name], rtol=0, atol=1e-6, msg=name)
    assert all(group["lr"] == pytest.approx(1e-10) for group in after["optimizer"]["param_groups"])
    change = {"iteration": 6, "changes": [{"key": "lr", "old": 0.05, "new": 1e-9},
                                          {"key": "milestones", "old": [9], "new": [10]}]}
    assert metrics["overrides"] == [change] and after["overrides"] == [change]
    assert json.loads((run / "metrics.json").read_text())["overrides"] == [change]
    assert after["config"]["lr"] == 1e-9 and after["config"]["milestones"] == [10]
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [int(r["iteration"]) for r in rows] == [4, 8, 12]
    assert [float(r["lr"]) for r in rows] == pytest.approx([0.05, 1e-9, 1e-10], rel=1e-12)
    assert rows[1]["overrides"] == "at iteration 6: --lr 0.05 -> 1e-09; --milestones [9] -> [10]"
    assert rows[0]["overrides"] == rows[2]["overrides"] == ""
    # the new values are the run's own now: a plain resume with them is no longer refused
    main(tiny_argv(run, "--iters", "12", "--lr", "1e-9", "--milestones", "10", "--resume"))


@pytest.mark.parametrize("argv, message", [
    (["--override", "lr"], "--override changes values of a run that --resume continues"),
    (["--resume", "--override", "arch"], "--override arch: --arch decides what is trained"),
    (["--resume", "--override", "device"], "--override device: --device may change on any resume"),
    (["--resume", "--override", "learning_rate"], "--override learning_rate: no such setting"),
])
def test_bad_overrides_exit_with_a_message(tmp_path, argv, message, capsys):
    with pytest.raises(SystemExit):
        main(tiny_argv(tmp_path, *argv))
    assert message in capsys.readouterr().err
