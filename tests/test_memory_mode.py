"""memory="min": a fused unit saves its input (and per-channel statistics) only and recomputes the
raw conv outputs in the backward from the saved BN scale and shift.

- the two modes give the same outputs, gradients and running statistics (float64: 1e-12 relative;
  fp16/bf16 on the C++ CPU kernels: bitwise, since the same kernel recomputes the same values), on the
  C++ CPU kernels (backend="cuda" on CPU tensors) and in Triton's interpreter, every shortcut form;
- the running statistics are updated once (equal to eager's after a step), where
  torch.utils.checkpoint updates them twice;
- saved activation bytes below the issue's targets, each activation between units saved once;
- torch.compile(fullgraph=True), synchronized BN over two gloo processes, bad values.
"""
from __future__ import annotations

import copy
import os
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.utils.checkpoint import checkpoint

from comparisons import assert_processes_match_one, perturb_bn, relative_error
from fused_preact import convert_to_fused, dispatch, models, sync_batch_stats
from fused_preact.fused import FusedPreActBlock, FusedPreActBottleneck, _FusedUnitMixin
from fused_preact.unit_function import MEMORY_MODES, check_memory
from fused_preact.units import PreActBlock

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from bench import memory as memory_bench  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EXACT = 1e-12    # float64, relative to the largest magnitude

# name, constructor (backend, memory), input shape: every shortcut form, basic and bottleneck
UNITS = [
    ("basic identity", lambda b, m: FusedPreActBlock(5, 5, backend=b, memory=m), (3, 5, 7, 9)),
    ("basic projection B", lambda b, m: FusedPreActBlock(3, 6, stride=2, backend=b, memory=m), (2, 3, 9, 7)),
    ("basic pad A", lambda b, m: FusedPreActBlock(4, 6, stride=2, projection="A", backend=b, memory=m),
     (3, 4, 9, 9)),
    ("basic raw", lambda b, m: FusedPreActBlock(3, 6, stride=2, projection="raw", backend=b, memory=m),
     (2, 3, 9, 7)),
    ("bottleneck identity", lambda b, m: FusedPreActBottleneck(8, 8, backend=b, memory=m), (3, 8, 7, 9)),
    ("bottleneck B stride 1x1", lambda b, m: FusedPreActBottleneck(4, 12, stride=2, backend=b, memory=m),
     (2, 4, 9, 7)),
    ("bottleneck raw stride 3x3",
     lambda b, m: FusedPreActBottleneck(4, 12, stride=2, projection="raw", stride_on="3x3", backend=b, memory=m),
     (2, 4, 9, 7)),
]
# the default run: every shortcut form on the C++ CPU kernels, a bottleneck with a projection (two convs
# recomputed, the shared first activation) in the interpreter
DEFAULT_CASES = [("cuda", u) for u in UNITS] + [("triton", UNITS[5])]
FULL_CASES = [("triton", u) for i, u in enumerate(UNITS) if i != 5]


def _need(backend, x):
    reason = dispatch.unavailable_reason(backend, x)
    if reason is not None:
        pytest.skip(reason)


def _step(unit, x, dy, autocast_dtype=None):
    """One training step of ``unit`` on ``x``: output, input gradient, parameter gradients, buffers."""
    x = x.clone().requires_grad_(True)
    with torch.autocast(x.device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        y = unit(x)
    (y * dy.to(y.dtype)).sum().backward()
    return ([y.detach(), x.grad] + [p.grad for p in unit.parameters()]
            + [b.clone() for b in unit.buffers()])


def _both_modes(make, backend, shape, dtype, train=True, autocast_dtype=None):
    torch.manual_seed(0)
    unit = perturb_bn(make(backend, "default")).to(DEVICE, dtype).train(train)
    low = copy.deepcopy(unit)
    low._set_memory("min")
    x = (torch.randn(shape, dtype=torch.float64) * 1.5 + 0.3).to(DEVICE, dtype)
    _need(backend, x)
    with torch.no_grad():
        shape = copy.deepcopy(unit)(x).shape
    dy = torch.randn(shape, dtype=torch.float64).to(DEVICE)
    return [_step(module, x, dy, autocast_dtype) for module in (unit, low)]


# with --full: the default run has this in tests/test_unit_cross_product.py
# (memory="min" against eager, every shortcut form, both backends)
@pytest.mark.full
@pytest.mark.parametrize("backend,case", DEFAULT_CASES, ids=[f"{b}-{u[0]}" for b, u in DEFAULT_CASES])
def test_min_equals_default_in_float64(backend, case):
    name, make, shape = case
    default, low = _both_modes(make, backend, shape, torch.float64)
    for i, (a, b) in enumerate(zip(default, low)):
        assert relative_error(b.cpu(), a.cpu()) <= EXACT, f"{name}: tensor {i} differs"


@pytest.mark.full
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,case", DEFAULT_CASES + FULL_CASES,
                         ids=[f"{b}-{u[0]}" for b, u in DEFAULT_CASES + FULL_CASES])
def test_min_equals_default_every_form_and_mode(backend, case, train):
    name, make, shape = case
    dtype = torch.float64 if backend == "cuda" or DEVICE == "cpu" else torch.float32
    default, low = _both_modes(make, backend, shape, dtype, train)
    for i, (a, b) in enumerate(zip(default, low)):
        assert relative_error(b.cpu(), a.cpu()) <= EXACT, f"{name}: tensor {i} differs"


@pytest.mark.parametrize("backend", ["cuda", pytest.param("triton", marks=pytest.mark.full)])
@pytest.mark.parametrize("precision", ["fp16", "bf16 autocast"])
def test_min_equals_default_bitwise_in_half_precision(precision, backend):
    """The backward recomputes h with the forward's kernel on the forward's inputs: the same bits."""
    for _, make, shape in (UNITS[1], UNITS[5]):
        if precision == "fp16":
            default, low = _both_modes(make, backend, shape, torch.float16)
        else:
            default, low = _both_modes(make, backend, shape, torch.float32, autocast_dtype=torch.bfloat16)
        for i, (a, b) in enumerate(zip(default, low)):
            assert torch.equal(a, b), f"tensor {i} differs"


def test_running_statistics_are_updated_once_unlike_checkpoint():
    """After one step, memory="min" has eager's running statistics; torch.utils.checkpoint re-runs BN in
    training mode during the backward and so moves them a second time (the reason for this mode)."""
    torch.manual_seed(0)
    eager = perturb_bn(PreActBlock(4, 4)).double()
    fused = convert_to_fused(copy.deepcopy(eager), "cuda", memory="min")
    checkpointed = copy.deepcopy(eager)
    x = torch.randn(3, 4, 6, 6, dtype=torch.float64) * 2 + 1
    _need("cuda", x)
    runs = {"eager": lambda xi: eager(xi), "fused min": lambda xi: fused(xi),
            "checkpoint": lambda xi: checkpoint(checkpointed, xi, use_reentrant=False)}
    for run in runs.values():
        xi = x.clone().requires_grad_(True)
        run(xi).square().sum().backward()
    for name in ("bn1", "bn2"):
        reference = getattr(eager, name)
        ours, theirs = getattr(fused, name), getattr(checkpointed, name)
        assert int(ours.num_batches_tracked) == 1 and int(theirs.num_batches_tracked) == 2
        for stat in ("running_mean", "running_var"):
            assert relative_error(getattr(ours, stat), getattr(reference, stat)) <= EXACT, f"{name}.{stat}"
            assert relative_error(getattr(theirs, stat), getattr(reference, stat)) > 1e-3, f"{name}.{stat}"


# -- saved bytes --------------------------------------------------------------------------------
def _assert_ratio_below(arch, target, side=16, batch=1):
    """Saved activation bytes of fused memory="min" over eager's, one training forward (C++ CPU kernels),
    fp32 and bf16 autocast. 16x16 at batch 1: every BN still normalizes >= 16 values per channel."""
    torch.manual_seed(0)
    eager = models.create_model(arch)
    fused = memory_bench.build("fused-min", eager, "cuda")
    x = torch.randn(batch, 3, side, side)
    _need("cuda", x)
    for amp in (None, torch.bfloat16):
        ratio = (memory_bench.saved_bytes(fused, x, amp)["saved_bytes"]
                 / memory_bench.saved_bytes(eager, x, amp)["saved_bytes"])
        assert ratio <= target, f"{arch} {amp}: fused memory='min' saves {ratio:.3f}x eager's activation bytes"


# Targets of the issue: ResNet-110 <= 0.30x eager, ResNet-1001 <= 0.35x. Activations scale with the image
# area and the batch alike in both, so 16x16 images at batch 1 give the ratio of 32x32 at any batch
# (bench/memory.py measured the same ratios at 32x32, batch 2: docs/memory.md). The default run takes ResNet-164
# for the bottleneck target: the same units as ResNet-1001 (18 per stage instead of 111), so the same
# per-unit saving and a larger share of the stem and head, which fused units do not shrink: ResNet-1001's
# ratio is below ResNet-164's (bench/memory.py: 0.334 and 0.337).
@pytest.mark.usefixtures("one_cpu_thread")
@pytest.mark.parametrize("arch,target", [("cifar_resnet110", 0.30), ("cifar_resnet164", 0.35)])
def test_saved_activations_below_the_targets(arch, target):
    _assert_ratio_below(arch, target)


@pytest.mark.full
@pytest.mark.usefixtures("one_cpu_thread")
def test_saved_activations_resnet1001():
    _assert_ratio_below("cifar_resnet1001", 0.35)


@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("arch", ["cifar_resnet14", "cifar_resnet11_bottleneck"])
def test_each_activation_between_units_is_saved_once(arch, amp):
    """Saved storages of a fused memory="min" net, split by who saved them: inside each unit exactly one
    batch-sized storage, the previous unit's output itself (no dtype, layout or NHWC copy of it); outside
    the units (stem, head) none of the units' inputs or outputs but the last output (the final BN's input)."""
    torch.manual_seed(0)
    model = convert_to_fused(models.create_model(arch), "cuda", memory="min")
    units = [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]
    x = torch.randn(2, 3, 16, 16)
    _need("cuda", x)
    inside: list = [None]           # the unit whose forward is running
    per_unit = {id(u): set() for u in units}
    outside: set = set()
    boundary = {}                   # unit -> (input storage, output storage)

    def pre_hook(unit, args, kwargs):
        inside[0] = unit

    def hook(unit, args, kwargs, output):
        inside[0] = None
        y = output[0] if isinstance(output, tuple) else output
        boundary[id(unit)] = (args[0].untyped_storage().data_ptr(), y.untyped_storage().data_ptr())

    for u in units:
        u.register_forward_pre_hook(pre_hook, with_kwargs=True)
        u.register_forward_hook(hook, with_kwargs=True)
    params = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params and t.dim() == 4 and t.shape[0] == x.shape[0]:
            (per_unit[id(inside[0])] if inside[0] is not None else outside).add(ptr)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            model(x).sum()
    for k, unit in enumerate(units):
        assert len(per_unit[id(unit)]) == 1, f"unit {k} saved {len(per_unit[id(unit)])} activation storages"
        if k > 0:   # the first unit's input is the stem's NCHW output, made channels_last once
            assert per_unit[id(unit)] == {boundary[id(units[k - 1])][1]}, f"unit {k} saved a copy of its input"
    unit_storages = set().union(*per_unit.values()) | {b[1] for b in boundary.values()}
    assert outside & unit_storages == {boundary[id(units[-1])][1]}
    assert len(outside) == 3, outside    # the stem conv's input, the final BN's input, the final ReLU's output


# -- compile, synchronized BN, the trainer, bad values ----------------------------------------------------
def test_training_step_compiles_without_graph_breaks():
    x = torch.randn(4, 8, 6, 6, device=DEVICE)
    _need("cuda", x)
    model = perturb_bn(FusedPreActBottleneck(8, 16, stride=2, backend="cuda", memory="min")).to(DEVICE)
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.sum().backward()
    expected = eager_model(x)
    expected.sum().backward()
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), eager_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
    for b, c in zip(model.buffers(), eager_model.buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=1e-6)


@pytest.mark.full
@pytest.mark.parametrize("compiler", ["aot_eager", "inductor"])
def test_compiled_unit_still_saves_its_input_alone(compiler):
    """Under torch.compile the partitioner decides what the forward saves: the recompute must stay in
    the backward (measured: inductor's min-cut partitioner keeps it there)."""
    x = torch.randn(4, 16, 8, 8, device=DEVICE)
    _need("cuda", x)
    saved = {}
    for memory in MEMORY_MODES:
        unit = FusedPreActBottleneck(16, 16, backend="cuda", memory=memory).to(DEVICE)
        compiled = torch.compile(unit, fullgraph=True, backend=compiler)
        xi = x.clone().requires_grad_(True)
        seen = memory_bench.saved_storages(lambda: compiled(xi), list(unit.parameters()) + list(unit.buffers()),
                                           x.shape[0])
        saved[memory] = sorted(s.nbytes for s in seen.values() if s.activation)
    assert saved["min"] == [x.numel() * x.element_size()], saved
    assert saved["default"] == sorted([x.numel() * x.element_size()] + 2 * [x.numel() * x.element_size() // 4])


WORLD = 2


def _sync_unit():
    torch.manual_seed(0)
    unit = perturb_bn(FusedPreActBottleneck(8, 16, stride=2, backend="cuda")).double()
    x = torch.randn(4, 8, 9, 7, dtype=torch.float64) * 2 + 1
    dy = torch.randn(4, 16, 5, 4, dtype=torch.float64)
    return unit, x, dy


def _sync_step(unit, x, dy):
    x = x.clone().requires_grad_(True)
    y = unit(x)
    (y * dy).sum().backward()
    return y.detach(), x.grad, {n: p.grad for n, p in unit.named_parameters()}, unit.state_dict()


def _sync_worker(rank, init_file, out_file):
    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    unit, x, dy = _sync_unit()
    unit._set_memory("min")
    sync_batch_stats(unit)
    half = slice(2 * rank, 2 * rank + 2)
    torch.save(_sync_step(unit, x[half], dy[half]), f"{out_file}.{rank}")
    dist.destroy_process_group()


@pytest.mark.full     # the default run has it with the reference operators: tests/test_sync_bn.py
def test_synchronized_statistics_two_gloo_processes(tmp_path):
    """Two processes with half the batch each, memory="min" and synchronized statistics (the recompute
    needs no collective), equal one process with the whole batch in the default mode."""
    unit, x, dy = _sync_unit()
    _need("cuda", x)
    mp.spawn(_sync_worker, args=(str(tmp_path / "init"), str(tmp_path / "out")), nprocs=WORLD, join=True)
    y, dx, grads, state = _sync_step(unit, x, dy)
    parts = [torch.load(tmp_path / f"out.{r}") for r in range(WORLD)]
    assert_processes_match_one(parts, y, dx, grads, state)


def test_memory_reaches_every_fused_unit_and_is_not_state():
    model = models.cifar_resnet(8)
    state = copy.deepcopy(model.state_dict())
    convert_to_fused(model, "cuda", memory="min")
    units = [m for m in model.modules() if isinstance(m, _FusedUnitMixin)]
    assert units and all(u.memory == "min" for u in units)
    assert "memory=min" in repr(units[0])
    assert list(model.state_dict()) == list(state)
    convert_to_fused(model, "cuda")     # fused units already there take the new setting
    assert all(u.memory == "default" for u in units)
    assert copy.deepcopy(FusedPreActBlock(4, 4, memory="min")).memory == "min"

    from fused_preact.train.cli import parse_args
    from fused_preact.train.options import memory_mode
    assert memory_mode(parse_args(["--synthetic", "--memory", "min"])) == "min"
    assert memory_mode(parse_args(["--synthetic"])) == "default"


def _train_losses(tmp_path, memory, iters):
    from fused_preact.train import main
    _need("cuda", torch.randn(1, 16, 4, 4))
    metrics = main(["--synthetic", "--image-size", "8", "--batch-size", "4", "--synthetic-images", "8",
                    "--arch", "cifar_resnet8", "--iters", str(iters), "--warmup-iters", "0", "--print-freq", "1",
                    "--eval-batch-size", "4", "--eval-every", "1000", "--device", "cpu", "--no-progress",
                    "--backend", "cuda", "--memory", memory, "--out", str(tmp_path / memory)])
    assert metrics["memory"] == memory and metrics["units_fused"] == [3, 3]
    return [loss for _, loss in metrics["train_curve"]]


@pytest.mark.usefixtures("one_cpu_thread")
def test_trainer_runs_memory_min(tmp_path):
    losses = _train_losses(tmp_path, "min", 1)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses)).all()


@pytest.mark.full
@pytest.mark.usefixtures("one_cpu_thread")
def test_trainer_memory_min_follows_the_default_mode_exactly(tmp_path):
    """``--memory min`` reaches the fused units of the trainer's model; same kernels, same losses."""
    curves = {memory: _train_losses(tmp_path, memory, 3) for memory in MEMORY_MODES}
    assert len(curves["min"]) == 3 and curves["min"] == curves["default"]


def test_bad_memory_value_names_the_allowed_values(capsys):
    assert MEMORY_MODES == ("default", "min")
    for make in (lambda: FusedPreActBlock(4, 4, memory="low"), lambda: FusedPreActBottleneck(4, 4, memory="low"),
                 lambda: convert_to_fused(models.cifar_resnet(8), memory="low"), lambda: check_memory("low"),
                 lambda: FusedPreActBlock(4, 4)._set_memory(None)):
        with pytest.raises(ValueError, match=r"memory must be one of \('default', 'min'\), got"):
            make()
    from fused_preact.train.cli import parse_args
    with pytest.raises(SystemExit):
        parse_args(["--synthetic", "--memory", "low"])
    error = capsys.readouterr().err
    assert "--memory" in error and "'low'" in error and "min" in error
    with pytest.raises(SystemExit):
        parse_args(["--synthetic", "--memory", "min", "--backend", "eager"])
    assert "--memory min applies to the fused kernels" in capsys.readouterr().err
