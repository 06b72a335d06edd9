"""The fused original (post-activation) units against the eager units, both in float64.

Every unit form (basic and bottleneck; stride on the 3x3 or the first 1x1; shortcuts identity,
option A, projection B with and without its BN, a projection on every unit; zero_init_residual),
on the Triton backend (Triton's interpreter on this CPU machine) and the C++ extension (its CPU
kernels here): outputs, input and parameter gradients and running statistics, training and eval.
Tolerance 1e-10 relative to the largest magnitude (float64 throughout); the other dtypes run in
the ``full`` sweep (bf16 / fp16 autocast bounds as in test_fused_backends.py).
"""
import copy

import pytest
import torch

from fused_preact import FusedOriginalBlock, FusedOriginalBottleneck, OriginalBlock, OriginalBottleneck, dispatch
from fused_preact.fused import FUSED_CLASS
from comparisons import perturb_bn, relative_error

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["triton", "cuda"]
FLOAT64_TOL = 1e-10

# Every BN normalizes at least 16 values per channel (N * Ho * Wo >= 30 below).
UNITS = [
    ("basic", lambda b: FusedOriginalBlock(5, 5, backend=b), (3, 5, 7, 9)),
    ("basic s2 A", lambda b: FusedOriginalBlock(4, 6, stride=2, projection="A", backend=b), (3, 4, 9, 7)),
    ("basic s2 B+BN", lambda b: FusedOriginalBlock(3, 7, stride=2, backend=b), (2, 3, 9, 7)),
    ("basic s2 B", lambda b: FusedOriginalBlock(3, 7, stride=2, shortcut_bn=False, backend=b), (2, 3, 9, 11)),
    ("basic conv1x1", lambda b: FusedOriginalBlock(4, 4, shortcut="conv1x1", backend=b), (2, 4, 5, 7)),
    ("bottleneck", lambda b: FusedOriginalBottleneck(8, 8, backend=b), (2, 8, 5, 7)),
    ("bottleneck s2 3x3 B+BN", lambda b: FusedOriginalBottleneck(6, 12, stride=2, backend=b), (2, 6, 9, 11)),
    ("bottleneck s2 1x1 B+BN",
     lambda b: FusedOriginalBottleneck(5, 8, stride=2, stride_on="1x1", backend=b), (2, 5, 9, 11)),
    ("bottleneck s2 1x1 A",
     lambda b: FusedOriginalBottleneck(4, 8, stride=2, projection="A", stride_on="1x1", backend=b), (3, 4, 7, 9)),
]
IDS = [u[0] for u in UNITS]


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


def _close(got, expected, what, bound=FLOAT64_TOL):
    error = relative_error(got, expected)
    assert error <= bound, f"{what}: max error {error:.3g} relative to max |value| (bound {bound:.3g})"


def compare_float64(unit, x, train: bool, steps: int = 1):
    """``unit`` (fused, float64) against its eager twin: ``steps`` training or eval steps."""
    unit = unit.double().train(train)
    reference = copy.deepcopy(unit)
    reference.backend = "eager"
    unit.to(DEVICE)
    for _ in range(steps):
        dy = None
        results = []
        for module in (reference, unit):
            module.zero_grad()
            xd = x.to(module.conv1.weight.device).clone().requires_grad_(True)
            y = module(xd)
            dy = torch.randn_like(y.cpu()) if dy is None else dy
            (y * dy.to(y.device)).sum().backward()
            results.append((y.cpu(), xd.grad.cpu()))
        (y64, dx64), (y, dx) = results
        _close(y, y64, "output")
        assert y.is_contiguous(memory_format=torch.channels_last)
        _close(dx, dx64, "input gradient")
        params = dict(unit.named_parameters())
        for name, p in reference.named_parameters():
            _close(params[name].grad.cpu(), p.grad, f"{name}.grad")
        buffers = dict(unit.named_buffers())
        for name, b in reference.named_buffers():
            _close(buffers[name].cpu(), b, name)


# The default run: every form on the C++ backend; on Triton's interpreter (about 1.5 s a unit) the
# forms that reach its code paths (shortcut BN, option A, bottleneck with the stride on the 1x1).
TRITON_DEFAULT = ("basic s2 B+BN", "bottleneck s2 1x1 A")
TRAIN_CASES = [pytest.param(backend, *unit, id=f"{unit[0]}-{backend}",
                            marks=() if backend == "cuda" or unit[0] in TRITON_DEFAULT else pytest.mark.full)
               for backend in BACKENDS for unit in UNITS]


# with --full: the default run has this in tests/test_unit_cross_product.py
# (original units against eager in float64, every shortcut form, both backends)
@pytest.mark.full
@pytest.mark.parametrize("backend,name,make,shape", TRAIN_CASES)
def test_original_unit_float64_train(backend, name, make, shape):
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.5
    _need(backend, x.to(DEVICE))
    compare_float64(perturb_bn(make(backend)), x, train=True)


EVAL_CASES = [pytest.param("cuda", *UNITS[7], id="bottleneck s2 1x1 B+BN-cuda"),
              pytest.param("triton", *UNITS[2], id="basic s2 B+BN-triton")]


# with --full: the default run has this in tests/test_unit_cross_product.py
# (original units against eager in float64, every shortcut form, both backends)
@pytest.mark.full
@pytest.mark.parametrize("backend,name,make,shape", EVAL_CASES)
def test_original_unit_float64_eval(backend, name, make, shape):
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.5
    _need(backend, x.to(DEVICE))
    compare_float64(perturb_bn(make(backend)), x, train=False)


@pytest.mark.full
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name,make,shape", UNITS, ids=IDS)
def test_original_unit_float64_eval_every_form(backend, name, make, shape):
    x = torch.randn(shape, dtype=torch.float64) * 1.5 + 0.5
    _need(backend, x.to(DEVICE))
    compare_float64(perturb_bn(make(backend)), x, train=False)


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.full)])
def test_zero_init_residual_stays_exact(backend):
    """torchvision's zero_init_residual: the last BN's weight 0, so the unit starts as relu(s); two
    training steps with momentum=None (the cumulative average reads num_batches_tracked)."""
    x = torch.randn(2, 6, 9, 11, dtype=torch.float64)
    _need(backend, x.to(DEVICE))
    unit = perturb_bn(FusedOriginalBottleneck(6, 12, stride=2, backend=backend))
    with torch.no_grad():
        unit.bn3.weight.zero_()
    for m in unit.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None
    compare_float64(unit, x, train=True, steps=2)


def test_fused_original_units_keep_the_eager_state():
    """Same modules under the same names: state_dicts load strictly both ways, in the same order."""
    for fused, eager in ((FusedOriginalBlock(3, 8, 2), OriginalBlock(3, 8, 2)),
                         (FusedOriginalBottleneck(4, 16, 2, shortcut_bn=False),
                          OriginalBottleneck(4, 16, 2, shortcut_bn=False)),
                         (FusedOriginalBlock(4, 4, shortcut="conv1x1"), OriginalBlock(4, 4, shortcut="conv1x1"))):
        assert FUSED_CLASS[type(eager)] is type(fused)
        assert list(fused.state_dict()) == list(eager.state_dict())
        eager.load_state_dict(fused.state_dict(), strict=True)
        fused.load_state_dict(eager.state_dict(), strict=True)
    assert list(OriginalBlock(3, 8, 2).state_dict())[-6:] == [
        "shortcut.weight", "shortcut_bn.weight", "shortcut_bn.bias", "shortcut_bn.running_mean",
        "shortcut_bn.running_var", "shortcut_bn.num_batches_tracked"]
    assert OriginalBlock(3, 8, 2, shortcut_bn=False).shortcut_bn is None
    assert OriginalBlock(3, 8, 2, "A").pad_shortcut is not None
    with pytest.raises(ValueError, match="projection"):
        OriginalBlock(3, 8, 2, projection="raw")


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.full)])
def test_saved_tensors_hold_no_bn_or_relu_output(backend):
    """A bottleneck with a projection saves x, h1..h3, h_s and y (plus per-channel vectors and
    weights): eager's saved activations less its two ReLU outputs relu(bn1(h1)), relu(bn2(h2)).
    (y is the next unit's x, which eager saves too: within a network the unit keeps h1..h3, h_s.)"""
    x = torch.randn(2, 6, 9, 11, requires_grad=True)
    _need(backend, x.to(DEVICE))
    unit = FusedOriginalBottleneck(6, 12, stride=2, backend=backend).to(DEVICE)
    eager = copy.deepcopy(unit)
    eager.backend = "eager"

    def saved_elements(module):
        """Elements of the distinct activation-shaped tensors (4-D, batch first) autograd saves."""
        sizes = {}

        def pack(t):
            if t.dim() == 4 and t.shape[0] == x.shape[0]:
                sizes[t.untyped_storage().data_ptr()] = t.numel()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(x.to(DEVICE))
        return sum(sizes.values())
    fused, reference = saved_elements(unit), saved_elements(eager)
    # x [2, 6, 9, 11], h1 [2, 3, 9, 11], h2 [2, 3, 5, 6], h3, h_s and y [2, 12, 5, 6]
    assert fused == 2 * 6 * 99 + 2 * 3 * 99 + 2 * 3 * 30 + 3 * 2 * 12 * 30
    assert fused == reference - 2 * 3 * 99 - 2 * 3 * 30, (fused, reference)


def compare_low_precision(unit, x, dtype, autocast: bool):
    """``unit`` (fused) in ``dtype`` (or under autocast to it) against its float64 eager twin; the
    bound is 3x eager's own error in the same precision on the same inputs, and at least
    LOW_PRECISION_TOL (as tests/test_fused_backends.py)."""
    reference = copy.deepcopy(unit).double()
    reference.backend = "eager"
    x64 = x.double().requires_grad_(True)
    y64 = reference(x64)
    dy = torch.randn_like(y64)
    (y64 * dy).sum().backward()

    def run(module):
        module = module.to(DEVICE)
        xd = x.to(DEVICE).clone()
        if autocast:
            xd.requires_grad_(True)
            with torch.autocast(DEVICE, dtype=dtype):
                y = module(xd)
        else:
            module = module.to(dtype)
            xd = xd.to(dtype).requires_grad_(True)
            y = module(xd)
        (y * dy.to(DEVICE, y.dtype)).sum().backward()
        grads = {name: p.grad for name, p in module.named_parameters()}
        return {"output": y, "input gradient": xd.grad, **grads, **dict(module.named_buffers())}

    eager = copy.deepcopy(unit)
    eager.backend = "eager"
    expected = {"output": y64, "input gradient": x64.grad, **{n: p.grad for n, p in reference.named_parameters()},
                **dict(reference.named_buffers())}
    eager_got, fused_got = run(eager), run(unit)
    for name, value in expected.items():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(fused_got[name].cpu(), value), name
            continue
        bound = max(LOW_PRECISION_TOL[dtype], 3 * relative_error(eager_got[name].cpu(), value))
        _close(fused_got[name].cpu(), value, name, bound)


LOW_PRECISION_TOL = {torch.float32: 1e-4, torch.bfloat16: 5e-2, torch.float16: 1e-2}
LOW_PRECISION_CASES = [
    pytest.param(backend, dtype, autocast, id=f"{backend}-{str(dtype)[6:]}{'-autocast' if autocast else ''}",
                 marks=() if (backend, dtype) == ("cuda", torch.float32) else pytest.mark.full)
    for backend in BACKENDS for dtype, autocast in ((torch.float32, False), (torch.bfloat16, True),
                                                    (torch.float16, True))]


@pytest.mark.parametrize("backend,dtype,autocast", LOW_PRECISION_CASES)
@pytest.mark.parametrize("unit_index", [2, 6], ids=["basic s2 B+BN", "bottleneck s2 3x3 B+BN"])
def test_original_unit_lower_precision(backend, dtype, autocast, unit_index):
    _, make, shape = UNITS[unit_index]
    x = torch.randn(shape) * 1.5 + 0.5
    _need(backend, x.to(DEVICE, dtype))
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        compare_low_precision(perturb_bn(make(backend)), x, dtype, autocast)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.full)])
def test_original_unit_compiles_without_graph_breaks(backend):
    """torch.compile(fullgraph=True) traces the fused original unit (opaque operators with fake / Meta
    kernels) and gives what the uncompiled unit gives, running statistics included."""
    x = torch.randn(2, 6, 9, 11, device=DEVICE)
    _need(backend, x)
    unit = perturb_bn(FusedOriginalBottleneck(6, 12, stride=2, backend=backend)).to(DEVICE)
    twin = copy.deepcopy(unit)
    compiled = torch.compile(unit, fullgraph=True, backend="aot_eager")
    out, expected = compiled(x), twin(x)
    out.sum().backward()
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(unit.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for b, c in zip(unit.buffers(), twin.buffers()):
        torch.testing.assert_close(b, c)
