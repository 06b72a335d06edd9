"""fused_preact.cuda_graph: the host-read guard, static buffers, device learning rates, and
(on a GPU) a captured step against the same step run eagerly."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fused_preact.cuda_graph import DeviceLR, GraphedStep, HostReadError, forbid_host_reads

@pytest.mark.parametrize("read", [
    lambda t: t.sum().item(),
    lambda t: bool(t.sum() > 0),
    lambda t: t.nonzero(),
    lambda t: t[t > 0],                       # boolean indexing: a data-dependent size
    lambda t: torch.equal(t, t),
    lambda t: t.unique(),
    lambda t: t.masked_fill(t > 0, 1.0)[t > 1],
], ids=["item", "bool", "nonzero", "mask-index", "equal", "unique", "masked"])
def test_host_reads_are_refused_on_the_cpu(read):
    t = torch.randn(5, 3)
    with pytest.raises(HostReadError, match="reads device data back to the host"):
        with forbid_host_reads():
            read(t)


def test_device_work_passes_the_guard():
    x, w = torch.randn(4, 3, 6, 6), torch.randn(5, 3, 3, 3, requires_grad=True)
    with forbid_host_reads():
        y = F.conv2d(torch.relu(F.batch_norm(x, None, None, training=True)), w, padding=1)
        y.square().mean().backward()
        wrong = (y.flatten(1).argmax(1) != torch.zeros(4, dtype=torch.long)).sum()
    assert w.grad is not None and wrong.dim() == 0


def _model():
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))


def _sgd_step(model, optimizer, lr):
    def step(x, y):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with lr.installed():
            optimizer.step()
        return loss.detach()
    return step


def _batches(n, device="cpu"):
    return [(torch.randn(4, 3, 7, 7, device=device).contiguous(memory_format=torch.channels_last),
             torch.randint(5, (4,), device=device)) for _ in range(n)]


def test_eager_mode_keeps_static_buffers_and_matches_the_plain_step():
    model = _model()
    reference = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4, fused=True)
    ref_optimizer = torch.optim.SGD(reference.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    lr = DeviceLR(optimizer)
    graphed = GraphedStep(_sgd_step(model, optimizer, lr), capture=False)
    pointers, outputs = None, set()
    for index, (x, y) in enumerate(_batches(5)):
        if index == 3:                                   # a new lr between calls: no rebuild
            for o in (optimizer, ref_optimizer):
                o.param_groups[0]["lr"] = 0.01
        lr.sync()
        loss = graphed(x, y)
        ref_loss = F.cross_entropy(reference(x), y)
        ref_optimizer.zero_grad(set_to_none=True)
        ref_loss.backward()
        ref_optimizer.step()
        torch.testing.assert_close(loss, ref_loss.detach(), rtol=1e-5, atol=1e-6)
        now = [t.data_ptr() for t in graphed.static_inputs]
        assert pointers is None or now == pointers
        pointers = now
        outputs.add(loss.data_ptr())
        assert graphed.static_inputs[0].is_contiguous(memory_format=torch.channels_last)
    assert len(outputs) == 1, "the static output is overwritten in place every call"
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)
    assert int(model[1].num_batches_tracked) == 5
    torch.testing.assert_close(model[1].running_var, reference[1].running_var)
    assert optimizer.param_groups[0]["lr"] == 0.01 and float(lr.tensors[0]) == pytest.approx(0.01)


def test_a_graphed_step_refuses_other_shapes_and_cpu_capture():
    graphed = GraphedStep(lambda x: x * 2, capture=False)
    graphed(torch.randn(3, 4))
    with pytest.raises(ValueError, match="same shapes every call"):
        graphed(torch.randn(2, 4))
    with pytest.raises(ValueError, match="CUDA graph captures CUDA work only"):
        GraphedStep(lambda x: x * 2, capture=True)(torch.randn(3))
    with pytest.raises(ValueError, match="warmup must be >= 1"):
        GraphedStep(lambda x: x, capture=True, warmup=0)


def test_device_lr_is_read_by_fused_sgd_without_a_host_read():
    p = nn.Parameter(torch.randn(6))
    optimizer = torch.optim.SGD([p], lr=0.5, momentum=0.9, fused=True)
    lr = DeviceLR(optimizer)
    p.grad = torch.randn(6)
    optimizer.step()                                     # creates the momentum buffer
    before, first_buffer = p.detach().clone(), optimizer.state[p]["momentum_buffer"].clone()
    optimizer.param_groups[0]["lr"] = 0.25
    lr.sync()
    with forbid_host_reads("the optimizer step"), lr.installed():
        assert optimizer.param_groups[0]["lr"] is lr.tensors[0]
        optimizer.step()
    assert optimizer.param_groups[0]["lr"] == 0.25       # the float is back
    torch.testing.assert_close(p.detach(), before - 0.25 * (0.9 * first_buffer + p.grad))


def test_foreach_sgd_with_a_tensor_lr_reads_it_back():
    """Why the graphed step runs SGD's fused variant: the foreach one calls .item() on a tensor lr."""
    p = nn.Parameter(torch.randn(6))
    optimizer = torch.optim.SGD([p], lr=torch.tensor(0.5), momentum=0.9, foreach=True)
    p.grad = torch.randn(6)
    optimizer.step()
    with pytest.raises(HostReadError):
        with forbid_host_reads():
            optimizer.step()


# -- on a GPU: real capture ----------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", [None, torch.bfloat16], ids=["fp32", "bf16"])
def test_captured_step_matches_the_eager_step_and_follows_lr_changes(amp):
    torch.backends.cudnn.benchmark = False
    model = _model().cuda()
    reference = copy.deepcopy(model)
    models = {"graph": model, "eager": reference}
    optimizers = {k: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9, fused=True) for k, m in models.items()}
    lrs = {k: DeviceLR(o) for k, o in optimizers.items()}

    def step_of(key):
        inner = _sgd_step(models[key], optimizers[key], lrs[key])
        if amp is None:
            return inner
        def step(x, y):
            with torch.autocast("cuda", dtype=amp, cache_enabled=False):
                return inner(x, y)
        return step

    graphed = GraphedStep(step_of("graph"), capture=True, warmup=2)
    eager = GraphedStep(step_of("eager"), capture=False)
    try:
        for index, (x, y) in enumerate(_batches(8, "cuda")):
            if index == 3:                               # captured at call 2: from here on only replays,
                torch.cuda.set_sync_debug_mode("error")  # and a sync anywhere in the loop fails
            if index == 5:
                for o in optimizers.values():
                    o.param_groups[0]["lr"] = 0.02
            for g, key in ((graphed, "graph"), (eager, "eager")):
                lrs[key].sync()
                g(x, y)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert graphed.captured and graphed.calls == 8
    torch.testing.assert_close(graphed.static_outputs[0], eager.static_outputs[0], rtol=2e-3, atol=2e-3)
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p, q, rtol=2e-3, atol=2e-4)
    assert int(model[1].num_batches_tracked) == 8
    torch.testing.assert_close(model[1].running_mean, reference[1].running_mean, rtol=1e-3, atol=1e-4)
