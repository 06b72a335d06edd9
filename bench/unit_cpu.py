"""CPU benchmark: a whole fused unit (the C++ extension's CPU kernels) against the eager unit, over sizes.

    python bench/unit_cpu.py [--repeats 15] [--threads N] [--only CASE,...] [--bf16]

Each case is one full pre-activation unit (basic or bottleneck, identity shortcut, float32) run as a
training step: forward, backward of sum(y * g) into the input and every parameter. The fused side is
``FusedPreAct*(backend="cuda")`` on CPU tensors (the C++ CPU kernels around oneDNN's convolutions),
the eager side the reference ``PreAct*`` unit with the same weights. The two alternate call by call
(the shared dev VMs drift within seconds) after two warm-up calls each; the median of ``repeats`` is
printed, with the ratio eager / fused (above 1: fused is faster). ``--bf16``: both under
``torch.autocast("cpu", torch.bfloat16)``. This is what ``"auto"``'s CPU size
rule in ``fused_preact/dispatch.py`` was read from (``notes/cpp_ops.md``). Nothing here is a test.
"""
from __future__ import annotations

import argparse
import os
import sys
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


def measure(case, repeats, bf16=False):
    bottleneck, channels, batch, side, channels_last = CASES[case]
    eager = (PreActBottleneck if bottleneck else PreActBlock)(channels, channels)
    fused = (FusedPreActBottleneck if bottleneck else FusedPreActBlock)(channels, channels, backend="cuda")
    fused.load_state_dict(eager.state_dict())
    x = torch.randn(batch, channels, side, side)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    g = torch.randn_like(x)
    sides = {"eager": lambda: step(eager, x, g, bf16), "fused": lambda: step(fused, x, g, bf16)}
    for fn in sides.values():   # the first of two warm-up calls each; median_seconds makes the second
        fn()
    seconds = median_seconds(list(sides.values()), repeats)
    return {name: spent * 1e3 for name, spent in zip(sides, seconds)}, x.numel()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--only", default=None, help="comma-separated case names")
    parser.add_argument("--bf16", action="store_true", help="both sides under bf16 autocast")
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
    print(f"{'case':<24}{'input elements':>15}{'eager ms':>10}{'fused ms':>10}{'eager/fused':>13}")
    for case in cases:
        ms, elements = measure(case, args.repeats, args.bf16)
        print(f"{case:<24}{elements:>15,}{ms['eager']:>10.2f}{ms['fused']:>10.2f}{ms['eager'] / ms['fused']:>12.2f}x",
              flush=True)
    print(f"load average {os.getloadavg()[0]:.1f} after (the machine's other jobs make the figures noisy)")


if __name__ == "__main__":
    main()
