"""Hooks on and inside fused units fire as they would on the eager model, and what a hook changes
is honoured: a hook inside a unit runs that unit eager (one warning) while it is there; hooks on
a unit see tensors; a pre-hook that changes a unit's input gets statistics of the changed input
(the previous unit's are handed over only for its output unchanged, ``stats_handoff``).

Float64 against the unconverted model on the C++ CPU kernels (``backend="cuda"`` on CPU tensors).
"""
import copy
import warnings

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_globals

import foreign_models as fm
from comparisons import assert_same_step, perturb_bn, relative_error
from fused_preact import convert_to_fused, dispatch, fused, models

torchvision = pytest.importorskip("torchvision")


@pytest.fixture
def kernel_calls(monkeypatch):
    """Every call of the fused kernels: whether it was handed statistics of its input (the tests
    clear it after converting: the conversion's float64 checks run kernels too)."""
    if dispatch.unavailable_reason("cuda", torch.zeros(1, dtype=torch.float64)) is not None:
        pytest.skip("the C++ extension is not built")
    calls = []
    real = dispatch.run_unit

    def counting(name, unit, x, stats_in, want_stats):
        calls.append(stats_in is not None)
        return real(name, unit, x, stats_in, want_stats)
    monkeypatch.setattr(dispatch, "run_unit", counting)
    return calls


def _resnet():
    """A ResNet of this project's units, float64, BN perturbed: a unit, then a stage of two (the
    second handed the first one's output statistics)."""
    return perturb_bn(models.ResNet((1, 2), (8, 16), bottleneck=False, num_classes=5, stem_channels=8).double())


def test_a_hook_inside_a_unit_fires_as_in_eager_and_removing_it_brings_the_fused_path_back(kernel_calls):
    block = torchvision.models.resnet.BasicBlock
    model = perturb_bn(nn.Sequential(block(8, 8), block(8, 8)).double())
    reference = copy.deepcopy(model)
    convert_to_fused(model, backend="cuda")
    kernel_calls.clear()
    x = torch.randn(4, 8, 6, 6, dtype=torch.float64)
    seen = {"eager": [], "fused": []}
    reference[1].conv2.register_forward_hook(lambda m, args, out: seen["eager"].append(out.detach()))
    handle = model[1].conv2.register_forward_hook(lambda m, args, out: seen["fused"].append(out.detach()))
    with pytest.warns(RuntimeWarning, match=r"BasicBlock \(fused\) runs its eager PyTorch computation, not the "
                                            r"fused kernels: conv2 \(Conv2d\) has a forward hook"):
        assert_same_step(reference, model, x)
    assert kernel_calls == [False] and len(seen["fused"]) == 1       # unit 0 fused, unit 1 eager
    assert relative_error(seen["fused"][0], seen["eager"][0]) <= 1e-10   # unit 0 ran fused: its rounding
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                # one warning, not one per call
        model(x), reference(x)
        handle.remove()
        assert_same_step(reference, model, x)
    assert kernel_calls == [False] * 4 and len(seen["fused"]) == 2   # then both units fused


def test_backward_hooks_inside_and_hooks_registered_before_conversion(kernel_calls):
    """A full backward hook on an inner BN (registered before conversion) fires with eager's
    gradients; the unit runs eager for it."""
    unit = perturb_bn(fm.KLPreActBlock(6, 6).double())
    reference = copy.deepcopy(unit)
    grads = {"eager": [], "fused": []}
    reference.bn2.register_full_backward_hook(lambda m, gin, gout: grads["eager"].append(gout[0]))
    unit.bn2.register_full_backward_hook(lambda m, gin, gout: grads["fused"].append(gout[0]))
    fused_unit = convert_to_fused(unit, backend="cuda")
    kernel_calls.clear()
    with pytest.warns(RuntimeWarning, match="bn2 .BatchNorm2d. has a backward hook"):
        assert_same_step(reference, fused_unit, torch.randn(4, 6, 5, 5, dtype=torch.float64))
    assert not kernel_calls and len(grads["fused"]) == 1
    assert relative_error(grads["fused"][0], grads["eager"][0]) <= 1e-10


def test_hooks_on_units_see_tensors_and_their_replacements_count(kernel_calls):
    """A forward hook on a unit of a library ResNet gets the unit's output tensor (not a tuple with
    statistics) and may replace it: the next unit then computes the statistics of the new tensor."""
    model = _resnet()
    reference = copy.deepcopy(model)
    convert_to_fused(model, backend="cuda")
    kernel_calls.clear()
    outputs = []
    for net in (reference, model):
        net.stages[1][0].register_forward_hook(lambda m, args, out: out * 2)
        net.stages[1][1].register_forward_hook(lambda m, args, out: outputs.append(out.detach().clone()))
    assert_same_step(reference, model, torch.randn(8, 3, 8, 8, dtype=torch.float64))
    assert all(isinstance(o, torch.Tensor) for o in outputs) and len(outputs) == 2
    assert relative_error(outputs[1], outputs[0]) <= 1e-10
    # the unit after the doubled output was handed nothing; the one before was
    assert kernel_calls == [False, True, False]


@pytest.mark.parametrize("change", ["returned", "in place"])
def test_a_pre_hook_that_changes_a_units_input_trains_as_eager(change, kernel_calls):
    """A forward pre-hook doubling a unit's input, returned as a new tensor or in place (the version
    counter tells), in a library ResNet in training: outputs, gradients and running statistics as
    eager's, float64; that unit computes the statistics of its doubled input."""
    model = _resnet()
    reference = copy.deepcopy(model)
    convert_to_fused(model, backend="cuda")
    kernel_calls.clear()

    def double(module, args):
        if change == "returned":
            return (args[0] * 2,)
        args[0].mul_(2)
    for net in (reference, model):
        net.stages[1][1].register_forward_pre_hook(double)
    assert_same_step(reference, model, torch.randn(8, 3, 8, 8, dtype=torch.float64))
    assert kernel_calls == [False, True, False]


def test_global_module_hooks_see_the_fused_unit_and_warn_once(kernel_calls, monkeypatch):
    """Global hooks (what FlopCounterMode's module tracker installs) leave the units fused: they see
    each fused unit; one warning per process says they do not see the modules inside."""
    monkeypatch.setattr(fused, "_warned_global_hooks", False)
    model = convert_to_fused(_resnet(), backend="cuda")
    kernel_calls.clear()
    called = []
    handle = module_globals.register_module_forward_hook(lambda m, args, out: called.append(type(m).__name__))
    try:
        with pytest.warns(RuntimeWarning, match="global module forward hook registered: fused units run"):
            model(torch.randn(4, 3, 8, 8, dtype=torch.float64))
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            model(torch.randn(4, 3, 8, 8, dtype=torch.float64))
    finally:
        handle.remove()
    assert len(kernel_calls) == 6 and called.count("FusedPreActBlock") == 6 and "Conv2d" in called
