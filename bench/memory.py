"""Saved activations of one training step: eager, eager + checkpoint per unit, fused, fused memory="min".

    python bench/memory.py                                   # every model, fp32 and bf16, this machine's device
    python bench/memory.py --models cifar_resnet110,cifar_resnet1001 --dtypes fp32 --batch 2
    python bench/memory.py --device cuda --batch 64 --max-batch-seconds 120   # also peak, largest batch, step time

Contenders, the same weights for all four (one model per architecture, copied):

| contender | what runs |
|---|---|
| ``eager`` | the reference model (``fused_preact.models``) |
| ``eager+checkpoint`` | the same, each residual unit under ``torch.utils.checkpoint`` (re-entrant variant, whose saved inputs pass through ``saved_tensors_hooks``; the non-re-entrant one keeps the same inputs out of their sight) |
| ``fused`` | ``convert_to_fused(model, backend)`` |
| ``fused-min`` | ``convert_to_fused(model, backend, memory="min")`` |

Saved-activation bytes: one forward in training mode under ``torch.autograd.graph.saved_tensors_hooks``,
each storage counted once at its full size however many saved tensors view it (``bench/measure.py``),
parameters and buffers left out. ``saved_bytes`` (and every ratio) counts the activations: storages
viewed by a saved 4-D tensor whose first dim is the batch; ``saved_other_bytes`` the rest (per-channel
statistics, and in eager under autocast the bf16 weight copies its convolutions save, which do not grow
with the batch). What autograd holds after the forward is what the backward needs,
so this is the activation memory of a training step, whatever the device: on the CPU the fused units run
the extension's C++ CPU kernels (``--backend cuda``), which save what its CUDA kernels save. Activation
bytes scale linearly with the batch (the per-channel statistics, a few KB, do not), so a small batch
gives the ratios of any batch; ImageNet nets run at ``--imagenet-size`` (default 64 on the CPU: every
activation scales with the image area, so the ratios hold at 224). Under ``--dtypes bf16`` everything
runs under ``torch.autocast`` (bf16 convolutions, BN statistics in fp32).

On a GPU (``--device cuda``) also, per contender: the peak memory of one training step (forward and
backward, ``torch.cuda.max_memory_allocated``, the model's parameters and gradients included), the
largest batch whose step fits (doubling, then bisection to within 2%, at most ``--max-batch-seconds``
per contender; ``exact: false`` when time ran out), and the median step time at ``--batch`` (the
recompute's cost: ``fused-min`` against ``fused``, ``step_time_vs_fused``); ``--time`` measures the step
time on the CPU too (the C++ CPU kernels: says nothing about a GPU).

Outputs in ``--out`` (default ``bench/results/memory-<device>-<date>/``): ``memory.json`` (every figure
with the batch, image size, device, versions and commit) and ``memory.png`` (saved bytes per image
against depth, CIFAR and ImageNet panels, one line per contender and dtype). Nothing here is a test.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import logging
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

if __package__ in (None, ""):            # run as a script: make `bench` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from bench import environment, measure
from fused_preact import convert_to_fused, dispatch
from fused_preact.models import create_model
from fused_preact.train import records
from fused_preact.units import ResidualUnit

CONTENDERS = ("eager", "eager+checkpoint", "fused", "fused-min")
ARCHS = ("cifar_resnet110", "cifar_resnet164", "cifar_resnet1001", "imagenet_resnet50", "imagenet_resnet200")
DTYPES = {"fp32": None, "bf16": torch.bfloat16}
JSON_NAME, CHART_NAME = "memory.json", "memory.png"


# -- the contenders ----------------------------------------------------------------------------
class CheckpointedUnit(nn.Module):
    """A residual unit run under ``torch.utils.checkpoint``: only its input is saved; the backward
    runs its forward again (BN in training mode: the running statistics are updated a second time)."""

    def __init__(self, unit: nn.Module, use_reentrant: bool = True):
        super().__init__()
        self.unit = unit
        self.use_reentrant = use_reentrant

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return checkpoint(self.unit, x, use_reentrant=self.use_reentrant)


def checkpoint_units(model: nn.Module, use_reentrant: bool = True) -> nn.Module:
    """``model`` with each of its residual units wrapped in ``CheckpointedUnit``, in place."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, ResidualUnit):
                setattr(parent, name, CheckpointedUnit(child, use_reentrant))
    return model


def build(contender: str, model: nn.Module, backend: str) -> nn.Module:
    """A copy of eager ``model`` as ``contender`` runs it."""
    model = copy.deepcopy(model)
    if contender == "eager":
        return model
    if contender == "eager+checkpoint":
        return checkpoint_units(model)
    memory = "min" if contender == "fused-min" else "default"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # a unit left eager would make the figure a lie
        return convert_to_fused(model, backend, memory=memory)


def image_size(arch: str, imagenet_size: int) -> int:
    return imagenet_size if arch.startswith("imagenet") else 32


def depth_of(arch: str) -> int:
    return int("".join(ch for ch in arch.split("resnet", 1)[1] if ch.isdigit()))


# -- measurements ----------------------------------------------------------------------------
def state_tensors(model: nn.Module) -> list[torch.Tensor]:
    return list(model.parameters()) + list(model.buffers())


@dataclass
class SavedStorage:
    """One storage autograd saved: its full size, and whether a batch-shaped tensor views it."""
    nbytes: int
    activation: bool      # viewed by a 4-D tensor whose first dim is the batch
    tensors: int = 0


def saved_storages(forward: Callable[[], object], exclude: list[torch.Tensor], batch: int) -> dict:
    """Run ``forward()`` once and record every storage autograd saves (key: device, data pointer, size;
    ``measure._storage_key``), counted once however many saved tensors view it. Storages of ``exclude``
    (parameters, buffers) are left out. A storage is an *activation* when a saved 4-D tensor of first dim
    ``batch`` (NCHW or NHWC) views it; the others are per-channel statistics and, in eager under
    autocast, the low-precision weight copies the convolutions save (batch-independent)."""
    excluded = {measure._storage_key(t) for t in exclude}
    seen: dict = {}

    def pack(t: torch.Tensor):
        key = measure._storage_key(t)
        if key not in excluded:
            entry = seen.setdefault(key, SavedStorage(key[3], False))
            entry.activation |= t.dim() == 4 and t.shape[0] == batch
            entry.tensors += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return seen


def saved_bytes(model: nn.Module, x: torch.Tensor, amp: Optional[torch.dtype]) -> dict:
    """Bytes autograd saves in one training forward of ``model`` on ``x``: activations (the figure
    that scales with the batch) and the rest."""
    def forward():
        with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
            return model(x)
    seen = saved_storages(forward, state_tensors(model), x.shape[0])
    activations = sum(s.nbytes for s in seen.values() if s.activation)
    return {"saved_bytes": activations, "saved_other_bytes": sum(s.nbytes for s in seen.values()) - activations,
            "saved_storages": len(seen), "saved_tensors": sum(s.tensors for s in seen.values())}


def training_step(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, amp: Optional[torch.dtype]) -> None:
    """Forward, loss, backward into every parameter (no optimizer: its state is not activation memory)."""
    model.zero_grad(set_to_none=False)
    with torch.autocast(x.device.type, dtype=amp or torch.float32, enabled=amp is not None):
        logits = model(x)
    F.cross_entropy(logits.float(), labels).backward()


def batch_of(arch: str, batch: int, size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    classes = 1000 if arch.startswith("imagenet") else 10
    x = torch.randn(batch, 3, size, size, device=device)
    return x, torch.randint(classes, (batch,), device=device)


def _fits(step: Callable[[int], None], batch: int) -> bool:
    try:
        step(batch)
        torch.cuda.synchronize()
        fits = True
    except torch.cuda.OutOfMemoryError:
        fits = False
    # here the exception and the frames it held (with the failed step's tensors) are gone
    gc.collect()
    torch.cuda.empty_cache()
    return fits


def largest_batch(step: Callable[[int], None], start: int, seconds: float) -> dict:
    """The largest batch whose ``step(batch)`` runs without a CUDA out-of-memory error: doubling from
    ``start``, then bisection until the gap is under 2%, starting no trial after ``seconds``."""
    deadline = time.monotonic() + seconds
    fits, fails, trial, trials = 0, None, max(1, start), 0
    while time.monotonic() < deadline:
        trials += 1
        if _fits(step, trial):
            fits = trial
        else:
            fails = trial
        if fails is None:
            trial = 2 * fits
        elif fails - fits <= max(1, fits // 50):
            break
        else:
            trial = (fits + fails) // 2
    exact = fails is not None and fails - fits <= max(1, fits // 50)
    return {"largest_batch": fits, "first_failing_batch": fails, "exact": exact, "trials": trials,
            "seconds_limit": seconds}


def gpu_figures(model: nn.Module, arch: str, batch: int, size: int, amp: Optional[torch.dtype],
                device: torch.device, max_batch_seconds: float, repeats: int) -> dict:
    """Peak memory and median time of one training step at ``batch``, and the largest batch that fits."""
    x, labels = batch_of(arch, batch, size, device)
    training_step(model, x, labels, amp)    # warm-up: kernels chosen, gradients allocated
    peak = measure.peak_memory_bytes(lambda: training_step(model, x, labels, amp), device)
    timing = measure.time_call(lambda: training_step(model, x, labels, amp), device, warmup=1, repeats=repeats)
    del x, labels

    def step(b: int) -> None:
        xb, lb = batch_of(arch, b, size, device)
        training_step(model, xb, lb, amp)
    figures = {"peak_step_bytes": peak, "step_time": timing.as_dict(),
               "images_per_s": batch / (timing.median_ms / 1e3)}
    if max_batch_seconds > 0:
        figures["largest_batch"] = largest_batch(step, batch, max_batch_seconds)
    return figures


def step_time(model: nn.Module, arch: str, batch: int, size: int, amp: Optional[torch.dtype],
              device: torch.device, repeats: int) -> dict:
    """Median time of one training step at ``batch`` (``--time`` on the CPU)."""
    x, labels = batch_of(arch, batch, size, device)
    return measure.time_call(lambda: training_step(model, x, labels, amp), device, warmup=1,
                             repeats=repeats).as_dict()


def measure_arch(arch: str, args, device: torch.device) -> list[dict]:
    """Every contender and dtype of one architecture (one set of weights, copied)."""
    torch.manual_seed(0)
    reference = create_model(arch).to(device).train()
    size = image_size(arch, args.imagenet_size)
    entries = []
    for dtype_name in args.dtypes:
        amp = DTYPES[dtype_name]
        torch.manual_seed(1)
        x, _ = batch_of(arch, args.batch, size, device)
        eager_bytes = None
        for contender in args.contenders:
            model = build(contender, reference, args.backend)
            started = time.perf_counter()
            saved = saved_bytes(model, x, amp)
            entry = {"arch": arch, "depth": depth_of(arch), "dtype": dtype_name, "contender": contender,
                     "batch": args.batch, "image_size": size, **saved,
                     "saved_bytes_per_image": saved["saved_bytes"] / args.batch,
                     "forward_seconds": round(time.perf_counter() - started, 3)}
            if contender == "eager":
                eager_bytes = saved["saved_bytes"]
            if eager_bytes:
                entry["ratio_vs_eager"] = saved["saved_bytes"] / eager_bytes
            if device.type == "cuda":
                entry.update(gpu_figures(model, arch, args.batch, size, amp, device, args.max_batch_seconds,
                                         args.repeats))
            elif args.time:
                entry["step_time"] = step_time(model, arch, args.batch, size, amp, device, args.repeats)
            entries.append(entry)
            print(one_line(entry), flush=True)
            del model
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
    by_key = {(e["dtype"], e["contender"]): e for e in entries}
    for e in entries:   # the recompute's time cost, on a GPU
        default = by_key.get((e["dtype"], "fused"))
        if e["contender"] == "fused-min" and default and "step_time" in e:
            e["step_time_vs_fused"] = e["step_time"]["median_ms"] / default["step_time"]["median_ms"]
    return entries


def one_line(e: dict) -> str:
    line = (f"{e['arch']:<20}{e['dtype']:<6}{e['contender']:<18}{e['saved_bytes'] / 2**20:>10.2f} MiB"
            f"{e.get('ratio_vs_eager', float('nan')):>8.3f}x eager")
    if "peak_step_bytes" in e:
        line += f"  peak {e['peak_step_bytes'] / 2**30:.2f} GiB"
    if "step_time" in e:
        line += f"  step {e['step_time']['median_ms']:.1f} ms"
    if "largest_batch" in e:
        line += f", largest batch {e['largest_batch']['largest_batch']}"
    return line


# -- outputs ---------------------------------------------------------------------------------
def write_png(run: dict, path: Path) -> Path:
    """Saved bytes per image against depth: CIFAR and ImageNet panels, a line per contender and dtype."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    families = [("cifar", "CIFAR (32 px)"), ("imagenet", f"ImageNet ({run['imagenet_size']} px)")]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), squeeze=False)
    styles = {"fp32": "-", "bf16": "--"}
    # a color and marker per contender, a line style per dtype (eager+checkpoint and fused-min save the
    # same bytes: the cross shows through the circle)
    looks = {"eager": ("tab:blue", "o", 6), "eager+checkpoint": ("tab:green", "x", 9),
             "fused": ("tab:orange", "s", 6), "fused-min": ("tab:red", "o", 6)}
    for ax, (family, title) in zip(axes[0], families):
        entries = [e for e in run["results"] if e["arch"].startswith(family)]
        for contender in CONTENDERS:
            color, marker, size = looks[contender]
            for dtype in DTYPES:
                points = sorted((e["depth"], e["saved_bytes_per_image"] / 2**20) for e in entries
                                if e["contender"] == contender and e["dtype"] == dtype)
                if points:
                    ax.plot(*zip(*points), styles[dtype], color=color, marker=marker, markersize=size,
                            fillstyle="none" if contender == "fused-min" else "full", label=f"{contender} {dtype}")
        ax.set_xlabel("depth (layers)")
        ax.set_ylabel("saved activations per image (MiB)")
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
        if entries:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("fused-preact: activation bytes saved for the backward, one training step")
    fig.text(0.01, 0.005, environment.one_line(run["info"]) + f" | batch {run['batch']}", fontsize=7, va="bottom")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=110, metadata={"Source": run["info"]["git_commit"]})
    plt.close(fig)
    return path


def ratio_table(results: list[dict]) -> str:
    """Markdown: saved bytes relative to eager, one row per model and dtype (as docs/memory.md shows it)."""
    rows = ["| model | dtype | eager MiB/image | " + " | ".join(f"{c} / eager" for c in CONTENDERS[1:]) + " |",
            "|---|---|---|" + "---|" * (len(CONTENDERS) - 1)]
    keys = dict.fromkeys((e["arch"], e["dtype"]) for e in results)
    by = {(e["arch"], e["dtype"], e["contender"]): e for e in results}
    for arch, dtype in keys:
        eager = by.get((arch, dtype, "eager"))
        cells = [f"{by[(arch, dtype, c)]['ratio_vs_eager']:.3f}" if (arch, dtype, c) in by and eager else "-"
                 for c in CONTENDERS[1:]]
        mib = f"{eager['saved_bytes_per_image'] / 2**20:.2f}" if eager else "-"
        rows.append(f"| {arch} | {dtype} | {mib} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(ARCHS), help="comma-separated fused_preact.models presets")
    p.add_argument("--dtypes", default="fp32,bf16", help="fp32, bf16 (autocast)")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    p.add_argument("--backend", default="cuda", choices=("cuda", "triton"),
                   help="fused backend (on the CPU: 'cuda' runs the extension's C++ CPU kernels)")
    p.add_argument("--batch", type=int, default=None, help="batch (default: 2 on the CPU, 64 on a GPU)")
    p.add_argument("--imagenet-size", type=int, default=None, help="ImageNet image side (default 64 CPU, 224 GPU)")
    p.add_argument("--max-batch-seconds", type=float, default=60.0,
                   help="GPU: time for the largest-batch search per contender and dtype (0: no search)")
    p.add_argument("--repeats", type=int, default=5, help="timed steps per contender")
    p.add_argument("--time", action="store_true",
                   help="CPU: also the median training-step time per contender (always measured on a GPU)")
    p.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    p.add_argument("--out", default=None, help="output folder")
    args = p.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.contenders = [c for c in args.contenders.split(",") if c]
    for name, values, allowed in (("--models", args.models, None), ("--dtypes", args.dtypes, DTYPES),
                                  ("--contenders", args.contenders, CONTENDERS)):
        for value in values:
            if allowed is not None and value not in allowed:
                p.error(f"{name}: {value!r} is not one of {tuple(allowed)}")
    if "eager" not in args.contenders:
        args.contenders.insert(0, "eager")    # the baseline of every ratio
    args.contenders.sort(key=CONTENDERS.index)
    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    gpu = args.device.type == "cuda"
    args.batch = args.batch or (64 if gpu else 2)
    args.imagenet_size = args.imagenet_size or (224 if gpu else 64)
    if args.batch < 1 or args.imagenet_size < 32:
        p.error("--batch must be >= 1 and --imagenet-size >= 32")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    probe = torch.empty(1, 16, 8, 8, device=args.device)
    reason = dispatch.unavailable_reason(args.backend, probe)
    if reason is not None and any(c.startswith("fused") for c in args.contenders):
        raise SystemExit(f"backend {args.backend!r} cannot run on {args.device}: {reason}")
    logging.getLogger("fused_preact.convert").setLevel(logging.WARNING)
    info = environment.describe(args.device)
    info["fused_backend"] = dispatch.describe_backend(args.backend, args.device)
    run = {"info": info, "batch": args.batch, "imagenet_size": args.imagenet_size,
           "command": "python bench/memory.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "note": "saved bytes scale linearly with the batch; ratio_vs_eager is batch-independent",
           "results": []}
    out = Path(args.out) if args.out else (Path(__file__).resolve().parent / "results" /
                                           f"memory-{args.device.type}-{datetime.date.today().isoformat()}")
    out.mkdir(parents=True, exist_ok=True)
    print(f"{environment.one_line(info)}; fused: {info['fused_backend']}; batch {args.batch}, "
          f"ImageNet at {args.imagenet_size} px", flush=True)
    for arch in args.models:
        entries = measure_arch(arch, args, args.device)
        for e in entries:
            if "step_time_vs_fused" in e:
                print(f"{arch} {e['dtype']}: fused-min step time {e['step_time_vs_fused']:.3f}x fused's "
                      f"(the recompute)", flush=True)
        run["results"] += entries
        records.write_json(out / JSON_NAME, run)     # rewritten per model: a killed run keeps what it had
    write_png(run, out / CHART_NAME)
    print(ratio_table(run["results"]))
    print(f"wrote {out / JSON_NAME} and {out / CHART_NAME}")
    return run


if __name__ == "__main__":
    main()
