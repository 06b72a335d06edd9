"""Short demo: build a pre-activation ResNet, run a fused unit against eager, print the comparison.

    python -m fused_preact.demo [--device cpu|cuda] [--batch N] [--depth 164]

Everything printed is measured in this run: which backend ran, the largest
difference from eager PyTorch (output, input gradient, weight gradients,
running statistics), the relative error of both against float64 eager (which
tells rounding apart from a wrong result: the float32 gradients of a deep net
at a small batch are ill-conditioned, eager's as much as the fused ones), and
median wall times.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
import warnings

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


def _max_diff(a, b) -> float:
    return max((u.double() - v.double()).abs().max().item() for u, v in zip(a, b))


def _max_relative(a, exact) -> float:
    """The largest of max|a - exact| / max|exact| over the tensors."""
    return max(((u.double() - v).abs().max() / v.abs().max().clamp_min(1e-30)).item()
               for u, v in zip(a, exact))


def _float64_step(module, x):
    """_train_step of a float64 copy of module (its eager reference)."""
    return _train_step(copy.deepcopy(module).double(), x.double())


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
    fused = FusedPreActBottleneck(64, 64, backend=backend).to(device)
    fused.load_state_dict(eager.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        auto = dispatch.resolve_backend("auto", x)
        fused_out = _train_step(fused, x)
        eager_out = _train_step(eager, x)
        exact_out = _float64_step(eager, x)
        fused_ms, eager_ms = _median_ms([lambda: _train_step(fused, x), lambda: _train_step(eager, x)],
                                        device, args.repeats)

    # the whole model, converted in place, against an eager copy
    reference = copy.deepcopy(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        convert_to_fused(model, backend=backend)
        images = torch.randn(args.batch, 3, 32, 32, device=device)
        model_out = _train_step(model, images)
    reference_out = _train_step(reference, images)
    model_exact_out = _float64_step(reference, images)

    why_eager = "; ".join(f"{n}: {dispatch.unavailable_reason(n, x) or dispatch.slower_than_eager(n, x)}"
                          for n in dispatch.AUTO_ORDER)
    print(f"\nfused units run: {dispatch.describe_backend(backend, device)}"
          + ("" if backend != "eager" else f"  (no fused kernel can run here: {why_eager})"))
    print(f"backend='auto' on this input runs: {dispatch.describe_backend(auto, device)}"
          + ("" if auto != "eager" or backend == "eager" else f"  ({why_eager})"))
    rows = [("unit output", [fused_out[0]], [eager_out[0]], [exact_out[0]]),
            ("unit input gradient", [fused_out[1]], [eager_out[1]], [exact_out[1]]),
            ("unit parameter gradients", fused_out[2], eager_out[2], exact_out[2]),
            ("unit running statistics", list(fused.state_dict().values()),
             list(eager.state_dict().values()), None),
            (f"ResNet-{args.depth} logits (convert_to_fused)", [model_out[0]], [reference_out[0]],
             [model_exact_out[0]]),
            (f"ResNet-{args.depth} parameter gradients", model_out[2], reference_out[2], model_exact_out[2])]
    print(f"\n{'what':<44}{'max |fused - eager|':>20}{'fused vs float64':>18}{'eager vs float64':>18}")
    print(f"{'':<44}{'':>20}{'(max relative error)':>36}")
    for what, got, eager_got, exact in rows:
        line = f"{what:<44}{_max_diff(got, eager_got):>20.3e}"
        if exact is not None:
            line += f"{_max_relative(got, exact):>18.2e}{_max_relative(eager_got, exact):>18.2e}"
        print(line)
    print(f"\nunit forward+backward, batch {args.batch}, 64x32x32 channels_last, median of {args.repeats}:")
    print(f"  {'eager PyTorch':<19}{eager_ms:9.2f} ms")
    label = f"fused ({backend}{', CPU' if device.type == 'cpu' and backend != 'eager' else ''})"
    print(f"  {label:<19}{fused_ms:9.2f} ms   speed-up {eager_ms / fused_ms:.2f}x")


if __name__ == "__main__":
    main()
