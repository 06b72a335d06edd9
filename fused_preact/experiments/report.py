"""``report.md`` and ``figures.png``: every table of the paper beside this library's runs.

For each number of the paper (``paper.CELLS``) the report gives this library's
result over the seeds that finished: the median, as the paper reports medians
of several runs, the range [min, max] and the run count, then the difference
(ours - paper, in points). The paper's "fail" (test error above 20%) and a run
that diverged (the trainer found a non-finite loss or tensor) are both shown as
such. Runs at ``--scale`` below 1 or with fewer units per stage are labelled:
they test the pipeline, not the paper.

``figures.png`` sets the runs' own training curves side by side as the paper's
figures 1, 3 and 6: training loss dashed (left axis), test error solid (right).
"""
from __future__ import annotations

import csv
import datetime
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from . import paper
from .registry import EXPERIMENTS, FIGURES


@dataclass
class SeedRun:
    folder: Path
    seed: int
    state: str                       # finished | diverged | started
    scale: float
    units_per_stage: Optional[int]
    metrics: dict = field(default_factory=dict)
    diverged: dict = field(default_factory=dict)
    last_iteration: int = 0

    @property
    def config(self) -> tuple[float, Optional[int]]:
        return self.scale, self.units_per_stage

    def value(self, metric: str) -> Optional[float]:
        """The metric in percent, or None when this run has no such number."""
        if self.state != "finished":
            return None
        if metric == paper.CIFAR_ERROR:
            return 100 * self.metrics["test_error"]
        which, crop = metric.split("@")
        entry = self.metrics.get("crop_errors", {}).get(crop)
        return None if entry is None else 100 * entry[which]


def _load(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _last_iteration(folder: Path) -> int:
    try:
        with open(folder / "log.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        return int(rows[-1]["iteration"]) if rows else 0
    except (OSError, KeyError, ValueError):
        return 0


def curves(run: SeedRun) -> tuple[list, list]:
    """(training loss points, test error points) of a run: the final metrics' curves, or for a run that
    diverged or has not finished, the per-epoch rows of its ``log.csv``."""
    if run.metrics:
        return run.metrics.get("train_curve", []), run.metrics.get("test_curve", [])
    train, test = [], []
    try:
        with open(run.folder / "log.csv", newline="") as f:
            for row in csv.DictReader(f):
                it = int(row["iteration"])
                if row.get("train_loss"):
                    train.append((it, float(row["train_loss"])))
                if row.get("test_error"):
                    test.append((it, float(row["test_error"])))
    except (OSError, KeyError, ValueError):
        pass
    return train, test


def collect(out: str | Path) -> dict[str, list[SeedRun]]:
    """Every run under ``out``, by experiment name."""
    found: dict[str, list[SeedRun]] = {}
    for name in EXPERIMENTS:
        for folder in sorted((Path(out) / name).glob("seed*")):
            record = _load(folder / "run.json")
            if not record:
                continue
            diverged = _load(folder / "diverged.json")
            metrics = _load(folder / "metrics.json")
            state = "diverged" if diverged else "finished" if metrics else "started"
            found.setdefault(name, []).append(SeedRun(
                folder, int(record["seed"]), state, float(record.get("scale", 1.0)), record.get("units_per_stage"),
                metrics, diverged, _last_iteration(folder)))
    return found


def representative(runs: list[SeedRun]) -> list[SeedRun]:
    """The runs of one configuration: full scale and size first, else the largest scale."""
    if not runs:
        return []
    best = max((r.config for r in runs), key=lambda c: (c[1] is None, c[0], c[1] or 0))
    return sorted((r for r in runs if r.config == best), key=lambda r: r.seed)


def config_label(runs: list[SeedRun]) -> str:
    if not runs:
        return ""
    scale, units = runs[0].config
    parts = ([f"scale {scale:g}"] if scale != 1 else []) + ([f"{units} units/stage"] if units else [])
    return f" ({', '.join(parts)})" if parts else ""


@dataclass
class CellResult:
    text: str
    difference: str


def _fmt(value: float, table: int) -> str:
    return f"{value:.1f}" if table == 5 else f"{value:.2f}"


def cell_result(cell: paper.PaperCell, runs: list[SeedRun]) -> CellResult:
    if cell.experiment is None:
        return CellResult("not run (another method)", "")
    if not runs:
        return CellResult("not run", "")
    values = [v for v in (r.value(cell.metric) for r in runs) if v is not None]
    diverged = sum(r.state == "diverged" for r in runs)
    unfinished = [r for r in runs if r.state == "started"]
    notes = []
    if diverged:
        notes.append(f"{diverged} diverged")
    if unfinished:
        notes.append(f"{len(unfinished)} unfinished")
    label = config_label(runs)
    if not values:
        if diverged:
            text = f"diverged ({diverged}/{len(runs)} runs){label}"
            return CellResult(text, "both fail" if cell.fail else "diverged")
        progress = ", ".join(f"it {r.last_iteration}" for r in unfinished)
        return CellResult(f"unfinished ({progress}){label}", "")
    median = statistics.median(values)
    if len(values) > 1:   # as Table 4's brackets
        notes.insert(0, f"mean {_fmt(statistics.mean(values), cell.table)}+-{_fmt(statistics.stdev(values), cell.table)}")
    text = f"{_fmt(median, cell.table)} [{_fmt(min(values), cell.table)}, {_fmt(max(values), cell.table)}] " \
           f"({len(values)} run{'s' if len(values) > 1 else ''}{'; ' + ', '.join(notes) if notes else ''}){label}"
    ours_fail = cell.table == 1 and median > 20
    if ours_fail:
        text = f"fail: {text}"
    if not cell.reported:
        difference = ""
    elif cell.fail:
        difference = "both fail" if ours_fail else "paper: fail"
    else:
        difference = f"{median - cell.value:+.2f}" if cell.table != 5 else f"{median - cell.value:+.1f}"
        if ours_fail:
            difference = f"fail ({difference})"
    return CellResult(text, difference)


def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def render(out: str | Path, runs: Optional[dict[str, list[SeedRun]]] = None) -> str:
    """The text of ``report.md``."""
    from ..train.records import git_commit

    runs = collect(out) if runs is None else runs
    chosen = {name: representative(r) for name, r in runs.items()}
    lines = ["# Identity Mappings in Deep Residual Networks (He et al. 2016): the paper beside this library", "",
             f"Runs in `{out}`; report written {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, "
             f"library commit {git_commit() or 'unknown'}.", "",
             "Each cell: the paper's number; this library's median [min, max] over the finished seeds (the paper "
             "gives medians of 5 runs on CIFAR); the difference ours - paper in points. \"fail\" is the paper's "
             "(test error above 20%, Table 1); \"diverged\": the trainer found a non-finite loss or tensor. Runs at a "
             "scale below 1 or with fewer units per stage are labelled so: they test the pipeline, not the paper.",
             ""]
    for table, title in paper.TABLE_TITLES.items():
        lines += [f"## {title}", "", "| row | column | paper | this library | difference | experiment |",
                  "| --- | --- | ---: | --- | ---: | --- |"]
        for cell in paper.cells_of(table):
            result = cell_result(cell, chosen.get(cell.experiment, []))
            note = f" ({cell.note})" if cell.note else ""
            lines.append(f"| {_escape(cell.row)}{_escape(note)} | {cell.column} | {cell.text()} | "
                         f"{_escape(result.text)} | {result.difference} | {cell.experiment or ''} |")
        lines.append("")
    lines += ["## Training curves", "", "![training curves](figures.png)", "",
              "Panels: " + "; ".join(f"{f.title}" for f in FIGURES.values()) + ".", "",
              "## Experiments", "", "| experiment | what it runs | runs |", "| --- | --- | --- |"]
    for name, experiment in EXPERIMENTS.items():
        these = chosen.get(name, [])
        states = ", ".join(f"seed {r.seed}: {r.state}" for r in these) or "not run"
        lines.append(f"| {name} | {_escape(experiment.describe())} | {states}{config_label(these)} |")
    return "\n".join(lines) + "\n"


def draw_figures(path: Path, runs: dict[str, list[SeedRun]]) -> None:
    """One PNG, one panel per paper figure: each experiment's first finished seed (or its first run, when
    none finished), training loss dashed, test error solid."""
    from ..train.plots import _pyplot

    plt = _pyplot()
    figures = list(FIGURES.values())
    columns = 3
    rows = -(-len(figures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(5.2 * columns, 3.6 * rows), squeeze=False)
    colors = ("tab:gray", "tab:red", "tab:blue", "tab:green")
    for axis, figure in zip(axes.flat, figures):
        error_axis = axis.twinx()
        drawn = False
        for color, name in zip(colors, figure.experiments):
            chosen = representative(runs.get(name, []))
            source = next((r for r in chosen if r.state == "finished"), chosen[0] if chosen else None)
            if source is None:
                continue
            train, test = curves(source)
            if not (train or test):
                continue
            if train:
                it, loss = zip(*train)
                axis.plot(it, loss, "--", color=color, linewidth=1)
            if test:
                it, err = zip(*test)
                state = "" if source.state == "finished" else f", {source.state}"
                error_axis.plot(it, [100 * e for e in err], "-", color=color, linewidth=2,
                                label=f"{name}{config_label([source])}{state}")
            drawn = True
        if not drawn:
            axis.text(0.5, 0.5, "not run yet", ha="center", va="center", transform=axis.transAxes)
        else:
            error_axis.legend(fontsize=7, loc="upper right")
        axis.set_title(figure.title, fontsize=9)
        axis.set_xlabel("iterations")
        axis.set_ylabel("training loss (dashed)")
        error_axis.set_ylabel("test error % (solid)")
        axis.grid(alpha=0.3)
    for axis in list(axes.flat)[len(figures):]:
        axis.axis("off")
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: str | Path = "runs/paper") -> Path:
    """Write ``<out>/report.md`` and ``<out>/figures.png``; returns the report's path."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    runs = collect(out)
    text = render(out, runs)
    draw_figures(out / "figures.png", runs)
    path = out / "report.md"
    tmp = path.with_name(".report.md.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    return path
