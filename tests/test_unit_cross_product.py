"""Every fused unit configuration against its eager twin, float64, both backends: the cross product
{pre-activation, original} x {basic, bottleneck} x {memory default, min} x {padding: none, symmetric,
asymmetric, one-sided} x {every shortcut form} x {train, eval} x {triton, cuda}.

Compared: the output, the input gradient, every parameter gradient and every buffer (running
statistics, num_batches_tracked). The eager twin is the same module with ``backend="eager"`` (its
``conv_padding`` runs as ``F.pad`` + a conv without padding). Tolerance 1e-10 relative to the largest
magnitude of each tensor (float64 sums of a few hundred products).

Explicit padding per branch conv (``conv_padding``), chosen so the branch keeps the shortcut's shape
on a 6x8 input: "symmetric" pads every 3x3 (1, 1, 1, 1) (the default's value, passed explicitly);
"asymmetric" pads a stride-2 3x3 (0, 1, 0, 1) (TensorFlow's stride-2 "SAME") and a stride-1 3x3
(1, 1, 0, 2); "one-sided" pads (0, 2, 2, 0) and (2, 0, 0, 2); a 1x1 never pads. The default run
takes a sample that holds every value of every axis (and the combinations that were wrong before
the unit operators: memory="min" with asymmetric padding, original units with padding); ``--full``
runs all of it (576 cases, most of the time in Triton's interpreter).
"""
from __future__ import annotations

import copy

import pytest
import torch

from comparisons import perturb_bn, relative_error
from fused_preact import dispatch
from fused_preact.fused import FusedOriginalBlock, FusedOriginalBottleneck, FusedPreActBlock, FusedPreActBottleneck

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = 1e-10
SHAPE = (2, 8, 6, 8)   # after a stride of 2: 2 x 3 x 4 = 24 values per channel

pytestmark = pytest.mark.usefixtures("one_cpu_thread")

# every shortcut form of each kind: (name, constructor options, stride)
SHORTCUTS = {
    "preact": [("identity", dict(), 1), ("B", dict(projection="B"), 2), ("raw", dict(projection="raw"), 2),
               ("A", dict(projection="A"), 2)],
    "original": [("identity", dict(), 1), ("B+bn", dict(projection="B"), 2),
                 ("B", dict(projection="B", shortcut_bn=False), 2), ("A", dict(projection="A"), 2),
                 ("conv1x1", dict(shortcut="conv1x1"), 1)],
}
CLASSES = {("preact", "basic"): FusedPreActBlock, ("preact", "bottleneck"): FusedPreActBottleneck,
           ("original", "basic"): FusedOriginalBlock, ("original", "bottleneck"): FusedOriginalBottleneck}
PADDINGS = ("none", "symmetric", "asymmetric", "one-sided")
# per padding mode: (stride-1 3x3, stride-2 3x3)
PADDING_OF_3X3 = {"symmetric": ((1, 1, 1, 1), (1, 1, 1, 1)), "asymmetric": ((1, 1, 0, 2), (0, 1, 0, 1)),
                  "one-sided": ((2, 0, 0, 2), (0, 2, 2, 0))}


def make_unit(kind, form, shortcut, memory, padding, backend):
    name, options, stride = next(s for s in SHORTCUTS[kind] if s[0] == shortcut)
    cls = CLASSES[(kind, form)]
    out_channels = 8 if stride == 1 and shortcut in ("identity", "conv1x1") else 12
    if form == "bottleneck":
        options = dict(options, stride_on="3x3")   # the stride on the 3x3, where "SAME" pads asymmetrically
    unit = cls(SHAPE[1], out_channels, stride, **options, backend=backend, memory=memory)
    if padding != "none":
        convs = [getattr(unit, f"conv{i}") for i in range(1, unit.num_convs + 1)]
        unit.conv_padding = tuple((0, 0, 0, 0) if c.kernel_size[0] == 1 else PADDING_OF_3X3[padding][c.stride[0] - 1]
                                  for c in convs)
    return perturb_bn(unit).double()


CASES = [dict(kind=kind, form=form, shortcut=shortcut[0], memory=memory, padding=padding, train=train,
              backend=backend)
         for kind in ("preact", "original") for form in ("basic", "bottleneck") for shortcut in SHORTCUTS[kind]
         for memory in ("default", "min") for padding in PADDINGS for train in (True, False)
         for backend in ("cuda", "triton")]


def _case_id(case):
    return "-".join([case["kind"], case["form"], case["shortcut"], case["memory"], case["padding"],
                     "train" if case["train"] else "eval", case["backend"]])


def _default_sample():
    """Every value of every axis at least once (case k cycles each axis with its own period), on the
    C++ CPU kernels (fast) with every third case on Triton's interpreter; plus the configurations
    that were wrong before the unit operators: memory="min" with asymmetric padding and original
    units with explicit padding."""
    ids = set()
    for k in range(10):
        kind = ("preact", "original")[k % 2]
        shortcuts = SHORTCUTS[kind]
        ids.add(_case_id(dict(kind=kind, form=("basic", "bottleneck")[(k // 2) % 2],
                              shortcut=shortcuts[(k // 2) % len(shortcuts)][0],
                              memory=("default", "min")[(k // 4) % 2], padding=PADDINGS[k % 4],
                              train=(k // 3) % 2 == 0, backend="triton" if k % 3 == 1 else "cuda")))
    for kind, shortcut, memory, backend in (("original", "identity", "default", "cuda"),
                                            ("original", "B+bn", "min", "cuda"), ("preact", "B", "min", "cuda")):
        ids.add(_case_id(dict(kind=kind, form="basic", shortcut=shortcut, memory=memory, padding="asymmetric",
                              train=True, backend=backend)))
    return ids


DEFAULT_IDS = _default_sample()


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


def run_and_compare(unit, x, train: bool) -> None:
    unit.train(train)
    reference = copy.deepcopy(unit).cpu()
    reference.backend = "eager"
    results = []
    dy = None
    for module in (reference, unit.to(DEVICE)):
        xd = x.to(DEVICE).requires_grad_(True)
        y = module(xd)
        dy = torch.randn_like(y.cpu()) if dy is None else dy
        (y * dy.to(y.device)).sum().backward()
        results.append((y.detach().cpu(), xd.grad.cpu()))
    (y64, dx64), (y, dx) = results
    pairs = [("output", y, y64), ("input gradient", dx, dx64)]
    params = dict(unit.named_parameters())
    pairs += [(f"{name}.grad", params[name].grad, p.grad) for name, p in reference.named_parameters()]
    buffers = dict(unit.named_buffers())
    pairs += [(name, buffers[name], b) for name, b in reference.named_buffers()]
    for what, got, expected in pairs:
        assert got is not None, f"{what}: no gradient"
        error = relative_error(got.cpu().double(), expected.double())
        assert error <= TOL, f"{what}: max error {error:.3g} relative to max |value| (bound {TOL:g})"


@pytest.mark.default_cases(ids=sorted(DEFAULT_IDS))
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_fused_unit_equals_eager(case):
    x = torch.randn(SHAPE, dtype=torch.float64) * 1.5 + 0.3
    _need(case["backend"], x.to(DEVICE))
    unit = make_unit(case["kind"], case["form"], case["shortcut"], case["memory"], case["padding"], case["backend"])
    run_and_compare(unit, x, case["train"])


def test_the_default_sample_covers_every_value_of_every_axis():
    chosen = [c for c in CASES if _case_id(c) in DEFAULT_IDS]
    assert len(chosen) == len(DEFAULT_IDS)
    for axis in ("kind", "form", "memory", "padding", "train", "backend"):
        assert {c[axis] for c in chosen} == {c[axis] for c in CASES}, axis
    for kind in SHORTCUTS:
        assert {c["shortcut"] for c in chosen if c["kind"] == kind} == {s[0] for s in SHORTCUTS[kind]}, kind
