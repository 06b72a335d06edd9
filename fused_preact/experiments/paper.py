"""The published numbers of He et al., "Identity Mappings in Deep Residual Networks"
(ECCV 2016, arXiv:1603.05027), Tables 1-5, row by row as printed.

Each ``PaperCell`` is one number of one table row: the row's label as in the
paper, the column it sits in, the value in percent (``FAIL`` where the paper
writes "fail": test error above 20%, Table 1), which experiment of the registry
reproduces it (``None`` for the rows of other methods, which are listed but not
run) and the metric of that experiment's results it compares with. CIFAR
numbers are medians of 5 runs (Sec. 3.1); Table 4 adds mean +- std in brackets.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

FAIL = None   # the paper's "fail"
CIFAR_ERROR = "test_error"


def top1(crop: str) -> str:
    return f"top1@{crop}"


def top5(crop: str) -> str:
    return f"top5@{crop}"


@dataclass(frozen=True)
class PaperCell:
    table: int
    row: str
    column: str
    value: Optional[float]            # percent; FAIL (None) for "fail"
    experiment: Optional[str]         # registry name; None: another method, not run here
    metric: str = CIFAR_ERROR
    note: str = ""
    reported: bool = True             # False: a number this library measures that the paper does not give

    @property
    def fail(self) -> bool:
        return self.reported and self.value is None

    def text(self) -> str:
        if not self.reported:
            return "-"
        if self.fail:
            return "fail"
        return f"{self.value:.1f}" if self.table == 5 else f"{self.value:.2f}"


TABLE_TITLES = {
    1: "Table 1. CIFAR-10 test error (%) of ResNet-110 with different shortcut connections on all units "
       "(original units, f = ReLU); \"fail\": test error above 20%",
    2: "Table 2. CIFAR-10 test error (%) with different usages of activation (Fig. 4)",
    3: "Table 3. CIFAR-10/100 test error (%), original vs pre-activation units",
    4: "Table 4. CIFAR-10/100 test error (%) against the state of the art (moderate augmentation); "
       "median of 5 runs (mean+-std)",
    5: "Table 5. ImageNet (ILSVRC 2012 val) single-crop error (%), trained on 224x224 crops",
}

_T1 = "error (%)"
CELLS: tuple[PaperCell, ...] = (
    # -- Table 1: shortcuts on ResNet-110, original units ---------------------------------------------
    PaperCell(1, "original [1]: shortcut 1, F 1", _T1, 6.61, "c10-110-original"),
    PaperCell(1, "constant scaling: shortcut 0, F 1", _T1, FAIL, "c10-110-scaling-0-1", note="a plain net"),
    PaperCell(1, "constant scaling: shortcut 0.5, F 1", _T1, FAIL, "c10-110-scaling-0.5-1"),
    PaperCell(1, "constant scaling: shortcut 0.5, F 0.5", _T1, 12.35, "c10-110-scaling-0.5-0.5",
              note="frozen gating"),
    *(PaperCell(1, f"exclusive gating: 1-g(x), g(x), init b_g={b}", _T1, FAIL, f"c10-110-exclusive-gating-b{b}",
                note="the paper's row: init b_g = 0 to -5") for b in (0, -1, -2, -3, -4, -5)),
    PaperCell(1, "exclusive gating: 1-g(x), g(x), init b_g=-6", _T1, 8.70, "c10-110-exclusive-gating-b-6"),
    PaperCell(1, "exclusive gating: 1-g(x), g(x), init b_g=-7", _T1, 9.81, "c10-110-exclusive-gating-b-7"),
    PaperCell(1, "shortcut-only gating: 1-g(x), 1, init b_g=0", _T1, 12.86, "c10-110-shortcut-gating-b0"),
    PaperCell(1, "shortcut-only gating: 1-g(x), 1, init b_g=-6", _T1, 6.91, "c10-110-shortcut-gating-b-6"),
    PaperCell(1, "1x1 conv shortcut", _T1, 12.22, "c10-110-conv1x1"),
    PaperCell(1, "dropout shortcut: dropout 0.5, 1", _T1, FAIL, "c10-110-dropout"),

    # -- Table 2: activation variants ----------------------------------------------------------------------
    *(PaperCell(2, label, f"ResNet-{depth}", value, f"c10-{depth}-{variant}")
      for label, variant, values in (
          ("original Residual Unit [1] (a)", "original", (6.61, 5.93)),
          ("BN after addition (b)", "bn-after-add", (8.17, 6.50)),
          ("ReLU before addition (c)", "relu-before-add", (7.84, 6.14)),
          ("ReLU-only pre-activation (d)", "relu-only-preact", (6.71, 5.91)),
          ("full pre-activation (e)", "preact", (6.37, 5.46)))
      for depth, value in zip((110, 164), values)),

    # -- Table 3: original vs pre-activation ---------------------------------------------------------------
    *(PaperCell(3, f"{dataset} {net}", column, value, f"{key}-{variant}")
      for dataset, net, key, values in (
          ("CIFAR-10", "ResNet-110 (1layer skip)", "c10-110-1layer", (9.90, 8.91)),
          ("CIFAR-10", "ResNet-110", "c10-110", (6.61, 6.37)),
          ("CIFAR-10", "ResNet-164", "c10-164", (5.93, 5.46)),
          ("CIFAR-10", "ResNet-1001", "c10-1001", (7.61, 4.92)),
          ("CIFAR-100", "ResNet-164", "c100-164", (25.16, 24.33)),
          ("CIFAR-100", "ResNet-1001", "c100-1001", (27.82, 22.71)))
      for column, variant, value in zip(("baseline unit", "pre-activation unit"), ("original", "preact"), values)),

    # -- Table 4: state of the art ---------------------------------------------------------------------------
    *(PaperCell(4, name, "CIFAR-10", value, None, note="another method, not run here")
      for name, value in (("NIN [15]", 8.81), ("DSN [16]", 8.22), ("FitNet [17]", 8.39), ("Highway [7]", 7.72),
                          ("All-CNN [14]", 7.25), ("ELU [12] (no augmentation)", 6.55),
                          ("FitResNet, LSUV [18]", 5.84))),
    PaperCell(4, "ResNet-110 [1] (1.7M)", "CIFAR-10", 6.61, "c10-110-original"),
    PaperCell(4, "ResNet-1202 [1] (19.4M)", "CIFAR-10", 7.93, "c10-1202-original"),
    PaperCell(4, "ResNet-164 [ours] (1.7M)", "CIFAR-10", 5.46, "c10-164-preact"),
    PaperCell(4, "ResNet-1001 [ours] (10.2M)", "CIFAR-10", 4.92, "c10-1001-preact", note="mean+-std 4.89+-0.14"),
    PaperCell(4, "ResNet-1001 [ours] (10.2M), mini-batch 64", "CIFAR-10", 4.62, "c10-1001-preact-batch64",
              note="mean+-std 4.69+-0.20; the authors' Torch code"),
    *(PaperCell(4, name, "CIFAR-100", value, None, note="another method, not run here")
      for name, value in (("NIN [15]", 35.68), ("DSN [16]", 34.57), ("FitNet [17]", 35.04), ("Highway [7]", 32.39),
                          ("All-CNN [14]", 33.71), ("ELU [12] (no augmentation)", 24.28),
                          ("FitNet, LSUV [18]", 27.66))),
    PaperCell(4, "ResNet-164 [1] (1.7M)", "CIFAR-100", 25.16, "c100-164-original"),
    PaperCell(4, "ResNet-1001 [1] (10.2M)", "CIFAR-100", 27.82, "c100-1001-original"),
    PaperCell(4, "ResNet-164 [ours] (1.7M)", "CIFAR-100", 24.33, "c100-164-preact"),
    PaperCell(4, "ResNet-1001 [ours] (10.2M)", "CIFAR-100", 22.71, "c100-1001-preact", note="mean+-std 22.68+-0.22"),

    # -- Table 5: ImageNet -------------------------------------------------------------------------------
    PaperCell(5, "ResNet-152, original unit [1], scale aug., test 224x224", "top-1", 23.0, "in-152-original",
              top1("256:224")),
    PaperCell(5, "ResNet-152, original unit [1], scale aug., test 224x224", "top-5", 6.7, "in-152-original",
              top5("256:224")),
    *(cell for name, key, values in (
        ("ResNet-152, original unit [1]", "in-152-original", (21.3, 5.5)),
        ("ResNet-152, pre-act unit", "in-152-preact", (21.1, 5.5)),
        ("ResNet-200, original unit [1]", "in-200-original", (21.8, 6.0)),
        ("ResNet-200, pre-act unit", "in-200-preact", (20.7, 5.3)))
      for cell in (PaperCell(5, f"{name}, scale aug., test 320x320", "top-1", values[0], key, top1("320:320")),
                   PaperCell(5, f"{name}, scale aug., test 320x320", "top-5", values[1], key, top5("320:320")))),
    PaperCell(5, "ResNet-200, pre-act unit, scale+aspect ratio aug., test 320x320", "top-1", 20.1,
              "in-200-preact-scale-aspect", top1("320:320"), note="fb.resnet.torch model"),
    PaperCell(5, "ResNet-200, pre-act unit, scale+aspect ratio aug., test 320x320", "top-5", 4.8,
              "in-200-preact-scale-aspect", top5("320:320"), note="fb.resnet.torch model"),
    # the usual 224x224 center crop of the same runs, which the paper's table gives for ResNet-152 only
    *(PaperCell(5, f"{name}, test 224x224 (not in the paper's table)", column, None, key, metric("256:224"),
                reported=False)
      for name, key in (("ResNet-152, pre-act unit", "in-152-preact"), ("ResNet-200, original unit [1]",
                                                                         "in-200-original"),
                        ("ResNet-200, pre-act unit", "in-200-preact"),
                        ("ResNet-200, pre-act unit, scale+aspect ratio aug.", "in-200-preact-scale-aspect"))
      for column, metric in (("top-1", top1), ("top-5", top5))),
    PaperCell(5, "Inception v3 [19], scale+aspect ratio aug., 299x299", "top-1", 21.2, None,
              note="another method, not run here"),
    PaperCell(5, "Inception v3 [19], scale+aspect ratio aug., 299x299", "top-5", 5.6, None,
              note="another method, not run here"),
    # Sec. 5 text, beside Table 5: ResNet-101 with BN after addition
    PaperCell(5, "ResNet-101, original unit [1], test 224x224 (Sec. 5 text)", "top-1", 23.6, "in-101-original",
              top1("256:224")),
    PaperCell(5, "ResNet-101, original unit [1], test 224x224 (Sec. 5 text)", "top-5", 7.1, "in-101-original",
              top5("256:224")),
    PaperCell(5, "ResNet-101, BN after addition, test 224x224 (Sec. 5 text)", "top-1", 24.6, "in-101-bn-after-add",
              top1("256:224")),
    PaperCell(5, "ResNet-101, BN after addition, test 224x224 (Sec. 5 text)", "top-5", 7.5, "in-101-bn-after-add",
              top5("256:224")),
)


def cells_of(table: Optional[int] = None, experiment: Optional[str] = None) -> list[PaperCell]:
    """The paper's numbers of one table and/or one experiment, in the paper's order."""
    return [c for c in CELLS if (table is None or c.table == table)
            and (experiment is None or c.experiment == experiment)]
