"""Short demo: build a pre-activation ResNet, run a fused unit against eager, print the comparison.

    python -m fused_preact.demo [--device cpu|cuda] [--batch N] [--depth 164]

Everything printed is measured in this run: which backend ran; for the unit's output, input
gradient, parameter gradients and running statistics, and for a whole converted model's logits and
parameter gradients, the norm-wise relative error ||x - x64|| / ||x64|| of each tensor against
float64 eager PyTorch, for the fused run beside the eager float32 run (the worst tensor of each row
named); a verdict computed from those numbers; and median wall times. Both sides against float64
tell rounding apart from a wrong result: the float32 gradients of a deep net at a small batch are
ill-conditioned, eager's as much as the fused ones, so a large error is a bug only where eager's
is small.
"""
from __future__ import annotations

import argparse
import copy
import math
import statistics
import time
import warnings
from dataclasses import dataclass

import torch

from . import dispatch
from .convert import convert_to_fused
from .fused import FusedPreActBottleneck
from .models import cifar_resnet
from .units import PreActBottleneck


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _median_ms(fns, device: torch.device, repeats: int) -> list:
    """Median wall time (ms) of each function, run in turn `repeats` times after a warm-up call:
    alternating keeps a drift of the machine's speed out of the ratio."""
    for fn in fns:
        fn()
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, spent in zip(fns, times):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            spent.append((time.perf_counter() - start) * 1e3)
    return [statistics.median(spent) for spent in times]


def _train_step(module, x):
    """Forward and backward; returns output, input gradient and parameter gradients."""
    module.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    y = module(x)
    y.backward(torch.ones_like(y))
    return y.detach(), x.grad, [p.grad for p in module.parameters()]


# fused is "as close to float64 as eager" when each row's error is at most this many times eager's
# (plus one float32 rounding step, so that a row eager gets exactly right is no division by 0). Rows,
# not single tensors, are compared: each tensor's error is a draw of rounding luck, and the largest
# of hundreds of ratios between two equally good runs would exceed any small factor.
VERDICT_FACTOR = 2.0
VERDICT_FLOOR = torch.finfo(torch.float32).eps


def normwise_error(a: torch.Tensor, exact: torch.Tensor) -> float:
    """||a - exact|| / ||exact|| (Frobenius norms, in float64); 0 for two zero tensors."""
    a, exact = a.detach().double().cpu(), exact.detach().double().cpu()
    difference, norm = (a - exact).norm().item(), exact.norm().item()
    if norm == 0.0:
        return 0.0 if difference == 0.0 else math.inf
    return difference / norm


def normwise_error_of_mean(mean: torch.Tensor, exact_mean: torch.Tensor, exact_var: torch.Tensor) -> float:
    """||mean - exact_mean|| / ||sqrt(exact_var)||: a mean's error in units of the spread of what it averages.
    Relative to the mean itself it would measure only how close to 0 the mean is (a running mean of
    zero-mean data is ill-conditioned: any rounding is a large part of it), not how well it was computed."""
    mean, exact_mean = mean.detach().double().cpu(), exact_mean.detach().double().cpu()
    spread = exact_var.detach().double().cpu().clamp_min(0).sqrt().norm().item()
    difference = (mean - exact_mean).norm().item()
    return (0.0 if difference == 0.0 else math.inf) if spread == 0.0 else difference / spread


def tensor_errors(named: dict, exact: dict) -> dict:
    """{name: normwise_error} over the floating-point tensors of ``named``; running means against their
    running variance's spread (``normwise_error_of_mean``)."""
    errors = {}
    for name, t in named.items():
        if not t.is_floating_point():
            continue
        variance = name[:-len("running_mean")] + "running_var" if name.endswith("running_mean") else None
        errors[name] = (normwise_error_of_mean(t, exact[name], exact[variance]) if variance in exact
                        else normwise_error(t, exact[name]))
    return errors


@dataclass
class Row:
    """One line of the comparison: per tensor, the fused and the eager error against float64."""
    what: str
    fused: dict
    eager: dict

    @property
    def fused_error(self) -> float:
        return max(self.fused.values())

    @property
    def eager_error(self) -> float:
        return max(self.eager.values())

    @property
    def worst_tensor(self) -> str:
        """The tensor with the largest fused error."""
        return max(self.fused, key=self.fused.get)

    @property
    def ratio(self) -> float:
        return self.fused_error / max(self.eager_error, VERDICT_FLOOR)

    @property
    def as_close_as_eager(self) -> bool:
        return self.fused_error <= VERDICT_FACTOR * self.eager_error + VERDICT_FLOOR


def verdict(rows: list) -> str:
    """One line, computed from the numbers: whether fused is as close to float64 as eager."""
    worse = [row for row in rows if not row.as_close_as_eager]
    if not worse:
        return (f"verdict: fused is as close to float64 as eager (each row's error within {VERDICT_FACTOR:g}x "
                f"eager's; at most {max(row.ratio for row in rows):.2f}x)")
    row = max(worse, key=lambda r: r.ratio)
    others = f"; {len(worse) - 1} more row(s) beyond {VERDICT_FACTOR:g}x" if len(worse) > 1 else ""
    return (f"verdict: fused is FURTHER from float64 than eager: {row.what} ({row.worst_tensor}) "
            f"{row.fused_error:.2e}, {row.ratio:.1f}x eager's {row.eager_error:.2e}{others}")


def _named_step(names, step) -> dict:
    """The output, input gradient and parameter gradients of a _train_step, by name."""
    y, dx, grads = step
    return {"output": y, "input gradient": dx, **dict(zip(names, grads))}


def _statistics(module) -> dict:
    """Running means and variances, by name (copies: later steps update them)."""
    return {n: b.detach().clone() for n, b in module.named_buffers() if b.is_floating_point()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--depth", type=int, default=164, help="CIFAR bottleneck depth, 9n+2 (default 164)")
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions (default 5)")
    args = parser.parse_args(argv)
    if args.batch <= 0:
        parser.error(f"--batch must be positive, got {args.batch}")
    device = torch.device(args.device)
    torch.manual_seed(0)

    model = cifar_resnet(args.depth, 10, bottleneck=True).to(device)
    units = model.units()
    params = sum(p.numel() for p in model.parameters())
    print(f"pre-act ResNet-{args.depth} (CIFAR-10): {len(units)} bottleneck units, {params:,} parameters, "
          f"device {device}, torch {torch.__version__}")

    # one unit of stage 1 at its real shape: 64 channels, 32x32, channels_last, as between the units
    # of a converted model (an NCHW input costs the fused unit a layout copy on the way in and one on
    # the way back). The demo runs the first fused backend that can run it, whether or not "auto"
    # would pick it at this size, and says what "auto" picks.
    x = torch.randn(args.batch, 64, 32, 32, device=device).contiguous(memory_format=torch.channels_last)
    backend = dispatch.available_backends(x)[0]
    eager = PreActBottleneck(64, 64).to(device)
    exact = copy.deepcopy(eager).double()   # the float64 reference, before any step updates statistics
    fused = FusedPreActBottleneck(64, 64, backend=backend).to(device)
    fused.load_state_dict(eager.state_dict())
    unit_names = [n for n, _ in eager.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        auto = dispatch.resolve_backend("auto", x)
        unit_fused = _named_step(unit_names, _train_step(fused, x))
        unit_eager = _named_step(unit_names, _train_step(eager, x))
        unit_exact = _named_step(unit_names, _train_step(exact, x.double()))
        stats = [_statistics(m) for m in (fused, eager, exact)]
        fused_ms, eager_ms = _median_ms([lambda: _train_step(fused, x), lambda: _train_step(eager, x)],
                                        device, args.repeats)

    # the whole model, converted in place, against an eager copy
    reference = copy.deepcopy(model)
    model_exact = copy.deepcopy(model).double()
    model_names = [n for n, _ in reference.named_parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        convert_to_fused(model, backend=backend)
        images = torch.randn(args.batch, 3, 32, 32, device=device)
        model_fused = _named_step(model_names, _train_step(model, images))
    model_eager = _named_step(model_names, _train_step(reference, images))
    model_float64 = _named_step(model_names, _train_step(model_exact, images.double()))

    why_eager = "; ".join(f"{n}: {dispatch.unavailable_reason(n, x) or dispatch.slower_than_eager(n, x)}"
                          for n in dispatch.AUTO_ORDER)
    print(f"\nfused units run: {dispatch.describe_backend(backend, device)}"
          + ("" if backend != "eager" else f"  (no fused kernel can run here: {why_eager})"))
    print(f"backend='auto' on this input runs: {dispatch.describe_backend(auto, device)}"
          + ("" if auto != "eager" or backend == "eager" else f"  ({why_eager})"))

    def row(what, fused_named, eager_named, exact_named, keys):
        pick = (lambda d: {k: d[k] for k in keys})
        return Row(what, tensor_errors(pick(fused_named), exact_named), tensor_errors(pick(eager_named), exact_named))

    rows = [row("unit output", unit_fused, unit_eager, unit_exact, ["output"]),
            row("unit input gradient", unit_fused, unit_eager, unit_exact, ["input gradient"]),
            row("unit parameter gradients", unit_fused, unit_eager, unit_exact, unit_names),
            row("unit running statistics", *stats, list(stats[0])),
            row(f"ResNet-{args.depth} logits (convert_to_fused)", model_fused, model_eager, model_float64,
                ["output"]),
            row(f"ResNet-{args.depth} parameter gradients", model_fused, model_eager, model_float64, model_names)]
    print("\nnorm-wise relative error against float64 eager, ||x - x64|| / ||x64|| (running means: "
          "/ ||sqrt(running_var64)||), the largest over each row's tensors:")
    print(f"{'what':<44}{'fused':>11}{'eager':>11}{'fused/eager':>12}   worst tensor (fused)")
    for r in rows:
        named = f"   {r.worst_tensor}" if len(r.fused) > 1 else ""
        print(f"{r.what:<44}{r.fused_error:>11.2e}{r.eager_error:>11.2e}{r.ratio:>11.2f}x{named}")
    print(verdict(rows))
    print(f"\nunit forward+backward, batch {args.batch}, 64x32x32 channels_last, median of {args.repeats}:")
    print(f"  {'eager PyTorch':<19}{eager_ms:9.2f} ms")
    label = f"fused ({backend}{', CPU' if device.type == 'cpu' and backend != 'eager' else ''})"
    print(f"  {label:<19}{fused_ms:9.2f} ms   speed-up {eager_ms / fused_ms:.2f}x")


if __name__ == "__main__":
    main()
