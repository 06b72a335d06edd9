"""The time plan of ``bench/device_run.sh --budget``: each step's cap, and the seconds the steps
before it leave for the steps after it, so that one command ends inside its budget and every step
gets at least its minimum even when each earlier step runs to its cap.

    python bench/device_budget.py --budget 540 --shell     # CAP_<STEP>=... RESERVE_<STEP>=... lines

A step runs under ``min(cap, left - reserve)`` where ``left`` is the budget less the time spent,
the packing reserve and the kill grace (bench/device_steps.sh), and ``reserve`` the sum of the
minimums of the steps after it. The benchmark takes what is left. Order (issue 30): the build,
``python -m fused_preact.check --quick --json``, compute-sanitizer on a sample of the CUDA
operator tests (memcheck, racecheck), the GPU tests without ``--full``, the memory run (only
with time to spare: minimum 0) and the benchmark.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass

PACK_RESERVE = 25   # bench/device_steps.sh: seconds kept for packing the outputs
GRACE = 10          # seconds from SIGINT to SIGKILL of a step that overruns
MIN_STEP = 10       # a step with fewer seconds left is skipped


@dataclass(frozen=True)
class Step:
    name: str
    cap: int        # seconds at most (0: what is left)
    minimum: int    # seconds the steps before it leave for it


STEPS = (
    Step("environment", 15, 5),
    Step("build", 240, 120),       # sm_90 only, 16 jobs (nothing else can run before it)
    Step("check", 75, 30),         # --quick: under 60 s on a GPU
    Step("memcheck", 45, 20),
    Step("racecheck", 25, 10),
    Step("tests", 90, 40),         # the GPU-marked tests, then the fused units' tests, default sample
    Step("memory", 45, 0),         # ResNet-1001 peak memory: only with time to spare
    Step("benchmark", 0, 90),
)


def reserves(steps=STEPS) -> dict:
    """{step: seconds kept for the steps after it}."""
    return {step.name: sum(s.minimum for s in steps[i + 1:]) for i, step in enumerate(steps)}


def worst_case(budget: int, steps=STEPS) -> dict:
    """{step: seconds} when every step runs as long as it may (its cap, or up to the reserve of
    the steps after it); 0 for a step skipped for lack of time."""
    usable = budget - PACK_RESERVE - GRACE
    spent, taken = 0, {}
    for step in steps:
        left = usable - spent - reserves(steps)[step.name]
        seconds = left if step.cap == 0 else min(step.cap, left)
        seconds = seconds if seconds >= MIN_STEP else 0
        taken[step.name] = seconds
        spent += seconds
    return taken


def shell(budget: int) -> str:
    lines = [f"PACK_RESERVE={PACK_RESERVE}", f"GRACE={GRACE}", f"MIN_STEP={MIN_STEP}"]
    kept = reserves()
    for step in STEPS:
        key = step.name.upper().replace("-", "_")
        lines.append(f"PLAN_CAP_{key}={step.cap}")
        lines.append(f"PLAN_RESERVE_{key}={kept[step.name]}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=int, required=True, help="seconds for the whole command")
    parser.add_argument("--shell", action="store_true", help="print shell assignments (else the worst case)")
    args = parser.parse_args(argv)
    if args.shell:
        print(shell(args.budget))
    else:
        for name, seconds in worst_case(args.budget).items():
            print(f"{name:<12} {seconds:4d} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
