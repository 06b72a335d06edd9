"""A converted model with PyTorch's tools: torch.func, torch.export (a trainable program, a ``.pt2``
that loads in a fresh process after ``import fused_preact``), FlopCounterMode, and gradients with
their parameters' strides (what DistributedDataParallel's buckets expect).

float64 on the C++ CPU kernels (``backend="cuda"`` on CPU tensors), against the unconverted model.
"""
from __future__ import annotations

import copy
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.func import functional_call, grad, jacrev, vmap
from torch.utils.flop_counter import FlopCounterMode

from comparisons import perturb_bn
from fused_preact import convert_to_fused, dispatch, models
from fused_preact.unit_function import DOUBLE_BACKWARD_MESSAGE, VMAP_MESSAGE

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = dict(rtol=1e-10, atol=1e-10)

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


@pytest.fixture
def cpp():
    if dispatch.unavailable_reason("cuda", torch.zeros(1, 1, 1, 1, dtype=torch.float64)) is not None:
        pytest.skip("the C++ extension is not built")


def _pair(**options):
    """A float64 CIFAR ResNet-8 (1x1 projections at the stage changes) and its converted twin."""
    torch.manual_seed(0)
    model = perturb_bn(models.cifar_resnet(8, num_classes=5, **options)).double()
    fused = convert_to_fused(copy.deepcopy(model), backend="cuda")
    return model, fused


@pytest.mark.usefixtures("cpp")
@pytest.mark.parametrize("activation", ["full_preact", "original"])
def test_torch_func_grad_and_jacrev_equal_eager(activation):
    model, fused = _pair(activation=activation)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(module):
        return lambda p, x: functional_call(module, p, (x,)).square().sum()
    # eval (running statistics), and training with batch statistics only (torch.func's recipe for BN)
    train_model, train_fused = copy.deepcopy(model), copy.deepcopy(fused)
    for module in (train_model, train_fused):
        torch.func.replace_all_batch_norm_modules_(module.train())
    for eager, converted in ((model.eval(), fused.eval()), (train_model, train_fused)):
        expected = grad(loss(eager), argnums=(0, 1))(params, x)
        got = grad(loss(converted), argnums=(0, 1))(params, x)
        torch.testing.assert_close(got[1], expected[1], **TOL)
        for name in params:
            torch.testing.assert_close(got[0][name], expected[0][name], **TOL, msg=name)
    torch.testing.assert_close(jacrev(fused)(x[:1]), jacrev(model)(x[:1]), **TOL)
    with pytest.raises(RuntimeError, match="vmap") as caught:
        vmap(fused)(x[:, None])
    assert str(caught.value) == VMAP_MESSAGE

    def input_gradient_norm(x):
        return grad(lambda z: fused(z).square().sum())(x).square().sum()
    with pytest.raises(RuntimeError, match="double backward") as caught:   # a second derivative
        grad(input_gradient_norm)(x)
    assert DOUBLE_BACKWARD_MESSAGE in str(caught.value)


@pytest.mark.usefixtures("cpp")
def test_exported_model_trains_with_eager_gradients_and_loads_in_a_fresh_process(tmp_path):
    model, fused = _pair()
    x = torch.randn(4, 3, 8, 8, dtype=torch.float64)
    program = torch.export.export(fused.train(), (x,))
    assert {str(n.target) for n in program.graph.nodes if "fused_preact" in str(n.target)} == \
        {"fused_preact_unit.preact.default"}
    exported = program.module()
    x_exported, x_eager = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    (exported(x_exported) ** 2).sum().backward()
    (model.train()(x_eager) ** 2).sum().backward()
    torch.testing.assert_close(x_exported.grad, x_eager.grad, **TOL)
    eager_params = dict(model.named_parameters())
    for name, p in exported.named_parameters():
        assert p.grad is not None, name
        torch.testing.assert_close(p.grad, eager_params[name].grad, **TOL, msg=name)
    eager_buffers = dict(model.named_buffers())
    for name, b in exported.named_buffers():   # one step of running statistics
        torch.testing.assert_close(b, eager_buffers[name], **TOL, msg=name)

    path = tmp_path / "fused.pt2"
    torch.export.save(program, str(path))
    expected = program.module()(x)
    torch.save((x, expected), tmp_path / "io.pt")
    script = textwrap.dedent(f"""
        import torch
        import fused_preact   # registers every operator the program holds, nothing else is called
        program = torch.export.load({str(path)!r})
        x, expected = torch.load({str(tmp_path / 'io.pt')!r})
        module = program.module()
        xg = x.clone().requires_grad_(True)
        y = module(xg)
        torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
        y.square().sum().backward()
        assert xg.grad is not None and all(p.grad is not None for p in module.parameters())
        print("loaded and trained")
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", script], cwd=str(tmp_path), env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0 and "loaded and trained" in result.stdout, result.stderr[-3000:]


def _flops(module, x):
    with FlopCounterMode(display=False) as counter:
        y = module(x)
        y.square().sum().backward()
    return counter.get_total_flops()


@pytest.mark.usefixtures("cpp")
@pytest.mark.parametrize("activation,memory", [("full_preact", "default"), ("original", "default"),
                                               ("full_preact", "min")])
def test_flop_counter_counts_the_convolutions_as_eager(activation, memory):
    model, fused = _pair(activation=activation)
    if memory == "min":
        fused = convert_to_fused(copy.deepcopy(model), backend="cuda", memory="min")
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64, requires_grad=True)
    eager_flops, fused_flops = _flops(model, x), _flops(fused, x)
    assert eager_flops > 0
    if memory == "default":
        assert abs(fused_flops - eager_flops) <= 0.01 * eager_flops, (fused_flops, eager_flops)
    else:   # the recompute is counted where it runs: more than eager, less than one more forward
        with FlopCounterMode(display=False) as forward:
            model(x)
        assert eager_flops < fused_flops < eager_flops + forward.get_total_flops()
    # an input-gradient-only backward counts no weight gradient (frozen parameters)
    for module in (model, fused):
        module.requires_grad_(False)
    eager_input_only, fused_input_only = _flops(model, x), _flops(fused, x)
    assert eager_input_only < eager_flops
    if memory == "default":
        assert abs(fused_input_only - eager_input_only) <= 0.01 * eager_input_only, (fused_input_only,
                                                                                      eager_input_only)


@pytest.mark.usefixtures("cpp")
@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("activation", ["full_preact", "original"])
def test_weight_gradients_have_their_parameters_strides(channels_last, activation):
    _, fused = _pair(activation=activation)
    if channels_last:
        fused = fused.to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    fused(x).square().sum().backward()
    for name, p in fused.named_parameters():
        assert p.grad.stride() == p.stride(), (name, p.grad.stride(), p.stride())
