"""Every fused backend, end to end, against the eager units computed in float64.

On this CPU-only machine the Triton backend runs in Triton's interpreter and the
``cuda`` backend through the extension's C++ CPU kernels; on a GPU the same tests
run on CUDA tensors (and the GPU-only cases below join in).

Tolerances (relative to the largest magnitude of each compared tensor):
float32 1e-4 (fp32 accumulation over at most a few hundred products; TF32 is
turned off for these tests), float64 1e-10. Under bfloat16 autocast a gradient can
be off by 10% and more even in eager PyTorch (a ReLU mask flips where a value rounds across
zero, and a BN bias gradient sums values that cancel), so the bound is eager's own error
against float64 on the same input: at most 2x it, plus 2^-8 (one bf16 step: eager's error on a
single tensor is one draw of rounding luck, and where it came out lucky, at 1e-3, twice it is
below what one rounding of each bf16 operand gives; measured over seeds, fused and eager errors
agree to within 0.6x-1.6x per tensor, both fused backends alike).

A fused unit under autocast rounds a float32 input to bf16 before its first BN (its kernels
read activations in the compute dtype), where eager normalizes the float32 input; inside an
autocast network the input already is bf16 (the stem's conv output, the previous unit's).
Both are tested: a bf16 input against eager on that input, and a float32 input against eager
on the same input rounded to bf16, the one the fused unit normalizes (measured on "basic s2 B":
bn1.bias.grad 0.35 relative error for eager on the rounded input and for both fused backends,
0.05 for eager on the float32 input).
"""
import copy
import warnings

import pytest
import torch

from fused_preact import dispatch, convert_to_fused
from fused_preact.fused import FusedPreActBlock, FusedPreActBottleneck
from fused_preact.models import ResNet, cifar_resnet
from comparisons import perturb_bn, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "cuda"]
RELATIVE_TOL = {torch.float32: 1e-4, torch.float16: 1e-2, torch.float64: 1e-10}
EAGER_FACTOR, EAGER_FLOOR = 2.0, 2.0 ** -8   # autocast: the bound on each tensor's error from eager's


@pytest.fixture(autouse=True)
def _exact_fp32():
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_runs_on_this_machine(backend):
    """The CI machine has no GPU, yet both backends must run here (interpreter / C++ CPU)."""
    assert dispatch.unavailable_reason(backend, torch.randn(2, 4, 5, 5, device=DEVICE)) is None


def _close(got, expected, dtype, what, eager_error=None):
    """got against float64 ``expected``: within RELATIVE_TOL[dtype], or, given eager's own error on
    the same input (autocast), within EAGER_FACTOR times it plus EAGER_FLOOR."""
    error = relative_error(got, expected)
    if eager_error is None:
        bound = RELATIVE_TOL[dtype]
    else:
        bound = EAGER_FACTOR * eager_error + EAGER_FLOOR
    assert error <= bound, (f"{what}: max error {error:.3g} relative to max |value| (bound {bound:.3g}"
                            + ("" if eager_error is None else f", eager's error {eager_error:.3g}") + ")")


def compare_with_float64_eager(fused_unit, x, dtype, autocast=False, eager_input=None):
    """Run ``fused_unit`` (any backend) on x in ``dtype`` and its eager twin in float64.

    Under autocast the bound is eager's own error against float64, eager run on ``eager_input``
    (default: x itself)."""
    reference = copy.deepcopy(fused_unit).double()
    reference.backend = "eager"
    x64 = x.double().requires_grad_(True)
    y64 = reference(x64)
    dy = torch.randn_like(y64)
    (y64 * dy).sum().backward()

    def run(unit, x=x):
        xd = x.to(DEVICE).clone()
        if autocast:
            xd = xd.requires_grad_(True)
            with torch.autocast(DEVICE, dtype=dtype):
                y = unit(xd)
        else:
            unit = unit.to(dtype)
            xd = xd.to(dtype).requires_grad_(True)
            y = unit(xd)
        (y * dy.to(DEVICE, y.dtype)).sum().backward()
        return unit, xd, y

    eager_error = {}
    if autocast:   # eager PyTorch's own error under autocast, on the same inputs
        eager_unit = copy.deepcopy(fused_unit).to(DEVICE)
        eager_unit.backend = "eager"
        eager_unit, xe, ye = run(eager_unit, x if eager_input is None else eager_input)
        eager_error = {"output": relative_error(ye.cpu(), y64), "input gradient": relative_error(xe.grad.cpu(), x64.grad)}
        eager_params = dict(eager_unit.named_parameters())
        for name, p in reference.named_parameters():
            eager_error[name] = relative_error(eager_params[name].grad.cpu(), p.grad)
        eager_buffers = dict(eager_unit.named_buffers())
        for name, b in reference.named_buffers():
            eager_error[name] = relative_error(eager_buffers[name].cpu(), b)
    unit, xd, y = run(fused_unit.to(DEVICE))

    _close(y.cpu(), y64, dtype, "output", eager_error.get("output"))
    assert y.is_contiguous(memory_format=torch.channels_last)
    _close(xd.grad.cpu(), x64.grad, dtype, "input gradient", eager_error.get("input gradient"))
    params = dict(unit.named_parameters())
    for name, p in reference.named_parameters():
        _close(params[name].grad.cpu(), p.grad, dtype, f"{name}.grad", eager_error.get(name))
    buffers = dict(unit.named_buffers())
    for name, b in reference.named_buffers():
        _close(buffers[name].cpu(), b, dtype, name, eager_error.get(name))


UNITS = [
    ("basic", lambda b: FusedPreActBlock(5, 5, backend=b), (3, 5, 7, 9)),
    ("basic s2 B", lambda b: FusedPreActBlock(3, 17, stride=2, backend=b), (1, 3, 15, 9)),
    ("basic s2 A", lambda b: FusedPreActBlock(4, 6, stride=2, projection="A", backend=b), (3, 4, 9, 7)),
    ("bottleneck", lambda b: FusedPreActBottleneck(12, 12, backend=b), (3, 12, 7, 7)),
    ("bottleneck s2 1x1", lambda b: FusedPreActBottleneck(5, 20, stride=2, backend=b), (1, 5, 9, 15)),
    ("bottleneck s2 3x3", lambda b: FusedPreActBottleneck(8, 24, stride=2, stride_on="3x3", backend=b), (3, 8, 7, 9)),
]


# by default: every unit form on the C++ kernels in training and eval mode; on the Triton interpreter
# (about 1 s a case) the basic unit in both modes and, training, option A and the stride-2 1x1
# bottleneck (the other forms run there in test_unit_cross_product's sample); the rest with --full
def _default_unit_case(params):
    return (params["backend"] == "cuda" or params["name"] == "basic"
            or (params["train"] and params["name"] in ("basic s2 A", "bottleneck s2 1x1")))


@pytest.mark.default_cases(keep=_default_unit_case)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,shape", UNITS, ids=[u[0] for u in UNITS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_unit_float32(backend, name, make, shape, train):
    x = torch.randn(shape) * 1.5 + 0.5
    _need(backend, x.to(DEVICE))
    compare_with_float64_eager(perturb_bn(make(backend)).train(train), x, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,shape", UNITS[:2] + UNITS[4:5], ids=[UNITS[i][0] for i in (0, 1, 4)])
def test_unit_bfloat16_autocast(backend, name, make, shape):
    """A bf16 input, as inside an autocast network, against eager on the same input."""
    x = torch.randn(shape).to(torch.bfloat16)
    _need(backend, x.to(DEVICE))
    compare_with_float64_eager(perturb_bn(make(backend)), x, torch.bfloat16, autocast=True)


@pytest.mark.default_cases(keep=lambda params: params["name"] == "basic s2 B")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,shape", UNITS[:2] + UNITS[4:5], ids=[UNITS[i][0] for i in (0, 1, 4)])
def test_unit_bfloat16_autocast_of_a_float32_input(backend, name, make, shape):
    """A float32 input, which the fused unit rounds to bf16 before its first BN: against eager on
    that rounded input (float64 of the float32 input stays the reference)."""
    x = torch.randn(shape)
    _need(backend, x.to(DEVICE, torch.bfloat16))
    compare_with_float64_eager(perturb_bn(make(backend)), x, torch.bfloat16, autocast=True,
                               eager_input=x.to(torch.bfloat16).float())


RAW_PROJECTION_UNITS = [
    ("basic s2 raw", lambda b: FusedPreActBlock(3, 5, stride=2, projection="raw", backend=b), (2, 3, 5, 7)),
    ("bottleneck s2 3x3 raw",
     lambda b: FusedPreActBottleneck(4, 8, stride=2, projection="raw", stride_on="3x3", backend=b), (2, 4, 5, 5)),
    ("bottleneck s2 1x1 raw", lambda b: FusedPreActBottleneck(3, 8, stride=2, projection="raw", backend=b),
     (2, 3, 7, 5)),
]


@pytest.mark.default_cases(keep=lambda params: params["backend"] == "cuda" or params["train"]
                           or params["name"] == "basic s2 raw")
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,shape", RAW_PROJECTION_UNITS, ids=[u[0] for u in RAW_PROJECTION_UNITS])
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_raw_input_projection_float64(backend, name, make, shape, train):
    """The 1x1 projection of the raw input (fb.resnet.torch ports) against eager, both in float64,
    running statistics included."""
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.5
    _need(backend, x.to(DEVICE))
    unit = perturb_bn(make(backend)).double().train(train)
    reference = copy.deepcopy(unit)
    reference.backend = "eager"
    dy = None
    results = []
    for module in (reference, unit.to(DEVICE)):
        xd = x.to(DEVICE).requires_grad_(True)
        y = module(xd)
        dy = torch.randn_like(y) if dy is None else dy
        (y * dy.to(y.device)).sum().backward()
        results.append((y.cpu(), xd.grad.cpu()))
    (y64, dx64), (y, dx) = results
    _close(y, y64, torch.float64, "output")
    _close(dx, dx64, torch.float64, "input gradient")
    for (name, p), q in zip(reference.named_parameters(), unit.parameters()):
        _close(q.grad.cpu(), p.grad, torch.float64, f"{name}.grad")
    for (name, b), c in zip(reference.named_buffers(), unit.buffers()):
        assert relative_error(c.cpu(), b) <= RELATIVE_TOL[torch.float64], name


@pytest.mark.parametrize("backend", BACKENDS)
def test_double_backward_names_the_eager_backend(backend):
    x = torch.randn(2, 3, 5, 5, device=DEVICE, requires_grad=True)
    _need(backend, x)
    unit = FusedPreActBlock(3, 3, backend=backend).to(DEVICE)
    (grad,) = torch.autograd.grad(unit(x).square().sum(), x)            # first order: fine
    assert grad.shape == x.shape
    # a create_graph=True pass runs (the same gradient) as long as nothing differentiates it again
    (graph_grad,) = torch.autograd.grad(unit(x).square().sum(), x, create_graph=True)
    torch.testing.assert_close(graph_grad, grad)
    with pytest.raises(RuntimeError, match="backend='eager'"):
        graph_grad.square().sum().backward()
    eager = copy.deepcopy(unit)
    eager.backend = "eager"
    (grad,) = torch.autograd.grad(eager(x).square().sum(), x, create_graph=True)
    grad.sum().backward()   # and eager does second order


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_empty_batch_does_what_eager_does(backend, train):
    x = torch.randn(0, 4, 6, 6, device=DEVICE, requires_grad=True)
    _need(backend, x[:1])
    unit = FusedPreActBlock(4, 8, stride=2, backend=backend).to(DEVICE).train(train)
    eager = copy.deepcopy(unit)
    eager.backend = "eager"
    y, y_eager = unit(x), eager(x)
    assert y.shape == y_eager.shape == (0, 8, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape
    for (name, b), c in zip(eager.named_buffers(), unit.buffers()):
        torch.testing.assert_close(c, b, equal_nan=True, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_large_mean_input_statistics(backend):
    """Mean 100, std 0.01: the running variance must come out right (no cancellation)."""
    x = 100 + 0.01 * torch.randn(3, 6, 9, 9)
    _need(backend, x.to(DEVICE))
    unit = FusedPreActBlock(6, 6, backend=backend)
    reference = copy.deepcopy(unit).double()
    reference.backend = "eager"
    reference(x.double())
    unit.to(DEVICE)(x.to(DEVICE))
    torch.testing.assert_close(unit.bn1.running_var.cpu().double(), reference.bn1.running_var,
                               rtol=1e-3, atol=1e-9)
    torch.testing.assert_close(unit.bn1.running_mean.cpu().double(), reference.bn1.running_mean,
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unit_momentum_none_several_steps(backend):
    unit = FusedPreActBlock(4, 4, backend=backend)
    for m in unit.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    reference = copy.deepcopy(unit).double()
    reference.backend = "eager"
    unit.to(DEVICE)
    for _ in range(3):
        x = torch.randn(2, 4, 7, 7) * 2 + 1
        _need(backend, x.to(DEVICE))
        reference(x.double())
        unit(x.to(DEVICE))
    for (name, b), f in zip(reference.named_buffers(), unit.buffers()):
        torch.testing.assert_close(f.cpu().double(), b.double(), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.default_cases(ids=["cuda"])   # a whole net on the interpreter by default: test_convert_foreign
@pytest.mark.parametrize("backend", BACKENDS)
def test_whole_cifar_resnet_of_fused_units(backend):
    """A CIFAR ResNet-8 whose units run fused, chained statistics included, against float64 eager."""
    x = torch.randn(3, 3, 9, 9)
    _need(backend, x.to(DEVICE))
    model = perturb_bn(cifar_resnet(8, num_classes=7))
    reference = copy.deepcopy(model).double()
    fused = convert_to_fused(model, backend=backend).to(DEVICE)
    x64 = x.double().requires_grad_(True)
    xd = x.to(DEVICE).clone().requires_grad_(True)
    out64, out = reference(x64), fused(xd)
    dy = torch.randn_like(out64)
    (out64 * dy).sum().backward()
    (out * dy.to(DEVICE, out.dtype)).sum().backward()
    _close(out.cpu(), out64, torch.float32, "logits")
    _close(xd.grad.cpu(), x64.grad, torch.float32, "input gradient")
    params = dict(fused.named_parameters())
    for name, p in reference.named_parameters():
        _close(params[name].grad.cpu(), p.grad, torch.float32, f"{name}.grad")
    buffers = dict(fused.named_buffers())
    for name, b in reference.named_buffers():
        _close(buffers[name].cpu(), b, torch.float32, name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_gradients_match_float64_finite_differences(backend):
    """Directional finite differences of the float64 unit against the backend's analytic gradients
    (float64 where the backend has it, else float32 with float32 tolerance)."""
    x = torch.randn(2, 3, 5, 5)
    dtype = torch.float64 if dispatch.unavailable_reason(backend, x.double().to(DEVICE)) is None else torch.float32
    _need(backend, x.to(DEVICE, dtype))
    unit = perturb_bn(FusedPreActBlock(3, 4, stride=2, backend=backend)).to(DEVICE, dtype)
    reference = copy.deepcopy(unit).cpu().double()
    reference.backend = "eager"
    dy = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    xd = x.to(DEVICE, dtype).requires_grad_(True)
    (unit(xd) * dy.to(DEVICE, dtype)).sum().backward()

    def loss(x_value, params):
        model = copy.deepcopy(reference)   # fresh running statistics each evaluation
        with torch.no_grad():
            for p, value in zip(model.parameters(), params):
                p.copy_(value)
            return (model(x_value) * dy).sum()

    base = [p.detach().double().cpu() for p in unit.parameters()]
    grads = [p.grad.double().cpu() for p in unit.parameters()]
    x64 = x.double()
    eps = 1e-6
    for _ in range(3):
        vx = torch.randn_like(x64)
        vp = [torch.randn_like(b) for b in base]
        plus = loss(x64 + eps * vx, [b + eps * v for b, v in zip(base, vp)])
        minus = loss(x64 - eps * vx, [b - eps * v for b, v in zip(base, vp)])
        numeric = (plus - minus) / (2 * eps)
        analytic = (xd.grad.double().cpu() * vx).sum() + sum((g * v).sum() for g, v in zip(grads, vp))
        tol = 1e-7 if dtype == torch.float64 else 2e-3
        assert abs(numeric - analytic) <= tol * max(1.0, abs(numeric)), (numeric, analytic)


# the Triton operators' own trace runs by default in test_triton_ops.py; through a whole model here
# (about 8 s in the interpreter) with --full
@pytest.mark.default_cases(ids=["cuda"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_compiles_without_graph_breaks(backend, monkeypatch):
    """A ResNet whose first stage has two units: the second takes the first's output statistics in
    the compiled graph too (stats_handoff: neighbours in one nn.Sequential)."""
    x = torch.randn(2, 3, 8, 8, device=DEVICE)
    _need(backend, x)
    model = convert_to_fused(ResNet((2, 1, 1), (16, 32, 64), bottleneck=False, num_classes=10),
                             backend=backend).to(DEVICE)
    eager_model = copy.deepcopy(model)
    handed = []
    real = dispatch.run_unit
    monkeypatch.setattr(dispatch, "run_unit", lambda *args: handed.append(args[3] is not None) or real(*args))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    assert handed[:4] == [False, True, False, False]      # as traced
    monkeypatch.setattr(dispatch, "run_unit", real)
    out.sum().backward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # no fallback warning either
        expected = eager_model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=lambda m: f"{name}: {m}")
    for b, c in zip(model.buffers(), eager_model.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend,memory", [(b, "default") for b in BACKENDS] + [("cuda", "min")])
def test_forward_and_backward_never_read_back_to_the_host(backend, memory, monkeypatch):
    """Nothing in a training step synchronizes with the host (CUDA-graph capturable):
    no .item(), .tolist(), bool() or .cpu() of a tensor inside the fused path (memory="min"'s
    recompute included)."""
    x = torch.randn(2, 4, 6, 6, device=DEVICE)
    _need(backend, x)
    unit = FusedPreActBlock(4, 8, stride=2, backend=backend, memory=memory).to(DEVICE)
    for m in unit.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None      # the cumulative average reads num_batches_tracked: on the device
    unit(x.clone().requires_grad_(True))   # warm-up: imports, autotuning, caches

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization inside the fused unit")
    for name in ("item", "tolist", "__bool__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    y = unit(x.clone().requires_grad_(True))
    y.backward(torch.ones_like(y))
    monkeypatch.undo()
    assert torch.isfinite(y).all()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("memory", ["default", "min"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_training_step_captures_in_a_cuda_graph(backend, memory):
    unit = FusedPreActBlock(16, 16, backend=backend, memory=memory).cuda()
    x = torch.randn(8, 16, 16, 16, device="cuda", requires_grad=True)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            unit(x).sum().backward()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = unit(x)
        y.sum().backward()
    graph.replay()
    torch.cuda.synchronize()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    if memory == "min":   # the replayed recompute gives the default mode's gradient (2 warm-ups + 1 replay)
        reference = copy.deepcopy(unit)
        reference._set_memory("default")
        (grad,) = torch.autograd.grad(reference(x).sum(), x)
        torch.testing.assert_close(x.grad, 3 * grad, rtol=1e-4, atol=1e-4)
