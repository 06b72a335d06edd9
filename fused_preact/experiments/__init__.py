"""The experiments of He et al. 2016 (arXiv:1603.05027) as named presets of the trainer.

``python -m fused_preact.experiments list | run | report | cost``. Files: ``paper``
(the published numbers, row by row), ``recipes`` (the paper's training recipes as
trainer flags), ``registry`` (experiments and figures), ``runner`` (resumable
runs, one per seed), ``report`` (report.md and figures.png), ``costs`` (counted
MACs and estimated training work), ``cli``.
"""
from .paper import CELLS, TABLE_TITLES, PaperCell, cells_of
from .registry import EXPERIMENTS, FIGURES, Experiment, Figure, select
from .report import write_report
from .runner import run_experiments

__all__ = ["CELLS", "EXPERIMENTS", "FIGURES", "TABLE_TITLES", "Experiment", "Figure", "PaperCell", "cells_of",
           "run_experiments", "select", "write_report"]
