"""Whole-step CUDA graphs: a training (or inference) step captured once and replayed.

A CIFAR-sized step is a few hundred kernels of 1-4 us each, so on a GPU its time is
mostly launch overhead; replaying one captured graph removes it (this is what
``torch.compile(mode="max-autotune")`` does too). ``GraphedStep`` follows the recipe
of PyTorch's CUDA-graph notes (whole-network capture):

- the step reads its inputs from **static buffers** that each call copies the new
  batch into, and returns **static outputs** that each call overwrites;
- the first ``warmup`` calls run eagerly on a side stream (they are real steps: lazy
  state such as momentum buffers, cuDNN plans and Triton compiles happen there);
- the next call captures the step into a ``torch.cuda.CUDAGraph`` and replays it, so
  every call is exactly one step; later calls only copy and replay.

What runs inside the graph must not read anything back to the host (``.item()``,
``nonzero``, a bool of a tensor...): ``forbid_host_reads`` finds such reads on any
device, the CPU included, so the step's code path is checked without a GPU.
Hyper-parameters that change during training live on the device: ``DeviceLR``
mirrors each optimizer group's learning rate in a 0-dim tensor that the captured
optimizer reads and that is refilled from the (host) schedule before each replay,
so a new learning rate needs no re-capture.

With ``capture=False`` (a CPU, or to compare) the same step runs eagerly on the same
static buffers, and the outputs are copied into static output tensors, so callers
see the same contract either way.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# Operators whose result the host must wait for: a value read back (item, bool, equal),
# or an output size that depends on the data (nonzero, masked_select, unique...).
HOST_READ_OPS = frozenset({
    aten._local_scalar_dense, aten.is_nonzero, aten.equal, aten.nonzero, aten.masked_select,
    aten.unique_consecutive, aten._unique, aten._unique2, aten.unique_dim, aten.repeat_interleave,
})


class HostReadError(RuntimeError):
    """Something inside a step to be captured reads a tensor back to the host."""


class forbid_host_reads(TorchDispatchMode):
    """While active, an operator that reads a tensor back to the host raises ``HostReadError``.

    Also refused: a copy between devices (``.cpu()``, ``.to("cuda")`` of a host tensor),
    indexing by a boolean mask and ``repeat_interleave`` without ``output_size``. Works on
    the CPU, where nothing would sync, so a step meant for a CUDA graph can be checked
    without a GPU. Not seen: reads that bypass the dispatcher on a CPU tensor
    (``tolist()``, ``numpy()``; on a GPU they are copies to the host and caught), and
    what a custom operator's C++/CUDA kernel does inside (the mode sees the operator).
    """

    def __init__(self, what: str = "the step"):
        super().__init__()
        self.what = what

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        packet = func.overloadpacket
        refused = packet in HOST_READ_OPS
        if packet is aten.repeat_interleave and kwargs.get("output_size") is not None:
            refused = False
        if packet in (aten._to_copy, aten.copy_):
            refused = _crosses_devices(func, args, kwargs)
        if packet in (aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_):
            refused = _has_mask_index(args)
        if refused:
            raise HostReadError(f"{func} inside {self.what} reads device data back to the host (or waits "
                                f"for it); a CUDA graph cannot capture that")
        return func(*args, **kwargs)


def _has_mask_index(args) -> bool:
    """A boolean mask as an index: the selected count is data-dependent (a nonzero inside)."""
    indices = args[1] if len(args) > 1 else ()
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _crosses_devices(func, args, kwargs) -> bool:
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if func.overloadpacket is aten._to_copy:
        target = kwargs.get("device")
        return target is not None and tensors and torch.device(target) != tensors[0].device
    return len(tensors) >= 2 and tensors[0].device != tensors[1].device


class DeviceLR:
    """Each param group's learning rate mirrored in a 0-dim float32 tensor on the device,
    for an optimizer step that is captured once and must see later learning rates.

    The groups keep their Python floats (schedulers, checkpoints and logs stay as they
    are); ``sync()`` writes them into the tensors (a fill, no read back), and inside
    ``installed()`` the groups hold the tensors, so an optimizer that accepts a tensor
    lr (``SGD(fused=True)``, or ``capturable=True`` for Adam and friends) reads device
    memory. Capture the step inside ``installed()`` and call ``sync()`` before each replay.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self.tensors = []
        for index, group in enumerate(optimizer.param_groups):
            if not group["params"]:
                raise ValueError(f"optimizer param group {index} has no parameters")
            self.tensors.append(torch.tensor(float(group["lr"]), dtype=torch.float32,
                                             device=group["params"][0].device))

    def sync(self) -> None:
        """Copy each group's current (host) learning rate into its device tensor."""
        for group, tensor in zip(self.optimizer.param_groups, self.tensors):
            tensor.fill_(float(group["lr"]))

    @contextlib.contextmanager
    def installed(self):
        """The groups' ``lr`` are the device tensors inside, their floats again after."""
        groups = self.optimizer.param_groups
        saved = [group["lr"] for group in groups]
        for group, tensor in zip(groups, self.tensors):
            group["lr"] = tensor
        try:
            yield self.tensors
        finally:
            for group, lr in zip(groups, saved):
                group["lr"] = lr


class GraphedStep:
    """``step(*static_inputs) -> tensor or tuple of tensors``, run once per call on static buffers.

    ``__call__(*inputs)`` copies ``inputs`` into the static buffers (made like the first
    call's inputs: same shape, dtype, device and memory format; later calls must match),
    runs one step and returns the static outputs, which the next call overwrites: clone
    what you keep. ``capture=True`` needs CUDA inputs: ``warmup`` eager calls on a side
    stream, then capture + replay. ``capture=False`` runs the step eagerly every call.
    """

    def __init__(self, step: Callable[..., object], *, capture: bool, warmup: int = 3,
                 pool: Optional[tuple] = None):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (lazy state must exist before capture), got {warmup}")
        self.step, self.capture, self.warmup, self.pool = step, capture, warmup, pool
        self.calls = 0
        self.graph: Optional[torch.cuda.CUDAGraph] = None
        self.static_inputs: Optional[list[torch.Tensor]] = None
        self.static_outputs: Optional[tuple[torch.Tensor, ...]] = None
        self._single = False
        self._side_stream = None

    @property
    def captured(self) -> bool:
        return self.graph is not None

    def __call__(self, *inputs: torch.Tensor):
        self._load(inputs)
        if not self.capture:
            self._store(self.step(*self.static_inputs))
        elif self.calls < self.warmup:
            self._warm_up()
        else:
            if self.graph is None:
                self._capture()
            self.graph.replay()
        self.calls += 1
        return self.static_outputs[0] if self._single else self.static_outputs

    # -- pieces -----------------------------------------------------------------------
    def _load(self, inputs: Sequence[torch.Tensor]) -> None:
        if self.static_inputs is None:
            if self.capture and any(x.device.type != "cuda" for x in inputs):
                devices = sorted({str(x.device) for x in inputs})
                raise ValueError(f"a CUDA graph captures CUDA work only; the inputs are on {', '.join(devices)}")
            self.static_inputs = [torch.empty_like(x) for x in inputs]   # keeps the memory format
        if len(inputs) != len(self.static_inputs):
            raise ValueError(f"the step takes {len(self.static_inputs)} inputs, got {len(inputs)}")
        for index, (x, static) in enumerate(zip(inputs, self.static_inputs)):
            if x.shape != static.shape or x.dtype != static.dtype or x.device != static.device:
                raise ValueError(f"input {index} is {tuple(x.shape)} {x.dtype} on {x.device}, but the step's "
                                 f"static buffer is {tuple(static.shape)} {static.dtype} on {static.device}: "
                                 f"a graphed step needs the same shapes every call")
            static.copy_(x, non_blocking=True)

    def _store(self, outputs) -> None:
        self._single = isinstance(outputs, torch.Tensor)
        outputs = (outputs,) if self._single else tuple(outputs)
        if self.static_outputs is None:
            self.static_outputs = tuple(torch.empty_like(t) for t in outputs)
        for static, t in zip(self.static_outputs, outputs):
            static.copy_(t)

    def _warm_up(self) -> None:
        if self._side_stream is None:
            self._side_stream = torch.cuda.Stream()
        side, main = self._side_stream, torch.cuda.current_stream()
        side.wait_stream(main)
        with torch.cuda.stream(side):
            self._store(self.step(*self.static_inputs))
        main.wait_stream(side)

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            outputs = self.step(*self.static_inputs)
        self._single = isinstance(outputs, torch.Tensor)
        self.static_outputs = (outputs,) if self._single else tuple(outputs)
        self.graph = graph
