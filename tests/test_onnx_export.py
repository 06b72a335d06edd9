"""Exporting a converted model: the unit operators' decomposition into standard ops
(``fused_preact/unit_decomposition.py``) and ONNX through both exporters.

- The decomposition against the unit operator it stands for, float64 on the C++ CPU kernels: every
  output (y, new running statistics, saved tensors, per-BN statistics; partials compared as the
  statistics they merge to) over {pre-activation, original} x {basic, bottleneck} x {every shortcut
  form} x {padding: none, symmetric, asymmetric, one-sided} x {memory default, min} x {train, eval}: a
  sample that holds every shortcut form of each kind by default, all of it under ``--full``. Needs no
  ONNX package.
- ``torch.onnx.export(..., dynamo=True)`` of a converted CIFAR ResNet-8 in eval mode with a dynamic
  batch: onnxruntime's output within 1e-5 of PyTorch's (float32) on another batch size than traced.
  Under ``--full`` also the bottleneck and original-unit ResNets, with the exporter's optimizer on.
- An ``ExportedProgram`` that holds the unit operators (a pre-activation bottleneck with the option-A
  shortcut, original units with a projection with and without BN) through ``torch.onnx.export``: the route of
  torch's decomposition table.
- The TorchScript exporter (``dynamo=False``), and training mode refused with what to do.
- What the registration leaves alone: ``torch.export`` and its default ``run_decompositions()`` keep
  the operator; FakeTensorMode gets the operator's own fake from the table entry.

onnx, onnxruntime and onnxscript are optional test dependencies (requirements.txt): the ONNX tests
skip without them.
"""
from __future__ import annotations

import copy
import functools
import io
import warnings

import pytest
import torch
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from comparisons import perturb_bn, relative_error
from fused_preact import convert_to_fused, dispatch, models
from fused_preact.fused import FusedOriginalBlock, FusedPreActBottleneck
from fused_preact.reference_ops import merge_partials
from fused_preact.unit_decomposition import ONNX_TRAINING_MESSAGE
from test_unit_cross_product import PADDINGS, SHAPE, SHORTCUTS, make_unit

TOL = 1e-10          # float64, relative to the largest magnitude (as the unit cross product)
ONNX_TOL = 1e-5      # float32, onnxruntime against PyTorch
UNIT_OPERATORS = ("fused_preact_unit::preact", "fused_preact_unit::original")

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def cpp():
    if dispatch.unavailable_reason("cuda", torch.zeros(1, 1, 1, 1, dtype=torch.float64)) is not None:
        pytest.skip("the C++ extension is not built")


@pytest.fixture(scope="module")
def onnxruntime():
    """onnxruntime, after onnx and onnxscript (the dynamo exporter's) are found; skips without them.

    torch.onnx builds its registry of ONNX functions anew for every export (about 2 s here): the tests
    share one (their exports pass no custom translation table, which is what the registry would hold
    besides). Where that private hook is missing each export builds its own."""
    for package in ("onnx", "onnxscript"):
        pytest.importorskip(package, reason=f"{package} is an optional test dependency (requirements.txt)")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is an optional test dependency (requirements.txt)")
    try:
        from torch.onnx._internal.exporter._registration import ONNXRegistry
        build = ONNXRegistry.from_torchlib
    except (ImportError, AttributeError):
        yield ort
        return
    ONNXRegistry.from_torchlib = classmethod(functools.lru_cache(maxsize=None)(build.__func__))
    try:
        yield ort
    finally:
        ONNXRegistry.from_torchlib = build


# -- the decomposition against the operator --------------------------------------------------------
class UnitCalls(TorchDispatchMode):
    """Records each forward unit operator call: its arguments (copied before the caller stores the new
    running statistics into the buffers they name) and its outputs."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.name() not in UNIT_OPERATORS:
            return func(*args, **kwargs)
        arguments = pytree.tree_map_only(torch.Tensor, torch.clone, (args, kwargs))
        outputs = func(*args, **kwargs)
        self.calls.append((func, arguments, outputs))
        return outputs


def _tensors(value) -> list:
    return [value] if isinstance(value, torch.Tensor) else list(value)


def compare_outputs(op, got, expected) -> None:
    """Every output of ``op`` (schema order): tensors by relative error, partials by what they merge to."""
    names = [r.name for r in op._schema.returns]
    for name, g, e in zip(names, got, expected):
        if name in ("y_mean", "y_m2", "y_count"):
            continue
        g, e = _tensors(g), _tensors(e)
        assert len(g) == len(e), f"{name}: {len(g)} tensors, the operator {len(e)}"
        for i, (a, b) in enumerate(zip(g, e)):
            assert (a.shape, a.dtype) == (b.shape, b.dtype), f"{name}[{i}]: {a.shape} {a.dtype}, {b.shape} {b.dtype}"
            error = relative_error(a, b) if b.numel() else 0.0
            assert error <= TOL, f"{name}[{i}]: max error {error:.3g}"
    if "y_mean" in names:
        partials = [tuple(out[names.index(n)] for n in ("y_mean", "y_m2", "y_count")) for out in (got, expected)]
        assert (partials[0][0].numel() == 0) == (partials[1][0].numel() == 0), "want_stats honoured"
        if partials[1][0].numel():
            for what, a, b in zip(("mean", "M2", "count"), merge_partials(*partials[0]), merge_partials(*partials[1])):
                assert relative_error(a, b) <= TOL, f"partials of y: {what}"


def check_decomposition(module, x, train: bool) -> int:
    """Run ``module`` fused, recording its unit operator calls, and compare each with the table's
    decomposition on the same arguments; returns the number of calls compared."""
    module.train(train)
    with UnitCalls() as recorder, torch.no_grad():
        module(x)
    for op, (args, kwargs), outputs in recorder.calls:
        decomposed = torch._decomp.decomposition_table[op](*args, **kwargs)
        compare_outputs(op, decomposed, outputs)
    return len(recorder.calls)


CASES = [dict(kind=kind, form=form, shortcut=shortcut[0], padding=padding, memory=memory, train=train)
         for kind in ("preact", "original") for form in ("basic", "bottleneck") for shortcut in SHORTCUTS[kind]
         for padding in PADDINGS for memory in ("default", "min") for train in (True, False)]


def _case_id(case) -> str:
    return "-".join([case["kind"], case["form"], case["shortcut"], case["padding"], case["memory"],
                     "train" if case["train"] else "eval"])


def _default_sample() -> set[str]:
    """Each shortcut form of each kind once, cycling form, padding, memory and mode with it."""
    ids = set()
    for kind in ("preact", "original"):
        for i, (shortcut, _, _) in enumerate(SHORTCUTS[kind]):
            ids.add(_case_id(dict(kind=kind, form=("basic", "bottleneck")[i % 2], shortcut=shortcut,
                                  padding=PADDINGS[i % len(PADDINGS)], memory=("default", "min")[(i // 2) % 2],
                                  train=i % 2 == (kind == "original"))))
    return ids


@pytest.mark.usefixtures("cpp")
@pytest.mark.default_cases(ids=sorted(_default_sample()))
@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_decomposition_equals_the_unit_operator(case):
    unit = make_unit(case["kind"], case["form"], case["shortcut"], case["memory"], case["padding"], "cuda")
    x = torch.randn(SHAPE, dtype=torch.float64) * 1.5 + 0.3
    assert check_decomposition(unit, x, case["train"]) == 1


@pytest.mark.usefixtures("cpp")
@pytest.mark.parametrize("activation", ["full_preact", "original"])
def test_decomposition_equals_the_operators_of_a_converted_resnet(activation):
    """A chain of units in training mode: the operators take the previous unit's partials (x_mean...),
    which the decomposition merges as the operator does; momentum=None (a cumulative average) too."""
    torch.manual_seed(0)
    model = perturb_bn(convert_to_fused(models.cifar_resnet(8, num_classes=5, activation=activation),
                                        backend="cuda")).double()
    model.stages[1][0].bn1.momentum = None
    assert check_decomposition(model, torch.randn(4, 3, 8, 8, dtype=torch.float64), train=True) == 3


def test_the_default_sample_covers_every_shortcut_form():
    chosen = [c for c in CASES if _case_id(c) in _default_sample()]
    for kind in SHORTCUTS:
        assert {c["shortcut"] for c in chosen if c["kind"] == kind} == {s[0] for s in SHORTCUTS[kind]}, kind
        assert {c["train"] for c in chosen if c["kind"] == kind} == {True, False}, kind
    for axis in ("form", "padding", "memory"):
        assert {c[axis] for c in chosen} == {c[axis] for c in CASES}, axis


# -- ONNX ------------------------------------------------------------------------------------------------
def _run_onnx(ort, model_bytes: bytes, x: torch.Tensor):
    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


def _assert_standard_ops(model_proto) -> None:
    domains = {node.domain for node in model_proto.graph.node} | {f.domain for f in model_proto.functions}
    assert domains <= {"", "ai.onnx"}, f"non-standard ONNX domains: {domains}"


def _converted_resnet(**options):
    torch.manual_seed(0)
    model = perturb_bn(models.cifar_resnet(8 if not options.get("bottleneck") else 11, num_classes=10, **options))
    return convert_to_fused(model, backend="cuda").eval()


ONNX_MODELS = {"preact-basic": dict(), "preact-bottleneck": dict(bottleneck=True),
               "original": dict(activation="original")}


@pytest.mark.usefixtures("cpp")
@pytest.mark.default_cases(ids=["preact-basic-unoptimized"])
@pytest.mark.parametrize("optimize", [False, True], ids=["unoptimized", "optimized"])
@pytest.mark.parametrize("name", list(ONNX_MODELS))
def test_dynamo_onnx_export_of_a_converted_resnet_matches_onnxruntime(onnxruntime, name, optimize):
    model = _converted_resnet(**ONNX_MODELS[name])
    batch = torch.export.Dim("batch", min=2, max=64)
    program = torch.onnx.export(model, (torch.randn(2, 3, 8, 8),), dynamo=True, verbose=False, optimize=optimize,
                                dynamic_shapes=({0: batch},))
    _assert_standard_ops(program.model_proto)
    x = torch.randn(5, 3, 8, 8)                 # another batch size than the traced one
    with torch.no_grad():
        expected = model(x)
    got = _run_onnx(onnxruntime, program.model_proto.SerializeToString(), x)
    torch.testing.assert_close(got, expected, rtol=ONNX_TOL, atol=ONNX_TOL)


@pytest.mark.usefixtures("cpp")
def test_an_exported_program_of_unit_operators_decomposes_for_onnx(onnxruntime):
    """The decomposition-table route: torch.export keeps the operators (and its default
    run_decompositions() would too), torch.onnx.export of that program decomposes them."""
    torch.manual_seed(0)
    net = perturb_bn(torch.nn.Sequential(
        FusedPreActBottleneck(16, 16, 2, projection="A", backend="cuda"),
        FusedOriginalBlock(16, 24, 2, projection="B", backend="cuda", memory="min"),
        FusedOriginalBlock(24, 24, 1, shortcut="conv1x1", shortcut_bn=False, backend="cuda"))).eval()
    x = torch.randn(3, 16, 8, 8)
    program = torch.export.export(net, (x,))
    held = [str(n.target) for n in program.graph.nodes if "fused_preact" in str(n.target)]
    assert held == ["fused_preact_unit.preact.default"] + ["fused_preact_unit.original.default"] * 2
    default_table = torch.export.default_decompositions()   # what run_decompositions() applies
    assert not {torch.ops.fused_preact_unit.preact.default, torch.ops.fused_preact_unit.original.default} & set(
        default_table.keys())
    onnx_program = torch.onnx.export(program, dynamo=True, verbose=False, optimize=False)
    _assert_standard_ops(onnx_program.model_proto)
    with torch.no_grad():
        expected = net(x)
    got = _run_onnx(onnxruntime, onnx_program.model_proto.SerializeToString(), x)
    torch.testing.assert_close(got, expected, rtol=ONNX_TOL, atol=ONNX_TOL)


@pytest.mark.usefixtures("cpp")
@pytest.mark.default_cases(ids=["full_preact"])   # original units go through ONNX in the exported-program test
@pytest.mark.parametrize("activation", ["full_preact", "original"])
def test_torchscript_onnx_export_of_a_converted_resnet_matches_onnxruntime(onnxruntime, activation):
    model = _converted_resnet(activation=activation)
    x = torch.randn(2, 3, 8, 8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")   # the legacy exporter's deprecation and tracer warnings
        torch.onnx.export(model, (x,), buffer, dynamo=False)
    import onnx
    _assert_standard_ops(onnx.load_from_string(buffer.getvalue()))
    with torch.no_grad():
        expected = model(x)
    torch.testing.assert_close(_run_onnx(onnxruntime, buffer.getvalue(), x), expected, rtol=ONNX_TOL, atol=ONNX_TOL)


@pytest.mark.usefixtures("cpp")
@pytest.mark.default_cases(ids=["torchscript"])   # the same refusal; the dynamo exporter tries two captures
@pytest.mark.parametrize("dynamo", [True, False], ids=["dynamo", "torchscript"])
def test_onnx_export_in_training_mode_says_to_call_eval(onnxruntime, dynamo):
    unit = FusedOriginalBlock(8, 8, backend="cuda").train()
    options = dict(verbose=False) if dynamo else dict(f=io.BytesIO(), training=torch.onnx.TrainingMode.TRAINING)
    with warnings.catch_warnings(), pytest.raises(Exception) as caught:
        warnings.simplefilter("ignore")
        torch.onnx.export(unit, (torch.randn(2, 8, 6, 6),), dynamo=dynamo, **options)
    assert ONNX_TRAINING_MESSAGE in str(caught.value)


# -- what the registration leaves alone -------------------------------------------------------------------
@pytest.mark.usefixtures("cpp")
def test_fake_tensor_mode_gets_the_operators_own_fake_from_the_table():
    """FakeTensorMode asks the decomposition table first for calls with symbolic sizes; the entry
    answers with the operator's fake implementation there (the backend's partials rows, its layouts)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv
    unit = make_unit("preact", "basic", "B", "default", "none", "cuda").train()
    with UnitCalls() as recorder, torch.no_grad():
        unit(torch.randn(SHAPE, dtype=torch.float64))
    (op, (args, kwargs), real), = recorder.calls
    with FakeTensorMode(shape_env=ShapeEnv()) as mode:
        fake_args = pytree.tree_map_only(torch.Tensor, mode.from_tensor, args)
        through_table = torch._decomp.decomposition_table[op](*fake_args)
        own = op(*fake_args)
    for name, a, b, c in zip([r.name for r in op._schema.returns], through_table, own, real):
        for i, (t, u, v) in enumerate(zip(*([s] if isinstance(s, torch.Tensor) else s for s in (a, b, c)))):
            assert (t.shape, t.stride(), t.dtype) == (u.shape, u.stride(), u.dtype) == (v.shape, v.stride(), v.dtype), \
                f"{name}[{i}]"


@pytest.mark.full
@pytest.mark.usefixtures("cpp")
def test_dynamic_compile_of_a_converted_resnet_trains_as_uncompiled():
    """torch.compile with dynamic shapes consults the table (FakeTensorMode): it still runs the fused
    operators and trains exactly as uncompiled; inductor's table does not hold the operators."""
    from torch._inductor.decomposition import select_decomp_table
    assert not {torch.ops.fused_preact_unit.preact.default, torch.ops.fused_preact_unit.original.default} & set(
        select_decomp_table())
    model = _converted_resnet().train()
    compiled, reference = torch.compile(copy.deepcopy(model), dynamic=True, backend="aot_eager"), copy.deepcopy(model)
    for batch in (3, 4):
        x = torch.randn(batch, 3, 8, 8)
        x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
        compiled(x1).square().sum().backward()
        reference(x2).square().sum().backward()
        torch.testing.assert_close(x1.grad, x2.grad, rtol=0, atol=0)
