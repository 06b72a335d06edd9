"""Fused residual units (pre-activation and original) against eager PyTorch and torch.compile, side by side.

    python bench/fused_vs_eager.py [--only unit,model/cifar_resnet164] [--dtype fp32,bf16]
                                   [--mode train,infer] [--contenders eager,fused-cuda+graph,...]
                                   [--batch N] [--quick] [--out DIR] [--max-minutes M] [--list]

Measures, in one run on the same inputs, every contender that can run (eager cuDNN,
torch.compile default and max-autotune, the fused Triton and C++/CUDA backends, eager
and fused steps captured whole into a CUDA graph (``+graph``), and at the conv level
cuDNN's own fused scale-bias-ReLU-conv-genstats graph) at three
levels (one BN-ReLU-conv, one unit, whole models; training step and inference), and
writes a console table, ``results.json``, ``report.md`` and ``speedup.png`` into
``--out``, each with the device, driver, versions and git commit. Contenders that
cannot run are listed with the reason instead of a figure.

Without a GPU it says so and runs a CPU smoke comparison on tiny shapes: eager
against the extension's CPU operators (``backend="cuda"`` on CPU tensors) and, only
when ``TRITON_INTERPRET=1`` is set, Triton's interpreter.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as dt
import gc
import sys
import time
import warnings
from pathlib import Path

if __package__ in (None, ""):            # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import cases as catalogue
from bench.cases import DEFAULT_MODES, STEP_MODES
from bench import environment, kernel_profile, measure, report
from bench.contenders import CONTENDERS, LEVEL_CONTENDERS, Setting, build_runner, graph_base
from bench.floors import operator_traffic, floor_seconds, fraction_of_floor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
REPEATS = {  # (warm-up, timed calls) per level; --quick and the CPU smoke run take the second and third
    "conv": ((10, 50), (5, 20), (1, 3)),
    "unit": ((10, 50), (5, 20), (1, 3)),
    "model": ((5, 20), (3, 10), (1, 2)),
}
PROFILED_STEPS = (3, 1)   # steps under torch.profiler: on a GPU, in the CPU smoke run


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--only", help="comma-separated levels (conv, unit, model), families (cifar, imagenet, "
                                       "tiny), kinds (basic, bottleneck), case names or globs")
    parser.add_argument("--dtype", help="comma-separated fp32, bf16, fp16, run in this order (default: fp32,bf16 "
                                        "for units and models and fp16 for convs on a GPU; fp32 on a CPU)")
    parser.add_argument("--mode", help="comma-separated steps of units and models: train, infer, pgd-train, "
                                       "pgd-eval (an input-gradient-only step, BN in training / eval mode) "
                                       "(default train,infer; convs always run fwd)")
    parser.add_argument("--contenders", help="comma-separated contenders to run (default: all of each level); "
                                             "one named here runs even where --quick would skip it: "
                                             + ", ".join(CONTENDERS))
    parser.add_argument("--batch", type=int, help="batch size of every case (default: 128 CIFAR, 64 ImageNet)")
    parser.add_argument("--quick", action="store_true", help="fewer cases and repeats, no max-autotune")
    parser.add_argument("--out", type=Path, help="output folder (default bench/results/<device>-<date>)")
    parser.add_argument("--max-minutes", type=float, help="start no new case after this many minutes")
    parser.add_argument("--device", help="cuda or cpu (default: cuda when there is a GPU)")
    parser.add_argument("--list", action="store_true", help="list the selected cases and exit")
    args = parser.parse_args(argv)
    try:
        args.dtypes = parse_dtypes(args.dtype)
        args.modes = _parse_list(args.mode, "--mode", STEP_MODES)
        args.contender_names = _parse_list(args.contenders, "--contenders", CONTENDERS)
    except ValueError as error:
        parser.error(str(error))
    if args.batch is not None and args.batch <= 0:
        parser.error(f"--batch must be a positive integer, got {args.batch}")
    if args.max_minutes is not None and args.max_minutes <= 0:
        parser.error(f"--max-minutes must be positive, got {args.max_minutes}")
    if args.device is not None and args.device not in ("cuda", "cpu"):
        parser.error(f"--device must be cuda or cpu, got {args.device!r}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA GPU here")
    return args


def parse_dtypes(text):
    """``"fp32,bf16"`` -> [torch.float32, torch.bfloat16]; None stays None (the defaults apply)."""
    if text is None:
        return None
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in DTYPES]
    if not names or unknown:
        raise ValueError(f"--dtype must be a comma-separated list of {', '.join(DTYPES)}, got {text!r}")
    return [DTYPES[name] for name in dict.fromkeys(names)]


def _parse_list(text, flag: str, allowed) -> "tuple | None":
    """``"a,b"`` -> ("a", "b"), each one of ``allowed``; None stays None (everything)."""
    if text is None:
        return None
    names = tuple(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
    unknown = [name for name in names if name not in allowed]
    if not names or unknown:
        raise ValueError(f"{flag} must be a comma-separated list of {', '.join(allowed)}, got {text!r}")
    return names


def modes_for(case, requested) -> tuple:
    """The steps of ``case`` to run: its own modes, narrowed by ``--mode`` (default ``DEFAULT_MODES``;
    convs keep fwd)."""
    if case.level == "conv":
        return case.modes
    return tuple(mode for mode in case.modes if mode in (requested or DEFAULT_MODES))


def jobs_in_order(selected, dtypes, modes, on_gpu: bool) -> list:
    """(case, dtype, mode) in the order they run: the cases' order, and with ``--dtype`` given, all
    cases of its first dtype before any of the next (a short budget measures the first dtype)."""
    jobs = [(case, dtype, mode) for case in selected for dtype in dtypes_for(case.level, dtypes, on_gpu)
            for mode in modes_for(case, modes)]
    if dtypes is not None:
        jobs.sort(key=lambda job: dtypes.index(job[1]))   # stable: the case order stays within a dtype
    return jobs


def dtypes_for(level: str, requested, on_gpu: bool) -> list:
    if requested is not None:
        return requested
    if not on_gpu:
        return [torch.float32]
    return [torch.float16] if level == "conv" else [torch.float32, torch.bfloat16]


# -- inputs ---------------------------------------------------------------------------
def make_inputs(case, dtype, device, base) -> dict:
    """The inputs every contender of a case shares (seeded, so reruns see the same data)."""
    generator = torch.Generator().manual_seed(1)
    shape = (case.batch, *case.input_shape)

    def randn(*size):
        return torch.randn(*size, generator=generator)

    inputs = {}
    if case.level == "conv":
        conv = case.conv
        x = randn(*shape)
        inputs["weight"] = (randn(conv.cout, conv.cin, conv.kernel, conv.kernel)
                            * (2.0 / (conv.cin * conv.kernel ** 2)) ** 0.5).to(device)
        inputs["scale"] = (0.5 + torch.rand(conv.cin, generator=generator)).to(device)
        inputs["shift"] = (0.1 * randn(conv.cin)).to(device)
        inputs["x"] = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        return inputs
    x = randn(*shape)
    if case.level == "unit":
        inputs["x"] = x.to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        inputs["dy"] = randn(*shape).to(device=device).contiguous(memory_format=torch.channels_last)
    else:
        inputs["x"] = x.to(device).contiguous(memory_format=torch.channels_last)   # autocast casts the stem
        num_classes = base.fc.out_features
        inputs["labels"] = torch.randint(num_classes, (case.batch,), generator=generator).to(device)
        inputs["unit_probe"] = torch.zeros(2, catalogue.first_unit_channels(base), 8, 8, device=device,
                                           dtype=dtype).contiguous(memory_format=torch.channels_last)
    return inputs


def conv_floor_ms(case, dtype, rates) -> float:
    """The floor of one BN-ReLU-conv with output statistics (the work all conv-level contenders do)."""
    conv = case.conv
    meta = dict(device="meta")
    ho = (conv.size + 2 * (conv.kernel // 2) - conv.kernel) // conv.stride + 1
    x = torch.empty(case.batch, conv.size, conv.size, conv.cin, dtype=dtype, **meta)
    weight = torch.empty(conv.cout, conv.cin, conv.kernel, conv.kernel, dtype=dtype, **meta)
    vector = torch.empty(conv.cin, **meta)
    y = torch.empty(case.batch, ho, ho, conv.cout, dtype=dtype, **meta)
    stats = torch.empty(2, conv.cout, **meta)           # the mean and variance the next BN needs
    traffic = operator_traffic("conv_bnrelu", [x, weight, vector, vector, None, conv.stride, True], [y, stats])
    return floor_seconds(traffic, rates.copy_bytes_per_s, rates.matrix_rate(dtype)) * 1e3


# -- one case ---------------------------------------------------------------------------
def _free(device) -> None:
    """Between contenders on a GPU: what the last one left (reference cycles included) goes back to the
    device before the next one's peak memory is measured. On a CPU nothing is measured that it would
    change, and a collection costs ~0.2 s a call on the 2-core CI machine: not done there."""
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()


def _describe(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def _max_abs_diff(out, reference):
    if reference is None or out.shape != reference.shape:
        return None
    return float((out.double() - reference.double()).abs().max())


def measure_case(case, mode, dtype, setting_args, rates, log) -> tuple[list, list]:
    """Every contender of one (case, mode, dtype): result entries and kernel rows."""
    device, quick, smoke, named = setting_args
    setting = Setting(device, dtype, mode, quick, smoke, frozenset(named or ()))
    warmup, repeats = REPEATS[case.level][2 if smoke else (1 if quick else 0)]
    torch.manual_seed(0)
    base = None
    if case.build is not None:
        base = case.build().to(device).to(memory_format=torch.channels_last)
    inputs = make_inputs(case, dtype, device, base)
    common = {"case": case.name, "level": case.level, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
              "batch": case.batch, "input_shape": list(case.input_shape)}
    entries, kernels, reference = [], [], None
    for contender in LEVEL_CONTENDERS[case.level]:
        if named is not None and contender not in named and contender != "eager":   # eager: the baseline
            continue
        entry = {**common, "contender": contender}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            allocated = True   # what a contender built (or half-built, failing) is freed after it (GPU)
            try:
                runner = build_runner(contender, case, setting, base, inputs)
                if isinstance(runner, str):
                    entries.append({**entry, "status": "unavailable", "reason": runner})
                    log(entries[-1])
                    allocated = False   # nothing built, nothing to free
                    continue
                out = runner.step()                       # first call: compiles, tunes, checks
                if contender == "eager":
                    reference = out.detach()
                diff = _max_abs_diff(out.detach(), reference)
                if graph_base(contender) is not None and mode == "train":
                    diff = None    # its weights took steps while building; its check is in notes
                entry.update(runner.notes)
                if runner.forward is not None:
                    try:
                        saved = measure.saved_activation_bytes(runner.forward, runner.state)
                        entry["saved_activation_bytes"] = saved.bytes
                        entry["saved_storages"] = saved.storages
                    except Exception as error:   # noqa: BLE001 - e.g. hooks a compiled graph refuses
                        entry["saved_activation_error"] = _describe(error)
                timing = measure.time_call(runner.step, device, warmup=warmup, repeats=repeats)
                entry.update(status="measured", **timing.as_dict())
                entry["images_per_s"] = case.batch / (timing.median_ms * 1e-3)
                if diff is not None and contender != "eager":
                    entry["max_abs_diff_vs_eager"] = diff
                peak = runner.peak_memory_bytes
                if peak is None:
                    peak = measure.peak_memory_bytes(runner.step, device)
                if peak is not None:
                    entry["peak_memory_bytes"] = peak
                if case.level == "conv":
                    entry["floor_ms"] = conv_floor_ms(case, dtype, rates)
                    entry["fraction_of_floor"] = fraction_of_floor(entry["floor_ms"], timing.median_ms)
                if runner.profiled:
                    try:
                        rows = kernel_profile.profile_operators(runner.step, device, rates,
                                                                repeats=PROFILED_STEPS[smoke])
                        kernels += [{**common, "contender": contender, **row} for row in rows]
                    except Exception as error:   # noqa: BLE001 - the timing above stands without it
                        entry["kernel_profile_error"] = _describe(error)
            except Exception as error:   # noqa: BLE001 - one failing contender must not stop the run
                entry = {**common, "contender": contender, "status": "failed", "reason": _describe(error)}
            finally:
                runner = None
                if allocated:
                    _free(device)
        entries.append(entry)
        log(entry)
    report.add_speedups(entries)
    return entries, kernels


# -- main ----------------------------------------------------------------------------------
def main(argv=None) -> int:
    args = parse_args(argv)
    on_gpu = torch.cuda.is_available() if args.device is None else args.device == "cuda"
    device = torch.device("cuda" if on_gpu else "cpu")
    smoke = not on_gpu
    try:
        selected = catalogue.select(catalogue.smoke_cases() if smoke else catalogue.gpu_cases(), args.only,
                                    quick=args.quick, batch=args.batch)
    except ValueError as error:
        print(f"fused_vs_eager.py: error: {error}", file=sys.stderr)
        return 2
    if args.list:
        for case in selected:
            print(f"{case.name:<48} batch {case.batch:<4} modes {','.join(modes_for(case, args.modes))}")
        return 0

    info = environment.describe(device)
    if smoke:
        print("No CUDA GPU here: running the CPU smoke comparison on tiny shapes "
              "(eager vs the fused CPU paths); GPU figures need a GPU.")
    print(environment.one_line(info))
    started = time.monotonic()
    stamp = dt.datetime.now(dt.timezone.utc)
    out_dir = args.out or report.default_out_dir(info, stamp)
    out_dir.mkdir(parents=True, exist_ok=True)

    all_dtypes = sorted({d for case in selected for d in dtypes_for(case.level, args.dtypes, on_gpu)},
                        key=str)
    rates = measure.device_rates(device, all_dtypes)
    print(f"measured: copy {rates.copy_bytes_per_s / 1e9:.1f} GB/s (read + write), matrix "
          + ", ".join(f"{k} {v / 1e12:.2f} TFLOP/s" for k, v in rates.matrix_flops_per_s.items()))

    run = report.Run(info=info, args={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
                                      if k not in ("dtypes", "modes", "contender_names")},
                     created_utc=stamp.isoformat(timespec="seconds"), smoke=smoke, rates=rates.as_dict())
    for case, dtype, mode in jobs_in_order(selected, args.dtypes, args.modes, on_gpu):
        if args.max_minutes is not None and time.monotonic() - started > 60 * args.max_minutes:
            run.skipped.append({"case": case.name, "mode": mode, "dtype": str(dtype).replace("torch.", ""),
                                "reason": f"not started: --max-minutes {args.max_minutes} reached"})
            continue
        current: list = []

        def progress(entry, current=current):   # after every contender: a killed run keeps it
            report.print_progress(entry)
            current.append(entry)
            report.write_json(dataclasses.replace(run, results=run.results + current), out_dir)
        entries, kernels = measure_case(case, mode, dtype,
                                        (device, args.quick, smoke, args.contender_names), rates, progress)
        run.results += entries
        run.kernels += kernels
        report.write_json(run, out_dir)
    report.write_all(run, out_dir)
    print(f"\nwrote {out_dir}/results.json, report.md, speedup.png ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
