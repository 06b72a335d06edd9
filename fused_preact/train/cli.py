"""Command line of ``python -m fused_preact.train``: every value of the recipe is a flag.

Defaults follow the paper (He et al. 2016, Sec. 4 and 5): SGD with momentum 0.9
and weight decay 1e-4; CIFAR: batch 128, lr 0.1 divided by 10 at 32k and 48k
iterations, 64k iterations, a warm-up at lr 0.01 for the first 400 iterations of
the deep nets (depth >= 110, as the paper does for ResNet-110 and -1001);
ImageNet: batch 256, lr 0.1 divided by 10 at epochs 30 and 60, 90 epochs.
"""
from __future__ import annotations

import argparse
import math
from typing import Optional, Sequence

from ..dispatch import BACKENDS
from ..unit_function import MEMORY_MODES
from ..units import ACTIVATIONS, BOTTLENECK_STRIDE_ON, PROJECTIONS, SHORTCUTS
from .imagenet_transforms import IMAGENET_AUGMENTS, parse_crop
from .options import dataset_kind
from .run_config import OVERRIDABLE, check_overrides, flag

DATASETS = ("cifar10", "cifar100", "imagenet")
AMP_MODES = ("off", "bf16", "fp16")
DEFAULTS = {   # dataset kind -> recipe values that depend on it
    "cifar": {"arch": "cifar_resnet110", "batch_size": 128, "iters": 64000, "milestones": (32000, 48000),
              "eval_batch_size": 1000, "image_size": 32},
    "imagenet": {"arch": "imagenet_resnet50", "batch_size": 256, "epochs": 90, "milestone_epochs": (30, 60),
                 "eval_batch_size": 250, "image_size": 224},
}
WARMUP_MIN_DEPTH = 110
EPILOG = """\
resuming: a checkpoint records the run's configuration (data, net, precision, recipe); --resume with
other values is refused, listing each difference (old -> new), unless --override names them; those
are applied to the optimizer and the lr schedule and recorded in log.csv and metrics.json. Overridable:
  %s
--out holds one run: a fresh run into a folder holding another run's checkpoint or log is refused
(--resume continues it, --overwrite moves it aside into <out>/replaced-<time>/), and <out>/train.lock
keeps a second trainer out while one runs (a lock left by a killed trainer is taken over).

divergence: at every --print-freq window end the loss, weights, gradients, BN running statistics and
momentum are checked for NaN/inf (no extra host reads per step); a diverged run writes diverged.json,
never writes a non-finite checkpoint, and names the last (finite) checkpoint it kept. A --resume from
it (e.g. with --override lr) continues the run and keeps the record as diverged-<iteration>.json.

exit status: 0 done (or stopped by --stop-after-iters), 1 failed while running (a checkpoint could
not be written: the previous one is kept), 2 refused (flags, --out, --resume), 3 diverged,
128+N stopped by signal N (SIGINT, SIGTERM; continue with --resume).
""" % " ".join(flag(k) for k in OVERRIDABLE)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in the flags' help, the epilog's line breaks kept."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m fused_preact.train",
        description="Train a pre-activation ResNet (He et al., 2016) on CIFAR or ImageNet with eager or "
                    "fused units. Multi-GPU: torchrun --nproc-per-node=N -m fused_preact.train ...",
        formatter_class=_HelpFormatter, epilog=EPILOG)
    data = p.add_argument_group("data")
    data.add_argument("--dataset", choices=DATASETS, default="cifar10")
    data.add_argument("--data", help="folder holding cifar-10-batches-py / cifar-100-python, or ImageNet's "
                                     "train/ and val/ class folders (nothing is downloaded)")
    data.add_argument("--synthetic", action="store_true", help="random data of the right shapes (speed runs)")
    data.add_argument("--synthetic-images", type=int, default=None,
                      help="training images of --synthetic data (default: 4 global batches)")
    data.add_argument("--image-size", type=int, default=None,
                      help="side of --synthetic images (default 32 for CIFAR, 224 for ImageNet)")
    data.add_argument("--no-verify", action="store_true",
                      help="skip the md5 sums of CIFAR files that hold the official image counts "
                           "(their structure is always checked)")
    data.add_argument("--no-flip", action="store_true", help="no random horizontal flips")
    data.add_argument("--pad", type=int, default=4, help="CIFAR padding before the random 32x32 crop")
    data.add_argument("--workers", type=int, default=8, help="ImageNet loader processes per GPU")
    data.add_argument("--imagenet-augment", choices=IMAGENET_AUGMENTS, default="resized_crop",
                      help="ImageNet training crops: RandomResizedCrop (scale + aspect ratio), or 'scale': "
                           "shorter side uniform in --scale-range, random 224 crop, PCA color noise (paper [1])")
    data.add_argument("--scale-range", type=int, nargs=2, default=(256, 480), metavar=("MIN", "MAX"),
                      help="shorter-side range of --imagenet-augment scale")
    data.add_argument("--eval-crops", nargs="*", default=None, metavar="RESIZE:CROP",
                      help="ImageNet: also report top-1/top-5 error at these center crops at the end "
                           "(e.g. 256:224 320:320, the paper's Table 5), in metrics.json crop_errors")

    model = p.add_argument_group("model")
    model.add_argument("--arch", default=None,
                       help="cifar_resnet20/56/110/164/1001, cifar_resnet<depth>[_bottleneck], "
                            "imagenet_resnet18/34/50/101/152/200 (default: cifar_resnet110 / imagenet_resnet50)")
    model.add_argument("--activation", choices=ACTIVATIONS, default=None, help="unit variant, paper Fig. 4")
    model.add_argument("--shortcut", choices=SHORTCUTS, default=None, help="shortcut variant, paper Fig. 2")
    model.add_argument("--projection", choices=PROJECTIONS, default=None,
                       help="shortcut of shape-changing units: B = 1x1 conv, A = subsample + zero-pad")
    model.add_argument("--stride-on", choices=BOTTLENECK_STRIDE_ON, default=None,
                       help="bottleneck stride on the first 1x1 or on the 3x3")
    model.add_argument("--scale-shortcut", type=float, default=None, help="lambda of --shortcut scaling")
    model.add_argument("--scale-residual", type=float, default=None, help="lambda of --shortcut scaling")
    model.add_argument("--gate-bias", type=float, default=None, help="initial gate bias of the gating shortcuts")
    model.add_argument("--dropout", type=float, default=None, help="drop ratio of --shortcut dropout")
    model.add_argument("--backend", choices=BACKENDS, default="auto",
                       help="who runs the pre-activation units (convert_to_fused)")
    model.add_argument("--memory", choices=MEMORY_MODES, default="default",
                       help="what the fused units keep for the backward: 'min' keeps each unit's input only "
                            "and recomputes the rest with the forward kernels (exact; running statistics "
                            "updated once)")

    speed = p.add_argument_group("speed")
    speed.add_argument("--amp", choices=AMP_MODES, default="off", help="autocast dtype (fp16 uses a GradScaler)")
    speed.add_argument("--channels-last", action="store_true", help="NHWC activations and weights")
    speed.add_argument("--compile", action="store_true", help="torch.compile the model")
    speed.add_argument("--cuda-graph", action="store_true",
                       help="capture the whole training step (forward, backward, SGD step) in one CUDA graph "
                            "after 3 eager steps and replay it (CUDA only; not with --amp fp16 or --log-signal)")
    speed.add_argument("--sync-bn", action="store_true",
                       help="batch statistics over all processes (fused units through their statistics hook)")
    speed.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")

    recipe = p.add_argument_group("recipe")
    recipe.add_argument("--iters", type=int, default=None, help="training iterations (CIFAR default 64000)")
    recipe.add_argument("--epochs", type=int, default=None, help="training epochs (ImageNet default 90)")
    recipe.add_argument("--batch-size", type=int, default=None,
                        help="global batch, split over the processes (default 128 CIFAR, 256 ImageNet)")
    recipe.add_argument("--lr", type=float, default=0.1, help="learning rate (finite, > 0)")
    recipe.add_argument("--momentum", type=float, default=0.9, help="SGD momentum, in [0, 1)")
    recipe.add_argument("--weight-decay", type=float, default=1e-4, help="L2 weight decay (finite, >= 0)")
    recipe.add_argument("--milestones", type=int, nargs="*", default=None,
                        help="iterations where the lr is divided, distinct and > 0 (CIFAR default 32000 48000)")
    recipe.add_argument("--milestone-epochs", type=int, nargs="*", default=None,
                        help="epochs where the lr is divided, distinct and > 0 (ImageNet default 30 60)")
    recipe.add_argument("--lr-factor", type=float, default=0.1, help="lr multiplier at each milestone (finite, > 0)")
    recipe.add_argument("--warmup-iters", type=int, default=None,
                        help=f"iterations at --warmup-lr first (default 400 for CIFAR nets of depth >= "
                             f"{WARMUP_MIN_DEPTH}, else 0)")
    recipe.add_argument("--warmup-lr", type=float, default=0.01, help="lr of the warm-up iterations (finite, > 0)")
    recipe.add_argument("--seed", type=int, default=0)
    recipe.add_argument("--deterministic", action="store_true",
                        help="deterministic kernels only (torch.use_deterministic_algorithms), no cudnn autotuning")

    run = p.add_argument_group("run and outputs")
    run.add_argument("--out", default=None, help="output folder (default runs/<dataset>-<arch>)")
    run.add_argument("--resume", nargs="?", const="auto", default=None,
                     help="continue from a checkpoint (default: <out>/checkpoint.pt) with the run's own "
                          "configuration (see below)")
    run.add_argument("--override", nargs="+", default=None, metavar="KEY",
                     help="with --resume: the recipe values to change on purpose (e.g. --override lr "
                          f"milestones); one of: {' '.join(OVERRIDABLE)}")
    run.add_argument("--overwrite", action="store_true",
                     help="start a fresh run in an --out that holds another run, moving that run's files into "
                          "<out>/replaced-<time>/ (nothing is deleted)")
    run.add_argument("--eval-only", action="store_true", help="evaluate the --resume checkpoint and stop")
    run.add_argument("--eval-batch-size", type=int, default=None)
    run.add_argument("--eval-every", type=int, default=1, help="epochs between test evaluations")
    run.add_argument("--print-freq", type=int, default=20,
                     help="iterations between progress updates, loss records and finiteness checks")
    run.add_argument("--log-signal", action="store_true",
                     help="record ||x_l|| and ||dL/dx_l|| at every unit (signal.csv, signal.png)")
    run.add_argument("--log-signal-every", type=int, default=500, help="iterations between signal records")
    run.add_argument("--stop-after-iters", type=int, default=None,
                     help="stop at the first iteration >= N as on SIGINT: save a checkpoint and exit "
                          "(a run resumed at or past N stops after one iteration, and says so)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parsed flags with the dataset-dependent defaults filled in; bad combinations exit with a message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    defaults = DEFAULTS[dataset_kind(args.dataset)]
    for name in ("arch", "batch_size", "eval_batch_size", "image_size"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.iters is None and args.epochs is None:
        args.iters, args.epochs = defaults.get("iters"), defaults.get("epochs")
    if args.milestones is None and args.milestone_epochs is None:
        args.milestones, args.milestone_epochs = defaults.get("milestones"), defaults.get("milestone_epochs")
    if args.warmup_iters is None:
        depth = "".join(ch for ch in args.arch.removeprefix("cifar_resnet").split("_")[0] if ch.isdigit())
        deep = args.arch.startswith("cifar_resnet") and depth and int(depth) >= WARMUP_MIN_DEPTH
        args.warmup_iters = 400 if deep else 0

    if not args.synthetic and not args.data:
        parser.error("--data FOLDER is required (or --synthetic)")
    if args.iters is not None and args.epochs is not None:
        parser.error("give --iters or --epochs, not both")
    if args.milestones is not None and args.milestone_epochs is not None:
        parser.error("give --milestones or --milestone-epochs, not both")
    for name in ("batch_size", "eval_batch_size", "print_freq", "log_signal_every", "eval_every", "image_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    for name in ("iters", "epochs", "stop_after_iters", "synthetic_images"):
        value = getattr(args, name)
        if value is not None and value <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {value}")
    if args.warmup_iters < 0 or args.pad < 0 or args.workers < 0:
        parser.error("--warmup-iters, --pad and --workers must be >= 0")
    reason = recipe_refusal(args)
    if reason is not None:
        parser.error(reason)
    if args.override and not args.resume:
        parser.error("--override changes values of a run that --resume continues: give --resume too")
    try:
        check_overrides(args.override or ())
    except ValueError as error:
        parser.error(str(error))
    if args.overwrite and (args.eval_only or args.resume == "auto"):
        parser.error("--overwrite starts a fresh run in --out (moving the run there aside); --resume continues "
                     "the run in --out and --eval-only writes eval.json only: leave out --overwrite")
    if args.eval_only and not args.resume:
        parser.error("--eval-only needs a checkpoint: --resume [PATH]")
    if args.eval_crops:
        if args.dataset != "imagenet" or args.synthetic:
            parser.error("--eval-crops needs --dataset imagenet with a --data folder")
        try:
            args.eval_crops = [parse_crop(c) for c in args.eval_crops]
        except ValueError as error:
            parser.error(str(error))
    if not 224 <= args.scale_range[0] <= args.scale_range[1]:
        parser.error(f"--scale-range must be 224 (the training crop) <= MIN <= MAX, got {tuple(args.scale_range)}")
    if args.memory == "min" and args.backend == "eager":
        parser.error("--memory min applies to the fused kernels, and --backend eager runs eager PyTorch (which "
                     "saves what eager saves): use --backend auto, cuda or triton")
    if args.cuda_graph:
        from .graph_step import refusal
        reason = refusal(args)
        if reason is not None:
            parser.error(reason)
    return args


def recipe_refusal(args: argparse.Namespace) -> Optional[str]:
    """Why the recipe's values cannot train (None when they can): learning rates, momentum, weight
    decay, the lr factor and the milestones."""
    for name, low, closed in (("lr", 0.0, False), ("warmup_lr", 0.0, False), ("lr_factor", 0.0, False),
                              ("weight_decay", 0.0, True)):
        value = getattr(args, name)
        if not (math.isfinite(value) and (value >= low if closed else value > low)):
            return f"{flag(name)} must be finite and {'>=' if closed else '>'} {low:g}, got {value}"
    if not (math.isfinite(args.momentum) and 0 <= args.momentum < 1):
        return (f"--momentum must be in [0, 1) (the fraction of the last update kept; 1 or more never "
                f"forgets an update), got {args.momentum}")
    for name in ("milestones", "milestone_epochs"):
        values = getattr(args, name)
        if values is None:
            continue
        if any(v <= 0 for v in values):
            return f"{flag(name)} must be > 0, got {' '.join(map(str, values))}"
        if len(set(values)) != len(values):
            return f"{flag(name)} must be distinct (each divides the lr once), got {' '.join(map(str, values))}"
    return None


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Parse ``argv`` and run; returns the final metrics (see ``loop.run``)."""
    from .loop import run
    return run(parse_args(argv))
