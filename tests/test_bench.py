"""The benchmark (bench/fused_vs_eager.py): its CPU smoke run, and its small pieces.

The smoke run is what CI runs on a machine without a GPU: it must exit 0, write the
JSON, Markdown and PNG with the device, versions and commit in each, carry the raw
samples behind every figure, and list each contender that could not run with a reason.
No test here asserts a speed.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench import cases, contenders, floors, kernel_profile, measure, report  # noqa: E402
from bench import fused_vs_eager as script  # noqa: E402

SCRIPT = REPO / "bench" / "fused_vs_eager.py"


def _run_script(out_dir: Path, *extra: str, interpret: bool = False) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, str(SCRIPT), "--quick", "--out", str(out_dir), *extra],
                          capture_output=True, text=True, env=env, timeout=600, cwd=REPO)


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    if torch.cuda.is_available():
        pytest.skip("the CPU smoke run is what a machine without a GPU runs")
    out_dir = tmp_path_factory.mktemp("bench")
    done = _run_script(out_dir)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return out_dir, done, json.loads((out_dir / "results.json").read_text())


# -- the CPU smoke run ---------------------------------------------------------------
def test_smoke_run_says_there_is_no_gpu_and_writes_every_output(smoke_run):
    out_dir, done, data = smoke_run
    assert "No CUDA GPU here" in done.stdout
    assert data["smoke"] is True
    for name in ("results.json", "report.md", "speedup.png"):
        assert (out_dir / name).stat().st_size > 0, name


def test_smoke_outputs_carry_device_versions_and_commit(smoke_run):
    out_dir, done, data = smoke_run
    info = data["info"]
    commit = info["git_commit"].split("+")[0]       # HEAD when the run started (others may commit since)
    known = subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=REPO)
    assert len(commit) == 40 and known.returncode == 0, info["git_commit"]
    assert info["torch"] == torch.__version__
    for key in ("device", "driver", "cuda", "triton"):
        assert info[key], key
    markdown = (out_dir / "report.md").read_text()
    png = (out_dir / "speedup.png").read_bytes()
    for text in (markdown, done.stdout):
        assert commit[:12] in text and torch.__version__ in text and info["device"] in text
    assert png.startswith(b"\x89PNG") and commit.encode() in png and torch.__version__.encode() in png


def test_every_figure_comes_from_its_samples(smoke_run):
    _, _, data = smoke_run
    measured = [e for e in data["results"] if e["status"] == "measured"]
    assert {e["case"] for e in measured} == {c.name for c in cases.smoke_cases()}   # eager runs everywhere
    for entry in measured:
        samples = entry["samples_ms"]
        assert len(samples) >= 2 and all(s > 0 for s in samples)
        assert entry["median_ms"] == statistics.median(samples)
        assert entry["images_per_s"] == pytest.approx(entry["batch"] / (entry["median_ms"] * 1e-3))
        assert "peak_memory_bytes" not in entry          # not measured on a CPU, so not reported
    eager = {(e["case"], e["mode"], e["dtype"]): e for e in measured if e["contender"] == "eager"}
    for entry in measured:
        base = eager[(entry["case"], entry["mode"], entry["dtype"])]
        assert entry["speedup_vs_eager"] == pytest.approx(base["median_ms"] / entry["median_ms"])
    trains = [e for e in measured if e["mode"] == "train"]
    assert trains and all(e["saved_activation_bytes"] > 0 for e in trains)


def test_smoke_run_measures_the_original_unit_nets(smoke_run):
    """The original (post-activation) unit's cases: this project's net with original units and
    torchvision's ResNet class (a ResNet-10), eager and (when the extension is built) converted to fused C++
    CPU units."""
    from fused_preact import _extension
    _, _, data = smoke_run
    for case in ("model/cifar_resnet8-original", "model/torchvision_resnet10"):
        measured = {(e["contender"], e["mode"]): e for e in data["results"]
                    if e["case"] == case and e["status"] == "measured"}
        assert {("eager", "train"), ("eager", "infer")} <= set(measured), case
        if _extension.available():
            fused = measured[("fused-cuda", "train")]
            assert fused["max_abs_diff_vs_eager"] < 1e-3 and fused["saved_activation_bytes"] > 0, case


def test_contenders_that_cannot_run_are_listed_with_a_reason(smoke_run):
    _, done, data = smoke_run
    not_run = [e for e in data["results"] if e["status"] != "measured"]
    assert not_run, "without a GPU, torch.compile and cuDNN are not run"
    for entry in not_run:
        assert entry["reason"].strip() and "samples_ms" not in entry and "median_ms" not in entry
    listed = {u["contender"] for u in data["unavailable"]}
    assert {"compile", "compile-max-autotune", "cudnn-fe", "eager+graph", "fused-cuda+graph"} <= listed
    graph_reasons = {u["reason"] for u in data["unavailable"] if u["contender"].endswith("+graph")}
    assert graph_reasons == {"not run without a GPU: a CUDA graph captures GPU work only"}
    for item in data["unavailable"]:
        assert item["reason"] in done.stdout


def test_report_is_rebuilt_from_the_json_of_a_run_stopped_early(smoke_run, tmp_path, capsys):
    """``python -m bench.report DIR`` (its main, in this process: a second interpreter costs 5 s here)."""
    out_dir, _, data = smoke_run
    (tmp_path / "results.json").write_text((out_dir / "results.json").read_text())
    assert report.main([str(tmp_path)]) == 0
    assert (tmp_path / "report.md").read_text() == (out_dir / "report.md").read_text()
    assert (tmp_path / "speedup.png").read_bytes().startswith(b"\x89PNG")
    assert data["info"]["git_commit"][:12] in capsys.readouterr().out
    with pytest.raises(SystemExit):
        report.main([str(tmp_path / "missing")])
    assert "out_dir: no results.json" in capsys.readouterr().err


@pytest.mark.full   # a second benchmark process (about 6 s); the GPU run measures the Triton contenders
def test_smoke_run_through_the_triton_interpreter_measures_or_explains(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("the interpreter path is the no-GPU path")
    done = _run_script(tmp_path, "--only", "conv/tiny/3x3*", interpret=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    data = json.loads((tmp_path / "results.json").read_text())
    (triton,) = [e for e in data["results"] if e["contender"] == "fused-triton"]
    assert "interpreter" not in triton.get("reason", "")         # TRITON_INTERPRET=1 was honoured
    if triton["status"] == "measured":
        assert triton["samples_ms"] and triton["max_abs_diff_vs_eager"] < 1e-3
    else:
        assert triton["reason"].strip()


# -- floors ---------------------------------------------------------------------------------
def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, dtype=dtype, device="meta")


def test_conv_bnrelu_traffic_counts_each_tensor_once_and_the_conv_flops():
    n, h, w, cin, cout, stride = 3, 9, 7, 5, 6, 2           # odd sizes, strided
    ho, wo = (h - 1) // stride + 1, (w - 1) // stride + 1
    x, weight = _meta(n, h, w, cin), _meta(cout, cin, 3, 3, dtype=torch.float32)
    scale, shift, residual = _meta(cin, dtype=torch.float32), _meta(cin, dtype=torch.float32), _meta(n, ho, wo, cout)
    y, pmean, pm2, pcount = _meta(n, ho, wo, cout), _meta(4, cout, dtype=torch.float32), \
        _meta(4, cout, dtype=torch.float32), _meta(4, dtype=torch.float32)
    traffic = floors.operator_traffic("conv_bnrelu", [x, weight, scale, shift, residual, stride, True],
                                      [y, pmean, pm2, pcount])
    expected_bytes = (n * h * w * cin * 2 + cout * cin * 9 * 4 + 2 * cin * 4 + 2 * n * ho * wo * cout * 2
                      + 2 * 4 * cout * 4 + 4 * 4)
    assert traffic.bytes == expected_bytes
    assert traffic.flops == 2 * n * ho * wo * cout * cin * 9
    assert traffic.dtype == torch.bfloat16


def test_wgrad_reads_its_weight_only_for_the_shape_and_finalize_rewrites_running_stats():
    dy, x, vec = _meta(2, 4, 4, 8), _meta(2, 4, 4, 3), _meta(3, dtype=torch.float32)
    weight = _meta(8, 3, 1, 1, dtype=torch.float32)
    dweight = _meta(8, 3, 1, 1, dtype=torch.float32)
    wgrad = floors.operator_traffic("conv_wgrad", [dy, x, vec, vec, weight, 1], [dweight])
    assert wgrad.bytes == 2 * 4 * 4 * 8 * 2 + 2 * 4 * 4 * 3 * 2 + 2 * 3 * 4 + 8 * 3 * 4
    assert wgrad.flops == 2 * 2 * 4 * 4 * 8 * 3
    c, t = 5, 3
    p, count, v = _meta(t, c, dtype=torch.float32), _meta(t, dtype=torch.float32), _meta(c, dtype=torch.float32)
    fin = floors.operator_traffic("bn_finalize", [p, p, count, v, v, v, v, None, 0.1, 1e-5], [v, v, v, v])
    assert fin.bytes == (2 * t * c + t) * 4 + 2 * c * 4 + 2 * 2 * c * 4 + 4 * c * 4
    assert fin.flops == 0


def test_floor_is_the_larger_of_memory_and_matrix_time():
    memory_bound = floors.Traffic(bytes=3_000_000, flops=1_000, dtype=torch.bfloat16)
    compute_bound = floors.Traffic(bytes=3_000, flops=8_000_000_000, dtype=torch.bfloat16)
    assert floors.floor_seconds(memory_bound, 3e12, 8e14) == pytest.approx(1e-6)
    assert floors.floor_seconds(compute_bound, 3e12, 8e14) == pytest.approx(1e-5)
    assert floors.floor_seconds(compute_bound, 3e12, None) == pytest.approx(1e-9)   # no rate: memory alone
    assert floors.fraction_of_floor(1e-5, 2e-5) == pytest.approx(0.5)


def test_floor_arguments_are_checked():
    with pytest.raises(ValueError, match="op must be one of"):
        floors.operator_traffic("conv_transpose", [], [])
    with pytest.raises(ValueError, match="copy_bytes_per_s"):
        floors.floor_seconds(floors.Traffic(1, 0, torch.float32), 0.0, None)
    with pytest.raises(ValueError, match="measured_s"):
        floors.fraction_of_floor(1.0, 0.0)


# -- measurements -------------------------------------------------------------------------------
def test_saved_bytes_of_a_conv_relu_are_its_input_and_its_output():
    conv = nn.Conv2d(3, 4, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 9, 7)
    out = {}

    def forward():
        out["y"] = torch.relu(conv(x))          # conv saves x (and its weight), relu saves its output
    saved = measure.saved_activation_bytes(forward, exclude=list(conv.parameters()))
    assert saved.storages == 2
    assert saved.bytes == x.numel() * 4 + out["y"].numel() * 4


def test_saved_bytes_count_a_storage_once_at_its_full_size():
    x = torch.randn(5, 6, requires_grad=True)
    out = {}

    def forward():
        a = x.exp()                 # saves its output a
        out["a"] = a
        (a[:, :2].sin() + a[1:].cos().sum()).sum()   # save two views of a's storage
    saved = measure.saved_activation_bytes(forward)
    assert saved.tensors >= 3 and saved.storages == 1
    assert saved.bytes == out["a"].numel() * 4


def test_time_call_takes_one_sample_per_call_after_the_warmup():
    calls = []
    timing = measure.time_call(lambda: calls.append(1), torch.device("cpu"), warmup=2, repeats=4)
    assert len(calls) == 6 and len(timing.samples_ms) == 4
    assert timing.median_ms == statistics.median(timing.samples_ms)
    with pytest.raises(ValueError, match="repeats"):
        measure.time_call(lambda: None, torch.device("cpu"), warmup=0, repeats=0)


def test_speedups_are_ratios_of_measured_medians():
    def entry(name, median):
        return {"contender": name, "status": "measured", "median_ms": median}
    entries = [entry("eager", 4.0), entry("compile", 2.5), entry("compile-max-autotune", 2.0),
               entry("fused-triton", 1.0), {"contender": "fused-cuda", "status": "unavailable", "reason": "r"}]
    report.add_speedups(entries)
    fused = entries[3]
    assert fused["speedup_vs_eager"] == 4.0 and fused["speedup_vs_compile"] == 2.0
    assert fused["compile_baseline"] == "compile-max-autotune"
    assert "speedup_vs_eager" not in entries[4]


def test_operator_profile_gives_time_bytes_and_floor_of_each_call():
    """The profiling pipeline on a stand-in operator registered under a test namespace."""
    @torch.library.custom_op("fused_preact_benchtest::bn_relu_apply", mutates_args=())
    def bn_relu_apply(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor,
                      residual: torch.Tensor | None) -> torch.Tensor:
        return torch.relu(x * scale + shift)

    x, scale, shift = torch.randn(4, 5, 3, 6), torch.rand(6), torch.randn(6)
    rates = measure.DeviceRates(copy_bytes_per_s=1e9, copy={})
    rows = kernel_profile.profile_operators(
        lambda: torch.ops.fused_preact_benchtest.bn_relu_apply(x, scale, shift, None), torch.device("cpu"),
        rates, repeats=3, namespaces=("fused_preact_benchtest",))
    (row,) = rows
    assert row["operator"] == "fused_preact_benchtest::bn_relu_apply" and row["calls_per_step"] == 1
    assert row["bytes"] == 2 * x.numel() * 4 + 2 * 6 * 4
    assert row["floor_ms"] == pytest.approx(row["bytes"] / 1e9 * 1e3)
    assert len(row["samples_ms"]) == 3 and row["median_ms"] == statistics.median(row["samples_ms"])
    assert row["fraction_of_floor"] == pytest.approx(row["floor_ms"] / row["median_ms"])


# -- arguments ------------------------------------------------------------------------------------
def test_only_selects_levels_and_rejects_what_matches_nothing():
    catalogue = cases.gpu_cases()
    units = cases.select(catalogue, "unit", quick=False, batch=None)
    assert units and all(c.level == "unit" for c in units)
    assert len([c for c in units if "imagenet" in c.name]) == 8 and len([c for c in units if "cifar" in c.name]) == 6
    (resnet,) = cases.select(catalogue, "model/cifar_resnet164", quick=False, batch=32)
    assert resnet.batch == 32 and resnet.input_shape == (3, 32, 32)
    with pytest.raises(ValueError, match="--only 'resnet9000' matches no case"):
        cases.select(catalogue, "unit,resnet9000", quick=False, batch=None)
    with pytest.raises(ValueError, match="--batch"):
        cases.select(catalogue, None, quick=False, batch=0)
    quick = cases.select(catalogue, None, quick=True, batch=None)
    assert 0 < len(quick) < len(catalogue)
    ordered = cases.select(catalogue, "model/cifar_resnet164,unit/cifar/basic,basic-16x32x32", quick=False, batch=None)
    assert [c.name for c in ordered] == ["model/cifar_resnet164", "unit/cifar/basic-16x32x32",
                                         "unit/cifar/basic-32x16x16", "unit/cifar/basic-64x8x8"]


def test_catalogue_has_the_issue_shapes():
    names = {c.name for c in cases.gpu_cases()}
    for name in ("unit/cifar/basic-16x32x32", "unit/cifar/bottleneck-256x8x8", "unit/imagenet/bottleneck-2048x7x7",
                 "unit/imagenet/basic-512x7x7", "model/cifar_resnet1001", "model/imagenet_resnet200",
                 "conv/imagenet/3x3-64x56x56-to-64", "conv/imagenet/1x1-256x56x56-to-64",
                 "model/cifar_resnet110-original", "model/torchvision_resnet50"):
        assert name in names, name


@pytest.mark.parametrize("argv, message", [
    (["--dtype", "fp64"], "--dtype must be"),
    (["--dtype", ""], "--dtype must be"),
    (["--batch", "0"], "--batch must be a positive integer"),
    (["--max-minutes", "-1"], "--max-minutes must be positive"),
    (["--device", "tpu"], "--device must be cuda or cpu"),
    (["--mode", "backward"], "--mode must be a comma-separated list of train, infer"),
    (["--contenders", "eager,cudnn"], "--contenders must be a comma-separated list of eager, eager+graph"),
])
def test_bad_arguments_exit_with_a_message_naming_them(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        script.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_an_only_pattern_matching_nothing_exits_2_and_names_it(capsys):
    assert script.main(["--only", "nonexistent-shape", "--list"]) == 2
    assert "--only 'nonexistent-shape' matches no case" in capsys.readouterr().err


def test_mode_and_contender_selection():
    args = script.parse_args(["--mode", "train", "--contenders", "fused-cuda+graph,compile-max-autotune"])
    (unit,) = cases.select(cases.gpu_cases(), "unit/cifar/basic-16x32x32", quick=True, batch=None)
    (conv,) = cases.select(cases.gpu_cases(), "conv/cifar/3x3-16x32x32-to-16", quick=True, batch=None)
    assert script.modes_for(unit, args.modes) == ("train",) and script.modes_for(conv, args.modes) == ("fwd",)
    assert args.contender_names == ("fused-cuda+graph", "compile-max-autotune")
    setting = contenders.Setting(torch.device("cuda"), torch.bfloat16, "train", True, False,
                                 frozenset(args.contender_names))
    assert contenders.static_reason("compile-max-autotune", unit, setting) is None    # named: --quick keeps it
    quick = contenders.Setting(torch.device("cuda"), torch.bfloat16, "train", True, False)
    assert "--quick" in contenders.static_reason("compile-max-autotune", unit, quick)
    assert contenders.graph_base("fused-triton+graph") == "fused-triton" and contenders.graph_base("eager") is None


def test_with_dtypes_given_all_cases_of_the_first_dtype_run_first():
    selected = cases.select(cases.gpu_cases(), "unit/cifar/basic-16x32x32,model/cifar_resnet164", quick=True,
                            batch=None)
    jobs = script.jobs_in_order(selected, [torch.bfloat16, torch.float32], ("train",), True)
    assert [(c.name.split("/")[-1], str(d)[6:], m) for c, d, m in jobs] == [
        ("basic-16x32x32", "bfloat16", "train"), ("cifar_resnet164", "bfloat16", "train"),
        ("basic-16x32x32", "float32", "train"), ("cifar_resnet164", "float32", "train")]
    default = script.jobs_in_order(selected, None, None, True)
    assert [(c.name.split("/")[-1], str(d)[6:], m) for c, d, m in default][:3] == [
        ("basic-16x32x32", "float32", "train"), ("basic-16x32x32", "float32", "infer"),
        ("basic-16x32x32", "bfloat16", "train")]


def test_graph_contender_checks_its_replays_against_eager_steps(monkeypatch):
    """The +graph runner's code path on a CPU: capture swapped for the same step run eagerly."""
    from fused_preact.cuda_graph import GraphedStep
    monkeypatch.setattr(contenders, "GraphedStep", lambda step, capture, warmup: GraphedStep(step, capture=False,
                                                                                             warmup=warmup))
    for name in ("synchronize", "reset_peak_memory_stats"):
        monkeypatch.setattr(torch.cuda, name, lambda device=None: None)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 12345)
    case = next(c for c in cases.smoke_cases() if c.name == "unit/tiny/basic-8x8x8")
    setting = contenders.Setting(torch.device("cpu"), torch.float32, "train", True, True)
    torch.manual_seed(0)
    base = case.build().to(memory_format=torch.channels_last)
    inputs = script.make_inputs(case, torch.float32, torch.device("cpu"), base)
    runner = contenders._graph_runner("eager", case, setting, base, inputs)
    assert runner.peak_memory_bytes == 12345
    assert runner.notes["graph_replay_max_abs_diff"] == 0.0
    first, second = runner.step(), runner.step()
    assert first is second and first.shape == (case.batch, *case.input_shape)   # one static output


def test_dtype_list_is_parsed_in_order_without_duplicates():
    assert script.parse_dtypes("bf16, fp32,bf16") == [torch.bfloat16, torch.float32]
    assert script.parse_dtypes(None) is None


@pytest.mark.skipif(not __import__("fused_preact._extension", fromlist=["x"]).available(),
                    reason="needs the C++ extension")
def test_cpu_bn_relu_benchmark_runs_and_its_fused_step_matches_float64():
    """bench/bn_relu_cpu.py at a tiny odd shape: one row per dtype, the fused dx close to float64."""
    result = subprocess.run([sys.executable, str(REPO / "bench" / "bn_relu_cpu.py"), "--batch", "2",
                             "--channels", "19", "--size", "5", "--repeats", "2"],
                            capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert "CPU kernels " in result.stdout and "commit " in result.stdout
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()
            if line.split() and line.split()[0] in ("float32", "bfloat16")}
    assert set(rows) == {"float32", "bfloat16"}
    assert float(rows["float32"][-1]) < 1e-5 and float(rows["bfloat16"][-1]) < 0.05
