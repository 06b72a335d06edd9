"""Divergence is caught in every tensor a checkpoint holds, at the window ends, without host reads
in between: a diverged run exits non-zero, never writes a non-finite checkpoint and names the one
it kept."""
import json
import math
import runpy
import sys

import pytest
import torch

from fused_preact.cuda_graph import forbid_host_reads
from fused_preact.train import Diverged, loop, main
from trainer_args import tiny_argv

pytestmark = pytest.mark.usefixtures("one_cpu_thread", "no_training_plots")


def _assert_entirely_finite(path):
    state = torch.load(path, weights_only=False)
    tensors = dict(state["model"])
    for index, entry in state["optimizer"]["state"].items():
        tensors.update({f"optimizer {index} {k}": v for k, v in entry.items() if isinstance(v, torch.Tensor)})
    bad = [name for name, t in tensors.items() if t.is_floating_point() and not torch.isfinite(t).all()]
    assert not bad, bad
    return state


def test_lr_1e6_stops_with_the_last_finite_checkpoint_named(tmp_path):
    # the first epoch (4 iterations) warms up at lr 0.01 and is saved; then lr 1e6 overflows the
    # running variances within a window while the losses can stay finite
    with pytest.raises(Diverged) as diverged:
        main(tiny_argv(tmp_path, "--iters", "12", "--lr", "1e6", "--warmup-iters", "4", "--warmup-lr", "0.01"))
    message = str(diverged.value)
    assert f"kept: the checkpoint '{tmp_path / 'checkpoint.pt'}' of iteration 4" in message, message
    assert diverged.value.exit_status == 3
    assert _assert_entirely_finite(tmp_path / "checkpoint.pt")["iteration"] == 4
    record = json.loads((tmp_path / "diverged.json").read_text())
    assert record["checkpoint_iteration"] == 4 and 4 < record["iteration"] <= 12
    assert record["non_finite"]["BN running statistics"], record   # not the loss alone
    assert not (tmp_path / "metrics.json").exists()

    # continued from the kept checkpoint at a sane lr, the run is no longer a diverged one
    metrics = main(tiny_argv(tmp_path, "--iters", "12", "--lr", "0.05", "--warmup-iters", "4", "--warmup-lr", "0.01",
                             "--resume", "--override", "lr"))
    assert metrics["iterations"] == 12 and math.isfinite(metrics["final_train_loss"])
    assert not (tmp_path / "diverged.json").exists()
    assert json.loads((tmp_path / f"diverged-{record['iteration']}.json").read_text()) == record


def _poisoning_step(at_iteration, poison):
    """``Trainer.step`` that, after the step of ``at_iteration``, puts an inf into one tensor."""
    step, calls = loop.Trainer.step, []

    def poisoned(self, images, labels):
        result = step(self, images, labels)
        calls.append(1)
        if len(calls) == at_iteration:
            with torch.no_grad():
                poison(self)
        return result
    return poisoned


POISONS = {   # what goes bad, and where the message finds it
    "BN running statistics": lambda t: t.model.stages[1][0].bn1.running_var.__setitem__(0, math.inf),
    "gradients": lambda t: t.model.fc.weight.grad.__setitem__((0, 0), math.inf),
    "weights": lambda t: t.model.stem[0].weight.view(-1).__setitem__(0, math.nan),
    "optimizer state": lambda t: t.optimizer.state[t.model.fc.weight]["momentum_buffer"].fill_(math.inf),
}
NAMES = {"BN running statistics": "stages.1.0.bn1.running_var", "gradients": "fc.weight",
         "weights": "stem.0.weight", "optimizer state": "fc.weight:momentum_buffer"}


@pytest.mark.default_cases(ids=["BN running statistics", "gradients"])   # what a finite loss hides
@pytest.mark.parametrize("group", list(POISONS))
def test_a_non_finite_tensor_stops_the_run_at_the_window_end(tmp_path, monkeypatch, group):
    # after the step of iteration 6, the last of the window 5-6 (gradients live until the next step)
    monkeypatch.setattr(loop.Trainer, "step", _poisoning_step(6, POISONS[group]))
    with pytest.raises(Diverged) as diverged:
        main(tiny_argv(tmp_path, "--iters", "12"))
    record = diverged.value.record
    assert record["iteration"] == 6 and record["checkpoint_iteration"] == 4      # epoch 1's checkpoint kept
    assert record["non_finite"][group] == [NAMES[group]], record
    assert record["first_non_finite_loss"] is None                               # the loss never showed it
    assert f"{group} ({NAMES[group]})" in str(diverged.value)
    _assert_entirely_finite(tmp_path / "checkpoint.pt")


def test_a_checkpoint_is_never_written_from_a_non_finite_state(tmp_path, monkeypatch):
    """The save checks what the window end did not: a state gone bad after it is not written."""
    trainer_save = loop.Trainer.save

    def poisoned_save(self, iteration):
        if iteration == 8:
            with torch.no_grad():
                self.model.norm.running_mean.fill_(math.nan)
            self.screened_at = None      # as if no window end had screened this state
        return trainer_save(self, iteration)

    monkeypatch.setattr(loop.Trainer, "save", poisoned_save)
    with pytest.raises(Diverged, match=r"non-finite BN running statistics \(norm.running_mean\)"):
        main(tiny_argv(tmp_path, "--iters", "12"))
    assert _assert_entirely_finite(tmp_path / "checkpoint.pt")["iteration"] == 4


def test_the_steps_between_window_ends_read_nothing_back(tmp_path, monkeypatch):
    """The plain (not graphed) training step and the window end's screen read nothing back: the
    window's one read is the only one."""
    step, screens = loop.Trainer.step, []

    def checked_step(self, images, labels):
        with forbid_host_reads("the trainer's step"):
            return step(self, images, labels)

    def checked_screen(probe, screen=loop.FinitenessProbe.screen):
        with forbid_host_reads("the divergence screen"):
            screens.append(screen(probe))
        return screens[-1]

    monkeypatch.setattr(loop.Trainer, "step", checked_step)
    monkeypatch.setattr(loop.FinitenessProbe, "screen", checked_screen)
    main(tiny_argv(tmp_path, "--iters", "6", "--print-freq", "3"))
    assert len(screens) == 3     # window ends at 3, 4 (the epoch's end) and 6
    assert all(torch.isfinite(s).all() and (s[:2] > 0).all() for s in screens)   # weights, gradients


def test_a_diverged_run_exits_with_status_3_through_the_command_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["fused_preact.train", *tiny_argv(tmp_path, "--iters", "8", "--lr", "1e6")])
    with pytest.raises(SystemExit) as exited:
        runpy.run_module("fused_preact.train", run_name="__main__")
    assert exited.value.code == 3
    assert "error: the run diverged by iteration" in capsys.readouterr().err
    assert not (tmp_path / "checkpoint.pt").exists() or _assert_entirely_finite(tmp_path / "checkpoint.pt")
