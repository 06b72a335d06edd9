"""Per-operator times of the fused backends, and how close each comes to its floor.

One step of a fused contender runs twice: once under a ``TorchDispatchMode`` that
records every call of a fused operator (``torch.ops.fused_preact_triton.*``,
``torch.ops.fused_preact.*``) with its arguments and outputs, which give the call's
bytes and FLOPs (``floors.operator_traffic``); then ``repeats`` times under
``torch.profiler``, which gives each call's device time (the kernels it launched;
CPU time on a CPU). Calls are matched by operator name and argument shapes, and
each signature's time is the median over its calls.
"""
from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from . import floors

FUSED_NAMESPACES = ("fused_preact_triton", "fused_preact")


@dataclass
class OperatorCall:
    namespace: str
    op: str
    shapes: tuple                 # shapes of the tensor arguments, None for the others
    traffic: floors.Traffic


def _shapes(args: Sequence) -> tuple:
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else None for a in args)


class OperatorRecorder(TorchDispatchMode):
    """Records calls of the operators in ``namespaces`` whose names ``floors`` knows."""

    def __init__(self, namespaces: Sequence[str] = FUSED_NAMESPACES):
        super().__init__()
        self.namespaces = tuple(namespaces)
        self.calls: list[OperatorCall] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        namespace, op = func.namespace, func._schema.name.split("::")[-1]
        if namespace in self.namespaces and op in floors.OPERATORS:
            self.calls.append(OperatorCall(namespace, op, _shapes(args),
                                           floors.operator_traffic(op, args, out)))
        return out


def _event_time_us(event) -> float:
    """Device time of a profiled operator and its kernels (CPU time when nothing ran on a device)."""
    attribute = "device_time_total" if hasattr(event, "device_time_total") else "cuda_time_total"  # torch < 2.4
    value = getattr(event, attribute, 0) or 0
    return float(value) if value > 0 else float(event.cpu_time_total)


def _event_shapes(event) -> tuple:
    return tuple(tuple(s) if s else None for s in (event.input_shapes or ()))


def _same_shapes(recorded: tuple, profiled: tuple) -> bool:
    """The profiler writes [] for non-tensor arguments and for 0-d tensors alike; compare the
    shapes of the tensors with at least one dimension."""
    return [s for s in recorded if s] == [s for s in profiled if s]


def profile_operators(step: Callable[[], object], device: torch.device, rates, *, repeats: int,
                      namespaces: Sequence[str] = FUSED_NAMESPACES) -> list[dict]:
    """For each distinct fused-operator call of ``step``: its time, bytes, FLOPs, floor and fraction."""
    device = torch.device(device)
    recorder = OperatorRecorder(namespaces)
    with recorder:
        step()
    if not recorder.calls:
        return []
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize(device)
    with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
        for _ in range(repeats):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    times_by_name = defaultdict(list)           # "ns::op" -> [(shapes, us)]
    for event in prof.events():
        if "::" in event.name and event.name.split("::")[0] in namespaces:
            times_by_name[event.name].append((_event_shapes(event), _event_time_us(event)))

    rows: dict[tuple, dict] = {}
    for call in recorder.calls:
        key = (call.namespace, call.op, call.shapes)
        if key in rows:
            rows[key]["calls_per_step"] += 1
            continue
        samples = [us / 1e3 for shapes, us in times_by_name.get(f"{call.namespace}::{call.op}", [])
                   if _same_shapes(call.shapes, shapes)]
        row = {"operator": f"{call.namespace}::{call.op}", "shapes": [list(s) if s else None for s in call.shapes],
               "dtype": str(call.traffic.dtype).replace("torch.", ""), "calls_per_step": 1,
               "bytes": call.traffic.bytes, "flops": call.traffic.flops, "samples_ms": samples}
        floor_s = floors.floor_seconds(call.traffic, rates.copy_bytes_per_s, rates.matrix_rate(call.traffic.dtype))
        row["floor_ms"] = floor_s * 1e3
        if samples:
            row["median_ms"] = statistics.median(samples)
            row["fraction_of_floor"] = floors.fraction_of_floor(floor_s, row["median_ms"] * 1e-3)
        else:
            row["reason"] = "the profiler recorded no time for this call"
        rows[key] = row
    return list(rows.values())
