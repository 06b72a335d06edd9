"""The torch.library registration of the Triton operators (``torch.ops.fused_preact_triton``):
schemas as in the contract, ``opcheck`` (schema, fake tensors, dynamic shapes, mutation), a
``torch.compile(fullgraph=True)`` trace, results equal to the launchers', lazy kernel imports.

Without a GPU the operators run on small CPU tensors in Triton's interpreter.
"""
import os
import subprocess
import sys

import pytest
import torch

import fused_preact.kernels.ops  # noqa: F401  (registers the operators)
from fused_preact import reference_ops
from fused_preact.unit_ops import OPERATORS, SCHEMAS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ops = torch.ops.fused_preact_triton


def _bn_parameters(channels):
    weight = torch.rand(channels, device=DEVICE) + 0.5
    bias = torch.randn(channels, device=DEVICE)
    running_mean = torch.randn(channels, device=DEVICE)
    running_var = torch.rand(channels, device=DEVICE) + 0.5
    return weight, bias, running_mean, running_var


@pytest.mark.parametrize("name", OPERATORS)
def test_schema_is_the_contract(name):
    assert str(getattr(ops, name).default._schema) == f"fused_preact_triton::{name}{SCHEMAS[name]}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_opcheck_channel_stats(dtype):
    x = (1 + torch.randn(2, 5, 7, 17, device=DEVICE)).to(dtype)
    torch.library.opcheck(ops.channel_stats.default, (x,))


@pytest.mark.parametrize("momentum", [0.1, -1.0, "no running stats"])
def test_opcheck_bn_finalize(momentum):
    partials = ops.channel_stats(torch.randn(3, 5, 7, 17, device=DEVICE))
    weight, bias, running_mean, running_var = _bn_parameters(17)
    if momentum == "no running stats":
        args = (*partials, weight, bias, None, None, None, 0.1, 1e-5)
    else:
        args = (*partials, weight, bias, running_mean, running_var, torch.tensor(3, device=DEVICE), momentum, 1e-5)
    torch.library.opcheck(ops.bn_finalize.default, args)


@pytest.mark.parametrize("batch_stats, with_add", [(True, True), (False, False)])
def test_opcheck_bn_backward_finish(batch_stats, with_add):
    g, h = torch.randn(2, 5, 7, 17, device=DEVICE), torch.randn(2, 5, 7, 17, device=DEVICE)
    stats = [torch.randn(17, device=DEVICE) for _ in range(5)]
    stats[1] = stats[1].abs() + 0.5   # invstd
    add = torch.randn_like(g) if with_add else None
    torch.library.opcheck(ops.bn_backward_finish.default, (g, h, *stats, 70.0, add, batch_stats))


@pytest.mark.parametrize("kernel_size, stride, residual, stats", [(3, 1, True, True), (1, 2, False, False)])
def test_opcheck_conv_bnrelu(kernel_size, stride, residual, stats):
    x = torch.randn(2, 7, 9, 5, device=DEVICE)
    weight = torch.randn(6, 5, kernel_size, kernel_size, device=DEVICE)
    scale, shift = torch.rand(5, device=DEVICE) + 0.5, torch.randn(5, device=DEVICE)
    ho = (7 + 2 * (kernel_size // 2) - kernel_size) // stride + 1
    wo = (9 + 2 * (kernel_size // 2) - kernel_size) // stride + 1
    res = torch.randn(2, ho, wo, 6, device=DEVICE) if residual else None
    torch.library.opcheck(ops.conv_bnrelu.default, (x, weight, scale, shift, res, stride, stats))


@pytest.mark.parametrize("with_h", [True, False])
def test_opcheck_conv_dgrad(with_h):
    dy = torch.randn(2, 4, 5, 6, device=DEVICE)
    weight = torch.randn(6, 5, 3, 3, device=DEVICE)
    h = torch.randn(2, 7, 9, 5, device=DEVICE)
    vectors = [torch.randn(5, device=DEVICE) for _ in range(4)]
    args = (h, *vectors) if with_h else (None,) * 5
    torch.library.opcheck(ops.conv_dgrad.default, (dy, weight, *args, None, 2, 7, 9))


@pytest.mark.parametrize("prologue", [True, False])
def test_opcheck_conv_wgrad(prologue):
    dy = torch.randn(2, 7, 9, 6, device=DEVICE)
    x = torch.randn(2, 7, 9, 5, device=DEVICE)
    weight = torch.randn(6, 5, 3, 3, device=DEVICE)
    vectors = (torch.rand(5, device=DEVICE), torch.randn(5, device=DEVICE)) if prologue else (None, None)
    torch.library.opcheck(ops.conv_wgrad.default, (dy, x, *vectors, weight, 1))


def test_opcheck_conv_bnrelu_without_prologue():
    x = torch.randn(2, 7, 9, 5, device=DEVICE)
    weight = torch.randn(6, 5, 1, 1, device=DEVICE)
    torch.library.opcheck(ops.conv_bnrelu.default, (x, weight, None, None, None, 2, True))


@pytest.mark.parametrize("residual_bn", [True, False])
def test_opcheck_bn_add_relu(residual_bn):
    h, residual = torch.randn(2, 5, 7, 17, device=DEVICE), torch.randn(2, 5, 7, 17, device=DEVICE)
    vectors = [torch.rand(17, device=DEVICE) + 0.5 for _ in range(4)]
    affine = vectors[2:] if residual_bn else [None, None]
    torch.library.opcheck(ops.bn_add_relu.default, (h, *vectors[:2], residual, *affine))
    y = torch.relu(torch.randn_like(h))
    shortcut = (residual, *vectors[2:]) if residual_bn else (None, None, None)
    torch.library.opcheck(ops.bn_add_relu_backward.default, (torch.randn_like(h), y, h, *vectors[:2], *shortcut))


def _bn_relu_conv_step(x, weight, bias, running_mean, running_var, batches, conv_weight, dy):
    """One BN-ReLU-conv triple, forward and the BN part of backward, as a fused unit runs it."""
    mean, invstd, scale, shift = ops.bn_finalize(*ops.channel_stats(x), weight, bias, running_mean,
                                                 running_var, batches, -1.0, 1e-5)
    y, pmean, pm2, pcount = ops.conv_bnrelu(x, conv_weight, scale, shift, None, 1, True)
    g, sum_g, sum_g_xhat = ops.conv_dgrad(dy, conv_weight, x, scale, shift, mean, invstd, None, 1,
                                          x.shape[1], x.shape[2])
    count = float(x.shape[0] * x.shape[1] * x.shape[2])
    dx = ops.bn_backward_finish(g, x, mean, invstd, weight, sum_g, sum_g_xhat, count, dy, True)
    dweight = ops.conv_wgrad(dy, x, scale, shift, conv_weight, 1)
    return y, pmean, pm2, pcount, dx, dweight


def test_compile_fullgraph_traces_every_operator():
    x = torch.randn(2, 5, 7, 6, device=DEVICE)
    conv_weight = torch.randn(6, 6, 3, 3, device=DEVICE) * 0.2
    dy = torch.randn(2, 5, 7, 6, device=DEVICE)
    weight, bias, running_mean, running_var = _bn_parameters(6)
    batches = torch.tensor(2, device=DEVICE)
    initial_mean = running_mean.clone()
    eager_running = (running_mean.clone(), running_var.clone())
    compiled = torch.compile(_bn_relu_conv_step, fullgraph=True, backend="aot_eager")
    got = compiled(x, weight, bias, running_mean, running_var, batches, conv_weight, dy)
    expected = _bn_relu_conv_step(x, weight, bias, *eager_running, batches, conv_weight, dy)
    for name, g, e in zip(("y", "pmean", "pm2", "pcount", "dx", "dweight"), got, expected):
        torch.testing.assert_close(g, e, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
    # the compiled graph keeps bn_finalize's in-place update of the running statistics
    torch.testing.assert_close(running_mean, eager_running[0], rtol=0, atol=0)
    torch.testing.assert_close(running_var, eager_running[1], rtol=0, atol=0)
    # and both agree with the float64 reference
    ref_mean, ref_invstd, _, _ = reference_ops.bn_finalize(
        *reference_ops.channel_stats(x), weight, bias, None, None, None, 0.1, 1e-5)
    partials = ops.channel_stats(x)
    mean, invstd, _, _ = ops.bn_finalize(*partials, weight, bias, None, None, None, 0.1, 1e-5)
    torch.testing.assert_close(mean.double(), ref_mean.double(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(invstd.double(), ref_invstd.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(running_mean, 0.5 * initial_mean + 0.5 * mean, rtol=1e-6, atol=1e-6)


def test_fake_partial_rows_match_the_kernels():
    """T of the partials comes from shapes alone: the fakes agree with what the kernels return."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    x = torch.randn(3, 9, 7, 17, device=DEVICE)
    weight = torch.randn(24, 17, 3, 3, device=DEVICE)
    scale, shift = torch.rand(17, device=DEVICE), torch.randn(17, device=DEVICE)
    real = [*ops.channel_stats(x), *ops.conv_bnrelu(x, weight, scale, shift, None, 2, True)]
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) for t in (x, weight, scale, shift)]
        fake = [*ops.channel_stats(fake_args[0]), *ops.conv_bnrelu(*fake_args, None, 2, True)]
    for r, f in zip(real, fake):
        assert (r.shape, r.dtype) == (f.shape, f.dtype)


def test_constant_results_are_marked_as_torch_compiler_marks_them():
    """dispatch marks its constant-result functions without importing torch._dynamo: the mark must be
    all that torch.compiler.assume_constant_result sets (a torch that changes it fails here)."""
    from fused_preact import dispatch

    def theirs():
        return None

    def ours():
        return None
    torch.compiler.assume_constant_result(theirs)
    dispatch._mark_constant(ours)
    assert vars(theirs) == vars(ours) == {"_dynamo_marked_constant": True}
    assert all(vars(f) == vars(theirs) for f in (dispatch._triton_import_error, dispatch._triton_interpreting,
                                                 dispatch._extension_error, dispatch._extension_has_cuda))


def test_importing_the_registration_loads_no_kernel():
    """Nor does ``import fused_preact`` load torch._dynamo (1.7 s here): see dispatch._mark_constant."""
    code = ("import sys, fused_preact, fused_preact.kernels.ops, torch; "
            "assert hasattr(torch.ops.fused_preact_triton, 'bn_finalize'); "
            "loaded = [m for m in sys.modules if m.startswith('fused_preact.kernels.') "
            "and m != 'fused_preact.kernels.ops']; "
            "assert not loaded, loaded; "
            "assert 'torch._dynamo' not in sys.modules, 'import fused_preact loaded torch._dynamo'")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
