"""``python -m fused_preact.experiments list | run | report | cost``.

list   [--table N]          every row of the paper's tables: experiment, what it runs, the paper's number
run    NAME... --data DIR   train (or continue) each named experiment, figure (fig1, fig3a, ...), table
                            (table1..table5) or all; finished runs are not repeated
report [--out DIR]          report.md and figures.png from the runs under --out
cost   [NAME...]            estimated training work of each experiment (FLOPs, hours at --tflops)
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..dispatch import BACKENDS
from ..train.data import DatasetError
from ..train.errors import TrainerError
from . import paper
from .registry import EXPERIMENTS, FIGURES, select

DEFAULT_OUT = "runs/paper"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m fused_preact.experiments",
                                description="The experiments of He et al. 2016 (arXiv:1603.05027) as named runs of "
                                            "python -m fused_preact.train, and a report beside the paper's numbers.")
    commands = p.add_subparsers(dest="command", required=True)
    listing = commands.add_parser("list", help="the paper's table rows and the experiments that reproduce them")
    listing.add_argument("--table", type=int, choices=sorted(paper.TABLE_TITLES), help="only this table")

    run = commands.add_parser("run", help="run experiments (resumable; finished runs are skipped)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("names", nargs="+", metavar="NAME",
                     help="experiment names, figure names (fig1, fig3a, ...), table1..table5 or all")
    run.add_argument("--data", required=True, help="the trainer's --data folder (CIFAR pickle folders or ImageNet)")
    run.add_argument("--imagenet-data", default=None,
                     help="ImageNet's folder (train/ and val/) for the Table 5 runs (default: --data)")
    run.add_argument("--seeds", type=int, default=1, help="runs per experiment, seeds 0..K-1 (the paper: 5)")
    run.add_argument("--scale", type=float, default=1.0,
                     help="multiplies every iteration count (0.001: a smoke run of 64 iterations)")
    run.add_argument("--out", default=DEFAULT_OUT, help="folder of all runs (<out>/<experiment>/seed<k>...)")
    run.add_argument("--backend", choices=BACKENDS, default="auto",
                     help="who runs the fused units (pre-activation and original); experiments without them run eager")
    run.add_argument("--device", default=None, help="cuda or cpu (default: the trainer's)")
    run.add_argument("--nproc", type=int, default=1,
                     help="processes (GPUs) per run, launched with torchrun; the global batch stays the paper's")
    run.add_argument("--subprocess", action="store_true",
                     help="run single-process runs as 'python -m fused_preact.train' instead of in this process")
    run.add_argument("--units-per-stage", type=int, default=None,
                     help="CIFAR nets with this many units per stage instead of the paper's (pipeline tests; "
                          "results are labelled so in the report)")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")

    report = commands.add_parser("report", help="write <out>/report.md and <out>/figures.png")
    report.add_argument("--out", default=DEFAULT_OUT)

    cost = commands.add_parser("cost", help="estimated training work (counted MACs x recipe), not a measurement")
    cost.add_argument("names", nargs="*", metavar="NAME", help="as for run (default: all)")
    cost.add_argument("--tflops", type=float, default=25.0,
                      help="assumed sustained TFLOP/s of one GPU on these nets (an assumption, not measured)")
    return p


def _paper_numbers(name: str) -> str:
    return "; ".join(f"T{c.table} {c.column} {c.text()}" for c in paper.cells_of(experiment=name))


def list_rows(table: Optional[int] = None) -> str:
    lines = []
    for number, title in paper.TABLE_TITLES.items():
        if table is not None and number != table:
            continue
        lines += [title, ""]
        width = max(len(c.experiment or "-") for c in paper.cells_of(number))
        for cell in paper.cells_of(number):
            what = EXPERIMENTS[cell.experiment].describe() if cell.experiment else cell.note
            lines.append(f"  {cell.experiment or '-':<{width}}  {cell.text():>6}  {cell.row} [{cell.column}]")
            lines.append(f"  {'':<{width}}          runs: {what}")
        lines.append("")
    if table is None:
        lines.append("Training-curve figures (run NAME runs their experiments):")
        for figure in FIGURES.values():
            lines.append(f"  {figure.name:<10}  {figure.title}: {', '.join(figure.experiments)}")
    return "\n".join(lines)


def cost_rows(names: Sequence[str], tflops: float) -> str:
    from .costs import IMAGE_SIZE, estimated_hours, forward_macs, training_images

    experiments = select(list(names)) if names else list(EXPERIMENTS.values())
    lines = [f"ESTIMATE (counted conv+fc MACs x 3 for training x images of the recipe, at an assumed "
             f"{tflops:g} TFLOP/s sustained on one GPU; not measured)",
             f"{'experiment':<30} {'MACs/img fwd':>13} {'train images':>13} {'GPU-hours':>10}"]
    total = 0.0
    for e in experiments:
        hours = estimated_hours(e, tflops)
        total += hours
        lines.append(f"{e.name:<30} {forward_macs(e.arch, e.dataset, IMAGE_SIZE[e.dataset]) / 1e6:>11,.0f}M "
                     f"{training_images(e):>13,} {hours:>10,.2f}")
    lines.append(f"{'total (one seed each)':<30} {'':>13} {'':>13} {total:>10,.2f}")
    return "\n".join(lines)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "list":
        print(list_rows(args.table))
        return 0
    if args.command == "report":
        from .report import write_report
        path = write_report(args.out)
        print(f"wrote {path} and {path.with_name('figures.png')}")
        return 0
    try:
        if args.command == "cost":
            print(cost_rows(args.names, args.tflops))
            return 0
        from .runner import run_experiments
        if not args.scale > 0:
            raise ValueError(f"--scale must be positive, got {args.scale}")
        states = run_experiments(args.names, data=args.data, seeds=args.seeds, scale=args.scale, out=args.out,
                                 backend=args.backend, device=args.device, nproc=args.nproc,
                                 units_per_stage=args.units_per_stage, progress=not args.no_progress,
                                 subprocess=args.subprocess, imagenet_data=args.imagenet_data)
    except (ValueError, DatasetError, TrainerError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:    # a second Ctrl-C, or one between runs: checkpoints are atomic
        print("interrupted; the same command continues from the last checkpoint", file=sys.stderr)
        return 130
    interrupted = any("interrupted" in s for s in states.values())
    return 130 if interrupted else 0
