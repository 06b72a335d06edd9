"""Figures of a run, drawn with matplotlib's Agg backend (no display needed)."""
from __future__ import annotations

import math
from pathlib import Path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def training_curves(path: Path, train_points: list[tuple[int, float]], test_points: list[tuple[int, float]],
                    title: str) -> None:
    """Training loss (dashed) and test error (bold) against iterations, as the paper's Fig. 1/4/6."""
    plt = _pyplot()
    fig, loss_axis = plt.subplots(figsize=(7, 4.5))
    if train_points:
        it, loss = zip(*train_points)
        loss_axis.plot(it, loss, "--", color="tab:blue", linewidth=1, label="training loss")
    loss_axis.set_xlabel("iterations")
    loss_axis.set_ylabel("training loss", color="tab:blue")
    error_axis = loss_axis.twinx()
    if test_points:
        it, err = zip(*test_points)
        error_axis.plot(it, [100 * e for e in err], "-", color="tab:red", linewidth=2, label="test error")
    error_axis.set_ylabel("test error (%)", color="tab:red")
    loss_axis.set_title(title)
    loss_axis.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def signal_propagation(path: Path, records: list[tuple[int, int, float, float]], title: str) -> None:
    """||x_l|| and ||dL/dx_l|| against depth l, one line per recorded iteration."""
    plt = _pyplot()
    fig, (x_axis, g_axis) = plt.subplots(1, 2, figsize=(11, 4.2))
    iterations = sorted({r[0] for r in records})
    colors = plt.cm.viridis([i / max(1, len(iterations) - 1) for i in range(len(iterations))])
    for color, iteration in zip(colors, iterations):
        rows = sorted((d, x, g) for it, d, x, g in records if it == iteration)
        depth = [r[0] + 1 for r in rows]
        x_axis.plot(depth, [r[1] for r in rows], color=color, label=f"iter {iteration}")
        g_axis.plot(depth, [r[2] if math.isfinite(r[2]) else float("nan") for r in rows], color=color)
    x_axis.set(xlabel="unit l", ylabel="||x_l|| (RMS per image)", title="forward signal", yscale="log")
    g_axis.set(xlabel="unit l", ylabel="||dL/dx_l|| (RMS per image)", title="backward signal", yscale="log")
    if len(iterations) <= 12:
        x_axis.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
