"""The paper's experiments registry: every table row listed with its number, recipes as
trainer flags, runs end to end on a tiny CIFAR folder (finished runs not repeated, an
interrupted run resumed exactly, a diverged run reported as such), the report, and
the ImageNet scale augmentation and crop evaluation the Table 5 runs need."""
import json
import os
import signal

import pytest
import torch
from PIL import Image

from cifar_folder import random_cifar
from fused_preact.experiments import CELLS, EXPERIMENTS, FIGURES, TABLE_TITLES, cells_of, select
from fused_preact.experiments.cli import main as experiments_main
from fused_preact.experiments.recipes import CIFAR, CIFAR_BATCH64, IMAGENET
from fused_preact.experiments.report import write_report
from fused_preact.experiments.runner import execute, plan, run_experiments, run_folder
from fused_preact.train import loop
from fused_preact.train import main as train_main
from fused_preact.train.cli import parse_args
from fused_preact.train.imagenet_transforms import PCALighting, eval_transform, parse_crop, train_transform

TINY = 3.2e-5       # 64,000 x 3.2e-5 = 2 iterations (one epoch of 256 images), milestones at 1 and 2, no warm-up


pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    random_cifar(root, 256, 32, seed=3)
    random_cifar(root, 256, 32, num_classes=100, seed=4)
    return root


def _run(names, data, out, **options):
    return run_experiments(names, data=str(data), out=out, scale=TINY, units_per_stage=1, device="cpu",
                           backend="eager", progress=False, **options)


# -- the paper's numbers and the registry -----------------------------------------------------------------
def test_paper_numbers_as_printed():
    def value(table, row, column=None):
        [cell] = [c for c in cells_of(table) if c.row.startswith(row) and (column is None or c.column == column)]
        return cell.value
    assert value(1, "original") == 6.61 and value(1, "constant scaling: shortcut 0.5, F 0.5") == 12.35
    assert value(1, "exclusive gating: 1-g(x), g(x), init b_g=-6") == 8.70
    assert value(1, "exclusive gating: 1-g(x), g(x), init b_g=-7") == 9.81
    assert value(1, "shortcut-only gating: 1-g(x), 1, init b_g=0") == 12.86
    assert value(1, "shortcut-only gating: 1-g(x), 1, init b_g=-6") == 6.91 and value(1, "1x1 conv") == 12.22
    fails = [c.experiment for c in cells_of(1) if c.fail]
    assert fails == ["c10-110-scaling-0-1", "c10-110-scaling-0.5-1", *(f"c10-110-exclusive-gating-b{b}"
                     for b in (0, -1, -2, -3, -4, -5)), "c10-110-dropout"]
    assert [c.value for c in cells_of(2) if c.column == "ResNet-110"] == [6.61, 8.17, 7.84, 6.71, 6.37]
    assert [c.value for c in cells_of(2) if c.column == "ResNet-164"] == [5.93, 6.50, 6.14, 5.91, 5.46]
    assert [c.value for c in cells_of(3)] == [9.90, 8.91, 6.61, 6.37, 5.93, 5.46, 7.61, 4.92, 25.16, 24.33,
                                              27.82, 22.71]
    assert value(4, "ResNet-1001 [ours] (10.2M), mini-batch 64") == 4.62
    assert value(4, "ResNet-1001 [ours] (10.2M)", "CIFAR-100") == 22.71
    assert [c.value for c in cells_of(5) if c.experiment and "320" in c.metric] == \
        [21.3, 5.5, 21.1, 5.5, 21.8, 6.0, 20.7, 5.3, 20.1, 4.8]
    assert set(TABLE_TITLES) == {1, 2, 3, 4, 5}


def test_registry_covers_every_row_and_figure():
    named = {c.experiment for c in CELLS if c.experiment}
    assert named == set(EXPERIMENTS)                # every row runnable, every experiment in a row
    assert all(set(f.experiments) <= set(EXPERIMENTS) for f in FIGURES.values())
    assert {e.name for e in select(["table3"])} == {c.experiment for c in cells_of(3)}
    assert [e.name for e in select(["fig1"])] == ["c10-1001-original", "c10-1001-preact"]
    gating = EXPERIMENTS["c10-110-exclusive-gating-b-6"]
    assert gating.units == {"activation": "original", "projection": "A", "shortcut": "exclusive_gating",
                            "gate_bias": -6.0} and not gating.fusable
    assert EXPERIMENTS["c10-1001-preact"].fusable and not EXPERIMENTS["c10-110-1layer-preact"].fusable
    # the original-unit rows run fused; the eager marks stay on what no fused unit computes
    fused = {n for n, e in EXPERIMENTS.items() if e.fusable and e.units.get("activation") == "original"}
    assert fused == {"c10-110-original", "c10-110-conv1x1", "c10-164-original", "c10-1001-original",
                     "c100-164-original", "c100-1001-original", "c10-1202-original", "in-152-original",
                     "in-200-original", "in-101-original"}
    eager = {n for n, e in EXPERIMENTS.items() if not e.fusable}
    assert all(n.split("-", 2)[2].startswith(("scaling", "exclusive-gating", "shortcut-gating", "dropout",
                                              "bn-after-add", "relu-before-add", "relu-only-preact", "1layer"))
               for n in eager), eager
    assert EXPERIMENTS["c10-110-1layer-original"].arch == "cifar_resnet110_1layer"
    assert EXPERIMENTS["in-200-preact"].eval_crops == ("256:224", "320:320")
    with pytest.raises(ValueError, match="unknown experiment 'c10-110-gating'.*did you mean"):
        select(["c10-110-gating"])


def test_recipes_as_trainer_flags():
    assert CIFAR.flags()[-7:] == ["--iters", "64000", "--milestones", "32000", "48000", "--warmup-iters", "400"]
    assert CIFAR.flags(0.001)[-7:] == ["--iters", "64", "--milestones", "32", "48", "--warmup-iters", "0"]
    assert CIFAR_BATCH64.iters == 156_200 and CIFAR_BATCH64.milestones == (62_480, 94_501)
    assert CIFAR_BATCH64.warmup_iters == 0 and CIFAR_BATCH64.batch_size == 64
    assert IMAGENET.flags()[-7:] == ["--epochs", "120", "--milestone-epochs", "30", "60", "--warmup-iters", "0"]
    # an epoch recipe at a scale counts iterations of the given training set
    assert IMAGENET.flags(0.01, train_images=25_600)[-7:] == ["--iters", "120", "--milestones", "30", "60",
                                                              "--warmup-iters", "0"]
    with pytest.raises(ValueError, match="fewer than one batch"):
        IMAGENET.flags(0.5, train_images=100)
    run = plan(EXPERIMENTS["c10-164-preact"], 3, data="d", out="o", backend="triton")
    args = parse_args(run.argv)
    assert (args.arch, args.batch_size, args.iters, list(args.milestones), args.warmup_iters, args.lr) == \
        ("cifar_resnet164", 128, 64000, [32000, 48000], 400, 0.1)
    assert (args.momentum, args.weight_decay, args.seed, args.backend) == (0.9, 1e-4, 3, "triton")
    eager = plan(EXPERIMENTS["c10-110-1layer-preact"], 0, data="d", out="o", backend="triton")
    assert eager.argv[eager.argv.index("--backend") + 1] == "eager"      # no fused single-conv unit


def test_every_experiment_is_a_valid_trainer_command():
    for experiment in EXPERIMENTS.values():
        args = parse_args(plan(experiment, 0, data="d", out="o").argv)
        assert (args.dataset, args.arch) == (experiment.dataset, experiment.arch)
        for key, value in experiment.units.items():
            assert getattr(args, key) == value, (experiment.name, key)
        assert args.backend == ("auto" if experiment.fusable else "eager")
    assert parse_args(plan(EXPERIMENTS["c10-110-exclusive-gating-b-7"], 0, data="d", out="o").argv).gate_bias == -7


def test_list_shows_every_row_of_tables_1_to_5(capsys):
    assert experiments_main(["list"]) == 0
    text = capsys.readouterr().out
    for title in TABLE_TITLES.values():
        assert title in text
    for cell in CELLS:
        expected = f"  {cell.experiment or '-'} "
        assert any(l.startswith(expected) and l.endswith(f"{cell.text():>6}  {cell.row} [{cell.column}]")
                   for l in text.splitlines()), cell
    assert all(name in text for name in FIGURES)
    assert experiments_main(["list", "--table", "3"]) == 0
    only = capsys.readouterr().out
    assert TABLE_TITLES[3] in only and TABLE_TITLES[1] not in only and "c10-110-1layer-preact" in only


# -- runs end to end --------------------------------------------------------------------------------------
def test_run_skip_resume_diverge_and_report(data, tmp_path, monkeypatch):
    out = tmp_path / "runs"
    assert _run(["c10-110-original"], data, out, seeds=2) == {"c10-110-original": ["finished", "finished"]}
    states = _run(["c100-164-preact", "c10-110-1layer-preact"], data, out)
    assert states == {"c100-164-preact": ["finished"], "c10-110-1layer-preact": ["finished"]}
    folder = run_folder(out, "c100-164-preact", 0, TINY, 1)
    metrics = json.loads((folder / "metrics.json").read_text())
    assert metrics["arch"] == "cifar_resnet11_bottleneck" and metrics["iterations"] == 2
    assert metrics["dataset"] == "cifar100" and metrics["batch_size"] == 128
    stamp = (folder / "metrics.json").stat().st_mtime_ns

    # a finished run is not repeated
    assert _run(["c100-164-preact"], data, out) == {"c100-164-preact": ["finished"]}
    assert (folder / "metrics.json").stat().st_mtime_ns == stamp

    # a run that diverges is recorded as such, and not repeated either
    with monkeypatch.context() as patch:
        patch.setattr(loop, "compute_loss", lambda logits, labels: logits.sum() * float("nan"))
        assert _run(["c10-110-dropout"], data, out) == {"c10-110-dropout": ["diverged"]}
    assert _run(["c10-110-dropout"], data, out) == {"c10-110-dropout": ["diverged"]}

    # the report: every experiment with the paper's numbers, ours beside them
    report = write_report(out).read_text()
    for name in EXPERIMENTS:
        assert f"| {name} |" in report
    for cell in CELLS:
        note = f" ({cell.note})" if cell.note else ""
        assert any(l.startswith(f"| {cell.row}{note} | {cell.column} | {cell.text()} | ")
                   and l.endswith(f"| {cell.experiment or ''} |") for l in report.splitlines()), cell
    dropout = next(l for l in report.splitlines() if l.startswith("| dropout shortcut"))
    assert "| fail |" in dropout and "diverged (1/1 runs)" in dropout and "| both fail |" in dropout
    ours = [100 * json.loads((run_folder(out, "c10-110-original", s, TINY, 1) / "metrics.json").read_text())
            ["test_error"] for s in (0, 1)]
    original = next(l for l in report.splitlines() if l.startswith("| original [1]"))
    median = sum(ours) / 2
    assert f"{median:.2f} [{min(ours):.2f}, {max(ours):.2f}] (2 runs; mean {median:.2f}+-" in original
    assert f"{median - 6.61:+.2f}" in original and "scale 3.2e-05, 1 units/stage" in original
    assert "| c10-1001-preact |" in report and "not run" in report
    assert (out / "figures.png").stat().st_size > 10_000


def test_interrupted_run_resumes_exactly_through_the_cli(data, tmp_path, monkeypatch):
    argv = ["run", "c10-110-preact", "--data", str(data), "--scale", str(2 * TINY), "--units-per-stage", "1",
            "--device", "cpu", "--backend", "eager", "--no-progress"]
    assert experiments_main([*argv, "--out", str(tmp_path / "whole")]) == 0

    calls = []

    def loss_then_sigterm(logits, labels):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return loop.F.cross_entropy(logits.float(), labels)

    with monkeypatch.context() as patch:
        patch.setattr(loop, "compute_loss", loss_then_sigterm)
        assert experiments_main([*argv, "--out", str(tmp_path / "parts")]) == 130    # stopped after iteration 2
    folder = run_folder(tmp_path / "parts", "c10-110-preact", 0, 2 * TINY, 1)
    assert not (folder / "metrics.json").exists()
    assert torch.load(folder / "checkpoint.pt", weights_only=False)["iteration"] == 2
    assert experiments_main([*argv, "--out", str(tmp_path / "parts")]) == 0            # continues 2 -> 4
    whole = json.loads((run_folder(tmp_path / "whole", "c10-110-preact", 0, 2 * TINY, 1) / "metrics.json")
                       .read_text())
    parts = json.loads((folder / "metrics.json").read_text())
    assert parts["iterations"] == whole["iterations"] == 4
    assert parts["train_curve"] == whole["train_curve"] and parts["test_error"] == whole["test_error"]


def test_a_run_folder_of_another_configuration_is_refused_not_continued(data, tmp_path):
    """A folder holding a run of another configuration (here: another lr, trained there by hand, so
    no run.json says so) is refused with the difference; its checkpoint is left as it was. So is a
    finished run of another configuration, which would otherwise be counted in the report."""
    from fused_preact.experiments.runner import RunFolderMismatch
    run = plan(EXPERIMENTS["c10-110-original"], 0, data=str(data), out=tmp_path, scale=TINY, units_per_stage=1,
               device="cpu", backend="eager", progress=False)
    other = list(run.argv)
    other[other.index("--lr") + 1] = "0.5"
    train_main([*other, "--stop-after-iters", "1"])
    before = (run.folder / "checkpoint.pt").read_bytes()
    with pytest.raises(RunFolderMismatch, match=r"holds a run of another configuration \(its checkpoint.pt\): .*"
                                                r"--lr 0.5 -> 0.1"):
        execute(run)
    assert (run.folder / "checkpoint.pt").read_bytes() == before and not (run.folder / "run.json").exists()

    train_main([*other, "--resume"])          # that run finishes: metrics.json records its configuration
    with pytest.raises(RunFolderMismatch, match=r"\(its metrics.json\): .*--lr 0.5 -> 0.1"):
        execute(run)


def test_multi_gpu_runs_go_through_torchrun(data, tmp_path, monkeypatch):
    from fused_preact.experiments import runner
    commands = []

    def fake_run(command):      # stands for the launched trainer: records the command, finishes the run
        commands.append(command)
        out = command[command.index("--out") + 1]
        (tmp_path / out).mkdir(parents=True, exist_ok=True)
        (tmp_path / out / "metrics.json").write_text("{}")
        return runner.subprocesses.CompletedProcess(command, 0)

    monkeypatch.setattr(runner.subprocesses, "run", fake_run)
    states = run_experiments(["c10-1001-preact"], data=str(data), out=tmp_path / "runs", nproc=4, backend="cuda")
    assert states == {"c10-1001-preact": ["finished"]}
    [command] = commands
    assert command[0].endswith("torchrun") or command[1:3] == ["-m", "torch.distributed.run"]
    start = command.index("--nproc-per-node=4")
    assert command[start + 1:start + 3] == ["-m", "fused_preact.train"]
    assert command[command.index("--batch-size") + 1] == "128"          # the global batch, split by the trainer
    assert command[command.index("--backend") + 1] == "cuda"


def test_imagenet_plan_at_a_scale_counts_the_training_images(tmp_path):
    for label in ("a", "b"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(1280):
            (tmp_path / "train" / label / f"{i}.JPEG").touch()
    run = plan(EXPERIMENTS["in-152-preact"], 0, data=str(tmp_path), out=tmp_path, scale=0.1)
    args = parse_args(run.argv)     # 2,560 images: 10 batches of 256 per epoch, x 120 epochs x 0.1
    assert (args.iters, args.milestones, args.batch_size, args.warmup_iters) == (120, [30, 60], 256, 0)
    assert (args.imagenet_augment, args.eval_crops, args.arch) == ("scale", [(256, 224), (320, 320)],
                                                                   "imagenet_resnet152")


def test_bad_arguments_name_themselves(data, tmp_path, capsys):
    assert experiments_main(["run", "nonsense", "--data", str(data), "--out", str(tmp_path)]) == 2
    assert "unknown experiment 'nonsense'" in capsys.readouterr().err
    assert experiments_main(["run", "c10-110-original", "--data", str(tmp_path / "none"), "--out", str(tmp_path),
                             "--device", "cpu", "--no-progress"]) == 2
    assert "CIFAR-10: expected the python-pickle folder" in capsys.readouterr().err
    run = plan(EXPERIMENTS["c10-110-original"], 0, data=str(data), out=tmp_path / "other")
    run.folder.mkdir(parents=True)
    (run.folder / "run.json").write_text(json.dumps({"config": {**run.config, "arch": "cifar_resnet56"}}))
    with pytest.raises(ValueError, match=r"holds a run of another configuration \(its run.json\): --arch "
                                         r"cifar_resnet56 -> cifar_resnet110"):
        execute(run)
    (run.folder / "run.json").write_text(json.dumps({"config": ["--arch", "cifar_resnet110"]}))
    with pytest.raises(ValueError, match="its run.json has no configuration record"):
        execute(run)
    with pytest.raises(ValueError, match="seeds must be a positive int"):
        run_experiments(["c10-110-original"], data=str(data), seeds=0)
    with pytest.raises(ValueError, match="units_per_stage only applies to the CIFAR nets"):
        plan(EXPERIMENTS["in-152-preact"], 0, data=str(data), out=tmp_path, units_per_stage=1, train_images=512)


# -- ImageNet: scale augmentation and crop evaluation -------------------------------------------------------
def test_scale_augmentation_and_eval_crops_shapes():
    torch.manual_seed(0)
    image = Image.fromarray(torch.randint(0, 256, (300, 260, 3), dtype=torch.uint8).numpy())
    out = train_transform("scale")(image)
    assert out.shape == (3, 224, 224) and out.dtype == torch.uint8
    assert eval_transform(320, 320)(image).shape == (3, 320, 320)
    assert eval_transform(256, 224)(image).shape == (3, 224, 224)
    flat = torch.full((3, 8, 8), 128, dtype=torch.uint8)
    torch.manual_seed(5)
    shifted = PCALighting(1.0)(flat).to(torch.float64) - 128
    torch.manual_seed(5)
    alpha = torch.randn(3).double()
    values = torch.tensor([0.2175, 0.0188, 0.0045], dtype=torch.float64)
    vectors = torch.tensor([[-0.5675, 0.7192, 0.4009], [-0.5808, -0.0045, -0.8140], [-0.5836, -0.6948, 0.4203]],
                           dtype=torch.float64)
    expected = (255 * vectors @ (alpha * values)).round()
    assert (shifted != 0).any() and (shifted == expected[:, None, None]).all()   # one RGB shift per image
    assert parse_crop("256:224") == (256, 224) and parse_crop("320") == (320, 320)
    with pytest.raises(ValueError, match="--eval-crops"):
        parse_crop("224:256")


def test_imagenet_run_reports_top1_top5_at_each_crop(tmp_path):
    for split, count in (("train", 4), ("val", 3)):
        for label in ("a", "b"):
            folder = tmp_path / split / label
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = torch.randint(0, 256, (90 + 7 * i, 80, 3), dtype=torch.uint8).numpy()
                Image.fromarray(pixels).save(folder / f"{i}.png")
    metrics = train_main(["--dataset", "imagenet", "--data", str(tmp_path), "--arch", "imagenet_resnet18",
                          "--imagenet-augment", "scale", "--scale-range", "224", "240", "--iters", "1",
                          "--batch-size", "2", "--eval-crops", "72:64", "40", "--eval-batch-size", "6",
                          "--workers", "0", "--out", str(tmp_path / "run"), "--device", "cpu", "--backend", "eager",
                          "--no-progress"])
    crops = metrics["crop_errors"]
    assert set(crops) == {"72:64", "40:40"}
    for entry in crops.values():
        assert entry["images"] == 6 and 0 <= entry["top5"] <= entry["top1"] <= 1
    assert crops["40:40"]["top5"] == 0            # 2 classes: always in the top 5


def test_eval_crops_need_imagenet():
    with pytest.raises(SystemExit):
        parse_args(["--synthetic", "--eval-crops", "320:320"])
    with pytest.raises(SystemExit):
        parse_args(["--dataset", "imagenet", "--data", "x", "--scale-range", "128", "480"])
