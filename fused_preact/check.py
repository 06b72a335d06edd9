"""``python -m fused_preact.check``: what fused-preact runs on this machine, and whether it computes
right here.

    python -m fused_preact.check [--device cuda|cpu] [--quick] [--json PATH] [--backends cuda,triton]

Prints, and with ``--json`` writes:

1. the environment: Python, torch, triton, CUDA, cuDNN, the extension's build (its CUDA
   architectures, whether PTX is in it), the device and its compute capability, and which backend
   ``backend="auto"`` picks for float32, bfloat16 and float16 inputs there, and why;
2. every operator of the contract (``unit_ops``) on every backend that can run on the device, in
   float32, bfloat16, float16 and float64, on shapes that hit tile boundaries (``operator_check``),
   against float64 references;
3. each unit form -- pre-activation and original, basic and bottleneck, projections, both memory
   modes, explicit padding -- forward, backward and running statistics, on every such backend, in
   float32 and under bf16 / fp16 autocast (``self_check.compare_unit``: the check units make of
   themselves on first use);
4. each unit's fused training step against eager's (time; for information).

Every error is judged by one rule (``accuracy``): at most ``accuracy.FACTOR`` times eager PyTorch's
own error in that dtype against the same float64 reference. A PASS/FAIL table ends the run; the
exit code is 1 when any row fails. ``--quick`` checks fewer shapes and forms (under a minute on a
GPU); on the CPU (``--device cpu``: the extension's C++ kernels, and Triton's interpreter on the
smallest shapes) ``--quick`` is what the test suite runs.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}


@dataclass
class Row:
    """One line of the table."""
    section: str          # "operator" | "unit" | "time"
    backend: str
    dtype: str
    case: str
    status: str           # PASS | FAIL | SKIP | INFO
    detail: str
    ratio: Optional[float] = None   # the worst error as a multiple of eager's


@dataclass
class Report:
    environment: dict
    rows: list = field(default_factory=list)
    seconds: float = 0.0
    complete: bool = False        # every section ran (a report written on the way is not)

    @property
    def passed(self) -> bool:
        return not any(row.status == "FAIL" for row in self.rows)

    def counts(self) -> dict:
        counts: dict = {}
        for row in self.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    def as_json(self) -> dict:
        return {"passed": self.passed, "complete": self.complete, "counts": self.counts(),
                "seconds": round(self.seconds, 1),
                "environment": self.environment, "rows": [asdict(row) for row in self.rows]}


# -- what is checked ----------------------------------------------------------------------------------
@dataclass(frozen=True)
class Plan:
    """The cases of one run (``plan``): operators as (Shape, dtype names, operators or None for all),
    units and timings as (form in UNIT_FORMS, dtype names: "fp32", or "bf16" / "fp16" autocast)."""
    operators: tuple              # for compiled kernels (and the C++ CPU kernels)
    interpreter_operators: tuple  # for Triton's interpreter on the CPU: the smallest
    units: tuple
    interpreter_units: tuple
    eval_mode: bool               # units also in eval mode
    timed: tuple


def plan(device: torch.device, quick: bool) -> Plan:
    from .operator_check import Shape
    if device.type == "cuda":
        every = ("fp32", "bf16", "fp16") if quick else ("fp32", "bf16", "fp16", "fp64")
        shapes = [Shape("odd sizes", 3, 7, 9, 17, 24, 3, 1),
                  Shape("3 channels, stride 2", 2, 13, 11, 3, 16, 3, 2),
                  Shape("1x1 tensor cores, rows past a tile", 2, 23, 23, 64, 136, 1, 1),
                  Shape("1x1 stride 2 tensor cores", 3, 15, 17, 24, 40, 1, 2),
                  Shape("SAME stride 2", 2, 8, 7, 8, 16, 3, 2, (0, 1, 0, 1))]
        if not quick:
            shapes += [Shape("1x1, channels not a multiple of 8", 2, 9, 9, 17, 12, 1, 1),
                       Shape("CIFAR stage", 16, 32, 32, 64, 64, 3, 1),
                       Shape("1x1 ImageNet stage", 8, 28, 28, 256, 64, 1, 1),
                       Shape("1x1 stride 2 odd", 2, 29, 31, 48, 96, 1, 2)]
        operators = [(shape, every, None) for shape in shapes]
        # 41.9M input pixels: the stride-2 1x1 dgrad's fill grid past 65,535 blocks of 512
        operators.append((Shape("grid past 65,535 blocks", 10, 2048, 2048, 8, 8, 1, 2), ("bf16",), ("conv_dgrad",)))
        forms = UNIT_FORMS if not quick else ("preact basic s2 B", "preact bottleneck", "original basic s2 B+BN",
                                              "original bottleneck s2 B+BN", "preact basic memory=min",
                                              "preact basic s2 SAME")
        unit_dtypes = ("fp32", "bf16") if quick else ("fp32", "bf16", "fp16")
        timed = ("preact basic s2 B", "preact bottleneck") if quick else UNIT_FORMS
        return Plan(tuple(operators), (), tuple((f, unit_dtypes) for f in forms), (), not quick,
                    tuple((f, ("fp32", "bf16")) for f in timed))
    every = ("fp32", "bf16", "fp16", "fp64")
    operators = [(Shape("odd sizes, 3 channels, stride 2", 2, 5, 7, 3, 17, 3, 2), every, None),
                 (Shape("1x1", 2, 5, 5, 16, 8, 1, 1), ("fp32", "bf16") if quick else every, None)]
    if not quick:
        operators += [(Shape("SAME stride 2", 2, 8, 7, 8, 16, 3, 2, (0, 1, 0, 1)), every, None),
                      (Shape("1x1 stride 2", 3, 9, 7, 24, 40, 1, 2), every, None)]
    smallest = Shape("smallest", 2, 3, 5, 3, 5, 3, 2)
    if quick:
        return Plan(tuple(operators), ((smallest, ("fp32",), None),),
                    (("preact basic s2 B", ("fp32", "bf16")), ("original basic s2 B+BN", ("fp32",))), (),
                    False, (("preact basic s2 B", ("fp32",)),))
    return Plan(tuple(operators), ((smallest, ("fp32", "bf16"), None),), tuple((f, ("fp32", "bf16")) for f in UNIT_FORMS),
                (("preact basic s2 B", ("fp32",)),), True, (("preact basic s2 B", ("fp32", "bf16")),))


def _same_padded(unit):
    """As ``convert_to_fused`` builds it from a net that pads with F.pad before padding=0 convs."""
    for i in range(1, unit.num_convs + 1):
        getattr(unit, f"conv{i}").padding = (0, 0)
    unit.conv_padding = ((0, 1, 0, 1), (1, 1, 1, 1))
    return unit


def _unit_forms():
    from .fused import FusedOriginalBlock, FusedOriginalBottleneck, FusedPreActBlock, FusedPreActBottleneck
    # name -> (build(backend), input [N, C, H, W] on a GPU); on the CPU the batch and size are cut to
    # 2 x 9 x 9 (8 x 8 for SAME padding, whose (0, 1) on an odd size misses the shortcut's last row)
    return {
        "preact basic s2 B": (lambda b: FusedPreActBlock(32, 64, 2, backend=b), (8, 32, 16, 16)),
        "preact bottleneck": (lambda b: FusedPreActBottleneck(64, 64, backend=b), (8, 64, 16, 16)),
        "preact bottleneck s2 3x3 raw": (lambda b: FusedPreActBottleneck(32, 64, 2, "raw", "3x3", backend=b),
                                         (8, 32, 15, 15)),
        "preact basic A": (lambda b: FusedPreActBlock(16, 32, 2, "A", backend=b), (8, 16, 16, 16)),
        "original basic s2 B+BN": (lambda b: FusedOriginalBlock(32, 64, 2, backend=b), (8, 32, 16, 16)),
        "original bottleneck s2 B+BN": (lambda b: FusedOriginalBottleneck(64, 128, 2, backend=b), (8, 64, 16, 16)),
        "original basic A": (lambda b: FusedOriginalBlock(16, 32, 2, "A", backend=b), (8, 16, 16, 16)),
        "preact basic memory=min": (lambda b: FusedPreActBlock(32, 32, backend=b, memory="min"), (8, 32, 16, 16)),
        "original bottleneck memory=min": (lambda b: FusedOriginalBottleneck(64, 64, backend=b, memory="min"),
                                           (8, 64, 16, 16)),
        "preact basic s2 SAME": (lambda b: _same_padded(FusedPreActBlock(32, 64, 2, backend=b)), (8, 32, 16, 16)),
    }


UNIT_FORMS = ("preact basic s2 B", "preact bottleneck", "preact bottleneck s2 3x3 raw", "preact basic A",
              "original basic s2 B+BN", "original bottleneck s2 B+BN", "original basic A", "preact basic memory=min",
              "original bottleneck memory=min", "preact basic s2 SAME")


# -- 1. the environment ----------------------------------------------------------------------------------
def _name(dtype: torch.dtype) -> str:
    return next(k for k, v in DTYPES.items() if v == dtype)


def environment(device: torch.device) -> dict:
    from . import _extension, dispatch
    env = {"python": platform.python_version(), "torch": torch.__version__, "torch_cuda": torch.version.cuda,
           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
           "device": str(device)}
    try:
        import triton
        env["triton"] = triton.__version__
    except ImportError as error:
        env["triton"] = f"not importable ({error})"
    env["triton_interpreter"] = os.environ.get("TRITON_INTERPRET", "0") == "1"
    info = _extension.build_info() or {}
    archs, recorded = _extension.cuda_archs(info)
    env["extension"] = {
        "available": _extension.available(), "reason": _extension.unavailable_reason(),
        "built_with_cuda": _extension.built_with_cuda(), "built_against_torch": info.get("torch"),
        "cuda_archs": [str(a) for a in archs] if info.get("cuda") else [],
        "cuda_archs_recorded": recorded, "cpu_simd": _extension.cpu_simd()}
    if device.type == "cuda":
        capability = dispatch.device_capability(device)
        env["gpu"] = torch.cuda.get_device_name(device)
        env["capability"] = f"{capability[0]}.{capability[1]}"
        env["extension"]["code_for_this_gpu"] = _extension.code_for_capability(capability, archs)
        env["extension"]["capability_problem"] = _extension.capability_problem(capability, info)
    env["auto"] = {name: auto_choice(device, dtype) for name, dtype in DTYPES.items() if name != "fp64"}
    return env


def auto_choice(device: torch.device, dtype: torch.dtype) -> dict:
    """What ``backend="auto"`` runs for a unit input of ``dtype`` on ``device`` (a CIFAR stage's
    32 x 64 x 32 x 32), and why it passes over the backends before it."""
    from . import dispatch
    probe = torch.empty(32, 64, 32, 32, device=device, dtype=dtype, memory_format=torch.channels_last)
    passed_over = {}
    for name in dispatch.AUTO_ORDER:
        reason = dispatch.unavailable_reason(name, probe) or dispatch.slower_than_eager(name, probe)
        if reason is None:
            return {"backend": name, "runs": dispatch.describe_backend(name, device), "passed_over": passed_over}
        passed_over[name] = reason
    return {"backend": "eager", "runs": dispatch.describe_backend("eager", device), "passed_over": passed_over}


# -- 2. operators ------------------------------------------------------------------------------------------
def _usable_backends(device: torch.device, asked: Optional[list]) -> dict:
    """{backend: None (runs here) or why not} for the backends asked (all of ``AUTO_ORDER`` by default)."""
    from . import dispatch
    probe = torch.empty(2, 8, 4, 4, device=device)
    return {name: dispatch.unavailable_reason(name, probe) for name in (asked or dispatch.AUTO_ORDER)}


def operator_rows(backend: str, device: torch.device, cases) -> list:
    """Rows of ``operator_check`` over ``cases``: (Shape, dtype names, operators or None)."""
    from . import dispatch, operator_check
    ops = dispatch.backend_ops(backend)
    rows = []
    for shape, dtypes, operators in cases:
        for dtype_name in dtypes:
            chosen = None if operators is None else set(operators)
            for result in operator_check.run_operators(ops, shape, DTYPES[dtype_name], device, operators=chosen):
                case = f"{result.operator} ({result.variant}) {shape}" if result.variant else f"{result.operator} {shape}"
                if result.skipped is not None:
                    rows.append(Row("operator", backend, dtype_name, case, "SKIP", result.skipped))
                elif result.failure is not None:
                    rows.append(Row("operator", backend, dtype_name, case, "FAIL", result.failure))
                else:
                    output, verdict = max(result.verdicts.items(), key=lambda kv: kv[1].ratio)
                    rows.append(Row("operator", backend, dtype_name, case, "PASS" if result.passed else "FAIL",
                                    f"worst: {output} {verdict}", _finite(verdict.ratio)))
    return rows


def _finite(value: float) -> Optional[float]:
    return value if value == value and value not in (float("inf"), float("-inf")) else None


# -- 3. units ------------------------------------------------------------------------------------------------
def _unit_input(form: str, shape, device: torch.device) -> torch.Tensor:
    n, c, h, w = shape
    if device.type == "cpu":   # the CPU kernels (and the interpreter) on a smaller sample
        size = 8 if "SAME" in form else 9
        n, h, w = 2, min(h, size), min(w, size)
    return torch.empty(n, c, h, w, device=device).contiguous(memory_format=torch.channels_last)


def unit_rows(backend: str, device: torch.device, cases, eval_mode: bool) -> list:
    """Rows of ``self_check.compare_unit`` over ``cases``: (form, dtype names)."""
    from . import self_check
    rows = []
    table = _unit_forms()
    for form, dtypes in cases:
        build, shape = table[form]
        for dtype_name in dtypes:
            for training in (True, False) if eval_mode else (True,):
                unit = build(backend).to(device).train(training)
                x = _unit_input(form, shape, device)
                case = f"{form} {'train' if training else 'eval'} [{', '.join(map(str, x.shape))}]"
                label = dtype_name if dtype_name == "fp32" else f"{dtype_name} autocast"
                autocast = torch.autocast(device.type, dtype=DTYPES[dtype_name], enabled=dtype_name != "fp32")
                try:
                    with autocast:
                        check = self_check.compare_unit(unit, x, backend)
                except Exception as error:   # eager itself failed: nothing to judge
                    rows.append(Row("unit", backend, label, case, "SKIP", f"eager failed: {type(error).__name__}: {error}"))
                    continue
                if check.failure is not None:
                    rows.append(Row("unit", backend, label, case, "FAIL", check.failure))
                    continue
                row, verdict = max(check.verdicts.items(), key=lambda kv: kv[1].ratio)
                rows.append(Row("unit", backend, label, case, "PASS" if check.passed else "FAIL",
                                f"worst: {row} {verdict}", _finite(verdict.ratio)))
    return rows


# -- 4. time -----------------------------------------------------------------------------------------------
def _median_seconds(step, device: torch.device, repeats: int) -> float:
    step()   # warm-up: compiles, autotunes, caches
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def time_rows(backend: str, device: torch.device, cases) -> list:
    """The fused training step of each of ``cases`` ((form, dtype names)) against eager's."""
    from . import self_check
    rows = []
    table = _unit_forms()
    repeats = 20 if device.type == "cuda" else 3
    for form, dtypes in cases:
        build, shape = table[form]
        for dtype_name in dtypes:
            fused = build(backend).to(device)
            eager = build("eager").to(device)
            eager.load_state_dict(fused.state_dict())
            n, c, h, w = shape
            if device.type == "cuda":
                n, h, w = 64, 32, 32   # a CIFAR stage at batch 64
            else:
                h, w = min(h, 9), min(w, 9)
            x = torch.randn(n, c, h, w, device=device).contiguous(memory_format=torch.channels_last)
            x.requires_grad_(True)
            autocast = torch.autocast(device.type, dtype=DTYPES[dtype_name], enabled=dtype_name != "fp32")

            def step(unit):
                def run():
                    with autocast:
                        y = unit(x)
                    y.backward(torch.ones_like(y))
                return run
            self_check.set_enabled(False)   # time the kernels, not the first-use check
            try:
                fused_s = _median_seconds(step(fused), device, repeats)
                eager_s = _median_seconds(step(eager), device, repeats)
            finally:
                self_check.set_enabled(None)
            label = dtype_name if dtype_name == "fp32" else f"{dtype_name} autocast"
            rows.append(Row("time", backend, label, f"{form} train step [{n}, {c}, {h}, {w}]", "INFO",
                            f"fused {fused_s * 1e3:.3f} ms, eager {eager_s * 1e3:.3f} ms: {eager_s / fused_s:.2f}x "
                            f"(median of {repeats})"))
    return rows


# -- the run ---------------------------------------------------------------------------------------------------
def _log_nothing(_text: str) -> None:
    pass


def run_check(device: torch.device, quick: bool, backends: Optional[list] = None, log=_log_nothing,
              progress=None) -> Report:
    """The whole check on ``device`` (see the module docstring); ``log(text)`` hears of each section,
    ``progress(report)`` gets the report so far after each (a run cut short keeps what it found)."""
    start = time.perf_counter()
    the_plan = plan(device, quick)
    report = Report(environment(device))
    usable = _usable_backends(device, backends)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)   # the table says it all
        for backend, why_not in usable.items():
            if why_not is not None:
                report.rows.append(Row("operator", backend, "-", "every operator", "SKIP", why_not))
                continue
            interpreted = device.type == "cpu" and backend == "triton"
            operators = the_plan.interpreter_operators if interpreted else the_plan.operators
            log(f"operators on the {backend} backend ({len(operators)} shapes)")
            report.rows += operator_rows(backend, device, operators)
            _tell(progress, report, start)
            units = the_plan.interpreter_units if interpreted else the_plan.units
            if units:
                log(f"unit forms on the {backend} backend ({len(units)} forms)")
                report.rows += unit_rows(backend, device, units, the_plan.eval_mode and not interpreted)
                _tell(progress, report, start)
            if not interpreted and the_plan.timed:
                log(f"timing on the {backend} backend")
                report.rows += time_rows(backend, device, the_plan.timed)
                _tell(progress, report, start)
    report.seconds = time.perf_counter() - start
    report.complete = True
    return report


def _tell(progress, report: Report, start: float) -> None:
    if progress is not None:
        report.seconds = time.perf_counter() - start
        progress(report)


# -- output ------------------------------------------------------------------------------------------------------
def format_environment(env: dict) -> str:
    lines = [f"python {env['python']}, torch {env['torch']} (CUDA {env['torch_cuda']}, cuDNN {env['cudnn']}), "
             f"triton {env['triton']}{' (interpreter)' if env['triton_interpreter'] else ''}"]
    ext = env["extension"]
    if ext["available"]:
        archs = ", ".join(ext["cuda_archs"]) or "none (CPU part only)"
        lines.append(f"extension: built against torch {ext['built_against_torch']}, CUDA code for {archs}"
                     f"{'' if ext['cuda_archs_recorded'] or not ext['cuda_archs'] else ' (assumed: not recorded)'}, "
                     f"CPU kernels {ext['cpu_simd']}")
    else:
        lines.append(f"extension: not loaded ({ext['reason']})")
    device = env["device"]
    if "gpu" in env:
        device += f": {env['gpu']}, compute capability {env['capability']}, extension code {ext.get('code_for_this_gpu')}"
    lines.append(f"device {device}")
    for dtype, choice in env["auto"].items():
        over = "; ".join(f"{k}: {v}" for k, v in choice["passed_over"].items())
        lines.append(f"auto for {dtype}: {choice['runs']}" + (f" (passed over {over})" if over else ""))
    return "\n".join(lines)


def format_table(rows: list) -> str:
    widths = {"section": 9, "backend": 8, "dtype": 14, "status": 5}
    lines = [f"{'section':<9} {'backend':<8} {'dtype':<14} {'status':<5} case: detail"]
    for row in rows:
        lines.append(f"{row.section:<{widths['section']}} {row.backend:<{widths['backend']}} "
                     f"{row.dtype:<{widths['dtype']}} {row.status:<{widths['status']}} {row.case}: {row.detail}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fused_preact.check", description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda when a GPU is there)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and forms (under a minute on a GPU)")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON to PATH")
    parser.add_argument("--backends", default=None, help="comma-separated backends to check (default: cuda,triton)")
    args = parser.parse_args(argv)
    device_name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device_name not in ("cpu", "cuda") and not device_name.startswith("cuda:"):
        parser.error(f"--device must be cpu or cuda, got {device_name!r}")
    device = torch.device(device_name)
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device here")
    backends = None
    if args.backends:
        from . import dispatch
        backends = [b.strip() for b in args.backends.split(",") if b.strip()]
        bad = [b for b in backends if b not in dispatch.AUTO_ORDER]
        if bad:
            parser.error(f"--backends takes {', '.join(dispatch.AUTO_ORDER)}, got {', '.join(bad)}")
    if device.type == "cpu" and argv is None and os.environ.get("TRITON_INTERPRET") != "1":
        # Triton's kernels run CPU tensors in its interpreter only, which must be chosen before triton
        # is imported (importing fused_preact imported it already): start again with it
        os.environ["TRITON_INTERPRET"] = "1"
        sys.stdout.flush()
        os.execv(sys.executable, [sys.executable, "-m", "fused_preact.check", *sys.argv[1:]])
    def write(report: Report) -> None:
        if args.json:
            temporary = f"{args.json}.tmp"
            with open(temporary, "w", encoding="utf-8") as f:
                json.dump(report.as_json(), f, indent=1, default=str)
            os.replace(temporary, args.json)
    report = run_check(device, args.quick, backends, log=lambda text: print(f"... {text}", flush=True),
                       progress=write)
    print(format_environment(report.environment))
    print()
    print(format_table(report.rows))
    counts = ", ".join(f"{n} {status}" for status, n in sorted(report.counts().items()))
    print(f"\ncheck: {'PASS' if report.passed else 'FAIL'} ({counts}) in {report.seconds:.1f} s")
    if args.json:
        write(report)
        print(f"wrote {args.json}")
    return 0 if report.passed else 1


if __name__ == "__main__":
    sys.exit(main())
