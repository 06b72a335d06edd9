"""The benchmark's outputs: console table, JSON, Markdown report and PNG chart.

Each carries the environment (device, driver, torch, triton, CUDA, git commit). A
figure is printed only where it was measured: entries that could not run show their
reason, and a missing figure prints as a dash.
"""
from __future__ import annotations

import json
import re
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

from . import environment

JSON_NAME, MARKDOWN_NAME, CHART_NAME = "results.json", "report.md", "speedup.png"
COMPILE_CONTENDERS = ("compile", "compile-max-autotune")
MIB = 2 ** 20


@dataclass
class Run:
    info: dict
    args: dict
    created_utc: str
    smoke: bool
    rates: dict
    results: list = field(default_factory=list)
    kernels: list = field(default_factory=list)
    skipped: list = field(default_factory=list)

    def unavailable(self) -> list[dict]:
        """Each contender that could not run, once per distinct reason, with the cases it concerns."""
        grouped: dict = defaultdict(list)
        for entry in self.results:
            if entry["status"] != "measured":
                grouped[(entry["contender"], entry["status"], entry["reason"])].append(entry["case"])
        return [{"contender": c, "status": s, "reason": r, "cases": sorted(set(cases))}
                for (c, s, r), cases in grouped.items()]


def add_speedups(entries: list[dict]) -> None:
    """Speed-up of each measured entry over eager and over the faster torch.compile mode
    measured for the same case, mode and dtype (ratios of measured medians)."""
    measured = {e["contender"]: e for e in entries if e["status"] == "measured"}
    eager = measured.get("eager")
    compiled = [measured[c] for c in COMPILE_CONTENDERS if c in measured]
    best_compile = min(compiled, key=lambda e: e["median_ms"]) if compiled else None
    for entry in measured.values():
        if eager is not None:
            entry["speedup_vs_eager"] = eager["median_ms"] / entry["median_ms"]
        if best_compile is not None:
            entry["speedup_vs_compile"] = best_compile["median_ms"] / entry["median_ms"]
            entry["compile_baseline"] = best_compile["contender"]


# -- formatting ------------------------------------------------------------------------
def _fmt(value, spec: str, scale: float = 1.0) -> str:
    return "—" if value is None else format(value / scale, spec)


def _row(entry: dict) -> list[str]:
    if entry["status"] != "measured":
        return [entry["contender"], entry["status"] + ": " + entry["reason"]]
    return [entry["contender"], _fmt(entry.get("median_ms"), ".3f"), _fmt(entry.get("images_per_s"), ",.0f"),
            _fmt(entry.get("speedup_vs_eager"), ".2f"), _fmt(entry.get("speedup_vs_compile"), ".2f"),
            _fmt(entry.get("peak_memory_bytes"), ".1f", MIB), _fmt(entry.get("saved_activation_bytes"), ".2f", MIB),
            _fmt(entry.get("fraction_of_floor"), ".2f"),
            _fmt(entry.get("max_abs_diff_vs_eager", entry.get("graph_replay_max_abs_diff")), ".1e")]


HEADER = ["contender", "median ms", "images/s", "x eager", "x compile", "peak MiB", "saved MiB",
          "of floor", "max abs diff"]


def _groups(run: Run):
    groups: dict = defaultdict(list)
    for entry in run.results:
        groups[(entry["case"], entry["mode"], entry["dtype"], entry["batch"])].append(entry)
    return groups


_reasons_printed: set = set()


def print_progress(entry: dict) -> None:
    """One line per contender as it finishes; a reason is printed in full the first time only."""
    what = f"{entry['case']} [{entry['mode']}, {entry['dtype']}, batch {entry['batch']}]"
    if entry["status"] == "measured":
        note = f"{entry['median_ms']:10.3f} ms median of {len(entry['samples_ms'])}"
    else:
        key = (entry["contender"], entry["reason"])
        note = entry["status"] + (": " + entry["reason"] if key not in _reasons_printed else " (as above)")
        _reasons_printed.add(key)
    print(f"  {what:<60} {entry['contender']:<21} {note}", flush=True)


def _not_run(entries: list[dict]) -> str:
    names = [e["contender"] for e in entries if e["status"] != "measured"]
    return ("not run: " + ", ".join(names) + " (reasons below)") if names else ""


def console_table(run: Run) -> str:
    widths = [22, 10, 10, 8, 9, 9, 9, 8, 12]
    lines = [environment.one_line(run.info)]
    for (case, mode, dtype, batch), entries in _groups(run).items():
        lines.append(f"\n{case}  [{mode}, {dtype}, batch {batch}]")
        lines.append("  " + " ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(HEADER, widths))))
        for entry in entries:
            if entry["status"] == "measured":
                lines.append("  " + " ".join(c.rjust(w) if i else c.ljust(w)
                                             for i, (c, w) in enumerate(zip(_row(entry), widths))))
        if _not_run(entries):
            lines.append("  " + _not_run(entries))
    unavailable = run.unavailable()
    if unavailable:
        lines.append("\ncontenders that did not run, and why:")
        for item in unavailable:
            lines.append(f"  {item['contender']:<21} {item['status']}: {item['reason']}")
    if run.kernels:
        lines.append("\nfused operators per step (summed over their calls): time, floor, fraction of the floor")
        for (case, mode, dtype, contender, operator), total in operator_totals(run.kernels).items():
            lines.append(f"  {case:<36} {mode:<6} {dtype:<9} {contender:<13} {operator:<34} "
                         f"{total['calls']:>3} calls {_fmt(total['ms'], '9.4f')} ms  floor {total['floor_ms']:9.4f} ms"
                         f"  {_fmt(total['fraction'], '.2f')}")
    for skipped in run.skipped:
        lines.append(f"\nnot run: {skipped['case']} [{skipped['mode']}, {skipped['dtype']}]: {skipped['reason']}")
    return "\n".join(lines)


def operator_totals(kernels: list[dict]) -> dict:
    """Per case, mode, dtype, contender and operator: calls per step, summed median time and floor.
    The time (and fraction) is left out when any of the operator's calls went untimed."""
    totals: dict = {}
    for k in kernels:
        key = (k["case"], k["mode"], k["dtype"], k["contender"], k["operator"])
        total = totals.setdefault(key, {"calls": 0, "ms": 0.0, "floor_ms": 0.0, "timed": True})
        total["calls"] += k["calls_per_step"]
        total["floor_ms"] += k["floor_ms"] * k["calls_per_step"]
        if "median_ms" in k:
            total["ms"] += k["median_ms"] * k["calls_per_step"]
        else:
            total["timed"] = False
    for total in totals.values():
        if not total["timed"]:
            total["ms"] = None
        total["fraction"] = total["floor_ms"] / total["ms"] if total["ms"] else None
    return totals


# -- files -------------------------------------------------------------------------------
def as_json(run: Run) -> dict:
    data = asdict(run)
    data["unavailable"] = run.unavailable()
    return {"schema": 1, **data}


def write_json(run: Run, out_dir: Path) -> Path:
    path = Path(out_dir) / JSON_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(as_json(run), indent=1))
    tmp.replace(path)
    return path


def markdown(run: Run) -> str:
    info, rates = run.info, run.rates
    lines = ["# fused-preact: fused units vs eager PyTorch and torch.compile", ""]
    if run.smoke:
        lines += ["**CPU smoke run** (no GPU): tiny shapes, eager against the fused CPU paths. "
                  "These figures say nothing about GPU speed.", ""]
    lines += ["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in info.items()]
    lines += [f"| run at (UTC) | {run.created_utc} |", f"| arguments | `{json.dumps(run.args)}` |", ""]
    lines += ["## Device rates measured in this run", "",
              f"- copy bandwidth (read + write, {rates['copy']['bytes'] / MIB:.0f} MiB device copy): "
              f"{rates['copy_bytes_per_s'] / 1e9:.1f} GB/s"]
    for dtype, value in rates["matrix_flops_per_s"].items():
        size = rates["matrix"][dtype]["size"]
        lines.append(f"- {dtype} matrix product ({size}^3): {value / 1e12:.2f} TFLOP/s")
    lines += ["", "Times are medians of the raw samples in `results.json`; `x eager` / `x compile` are "
              "speed-ups over eager and over the faster torch.compile mode; `of floor` is the conv level's "
              "floor (bytes / copy bandwidth, FLOPs / matrix rate) divided by the measured time; `max abs diff` is "
              "the output's largest difference from eager's, and for `+graph` training steps the replayed "
              "graph's from the same steps run eagerly (its weights have moved by then); `peak MiB` of a "
              "`+graph` contender is taken over its capture (a replay allocates nothing).", ""]
    lines += ["## Results", ""]
    for (case, mode, dtype, batch), entries in _groups(run).items():
        lines += [f"### {case} ({mode}, {dtype}, batch {batch})", "",
                  "| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for entry in entries:
            if entry["status"] == "measured":
                lines.append("| " + " | ".join(_row(entry)) + " |")
        if _not_run(entries):
            lines += ["", _not_run(entries) + "."]
        lines.append("")
    unavailable = run.unavailable()
    if unavailable:
        lines += ["## Contenders that did not run", ""]
        for item in unavailable:
            lines.append(f"- **{item['contender']}** ({item['status']}, {len(item['cases'])} case(s)): {item['reason']}")
        lines.append("")
    lines += ["## Fused operators against their floors", ""]
    if run.kernels:
        lines += ["| case | mode | contender | operator | dtype | calls/step | median ms | floor ms | of floor |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for k in run.kernels:
            lines.append(f"| {k['case']} | {k['mode']} | {k['contender']} | `{k['operator']}` | {k['dtype']} | "
                         f"{k['calls_per_step']} | {_fmt(k.get('median_ms'), '.4f')} | {k['floor_ms']:.4f} | "
                         f"{_fmt(k.get('fraction_of_floor'), '.2f')} |")
    else:
        lines.append("No fused operator ran in this run, so there is nothing to hold against a floor.")
    if run.skipped:
        lines += ["", "## Not run", ""] + [f"- {s['case']} ({s['mode']}, {s['dtype']}): {s['reason']}"
                                           for s in run.skipped]
    lines += ["", f"![speed-up over eager]({CHART_NAME})", "", f"_{environment.one_line(info)}_", ""]
    return "\n".join(lines)


def write_png(run: Run, out_dir: Path) -> Path:
    """Speed-up over eager per case and contender, one panel per level, mode and dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels: dict = defaultdict(lambda: defaultdict(dict))
    for entry in run.results:
        if entry["status"] == "measured" and "speedup_vs_eager" in entry:
            key = (entry["level"], entry["mode"], entry["dtype"])
            panels[key][entry["case"]][entry["contender"]] = entry["speedup_vs_eager"]
    keys = sorted(panels)
    fig, axes = plt.subplots(max(1, len(keys)), 1, figsize=(12, 3.2 * max(1, len(keys))), squeeze=False)
    for ax, key in zip(axes[:, 0], keys):
        cases = list(panels[key])
        contenders = sorted({c for per_case in panels[key].values() for c in per_case},
                            key=lambda c: (c != "eager", c))
        width = 0.8 / max(1, len(contenders))
        for i, contender in enumerate(contenders):
            xs = [j + i * width for j, case in enumerate(cases) if contender in panels[key][case]]
            ys = [panels[key][case][contender] for case in cases if contender in panels[key][case]]
            ax.bar(xs, ys, width, label=contender)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cases))])
        ax.set_xticklabels([c.split("/", 1)[1] for c in cases], rotation=20, ha="right", fontsize=7)
        ax.set_ylabel("speed-up over eager")
        ax.set_title(f"{key[0]} level, {key[1]}, {key[2]}", fontsize=9)
        ax.legend(fontsize=7, ncol=3)
    if not keys:
        axes[0, 0].text(0.5, 0.5, "nothing measured", ha="center", va="center")
        axes[0, 0].set_axis_off()
    missing = sorted({u["contender"] for u in run.unavailable()})
    footer = environment.one_line(run.info) + (f"\nnot run here (reasons in {MARKDOWN_NAME}): "
                                               + ", ".join(missing) if missing else "")
    fig.suptitle("fused-preact: speed-up over eager PyTorch" + (" (CPU smoke run)" if run.smoke else ""))
    fig.text(0.01, 0.005, footer, fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    path = Path(out_dir) / CHART_NAME
    fig.savefig(path, dpi=110, metadata={"Title": "fused-preact speed-up over eager",
                                         "Description": json.dumps(run.info), "Source": run.info["git_commit"]})
    plt.close(fig)
    return path


def write_all(run: Run, out_dir: Path) -> None:
    out_dir = Path(out_dir)
    write_json(run, out_dir)
    (out_dir / MARKDOWN_NAME).write_text(markdown(run))
    write_png(run, out_dir)
    print("\n" + console_table(run))


def load_run(out_dir: Path) -> Run:
    """The ``Run`` of a ``results.json`` (e.g. of a run stopped before it wrote its report)."""
    data = json.loads((Path(out_dir) / JSON_NAME).read_text())
    fields = {name: data[name] for name in ("info", "args", "created_utc", "smoke", "rates", "results",
                                             "kernels", "skipped")}
    return Run(**fields)


def main(argv=None) -> int:
    """``python -m bench.report DIR``: rewrite DIR's report.md and speedup.png from its results.json."""
    import argparse
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out_dir", type=Path, help="a benchmark output folder holding results.json")
    args = parser.parse_args(argv)
    if not (args.out_dir / JSON_NAME).is_file():
        parser.error(f"out_dir: no {JSON_NAME} in {args.out_dir}")
    write_all(load_run(args.out_dir), args.out_dir)
    return 0


def default_out_dir(info: dict, stamp) -> Path:
    slug = re.sub(r"[^A-Za-z0-9]+", "-", info["device"].replace("NVIDIA ", "")).strip("-").lower()[:40]
    return environment.REPO / "bench" / "results" / f"{slug}-{stamp:%Y%m%d-%H%M}"


if __name__ == "__main__":
    raise SystemExit(main())
