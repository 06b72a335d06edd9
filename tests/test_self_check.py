"""Fused units verify themselves on their device (fused_preact/self_check.py), and ``auto`` runs a
backend only where it has code (the capability rule of fused_preact/dispatch.py).

On the CPU the "device" is the extension's C++ CPU kernels (``backend="cuda"`` on CPU tensors): a
unit's first call of a configuration is compared with eager PyTorch once; a backend with one
operator made wrong (tests/wrong_ops.py) fails that check, and the unit runs eager from then on with
one warning giving the measured errors, as ``convert_to_fused`` leaves such a unit eager with them in
its report. The steady state reads nothing back to the host and checks nothing again.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from fused_preact import _extension, dispatch, self_check
from fused_preact.convert import convert_to_fused
from fused_preact.fused import FusedOriginalBottleneck, FusedPreActBlock
from fused_preact.models import cifar_resnet
from wrong_ops import make_wrong

needs_extension = pytest.mark.skipif(not _extension.available(), reason=str(_extension.unavailable_reason()))


@pytest.fixture
def checking():
    """The first-use check on (the test suite turns it off), with no verdicts remembered."""
    self_check.set_enabled(True)
    self_check.forget()
    yield
    self_check.set_enabled(None)
    self_check.forget()


def _counting(monkeypatch):
    calls = []
    real = self_check.compare_unit

    def counted(*args, **kwargs):
        calls.append(args[0])
        return real(*args, **kwargs)
    monkeypatch.setattr(self_check, "compare_unit", counted)
    return calls


@needs_extension
def test_a_correct_backend_passes_once_and_the_steady_state_costs_nothing(checking, monkeypatch):
    calls = _counting(monkeypatch)
    unit = FusedPreActBlock(8, 16, 2, backend="cuda")
    twin = FusedPreActBlock(8, 16, 2, backend="cuda")
    twin.load_state_dict(unit.state_dict())
    x = torch.randn(4, 8, 7, 7)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = unit(x)
        assert len(calls) == 1
        # the steady state: no check, no host read (CUDA-graph capturable), the same for an equal unit
        def forbidden(*args, **kwargs):
            raise AssertionError("host read in the steady state")
        with monkeypatch.context() as m:
            for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
                m.setattr(torch.Tensor, name, forbidden)
            for _ in range(2):
                out = unit(x.clone().requires_grad_(True))
                out.sum().backward()
            twin(x)
    assert len(calls) == 1
    unit.eval()
    unit(x)                       # eval is a configuration of its own
    assert len(calls) == 2
    eager = FusedPreActBlock(8, 16, 2, backend="eager")
    eager.load_state_dict(twin.state_dict())
    assert dispatch.resolve_backend("cuda", x) == "cuda" and y.shape == eager(x).shape


@needs_extension
def test_a_wrong_operator_sends_the_configuration_to_eager_with_one_warning(checking, monkeypatch):
    wrong = make_wrong(monkeypatch, "cuda", "conv_bnrelu")
    unit = FusedOriginalBottleneck(16, 32, 2, backend="cuda")
    reference = FusedOriginalBottleneck(16, 32, 2, backend="eager")
    reference.load_state_dict(unit.state_dict())
    x = torch.randn(4, 16, 8, 8)
    with pytest.warns(RuntimeWarning, match=r"failed its first-use check .*output \S+ = [0-9.]+x eager's") as seen:
        y = unit(x)
    message = str(seen[0].message)
    assert "FusedOriginalBottleneck" in message and "runs eager PyTorch from now on" in message
    assert "FUSED_PREACT_SELF_CHECK=0" in message
    torch.testing.assert_close(y, reference(x), rtol=0, atol=0)    # eager's result, bit for bit
    calls = wrong.calls
    other = FusedOriginalBottleneck(16, 32, 2, backend="cuda")
    other.load_state_dict(unit.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("error")                               # one warning per configuration
        unit(x)
        other(x)                                                     # the verdict is shared
    assert wrong.calls == calls                                      # no fused run after the verdict


@needs_extension
def test_the_check_can_be_turned_off(monkeypatch):
    make_wrong(monkeypatch, "cuda", "conv_bnrelu")
    self_check.forget()
    unit = FusedPreActBlock(8, 8, backend="cuda")
    x = torch.randn(2, 8, 6, 6)
    for switch in ("environment", "argument"):
        if switch == "environment":
            monkeypatch.setenv(self_check.ENVIRONMENT_VARIABLE, "0")
            self_check.set_enabled(None)
        else:
            monkeypatch.setenv(self_check.ENVIRONMENT_VARIABLE, "1")
            self_check.set_enabled(False)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert self_check.checked_backend(unit, x, "cuda") == "cuda"
    self_check.set_enabled(None)
    with pytest.raises(TypeError, match="flag must be True, False or None"):
        self_check.set_enabled("no")


@needs_extension
def test_no_check_while_tracing_or_under_a_dispatch_mode_or_saved_tensor_hooks(checking, monkeypatch):
    calls = _counting(monkeypatch)
    unit = FusedPreActBlock(8, 8, backend="cuda")
    with FakeTensorMode():
        fake = torch.empty(2, 8, 6, 6)
    assert self_check.checked_backend(unit, fake, "cuda") == "cuda"
    from fused_preact.cuda_graph import forbid_host_reads
    x = torch.randn(2, 8, 6, 6)
    with forbid_host_reads():
        assert self_check.checked_backend(unit, x, "cuda") == "cuda"
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):   # e.g. offloading
        assert self_check.checked_backend(unit, x, "cuda") == "cuda"
    assert calls == [] and not self_check._verdicts
    assert self_check.checked_backend(unit, x, "cuda") == "cuda" and len(calls) == 1   # the next plain call


@needs_extension
def test_convert_to_fused_checks_on_the_models_device_and_reports_the_error(checking, monkeypatch):
    """Wrong in float32 only: the float64 guard passes, the check in the model's own dtype (float32,
    the CPU kernels) does not: the units stay eager, the report gives the measured errors."""
    make_wrong(monkeypatch, "cuda", "conv_bnrelu", dtypes=(torch.float32,))
    model = cifar_resnet(8)
    with pytest.warns(RuntimeWarning, match="0 of 3 residual units fused"):
        model, report = convert_to_fused(model, backend="cuda", return_report=True)
    assert report.num_fused == 0 and report.num_units == 3
    reason = next(iter(report.left_eager.values()))
    assert "on cpu (float32, cuda backend: C++ extension, CPU kernels)" in reason
    assert "further from float64 than eager PyTorch" in reason and "x eager's" in reason
    monkeypatch.undo()
    self_check.forget()
    self_check.set_enabled(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = convert_to_fused(cifar_resnet(8), backend="cuda", return_report=True)
    assert report.num_fused == 3
    assert len(self_check._verdicts) == 3   # one per configuration (each stage differs), remembered


# -- the capability rule ------------------------------------------------------------------------------------
def _cuda_input():
    with FakeTensorMode():   # a CUDA tensor without a GPU: dispatch asks only its device and dtype
        return torch.empty(8, 16, 8, 8, device="cuda")


@pytest.mark.parametrize("capability,archs,expected,why", [
    ((7, 5), "8.0;9.0+PTX", "eager", "need compute capability 8.0 or newer"),
    ((12, 0), "8.0;9.0", "triton", "has no code for compute capability 12.0"),
    ((12, 0), "8.0;9.0+PTX", "cuda", None),            # PTX of sm_90: the driver JIT-compiles it
    ((8, 6), "8.0;9.0", "cuda", None),                 # sm_80 machine code runs on 8.6
])
def test_auto_runs_a_backend_only_where_it_has_code(capability, archs, expected, why, monkeypatch):
    if not _extension.built_with_cuda():
        pytest.skip("the extension was built without its CUDA part")
    monkeypatch.setattr(dispatch, "device_capability", lambda device: capability)
    info = {**(_extension.build_info() or {}), "cuda_archs": archs}
    monkeypatch.setattr(_extension, "build_info", lambda: info)
    monkeypatch.setattr(dispatch, "_warned", set())
    x = _cuda_input()
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        assert dispatch.resolve_backend("auto", x) == expected
    if why is None:
        assert dispatch.unavailable_reason("cuda", x) is None and not seen
        return
    assert why in dispatch.unavailable_reason("cuda", x)
    (warning,) = seen          # auto says which backend it runs, and why it passed over cuda
    runs = "eager PyTorch path" if expected == "eager" else "runs this input with the triton backend"
    assert runs in str(warning.message) and why in str(warning.message)
    with pytest.raises(RuntimeError, match="backend='cuda' cannot run here: .*" + why.split(" ")[0]):
        dispatch.resolve_backend("cuda", x)


def test_code_for_capability_follows_cuda_compatibility():
    archs = _extension.parse_cuda_archs("8.0;9.0a;9.0+PTX")
    assert [str(a) for a in archs] == ["sm_80", "sm_90a", "sm_90+PTX"]
    assert _extension.code_for_capability((8, 9), archs) == "sm_80"       # same major, higher minor
    assert _extension.code_for_capability((9, 0), archs) in ("sm_90", "sm_90a")
    assert _extension.code_for_capability((10, 0), archs) == "sm_90+PTX (JIT)"
    assert _extension.code_for_capability((7, 5), archs) is None
    assert _extension.code_for_capability((10, 0), _extension.parse_cuda_archs("8.0;9.0a")) is None
    problem = _extension.capability_problem((12, 0), {"cuda_archs": None})
    assert "assumed 8.0;9.0" in problem and "TORCH_CUDA_ARCH_LIST" in problem


def test_the_build_adds_ptx_of_its_newest_architecture():
    """setup.py's with_newest_ptx, and this tree's build record."""
    import ast
    import pathlib
    source = (pathlib.Path(__file__).resolve().parents[1] / "setup.py").read_text()
    tree = ast.parse(source)
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "with_newest_ptx")
    namespace: dict = {}
    exec(compile(ast.Module([function], []), "setup.py", "exec"), namespace)
    with_newest_ptx = namespace["with_newest_ptx"]
    assert with_newest_ptx("8.0;9.0") == "8.0;9.0+PTX"
    assert with_newest_ptx("9.0 8.0") == "9.0+PTX;8.0"
    assert with_newest_ptx("8.0+PTX;9.0") == "8.0+PTX;9.0"     # PTX asked for already
    assert with_newest_ptx("8.0;9.0a") == "8.0+PTX;9.0a"       # sm_90a PTX runs nowhere else
    assert with_newest_ptx("Ampere") == "Ampere"
    info = _extension.build_info() or {}
    if info.get("cuda"):
        assert info.get("cuda_archs") and "+PTX" in info["cuda_archs"], json.dumps(info)
