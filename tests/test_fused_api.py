"""The public fused-unit API: drop-in classes, backends, state_dict compatibility."""
import copy
import inspect
import warnings

import pytest
import torch

from fused_preact import dispatch
from fused_preact.fused import FusedPreActBlock, FusedPreActBottleneck
from fused_preact.units import PreActBlock, PreActBottleneck

PAIRS = [(PreActBlock, FusedPreActBlock), (PreActBottleneck, FusedPreActBottleneck)]
CONFIGS = {
    PreActBlock: [dict(in_channels=5, out_channels=5), dict(in_channels=5, out_channels=12, stride=2),
                  dict(in_channels=4, out_channels=12, stride=2, projection="A")],
    PreActBottleneck: [dict(in_channels=12, out_channels=12), dict(in_channels=8, out_channels=20, stride=2),
                       dict(in_channels=8, out_channels=20, stride=2, stride_on="3x3")],
}


def _params_and_grads(module):
    return {n: p.grad.clone() for n, p in module.named_parameters()}


@pytest.fixture(autouse=True)
def _fresh_warnings():
    dispatch._warned.clear()
    yield


@pytest.mark.parametrize("eager_cls,fused_cls", PAIRS)
def test_same_constructor_arguments(eager_cls, fused_cls):
    eager = list(inspect.signature(eager_cls.__init__).parameters.values())
    fused = list(inspect.signature(fused_cls.__init__).parameters.values())
    assert fused[:len(eager)] == eager
    assert [p.name for p in fused[len(eager):]] == ["backend", "memory"]


@pytest.mark.parametrize("eager_cls,fused_cls", PAIRS)
@pytest.mark.parametrize("index", range(3))
def test_state_dict_round_trip_and_identical_results(eager_cls, fused_cls, index):
    config = CONFIGS[eager_cls][index]
    eager = eager_cls(**config).double()
    fused = fused_cls(**config, backend="eager").double()
    assert list(eager.state_dict()) == list(fused.state_dict())
    fused.load_state_dict(eager.state_dict(), strict=True)
    x = torch.randn(3, config["in_channels"], 9, 7, dtype=torch.float64, requires_grad=True)
    x_fused = x.detach().clone().requires_grad_()
    y, y_fused = eager(x), fused(x_fused)
    torch.testing.assert_close(y_fused, y, rtol=0, atol=0)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_fused.backward(dy)
    torch.testing.assert_close(x_fused.grad, x.grad, rtol=0, atol=0)
    assert _params_and_grads(fused).keys() == _params_and_grads(eager).keys()
    for name, grad in _params_and_grads(eager).items():
        torch.testing.assert_close(_params_and_grads(fused)[name], grad, rtol=0, atol=0)
    for name, buf in eager.state_dict().items():     # running statistics updated the same way
        torch.testing.assert_close(fused.state_dict()[name], buf, rtol=0, atol=0)
    back = eager_cls(**config).double()
    back.load_state_dict(fused.state_dict(), strict=True)


def test_backend_is_validated_at_construction():
    with pytest.raises(ValueError, match="backend must be one of"):
        FusedPreActBlock(4, 4, backend="cudnn")


@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_explicit_backend_that_cannot_run_says_why(backend):
    unit = FusedPreActBlock(4, 4, backend=backend)
    if dispatch.unavailable_reason(backend, torch.randn(1, 4, 4, 4)) is None:
        pytest.skip(f"{backend} can run here")
    with pytest.raises(RuntimeError, match=f"backend='{backend}' cannot run here"):
        unit(torch.randn(1, 4, 8, 8))


def test_auto_falls_back_to_eager_with_one_warning(monkeypatch):
    # a small CPU input: no fused backend runs it faster than eager (not built, Triton's interpreter,
    # or the C++ CPU kernels below their size rule)
    monkeypatch.setattr(dispatch, "_warned", set())   # what earlier tests had said
    x = torch.randn(2, 8, 6, 6)
    unit = FusedPreActBottleneck(8, 8)
    reference = PreActBottleneck(8, 8)
    reference.load_state_dict(unit.state_dict())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert dispatch.resolve_backend("auto", x) == "eager"
        y = unit(x)
        unit(x)
        FusedPreActBlock(8, 8)(x)
    assert len([w for w in caught if "eager PyTorch path" in str(w.message)]) == 1
    torch.testing.assert_close(y, reference(x))


def _cpp_cpu_kernels_run():
    return dispatch.unavailable_reason("cuda", torch.empty(1, 4, 2, 2)) is None


def test_auto_on_cpu_takes_the_cpp_kernels_only_where_they_measured_not_slower(monkeypatch):
    if not _cpp_cpu_kernels_run():
        pytest.skip("the C++ extension is not built")
    monkeypatch.setattr(dispatch, "_warned", set())
    small = torch.empty(2, 16, 8, 8).contiguous(memory_format=torch.channels_last)
    big = torch.empty(32, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for x in (small, big, big.contiguous()):
            expected = "eager" if dispatch.slower_than_eager("cuda", x) else "cuda"
            assert dispatch.resolve_backend("auto", x) == expected
        # the size rule as a mechanism, at a limit of 2**19 elements
        monkeypatch.setattr(dispatch, "CPU_AUTO_MIN_ELEMENTS", 1 << 19)
        assert dispatch.resolve_backend("auto", big) == "cuda"
        assert dispatch.resolve_backend("auto", small) == "eager"
        assert dispatch.resolve_backend("auto", big.contiguous()) == "eager"    # NCHW
        assert dispatch.resolve_backend("auto", small) == "eager"
    said = [str(w.message) for w in caught if "eager PyTorch path" in str(w.message)]
    assert len(said) <= 2 and all("backend='cuda' runs them" in m for m in said), said   # once per rule
    assert len([m for m in said if "under 524,288 elements" in m]) == 1, said
    # an explicit backend is always honored; synchronized units (sync_batch_stats) need a fused path
    monkeypatch.setattr(dispatch, "CPU_AUTO_MIN_ELEMENTS", None)
    assert dispatch.resolve_backend("auto", big) == "eager"
    assert dispatch.resolve_backend("cuda", small) == "cuda"
    assert dispatch.resolve_backend("auto", small, synchronized=True) == "cuda"


def test_auto_never_picks_the_triton_interpreter_for_cpu_tensors():
    assert "interpreter" in dispatch.slower_than_eager("triton", torch.empty(64, 64, 64, 64))


def test_messages_say_which_kernels_run():
    assert dispatch.describe_backend("cuda", "cpu") == "cuda backend: C++ extension, CPU kernels"
    assert dispatch.describe_backend("cuda", "cuda") == "cuda backend: C++ extension, CUDA kernels"
    assert "interpreter" in dispatch.describe_backend("triton", "cpu")
    assert dispatch.describe_backend("eager", "cpu") == "eager PyTorch"
    if _cpp_cpu_kernels_run() and dispatch.CPU_AUTO_MIN_ELEMENTS is not None:
        assert dispatch.describe_auto(torch.empty(1, 16, 8, 8)).startswith(
            "cuda backend: C++ extension, CPU kernels for channels_last inputs of at least")


def test_fused_unit_checks_its_input():
    unit = FusedPreActBlock(4, 4, backend="eager")
    with pytest.raises(ValueError, match="x has 6 channels"):
        unit(torch.randn(1, 6, 5, 5))
    with pytest.raises(ValueError, match="4-D"):
        unit(torch.randn(4, 5, 5))


def test_repr_names_the_backend_and_deepcopy_keeps_it():
    unit = FusedPreActBottleneck(8, 16, 2, backend="eager")
    assert "backend=eager" in repr(unit)
    assert copy.deepcopy(unit).backend == "eager"


# inductor's compile takes about 30 s here: with --full. Fullgraph tracing of fused units runs by default
# in test_fused_backends.py (aot_eager).
@pytest.mark.full
def test_compiles_without_graph_breaks():
    from fused_preact import convert_to_fused, models
    model = convert_to_fused(models.cifar_resnet(8), backend="auto")
    x = torch.randn(2, 3, 12, 12)
    compiled = torch.compile(model, fullgraph=True)
    y = compiled(x)
    y.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        torch.testing.assert_close(y, model(x), rtol=1e-5, atol=1e-5)


def test_missing_extension_gives_a_clear_error(monkeypatch):
    from fused_preact import _extension
    monkeypatch.setattr(_extension, "_tried", True)
    monkeypatch.setattr(_extension, "_module", None)
    monkeypatch.setattr(_extension, "_reason", "the C++ extension fused_preact._C is not built (test)")
    assert not _extension.available() and not _extension.built_with_cuda()
    with pytest.raises(RuntimeError, match=r"batch_stats needs the C\+\+ extension: .* not built"):
        _extension.batch_stats(torch.randn(2, 3, 4, 4))
