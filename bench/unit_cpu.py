"""CPU benchmark: a whole fused unit (the C++ extension's CPU kernels) against the eager unit, over sizes.

    python bench/unit_cpu.py [--repeats 15] [--threads N] [--only CASE,...] [--bf16]
    python bench/unit_cpu.py --input-grad [--repeats 15] [--only CASE,...]

Each case is one full pre-activation unit (basic or bottleneck, identity shortcut, float32) run as a
training step: forward, backward of sum(y * g) into the input and every parameter. The fused side is
``FusedPreAct*(backend="cuda")`` on CPU tensors (the C++ CPU kernels around oneDNN's convolutions),
the eager side the reference ``PreAct*`` unit with the same weights. The two alternate call by call
(the shared dev VMs drift within seconds) after two warm-up calls each; the median of ``repeats`` is
printed, with the ratio eager / fused (above 1: fused is faster). ``--bf16``: both under
``torch.autocast("cpu", torch.bfloat16)``. This is what ``"auto"``'s CPU size
rule in ``fused_preact/dispatch.py`` was read from (``notes/cpp_ops.md``).

``--input-grad``: the backward alone, timed after an untimed forward (CPU time of this process,
``time.process_time``: what the shared VM's other jobs take is not counted; run with ``--threads 1``
so no thread spins waiting), of an attack's step
(``torch.autograd.grad(loss, x)`` with every parameter frozen) against the full backward (input and
every parameter gradient), BN in training and in eval mode, per side; prints each side's ratio
input-only / full (eager's is about 0.5: its weight gradients are half of the backward's convs).
Figures in ``notes/unit_autograd.md``. Nothing here is a test.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

if __package__ in (None, ""):            # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch

from bench import environment
from bench.bn_relu_cpu import median_seconds
from fused_preact import _extension
from fused_preact.fused import FusedPreActBlock, FusedPreActBottleneck
from fused_preact.units import PreActBlock, PreActBottleneck

# name -> (bottleneck, channels, batch, side, channels_last)
CASES = {
    "basic16-b2-8": (False, 16, 2, 8, True),
    "basic16-b8-16": (False, 16, 8, 16, True),
    "basic16-b32-32": (False, 16, 32, 32, True),
    "basic16-b128-32": (False, 16, 128, 32, True),
    "basic32-b32-16": (False, 32, 32, 16, True),
    "basic32-b128-16": (False, 32, 128, 16, True),
    "basic64-b8-8": (False, 64, 8, 8, True),
    "basic64-b128-8": (False, 64, 128, 8, True),
    "basic64-b32-8": (False, 64, 32, 8, True),
    "bottle64-b2-8": (True, 64, 2, 8, True),
    "bottle64-b2-32": (True, 64, 2, 32, True),
    "bottle64-b8-16": (True, 64, 8, 16, True),
    "bottle64-b8-32": (True, 64, 8, 32, True),
    "bottle64-b32-32": (True, 64, 32, 32, True),
    "bottle256-b8-16": (True, 256, 8, 16, True),
    "bottle256-b32-16": (True, 256, 32, 16, True),
    "bottle64-b8-32-nchw": (True, 64, 8, 32, False),
    "bottle256-b32-16-nchw": (True, 256, 32, 16, False),
}


def step(unit, x, g, bf16=False):
    unit.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        y = unit(x)
    (y.float() * g).sum().backward()


def _units_and_input(case):
    """An eager unit of ``case``, its fused twin (C++ CPU kernels) with the same state, an input and an
    output gradient."""
    bottleneck, channels, batch, side, channels_last = CASES[case]
    eager = (PreActBottleneck if bottleneck else PreActBlock)(channels, channels)
    fused = (FusedPreActBottleneck if bottleneck else FusedPreActBlock)(channels, channels, backend="cuda")
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(batch, channels, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    return eager, fused, x, g


def measure(case, repeats, bf16=False):
    eager, fused, x, g = _units_and_input(case)
    sides = {"eager": lambda: step(eager, x, g, bf16), "fused": lambda: step(fused, x, g, bf16)}
    for fn in sides.values():   # the first of two warm-up calls each; median_seconds makes the second
        fn()
    seconds = median_seconds(list(sides.values()), repeats)
    return {name: spent * 1e3 for name, spent in zip(sides, seconds)}, x.numel()


def backward_seconds(unit, x, g, frozen: bool) -> float:
    """Seconds of one backward of sum(unit(x) * g) (the forward untimed): the input gradient alone with
    every parameter frozen, else the input and every parameter gradient."""
    unit.requires_grad_(not frozen)
    unit.zero_grad(set_to_none=True)
    xg = x.detach().requires_grad_()
    loss = (unit(xg) * g).sum()
    start = time.process_time()
    if frozen:
        torch.autograd.grad(loss, xg)
    else:
        loss.backward()
    spent = time.process_time() - start
    unit.requires_grad_(True)
    return spent


def measure_input_grad(case, repeats):
    """{(side, BN mode): (full backward ms, input-only backward ms)}, medians of ``repeats`` calls each;
    every call of a round runs side by side (eager full, eager input-only, fused full, fused
    input-only), so the shared VM's drift hits all four alike."""
    eager, fused, x, g = _units_and_input(case)
    results = {}
    for mode in ("train", "eval"):
        sides = {"eager": eager.train(mode == "train"), "fused": fused.train(mode == "train")}
        times = {(name, frozen): [] for name in sides for frozen in (False, True)}
        for round_ in range(repeats + 2):             # two warm-up rounds
            for (name, frozen), spent in times.items():
                seconds = backward_seconds(sides[name], x, g, frozen)
                if round_ >= 2:
                    spent.append(seconds)
        for name in sides:
            results[(name, mode)] = tuple(statistics.median(times[(name, frozen)]) * 1e3 for frozen in (False, True))
    return results


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast")
    parser.add_argument("--input-grad", action="store_true",
                        help="time an input-gradient-only backward against the full backward (see the docstring)")
    args = parser.parse_args(argv)
    if not _extension.available():
        raise SystemExit(f"needs the C++ extension: {_extension.unavailable_reason()}")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = args.only.split(",") if args.only else list(CASES)
    for case in cases:
        if case not in CASES:
            raise SystemExit(f"--only: unknown case {case!r}; cases: {', '.join(CASES)}")
    commit = environment.short_commit(environment.git_commit())
    print(f"{environment.cpu_name()}, {torch.get_num_threads()} threads, torch {torch.__version__}, "
          f"extension CPU code {_extension.cpu_simd()}, commit {commit}; median of {args.repeats}, alternating"
          + (", bf16 autocast" if args.bf16 else ", float32")
          + f"; load average {os.getloadavg()[0]:.1f} before")
    measure("bottle64-b8-16", 3)   # warm-up: the first oneDNN calls of a process are slow
    if args.input_grad:
        print(f"{'case':<24}{'side':>6}{'BN':>6}{'full bwd ms':>13}{'input-only ms':>15}{'input/full':>12}")
        for case in cases:
            for (name, mode), (full, attack) in measure_input_grad(case, args.repeats).items():
                print(f"{case:<24}{name:>6}{mode:>6}{full:>13.2f}{attack:>15.2f}{attack / full:>12.2f}", flush=True)
        print(f"load average {os.getloadavg()[0]:.1f} after (the machine's other jobs make the figures noisy)")
        return
    print(f"{'case':<24}{'input elements':>15}{'eager ms':>10}{'fused ms':>10}{'eager/fused':>13}")
    for case in cases:
        ms, elements = measure(case, args.repeats, args.bf16)
        print(f"{case:<24}{elements:>15,}{ms['eager']:>10.2f}{ms['fused']:>10.2f}{ms['eager'] / ms['fused']:>12.2f}x",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} after (the machine's other jobs make the figures noisy)")


if __name__ == "__main__":
    main()
