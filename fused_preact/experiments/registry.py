"""The paper's experiments as named presets of the trainer, and its training-curve figures.

An ``Experiment`` fixes what one row of the paper trains: dataset, net, unit
variant and recipe; ``paper.CELLS`` holds the numbers it is compared with (one
experiment can serve several tables: the original ResNet-110 is a row of
Tables 1 to 4). Layout choices taken from the paper and [1]:

- all Table 1 runs use the original (post-activation) unit, f = ReLU (Sec. 3.1);
- ResNet-110 (and -1202, and the 1-layer-skip net) are [1]'s CIFAR basic nets,
  whose shape-changing units use the zero-padded identity shortcut (option A);
  the bottleneck nets ResNet-164 / -1001 use 1x1 projections (appendix), with
  pre-activation when the units are pre-activation ones;
- Table 1's gating rows differ only in the initial gate bias b_g, its scaling
  rows in the two lambdas; the "fail" row of exclusive gating covers b_g = 0 to
  -5: each value is one experiment.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Optional

from . import paper
from .recipes import CIFAR, CIFAR_BATCH64, IMAGENET, Recipe

EVAL_CROPS = ("256:224", "320:320")    # Table 5: the usual 224 center crop and the paper's 320 crop
_UNIT_FLAGS = {"activation": "--activation", "shortcut": "--shortcut", "projection": "--projection",
               "scale_shortcut": "--scale-shortcut", "scale_residual": "--scale-residual",
               "gate_bias": "--gate-bias", "dropout": "--dropout"}
_VARIANT_NAMES = {"original": "original (a)", "bn_after_add": "BN after addition (b)",
                  "relu_before_add": "ReLU before addition (c)", "relu_only_preact": "ReLU-only pre-act. (d)",
                  "full_preact": "full pre-activation (e)"}


@dataclass(frozen=True)
class Experiment:
    name: str
    dataset: str                          # cifar10 | cifar100 | imagenet
    arch: str                             # a name of fused_preact.models.create_model
    recipe: Recipe
    units: dict = field(default_factory=dict)
    augment: Optional[str] = None         # ImageNet training crops (imagenet_transforms)
    eval_crops: tuple[str, ...] = ()

    @property
    def fusable(self) -> bool:
        """Whether its units are ones the fused kernels compute: full pre-activation units with an
        identity shortcut, or original (post-activation) units with an identity shortcut or a 1x1
        conv on every unit (Table 1's "1x1 conv"); two-conv or bottleneck units, not the 1-layer-skip
        net. Scaled, gated and dropout shortcuts and Table 2's (b)-(d) run eager."""
        activation = self.units.get("activation", "full_preact")
        shortcut = self.units.get("shortcut", "identity")
        fused_shortcuts = ("identity", "conv1x1") if activation == "original" else ("identity",)
        return (activation in ("full_preact", "original") and shortcut in fused_shortcuts
                and not self.arch.endswith("_1layer"))

    def cells(self) -> list[paper.PaperCell]:
        return paper.cells_of(experiment=self.name)

    def describe(self) -> str:
        """What it runs, in one line."""
        units = dict(self.units)
        parts = [_VARIANT_NAMES[units.pop("activation", "full_preact")]]
        shortcut = units.pop("shortcut", "identity")
        if shortcut == "scaling":
            parts.append(f"scaling {units.pop('scale_shortcut'):g} x shortcut + {units.pop('scale_residual'):g} x F")
        elif shortcut in ("exclusive_gating", "shortcut_gating"):
            parts.append(f"{shortcut.replace('_', ' ')} b_g={units.pop('gate_bias'):g}")
        elif shortcut == "dropout":
            parts.append(f"dropout {units.pop('dropout'):g} on the shortcut")
        elif shortcut != "identity":
            parts.append(f"{shortcut} shortcut")
        if "projection" in units:
            parts.append(f"projection {units.pop('projection')}")
        if self.augment:
            parts.append({"scale": "scale aug.", "resized_crop": "scale+aspect aug."}[self.augment])
        if self.eval_crops:
            parts.append("test " + " & ".join(self.eval_crops))
        engine = "" if self.fusable else ", eager"
        return f"{self.dataset} {self.arch}: {', '.join(parts)}; {self.recipe.describe()}{engine}"

    def arch_with(self, units_per_stage: Optional[int]) -> str:
        """The net, or the same family with ``units_per_stage`` units per stage (cheap test runs)."""
        if units_per_stage is None:
            return self.arch
        n = units_per_stage
        if isinstance(n, bool) or not isinstance(n, int) or n <= 0:
            raise ValueError(f"units_per_stage must be a positive int, got {n!r}")
        if self.dataset == "imagenet":
            raise ValueError(f"{self.name}: units_per_stage only applies to the CIFAR nets")
        if self.arch.endswith("_1layer"):
            return f"cifar_resnet{3 * n + 2}_1layer"
        if self.arch in ("cifar_resnet164", "cifar_resnet1001") or self.arch.endswith("_bottleneck"):
            return f"cifar_resnet{9 * n + 2}_bottleneck"
        return f"cifar_resnet{6 * n + 2}"

    def trainer_flags(self, units_per_stage: Optional[int] = None) -> list[str]:
        """The trainer flags of the dataset, net and units (the recipe adds its own)."""
        flags = ["--dataset", self.dataset, "--arch", self.arch_with(units_per_stage)]
        for key, value in self.units.items():
            flags += [_UNIT_FLAGS[key], str(value)]
        if self.augment:
            flags += ["--imagenet-augment", self.augment]
        if self.eval_crops:
            flags += ["--eval-crops", *self.eval_crops]
        return flags


@dataclass(frozen=True)
class Figure:
    name: str
    title: str
    experiments: tuple[str, ...]


def _cifar(name, dataset, arch, recipe=CIFAR, **units) -> Experiment:
    return Experiment(name, dataset, arch, recipe, units)


def _imagenet(name, depth, augment="scale", **units) -> Experiment:
    return Experiment(name, "imagenet", f"imagenet_resnet{depth}", IMAGENET, units, augment, EVAL_CROPS)


ACTIVATION_VARIANTS = {"original": "original", "bn-after-add": "bn_after_add", "relu-before-add": "relu_before_add",
                       "relu-only-preact": "relu_only_preact", "preact": "full_preact"}

_ALL = [
    # Table 1: shortcut variants, ResNet-110, original units
    _cifar("c10-110-original", "cifar10", "cifar_resnet110", activation="original", projection="A"),
    *(_cifar(f"c10-110-scaling-{s:g}-{r:g}", "cifar10", "cifar_resnet110", activation="original", projection="A",
             shortcut="scaling", scale_shortcut=s, scale_residual=r) for s, r in ((0, 1), (0.5, 1), (0.5, 0.5))),
    *(_cifar(f"c10-110-exclusive-gating-b{b}", "cifar10", "cifar_resnet110", activation="original", projection="A",
             shortcut="exclusive_gating", gate_bias=float(b)) for b in (0, -1, -2, -3, -4, -5, -6, -7)),
    *(_cifar(f"c10-110-shortcut-gating-b{b}", "cifar10", "cifar_resnet110", activation="original", projection="A",
             shortcut="shortcut_gating", gate_bias=float(b)) for b in (0, -6)),
    _cifar("c10-110-conv1x1", "cifar10", "cifar_resnet110", activation="original", projection="A", shortcut="conv1x1"),
    _cifar("c10-110-dropout", "cifar10", "cifar_resnet110", activation="original", projection="A", shortcut="dropout",
           dropout=0.5),
    # Table 2: activation variants on ResNet-110 (option A) and ResNet-164 (projections)
    *(_cifar(f"c10-110-{key}", "cifar10", "cifar_resnet110", activation=activation, projection="A")
      for key, activation in ACTIVATION_VARIANTS.items() if key != "original"),
    *(_cifar(f"c10-164-{key}", "cifar10", "cifar_resnet164", activation=activation)
      for key, activation in ACTIVATION_VARIANTS.items()),
    # Table 3: original vs pre-activation (110 and 164 above)
    *(_cifar(f"c10-110-1layer-{key}", "cifar10", "cifar_resnet110_1layer", activation=ACTIVATION_VARIANTS[key],
             projection="A") for key in ("original", "preact")),
    *(_cifar(f"{short}-{depth}-{key}", dataset, f"cifar_resnet{depth}", activation=ACTIVATION_VARIANTS[key])
      for short, dataset, depths in (("c10", "cifar10", (1001,)), ("c100", "cifar100", (164, 1001)))
      for depth in depths for key in ("original", "preact")),
    # Table 4 (the rows not above)
    _cifar("c10-1202-original", "cifar10", "cifar_resnet1202", activation="original", projection="A"),
    _cifar("c10-1001-preact-batch64", "cifar10", "cifar_resnet1001", CIFAR_BATCH64, activation="full_preact"),
    # Table 5 and the ResNet-101 runs of Sec. 5
    *(_imagenet(f"in-{depth}-{key}", depth, activation=ACTIVATION_VARIANTS[key])
      for depth in (152, 200) for key in ("original", "preact")),
    _imagenet("in-200-preact-scale-aspect", 200, "resized_crop", activation="full_preact"),
    _imagenet("in-101-original", 101, activation="original"),
    _imagenet("in-101-bn-after-add", 101, activation="bn_after_add"),
]
EXPERIMENTS: dict[str, Experiment] = {e.name: e for e in _ALL}

FIGURES: dict[str, Figure] = {f.name: f for f in (
    Figure("fig1", "Fig. 1: ResNet-1001, CIFAR-10, original vs pre-activation", ("c10-1001-original", "c10-1001-preact")),
    Figure("fig3a", "Fig. 3(a): constant scaling 0.5/0.5 vs original, ResNet-110",
           ("c10-110-original", "c10-110-scaling-0.5-0.5")),
    Figure("fig3b", "Fig. 3(b): exclusive gating b_g=-6 vs original, ResNet-110",
           ("c10-110-original", "c10-110-exclusive-gating-b-6")),
    Figure("fig3c", "Fig. 3(c): shortcut-only gating b_g=0 vs original, ResNet-110",
           ("c10-110-original", "c10-110-shortcut-gating-b0")),
    Figure("fig3d", "Fig. 3(d): 1x1 conv shortcut vs original, ResNet-110", ("c10-110-original", "c10-110-conv1x1")),
    Figure("fig6-left", "Fig. 6 (left): BN after addition vs original, ResNet-110",
           ("c10-110-original", "c10-110-bn-after-add")),
    Figure("fig6-right", "Fig. 6 (right): pre-activation vs original, ResNet-164", ("c10-164-original", "c10-164-preact")),
)}


def experiments_of_table(table: int) -> list[Experiment]:
    """The experiments behind a table's rows, in the paper's order."""
    if table not in paper.TABLE_TITLES:
        raise ValueError(f"table must be one of {sorted(paper.TABLE_TITLES)}, got {table!r}")
    names = dict.fromkeys(c.experiment for c in paper.cells_of(table) if c.experiment)
    return [EXPERIMENTS[n] for n in names]


def select(names: list[str]) -> list[Experiment]:
    """Experiments named by experiment names, figure names (``fig1``), ``table1``..``table5`` or ``all``."""
    chosen: dict[str, Experiment] = {}
    for name in names:
        if name == "all":
            chosen.update(EXPERIMENTS)
        elif name in EXPERIMENTS:
            chosen[name] = EXPERIMENTS[name]
        elif name in FIGURES:
            chosen.update((n, EXPERIMENTS[n]) for n in FIGURES[name].experiments)
        elif name.startswith("table") and name[5:].isdigit() and int(name[5:]) in paper.TABLE_TITLES:
            chosen.update((e.name, e) for e in experiments_of_table(int(name[5:])))
        else:
            close = difflib.get_close_matches(name, [*EXPERIMENTS, *FIGURES], n=5, cutoff=0.6)
            hint = f"; did you mean {', '.join(close)}?" if close else " (see: python -m fused_preact.experiments list)"
            raise ValueError(f"unknown experiment {name!r}: give experiment names, figure names (fig1, fig3a, ...), "
                             f"table1..table5 or all{hint}")
    return list(chosen.values())
