"""``--cuda-graph`` in the trainer: on a CPU, the graphed step's code path run eagerly (the
same results as the plain trainer step, no host reads, static buffers, learning-rate changes
without rebuilding) and the refusals; on a GPU, a real captured run against a plain one."""
import argparse

import pytest
import torch

from fused_preact import _extension
from fused_preact.cuda_graph import forbid_host_reads
from fused_preact.train import distributed, graph_step, loop, main, parse_args

BATCH = 8


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def _argv(tmp_path, backend="eager", *extra):
    # lr warm-up for 2 iterations, then a milestone at 4: three learning rates in 6 steps
    return ["--synthetic", "--synthetic-images", str(4 * BATCH), "--image-size", "8", "--arch", "cifar_resnet8",
            "--batch-size", str(BATCH), "--iters", "6", "--warmup-iters", "2", "--warmup-lr", "0.02",
            "--lr", "0.1", "--milestones", "4", "--out", str(tmp_path), "--no-progress", "--device", "cpu",
            "--backend", backend, "--channels-last", *extra]


def _trainer(argv):
    trainer = loop.Trainer(parse_args(argv), distributed.Processes())
    trainer.build_data()
    trainer.build_model()
    trainer.build_optimizer()
    return trainer


def _eager_graph_step(trainer):
    """The graphed step of ``trainer``'s model, optimizer and schedule, with capture off."""
    trainer.optimizer = torch.optim.SGD(trainer.model.parameters(), lr=trainer.args.lr,
                                        momentum=trainer.args.momentum, weight_decay=trainer.args.weight_decay,
                                        fused=True)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, trainer.schedule)
    return graph_step.CapturedTrainStep(trainer.forward_model, trainer.optimizer, trainer.scheduler,
                                        loop.compute_loss, amp_dtype=trainer.amp_dtype, capture=False)


BACKENDS = ["eager", pytest.param("cuda", marks=pytest.mark.skipif(
    not _extension.available(), reason="needs the C++ extension (the fused CPU kernels)"))]


@pytest.mark.parametrize("amp", ["off", "bf16"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_graphed_step_run_eagerly_matches_the_trainer_step_without_host_reads(tmp_path, backend, amp):
    plain = _trainer(_argv(tmp_path / "plain", backend, "--amp", amp))
    graphed = _trainer(_argv(tmp_path / "graphed", backend, "--amp", amp))
    step = _eager_graph_step(graphed)
    batches = [plain.stream.next() for _ in range(6)]
    pointers, lrs = None, []
    for images, labels in batches:
        lrs.append(plain.optimizer.param_groups[0]["lr"])
        loss, wrong = plain.step(images, labels)
        with forbid_host_reads("the graphed training step"):   # the whole call, scheduler step included
            g_loss, g_wrong = step(images.contiguous(memory_format=torch.channels_last), labels)
        assert torch.equal(g_wrong, wrong)
        torch.testing.assert_close(g_loss, loss, rtol=1e-5, atol=1e-6)
        now = [t.data_ptr() for t in step.graphed.static_inputs]
        assert pointers is None or now == pointers, "the static input buffers moved"
        pointers = now
    assert lrs == pytest.approx([0.02, 0.02, 0.1, 0.1, 0.01, 0.01])
    assert float(step.lr.tensors[0]) == pytest.approx(0.01)    # filled before the last step
    tol = dict(rtol=1e-4, atol=1e-5) if amp == "off" else dict(rtol=2e-2, atol=2e-3)
    for (name, p), q in zip(plain.model.state_dict().items(), graphed.model.state_dict().values()):
        if name.endswith("num_batches_tracked"):
            assert int(p) == int(q) == 6, name
        else:
            torch.testing.assert_close(q, p, **tol, msg=name)


def test_graphed_step_through_its_call_gives_clones_and_follows_the_schedule(tmp_path):
    trainer = _trainer(_argv(tmp_path, "eager"))
    step = _eager_graph_step(trainer)
    losses, seen_lr = [], []
    for _ in range(6):
        images, labels = trainer.stream.next()
        loss, wrong = step(images.contiguous(memory_format=torch.channels_last), labels)
        seen_lr.append(float(step.lr.tensors[0]))       # what the step just read
        losses.append(loss)
        assert 0 <= int(wrong) <= BATCH
    assert len({t.data_ptr() for t in losses}) == 6, "each step's loss is its own tensor"
    assert len({float(t) for t in losses}) > 1
    assert step.graphed.static_outputs[0].data_ptr() not in {t.data_ptr() for t in losses}
    assert seen_lr == pytest.approx([0.02, 0.02, 0.1, 0.1, 0.01, 0.01])
    assert trainer.optimizer.param_groups[0]["lr"] == pytest.approx(0.01)
    assert trainer.optimizer.param_groups[0]["fused"] is True


def test_checkpoint_flags_of_a_foreach_optimizer_are_made_capturable(tmp_path):
    trainer = _trainer(_argv(tmp_path, "eager"))
    step = _eager_graph_step(trainer)
    plain = torch.optim.SGD(trainer.model.parameters(), lr=0.1, momentum=0.9, foreach=True)
    trainer.optimizer.load_state_dict(plain.state_dict())     # a checkpoint of a run without graphs
    assert trainer.optimizer.param_groups[0]["foreach"] is True
    images, labels = trainer.stream.next()
    step(images.contiguous(memory_format=torch.channels_last), labels)
    group = trainer.optimizer.param_groups[0]
    assert group["fused"] is True and group["foreach"] is False


def test_the_trainer_loop_runs_the_graphed_step_end_to_end_with_capture_off(tmp_path, monkeypatch):
    """The whole run on a CPU with --cuda-graph let through: the loop goes through the graphed step
    (capture off: a CPU), logs, checks, checkpoints and resumes as without it."""
    calls = []
    original = graph_step.CapturedTrainStep.__call__

    def counted(self, images, labels):
        calls.append(self.graphed.calls)
        return original(self, images, labels)
    monkeypatch.setattr(graph_step.CapturedTrainStep, "__call__", counted)
    monkeypatch.setattr(graph_step, "refusal", lambda *args, **kwargs: None)
    plain = main(_argv(tmp_path / "plain", "eager", "--print-freq", "2"))
    graphed = main(_argv(tmp_path / "graphed", "eager", "--print-freq", "2", "--cuda-graph"))
    assert calls == list(range(6)) and plain["cuda_graph"] is False and graphed["cuda_graph"] is True
    for (it, a), (it2, b) in zip(plain["train_curve"], graphed["train_curve"]):
        assert it == it2 and b == pytest.approx(a, rel=1e-4)
    assert graphed["test_error"] == pytest.approx(plain["test_error"], abs=0.02)   # a few flips at most
    saved = torch.load(tmp_path / "graphed" / "checkpoint.pt", weights_only=False)
    assert all(isinstance(group["lr"], float) for group in saved["optimizer"]["param_groups"])
    resumed = main(_argv(tmp_path / "graphed", "eager", "--print-freq", "2", "--cuda-graph", "--iters", "8",
                         "--resume", "--override", "iters"))
    assert resumed["iterations"] == 8 and calls[6:] == [0, 1]


def _namespace(**flags):
    args = argparse.Namespace(device=None, amp="off", log_signal=False, compile=False)
    args.__dict__.update(flags)
    return args


@pytest.mark.parametrize("flags, device, world, message", [
    ({}, "cpu", 1, "--cuda-graph needs a CUDA device, but this run is on cpu"),
    ({"amp": "fp16"}, "cuda", 1, "--cuda-graph with --amp fp16: the GradScaler"),
    ({"log_signal": True}, "cuda", 1, "--cuda-graph with --log-signal"),
    ({}, "cuda", 2, "--cuda-graph with 2 processes"),
])
def test_unsupported_combinations_are_refused_naming_the_flags(flags, device, world, message):
    assert message in graph_step.refusal(_namespace(**flags), device, world)


def test_supported_combinations_are_accepted():
    assert graph_step.refusal(_namespace(compile=True), "cuda", 1) is None
    assert graph_step.refusal(_namespace(amp="bf16"), "cuda", 1) is None


def test_cuda_graph_on_a_cpu_device_exits_with_a_message_naming_the_flag(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main(_argv(tmp_path, "eager", "--cuda-graph"))
    assert "--cuda-graph needs a CUDA device, but this run is on cpu" in capsys.readouterr().err


def test_a_namespace_built_elsewhere_is_refused_by_the_trainer(tmp_path):
    args = parse_args(_argv(tmp_path, "eager"))
    args.cuda_graph = True
    with pytest.raises(ValueError, match="--cuda-graph needs a CUDA device"):
        loop.Trainer(args, distributed.Processes())


# -- on a GPU ---------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("backend", ["eager", "auto"])
def test_graphed_training_run_matches_a_plain_run_on_the_gpu(tmp_path, backend):
    def argv(out, *extra):
        return [a if a != "cpu" else "cuda" for a in _argv(out, backend, "--amp", "bf16", "--iters", "8",
                                                           "--print-freq", "4", *extra)]
    plain = main(argv(tmp_path / "plain"))
    graphed = main(argv(tmp_path / "graphed", "--cuda-graph"))
    assert graphed["cuda_graph"] is True and graphed["iterations"] == 8
    for (it, a), (it2, b) in zip(plain["train_curve"], graphed["train_curve"]):
        assert it == it2 and b == pytest.approx(a, rel=2e-2, abs=2e-2)
    weights = {k: torch.load(tmp_path / k / "checkpoint.pt", weights_only=False)["model"] for k in ("plain", "graphed")}
    for name, value in weights["plain"].items():
        if value.is_floating_point():
            torch.testing.assert_close(weights["graphed"][name], value, rtol=5e-2, atol=5e-3, msg=name)
    resumed = main(argv(tmp_path / "graphed", "--cuda-graph", "--iters", "12", "--resume", "--override", "iters"))
    assert resumed["iterations"] == 12
