"""Measurements: step times, peak memory, saved-activation bytes, copy bandwidth, matrix rate.

Every figure comes with the raw samples it was computed from, so a report can show
(and a test can check) that nothing is made up.

- ``time_call``: warm-up calls, then one sample per call; on a GPU each call is timed
  with CUDA events (device time, no host sync in between), on the CPU with
  ``time.perf_counter``.
- ``saved_activation_bytes``: the bytes autograd keeps for backward during one
  forward, counted through ``torch.autograd.graph.saved_tensors_hooks`` once per
  unique storage; parameters and buffers are not activations and are left out.
- ``peak_memory_bytes``: ``torch.cuda.max_memory_allocated`` over one call (GPU only).
- ``device_rates``: copy bandwidth (bytes read + written by a large device-to-device
  copy) and the rate of a large matrix product per dtype, the two rates of a floor.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional

import torch


@dataclass
class Timing:
    """Raw per-call samples (milliseconds) and how they were taken."""
    samples_ms: list[float]
    warmup: int
    method: str

    @property
    def median_ms(self) -> float:
        return statistics.median(self.samples_ms)

    def as_dict(self) -> dict:
        return {"samples_ms": self.samples_ms, "warmup": self.warmup, "timer": self.method,
                "median_ms": self.median_ms}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], object], device: torch.device, *, warmup: int, repeats: int) -> Timing:
    """Median-ready samples of ``fn()``: ``warmup`` untimed calls, then ``repeats`` timed ones."""
    if warmup < 0:
        raise ValueError(f"warmup must be >= 0, got {warmup}")
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _synchronize(device)
    if device.type == "cuda":
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(repeats)]
        for start, end in events:
            start.record()
            fn()
            end.record()
        torch.cuda.synchronize(device)
        return Timing([start.elapsed_time(end) for start, end in events], warmup, "cuda events")
    samples = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return Timing(samples, warmup, "perf_counter")


def peak_memory_bytes(fn: Callable[[], object], device: torch.device) -> Optional[int]:
    """Peak allocated device memory during one call of ``fn`` (None off a GPU: not measured)."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return int(torch.cuda.max_memory_allocated(device))


@dataclass
class SavedBytes:
    """What autograd saved for backward: total bytes of unique storages, and how many."""
    bytes: int
    storages: int
    tensors: int


def _storage_key(t: torch.Tensor):
    storage = t.untyped_storage()
    return (t.device.type, t.device.index, storage.data_ptr(), storage.nbytes())


def saved_activation_bytes(forward: Callable[[], object], exclude: Iterable[torch.Tensor] = ()) -> SavedBytes:
    """Run ``forward()`` once and count the storages autograd saves for backward.

    A storage is counted once however many saved tensors view it, at its full size.
    Tensors whose storage is one of ``exclude`` (parameters, buffers) are not counted.
    """
    excluded = {_storage_key(t) for t in exclude}
    seen: dict = {}
    count = 0

    def pack(t: torch.Tensor):
        nonlocal count
        count += 1
        try:
            key = _storage_key(t)
        except (RuntimeError, NotImplementedError):   # no storage (e.g. a tensor subclass)
            key = None
        if key is not None and key not in excluded:
            seen[key] = key[3]
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return SavedBytes(sum(seen.values()), len(seen), count)


@dataclass
class DeviceRates:
    """The two rates of a floor, measured in this run."""
    copy_bytes_per_s: float
    copy: dict
    matrix_flops_per_s: dict[str, float] = field(default_factory=dict)
    matrix: dict[str, dict] = field(default_factory=dict)

    def matrix_rate(self, dtype: torch.dtype) -> Optional[float]:
        return self.matrix_flops_per_s.get(str(dtype).replace("torch.", ""))

    def as_dict(self) -> dict:
        return {"copy_bytes_per_s": self.copy_bytes_per_s, "copy": self.copy,
                "matrix_flops_per_s": self.matrix_flops_per_s, "matrix": self.matrix}


def copy_bandwidth(device: torch.device, nbytes: int, *, warmup: int = 3, repeats: int = 10) -> tuple[float, dict]:
    """Bytes read + written per second by ``dst.copy_(src)`` of ``nbytes`` bytes."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    timing = time_call(lambda: dst.copy_(src), device, warmup=warmup, repeats=repeats)
    rate = 2 * nbytes / (timing.median_ms * 1e-3)
    return rate, {"bytes": nbytes, **timing.as_dict()}


def matrix_rate(device: torch.device, dtype: torch.dtype, size: int, *, warmup: int = 3,
                repeats: int = 10) -> tuple[float, dict]:
    """FLOP/s of a ``size`` x ``size`` x ``size`` matrix product in ``dtype`` (2 FLOPs per multiply-add)."""
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    out = torch.empty(size, size, device=device, dtype=dtype)
    # fp32 products run as the convolutions do: TF32 exactly when cuDNN convs may use it
    tf32 = dtype == torch.float32 and device.type == "cuda" and torch.backends.cudnn.allow_tf32
    saved = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        timing = time_call(lambda: torch.mm(a, b, out=out), device, warmup=warmup, repeats=repeats)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = saved
    rate = 2 * size ** 3 / (timing.median_ms * 1e-3)
    return rate, {"size": size, "tf32": tf32, **timing.as_dict()}


def device_rates(device: torch.device, dtypes: Iterable[torch.dtype]) -> DeviceRates:
    """Copy bandwidth and the matrix rate of bf16 and of every dtype in ``dtypes``."""
    device = torch.device(device)
    on_gpu = device.type == "cuda"
    rate, copy = copy_bandwidth(device, (1 << 30) if on_gpu else (32 << 20))
    rates = DeviceRates(rate, copy)
    for dtype in dict.fromkeys([torch.bfloat16, *dtypes]):
        size = 8192 if on_gpu else (256 if dtype != torch.float32 else 512)   # CPU bf16 products are slow
        flops, info = matrix_rate(device, dtype, size, repeats=10 if on_gpu else 3)
        key = str(dtype).replace("torch.", "")
        rates.matrix_flops_per_s[key] = flops
        rates.matrix[key] = info
    return rates
