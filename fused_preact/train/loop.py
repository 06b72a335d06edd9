"""The training run: model, data, optimizer and schedule from the flags, the
iteration loop, evaluation, checkpoints, logs and the final figures.

The loop never waits for the device inside a window of ``--print-freq``
iterations: losses and errors stay on the device and are read back once per
window, in one transfer with the divergence screen of every tensor a checkpoint
holds (``divergence.py``); there the progress bar moves, and stop requests
(SIGINT, SIGTERM, ``--stop-after-iters``) are agreed on by all processes.
Windows end at fixed iterations (multiples of ``--print-freq``, epoch ends), so
all processes stop at the same iteration.

A run stays one run across interruptions: its checkpoint records its configuration
(``run_config.py``; ``--resume`` refuses other values unless ``--override`` names
them), the running sums of the epoch in progress (so an epoch's ``log.csv`` row
covers all its iterations however often it was interrupted) and the ``log.csv``
rows themselves: ``log.csv`` is rewritten from them after each checkpoint write,
so a row exists exactly when a checkpoint holding it does. ``--out`` is locked for
the run's life and never receives a second run's outputs (``out_folder.py``).
"""
from __future__ import annotations

import argparse
import contextlib
import math
import os
import resource
import signal
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import dispatch
from ..convert import convert_to_fused
from ..models import create_model
from . import checkpoint, distributed, graph_step, out_folder, plots, records, run_config
from .augment import BatchAugment
from .crop_eval import crop_errors
from .divergence import Diverged, Findings, FinitenessProbe
from .data import IMAGENET_MEAN, IMAGENET_STD, channel_stats, imagenet_datasets, load_cifar, \
    num_classes_of, synthetic_images
from .options import dataset_kind, memory_mode, unit_options
from .signal_log import SignalRecorder
from .streams import DeviceStream, LoaderStream, device_eval_batches, loader_eval_batches

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NO_ITERATION = 2**62


def compute_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of a batch, in fp32."""
    return F.cross_entropy(logits.float(), labels)


class StepSchedule:
    """lr multiplier of iteration ``it``: ``warmup_factor`` for the first ``warmup``
    iterations, then ``factor ** (milestones passed)``."""

    def __init__(self, milestones: list[int], factor: float, warmup: int, warmup_factor: float):
        self.milestones, self.factor = sorted(milestones), factor
        self.warmup, self.warmup_factor = warmup, warmup_factor

    def __call__(self, it: int) -> float:
        if it < self.warmup:
            return self.warmup_factor
        return self.factor ** sum(it >= m for m in self.milestones)


class _StopRequests:
    """SIGINT / SIGTERM ask the loop to stop at the next window end; a second one interrupts."""

    def __init__(self):
        self.signal: Optional[int] = None
        self._previous = {}

    def _handle(self, signum, frame):
        if self.signal is not None:
            raise KeyboardInterrupt
        self.signal = signum

    def __enter__(self):
        for signum in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:   # not the main thread: signals cannot be caught here
                pass
        return self

    def __exit__(self, *exc):
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _device(args: argparse.Namespace, processes: distributed.Processes) -> torch.device:
    name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise RuntimeError(f"--device {name}: no CUDA device is available")
        return torch.device("cuda", processes.local_rank)
    return torch.device(name)


def _peak_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024   # Linux reports KiB


@dataclass
class EpochSums:
    """Running sums of the epoch in progress, added one iteration at a time in float64 (so they do
    not depend on where windows or interruptions fall); checkpoints carry them."""
    loss: float = 0.0       # of the iterations' mean losses
    wrong: float = 0.0      # wrong top-1 predictions
    iterations: int = 0

    def add(self, losses: list[float], wrong: float) -> None:
        for loss in losses:
            self.loss += loss
        self.wrong += wrong
        self.iterations += len(losses)


@dataclass
class Window:
    """What one window end reads back (one transfer), agreed on by all processes."""
    losses: list[float]           # the global batch's mean loss of each iteration
    wrong: float                  # wrong top-1 predictions of the window (global batch)
    first_bad_loss: int           # first iteration whose loss is not finite, or NO_ITERATION
    suspicious: bool              # a tensor group's screen is not finite (divergence.py)
    stop_signal: int              # SIGINT / SIGTERM received by some process, or 0


class Trainer:
    def __init__(self, args: argparse.Namespace, processes: distributed.Processes):
        self.args, self.processes = args, processes
        self.device = _device(args, processes)
        self.kind = dataset_kind(args.dataset)
        self.out = Path(args.out or f"runs/{args.dataset}-{args.arch}")
        self.resume_path = None
        if args.resume:
            self.resume_path = self.out / "checkpoint.pt" if args.resume == "auto" else Path(args.resume)
        if args.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = not args.deterministic
        self.amp_dtype = AMP_DTYPES.get(args.amp)
        self.cuda_graph = getattr(args, "cuda_graph", False)
        if self.cuda_graph:   # parse_args refuses these too; a Namespace built elsewhere is checked here
            reason = graph_step.refusal(args, self.device.type, processes.world_size)
            if reason is not None:
                raise ValueError(reason)
        self.resumed = checkpoint.load(self.resume_path) if self.resume_path else None
        # what this run continues under changed values (--override), and the run's history of them
        self.applied: list[run_config.Difference] = []
        self.overrides: list[dict] = []
        # the last checkpoint of this run known to be entirely finite: (path, iteration)
        self.kept: Optional[tuple[Path, int]] = None
        if self.resumed is not None:
            if args.eval_only:
                checkpoint.require_format(self.resumed, self.resume_path, checkpoint.EVAL_FORMATS, "--eval-only")
            else:
                checkpoint.require_format(self.resumed, self.resume_path, (checkpoint.FORMAT,), "--resume")
                self.applied = run_config.resolve(self.resumed["config"], args, str(self.resume_path))
                self.overrides = list(self.resumed["overrides"])
                self.kept = (self.resume_path, self.resumed["iteration"])

    # -- building -----------------------------------------------------------
    def build_data(self) -> None:
        """The test set, and (unless evaluating only) the training stream and the schedule."""
        args, p = self.args, self.processes
        flip = not args.no_flip
        if self.kind == "cifar" or args.synthetic:
            if args.synthetic:
                count = args.synthetic_images or 4 * args.batch_size
                classes = num_classes_of(args.dataset)
                train = synthetic_images(count, args.image_size, classes, args.seed)
                test = synthetic_images(args.eval_batch_size, args.image_size, classes, args.seed + 1)
            else:
                train, test = load_cifar(args.data, args.dataset, verify_md5=not args.no_verify)
            mean, std = channel_stats(train.images)
            pad = args.pad if self.kind == "cifar" else 0
            augment = BatchAugment(mean, std, pad=pad, flip=flip)
            self.normalize = BatchAugment(mean, std, pad=0, flip=False)
            self.test_set = test.to(self.device)
            if args.eval_only:
                return
            self.stream = DeviceStream(train.to(self.device), augment, args.batch_size, seed=args.seed,
                                       rank=p.rank, world_size=p.world_size)
        else:
            train, self.test_set = imagenet_datasets(args.data, getattr(args, "imagenet_augment", "resized_crop"),
                                                     tuple(getattr(args, "scale_range", (256, 480))))
            self.normalize = BatchAugment(IMAGENET_MEAN, IMAGENET_STD, pad=0, flip=False)
            if args.eval_only:
                return
            self.stream = LoaderStream(train, self.normalize, args.batch_size, self.device,
                                       seed=args.seed, workers=args.workers, rank=p.rank, world_size=p.world_size)
        self.batches_per_epoch = self.stream.batches_per_epoch
        self.total_iters = args.iters or args.epochs * self.batches_per_epoch
        if args.milestones is not None:
            milestones = list(args.milestones)
        else:
            milestones = [e * self.batches_per_epoch for e in args.milestone_epochs or ()]
        self.schedule = StepSchedule(milestones, args.lr_factor, args.warmup_iters, args.warmup_lr / args.lr)

    def model_flags(self) -> argparse.Namespace:
        """The flags that define the model: the checkpoint's when evaluating one."""
        if self.args.eval_only and self.resumed is not None:
            saved = argparse.Namespace(**self.resumed["args"])
            return saved
        return self.args

    def build_model(self) -> None:
        args, flags = self.args, self.model_flags()
        torch.manual_seed(args.seed)   # the same initial weights in every process
        model = create_model(flags.arch, num_classes=num_classes_of(flags.dataset), **unit_options(flags))
        with warnings.catch_warnings():   # the start line says it, in this run's own words
            warnings.filterwarnings("ignore", message="convert_to_fused:", category=RuntimeWarning)
            model, self.conversion = convert_to_fused(model, args.backend, memory=memory_mode(args),
                                                      return_report=True)
        model = model.to(self.device)
        if args.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if self.resumed is not None:
            model.load_state_dict(self.resumed["model"])
        if args.sync_bn and self.processes.distributed:
            model = distributed.synchronize_batch_norm(model, self.device.type,
                                                       distributed.batch_norm_group(self.processes))
        self.model = model
        self.parameters = sum(p.numel() for p in model.parameters())
        wrapped: nn.Module = model
        if self.processes.distributed:
            ids = [self.device.index] if self.device.type == "cuda" else None
            wrapped = DistributedDataParallel(model, device_ids=ids)
        self.forward_model = torch.compile(wrapped) if args.compile else wrapped

    def build_optimizer(self, start: int = 0, saved: Optional[dict] = None) -> None:
        """SGD, the lr schedule at iteration ``start`` and the loss scaler, from the flags; ``saved``
        (a checkpoint) brings the optimizer's momentum and the scaler's state, never its
        hyper-parameters: those are this run's flags (equal to the checkpoint's, or overridden)."""
        args = self.args
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay, fused=True if self.cuda_graph else None)
        if saved is not None:
            self.optimizer.load_state_dict(saved["optimizer"])
            for group in self.optimizer.param_groups:
                group.update(lr=args.lr, initial_lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
        # iteration `start` runs at args.lr * schedule(start): the scheduler's first step sets it
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule, last_epoch=start - 1)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
        if saved is not None:
            self.scaler.load_state_dict(saved["scaler"])
        self.probe = FinitenessProbe(self.model, self.optimizer, gradients=not self.scaler.is_enabled())
        self.graphed_step = None
        if self.cuda_graph:   # the whole step captured once (graph_step.py)
            self.graphed_step = graph_step.CapturedTrainStep(
                self.forward_model, self.optimizer, self.scheduler,
                lambda logits, labels: compute_loss(logits, labels),   # looked up per call (tests patch it)
                amp_dtype=self.amp_dtype, capture=self.device.type == "cuda")

    def backend_used(self) -> str:
        """What runs the fused units on this device and dtype, in words (which kernels, CPU or GPU)."""
        probe = torch.empty(1, 16, 8, 8, device=self.device, dtype=self.amp_dtype or torch.float32)
        if self.args.backend != "auto":
            return dispatch.describe_backend(self.args.backend, self.device)
        return dispatch.describe_auto(probe)

    # -- state --------------------------------------------------------------
    def state(self, iteration: int) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        rngs = [rng]
        if self.processes.distributed:
            rngs = [None] * self.processes.world_size
            torch.distributed.all_gather_object(rngs, rng)
        return {
            "format": checkpoint.FORMAT, "args": vars(self.args), "config": run_config.record(self.args),
            "overrides": self.overrides, "iteration": iteration,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(), "stream": self.stream.state_dict(), "rng": rngs,
            "history": self.history, "epoch_sums": asdict(self.sums), "rows": self.rows,
            "train_seconds": self.train_seconds, "train_images": self.train_images,
        }

    def save(self, iteration: int) -> None:
        """Write the checkpoint of ``iteration``, which the window end of that iteration found
        entirely finite (``screened_at``); anything else is checked here first."""
        if self.screened_at != iteration:
            findings = self.probe.non_finite()
            if findings:
                raise self.diverged(iteration, NO_ITERATION, findings)
        state = self.state(iteration)   # every process joins the RNG gather
        if self.processes.main:
            checkpoint.save_atomic(state, self.out / "checkpoint.pt")
        self.kept = (self.out / "checkpoint.pt", iteration)

    def restore(self) -> int:
        """The resumed checkpoint's stream, RNG, history and sums; returns its iteration."""
        saved = self.resumed
        self.stream.load_state_dict(saved["stream"])
        rng = saved["rng"][self.processes.rank] if self.processes.rank < len(saved["rng"]) else saved["rng"][0]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.history = saved["history"]
        self.sums = EpochSums(**saved["epoch_sums"])
        self.rows = list(saved["rows"])
        self.train_seconds, self.train_images = saved["train_seconds"], saved["train_images"]
        return saved["iteration"]

    # -- evaluation -----------------------------------------------------------
    def autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def evaluate(self) -> tuple[float, float]:
        """(mean loss, top-1 error) on the whole test set, over all processes."""
        args, p = self.args, self.processes
        if not isinstance(self.test_set, torch.utils.data.Dataset):
            batches = device_eval_batches(self.test_set, self.normalize, args.eval_batch_size, p.rank, p.world_size)
        else:
            batches = loader_eval_batches(self.test_set, self.normalize, args.eval_batch_size, self.device,
                                          args.workers, p.rank, p.world_size)
        loss, top1, _, _ = self.evaluate_batches(batches)
        return loss, top1

    def evaluate_batches(self, batches) -> tuple[float, float, float, int]:
        """(mean loss, top-1 error, top-5 error, images) of the model over ``batches``, summed over
        all processes."""
        self.model.eval()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        wrong1 = torch.zeros_like(loss_sum)
        wrong5 = torch.zeros_like(loss_sum)
        count = 0
        with torch.no_grad(), self.autocast():
            for images, labels in batches:
                if self.args.channels_last:
                    images = images.contiguous(memory_format=torch.channels_last)
                logits = self.model(images)
                loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum")
                wrong1 += (logits.argmax(1) != labels).sum()
                top5 = logits.topk(min(5, logits.shape[1]), dim=1).indices
                wrong5 += (top5 != labels[:, None]).all(dim=1).sum()
                count += labels.numel()
        self.model.train()
        loss_sum, wrong1, wrong5, count = distributed.all_sum(
            [loss_sum.item(), wrong1.item(), wrong5.item(), float(count)], self.device, self.processes)
        return loss_sum / count, wrong1 / count, wrong5 / count, int(count)

    # -- training -------------------------------------------------------------
    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.args.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        if self.graphed_step is not None:
            return self.graphed_step(images, labels)
        with self.autocast():
            logits = self.forward_model(images)
            loss = compute_loss(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss.detach(), (logits.detach().argmax(1) != labels).sum()

    def read_window(self, losses: list[torch.Tensor], wrongs: list[torch.Tensor], first: int,
                    requests: "_StopRequests") -> Window:
        """The window's losses, wrong count and divergence screen in one read, agreed on by all
        processes (``first``: the iteration before the window)."""
        p = self.processes
        values = torch.cat([torch.stack(losses).double(), torch.stack(wrongs).sum().double().reshape(1),
                            self.probe.screen().double()]).cpu().tolist()
        n = len(losses)
        window_losses, wrong, screen = values[:n], values[n], values[n + 1:]
        if p.distributed:   # the global batch's mean loss and wrong count
            summed = distributed.all_sum(window_losses + [wrong], self.device, p)
            window_losses, wrong = [v / p.world_size for v in summed[:-1]], summed[-1]
        bad = [i for i, v in enumerate(window_losses) if not math.isfinite(v)]
        first_bad = first + bad[0] + 1 if bad else NO_ITERATION
        suspicious = not all(math.isfinite(v) for v in screen)
        first_bad, minus_signal, minus_suspicious = distributed.all_min(
            [first_bad, -(requests.signal or 0), -int(suspicious)], self.device, p)
        return Window(window_losses, wrong, int(first_bad), bool(minus_suspicious), -int(minus_signal))

    def diverged(self, it: int, first_bad_loss: int, findings: Findings) -> Diverged:
        """The error of a run found not finite at the window end of ``it`` (recorded in diverged.json)."""
        what = []
        if first_bad_loss != NO_ITERATION:
            what.append(f"the training loss is not finite from iteration {first_bad_loss}")
        if findings:
            what.append(f"non-finite {findings.describe()}")
        elif first_bad_loss == NO_ITERATION:
            what.append("non-finite tensors on another process")
        if self.kept is not None:
            kept = (f"kept: the checkpoint {str(self.kept[0])!r} of iteration {self.kept[1]}, the last one "
                    f"this run wrote or resumed from (entirely finite)")
        else:
            kept = "no checkpoint of this run was written, none is kept"
        message = f"the run diverged by iteration {it} (of {self.total_iters}): {'; '.join(what)}. Stopped; {kept}"
        record = {"iteration": it, "first_non_finite_loss": None if first_bad_loss == NO_ITERATION else first_bad_loss,
                  "non_finite": findings.names, "total_iterations": self.total_iters,
                  "checkpoint": str(self.kept[0]) if self.kept else None,
                  "checkpoint_iteration": self.kept[1] if self.kept else None,
                  "config": run_config.record(self.args), "message": message}
        if self.processes.main:   # a record of the divergence for whoever compares runs
            records.write_json(self.out / "diverged.json", record)
        return Diverged(message, record)

    def check_window(self, it: int, window: Window) -> None:
        """Raise ``Diverged`` when the window's loss or (on a suspicion, checked exactly) any tensor
        is not finite; otherwise the state at ``it`` is entirely finite."""
        findings, confirmed = Findings(), False
        if window.suspicious:    # the exact check, on every process (a collective follows)
            findings = self.probe.non_finite()
            confirmed = distributed.all_min([-int(bool(findings))], self.device, self.processes)[0] < 0
        if window.first_bad_loss != NO_ITERATION or confirmed:
            raise self.diverged(it, window.first_bad_loss, findings)
        self.screened_at = it

    # -- the run --------------------------------------------------------------
    def run(self) -> dict:
        if self.args.eval_only:
            self.build_data()
            self.build_model()
            return self.run_eval_only()
        with self.claim_out():
            return self.train()

    def continues_in_out(self) -> bool:
        """Whether this run resumes the checkpoint that is in ``--out`` (the run there is this one)."""
        if self.resume_path is None:
            return False
        own = self.out / "checkpoint.pt"
        try:
            return own.exists() and os.path.samefile(self.resume_path, own)
        except OSError:
            return False

    @contextlib.contextmanager
    def claim_out(self):
        """``--out`` locked for the run's life and made this run's (the main process does it)."""
        if not self.processes.main:
            yield
            return
        with out_folder.RunLock(self.out) as lock:
            if lock.stale:
                print(f"note: {lock.path} named process {lock.stale.get('pid')} on host {lock.stale.get('host')}, "
                      f"which ended without releasing it (a stale lock); this run takes it over", flush=True)
            aside = out_folder.claim(self.out, continues=self.continues_in_out(),
                                     overwrite=getattr(self.args, "overwrite", False))
            if aside is not None:
                print(f"--overwrite: the run that was in {self.out} is now in {aside}", flush=True)
            yield

    def train(self) -> dict:
        args, p = self.args, self.processes
        self.build_data()
        self.build_model()
        start = self.resumed["iteration"] if self.resumed is not None else 0
        self.build_optimizer(start, self.resumed)
        self.history = {"train": [], "test": [], "signal": []}
        self.sums, self.rows = EpochSums(), []
        self.train_seconds, self.train_images = 0.0, 0
        self.screened_at: Optional[int] = None
        if self.resumed is not None:
            self.restore()
            if self.applied:
                self.overrides.append({"iteration": start, "changes": [d.as_dict() for d in self.applied]})
        else:   # training randomness (dropout) of this process; a resume restores it
            torch.manual_seed(args.seed * 1000 + p.rank + 1)
        recorder = SignalRecorder(self.model) if args.log_signal else None
        log = records.EpochLog(self.out) if p.main else None
        if p.main:
            records.write_json(self.out / "args.json", vars(args))
            if self.resumed is not None:
                log.rewrite(self.rows)    # log.csv as the resumed checkpoint has it
        progress = None
        if p.main and not args.no_progress:
            from tqdm import tqdm
            progress = tqdm(total=self.total_iters, initial=start, unit="it", dynamic_ncols=True,
                            desc=f"{args.arch} {args.backend}")
        if p.main:
            memory = "" if memory_mode(args) == "default" else f", memory {memory_mode(args)}"
            print(f"{args.arch}: {self.parameters:,} parameters, backend {args.backend} "
                  f"(runs {self.backend_used()}){memory}, {self.total_iters} iterations of {args.batch_size} images, "
                  f"{p.world_size} process(es) on {self.device.type}", flush=True)
            print(self.conversion.summary(), flush=True)
            if self.applied:
                print(f"resumed at iteration {start} with --override: {run_config.describe(self.applied)} "
                      f"(recorded in log.csv and metrics.json)", flush=True)

        losses, wrongs = [], []
        window_start, window_first = time.perf_counter(), start
        it = start
        stopped: Optional[str] = None
        stop_signal = 0
        try:
            with _StopRequests() as requests:
                while it < self.total_iters:
                    images, labels = self.stream.next()
                    record = recorder is not None and it % args.log_signal_every == 0
                    if record:
                        recorder.arm()
                    loss, wrong = self.step(images, labels)
                    losses.append(loss)
                    wrongs.append(wrong)
                    it += 1
                    if record:
                        scale = self.scaler.get_scale() if self.scaler.is_enabled() else 1.0
                        self.history["signal"] += [(it, d, x, g) for d, x, g in recorder.collect(scale)]
                    epoch_end = it % self.batches_per_epoch == 0
                    # the first iteration at or past N: a run resumed past N stops after one iteration
                    asked_stop = args.stop_after_iters is not None and it >= args.stop_after_iters
                    if not (it % args.print_freq == 0 or epoch_end or it == self.total_iters or asked_stop):
                        continue

                    # -- window end: one read back, the divergence check, agreement on stopping --
                    window = self.read_window(losses, wrongs, window_first, requests)
                    self.check_window(it, window)
                    now = time.perf_counter()
                    seconds, n = now - window_start, it - window_first
                    self.train_seconds += seconds
                    self.train_images += n * args.batch_size
                    self.sums.add(window.losses, window.wrong)
                    mean_loss = sum(window.losses) / n
                    self.history["train"].append((it, mean_loss))
                    if progress is not None:
                        progress.update(n)
                        progress.set_postfix(loss=f"{mean_loss:.3f}",
                                             err=f"{100 * window.wrong / (n * args.batch_size):.1f}%",
                                             img_s=f"{n * args.batch_size / seconds:.0f}")
                    losses, wrongs = [], []

                    row_written = epoch_end or it == self.total_iters
                    if row_written:
                        self.end_epoch(it, log, progress)
                    if window.stop_signal or asked_stop:
                        stop_signal = window.stop_signal
                        stopped = signal.Signals(stop_signal).name if stop_signal else "--stop-after-iters"
                        if not row_written:
                            self.save(it)
                        break
                    window_start, window_first = time.perf_counter(), it
        finally:
            if progress is not None:
                progress.close()
            if log is not None:
                log.close()
            if recorder is not None:
                recorder.remove()

        if stopped is not None:
            if p.main:
                why = stopped
                if stopped == "--stop-after-iters":
                    why = f"--stop-after-iters {args.stop_after_iters}"
                    if it != args.stop_after_iters:   # resumed at or past N
                        why += f" (resumed at iteration {start}, at or past it: stopped at its first iteration)"
                print(f"stopped by {why} after iteration {it}; checkpoint {self.out / 'checkpoint.pt'} "
                      f"(continue with --resume)", flush=True)
            return {"interrupted": stopped, "iteration": it, "exit_code": 128 + stop_signal if stop_signal else 0}
        return self.finish(it)

    def end_epoch(self, it: int, log: Optional[records.EpochLog], progress) -> None:
        """The epoch's ``log.csv`` row (evaluated when due), written with the checkpoint that holds it:
        the checkpoint first, then ``log.csv`` from the checkpoint's rows."""
        args = self.args
        previous = self.rows[-1]["iteration"] if self.rows else 0
        row = {"epoch": math.ceil(it / self.batches_per_epoch), "iteration": it, "lr": args.lr * self.schedule(it - 1),
               "train_loss": self.sums.loss / max(self.sums.iterations, 1),
               "train_error": self.sums.wrong / max(self.sums.iterations * args.batch_size, 1),
               "images_per_s": self.train_images / max(self.train_seconds, 1e-9), "elapsed_s": self.train_seconds,
               "overrides": " ".join(f"at iteration {o['iteration']}: " + run_config.describe(
                   run_config.Difference(**c) for c in o["changes"])
                   for o in self.overrides if previous <= o["iteration"] < it)}
        if row["epoch"] % args.eval_every == 0 or it == self.total_iters:
            row["test_loss"], row["test_error"] = self.evaluate()
            self.history["test"].append((it, row["test_error"]))
        sums, self.sums = self.sums, EpochSums()     # the checkpoint of an epoch end holds no partial sums
        self.rows.append(row)
        try:
            self.save(it)
        except BaseException:
            self.rows.pop()
            self.sums = sums
            raise
        if log is not None:
            log.rewrite(self.rows, new=[row])
            if progress is not None:
                progress.write(self._describe(row))

    @staticmethod
    def _describe(row: dict) -> str:
        text = (f"epoch {row['epoch']} iter {row['iteration']}: train loss {row['train_loss']:.4f} "
                f"error {100 * row['train_error']:.2f}%")
        if "test_error" in row:
            text += f", test loss {row['test_loss']:.4f} error {100 * row['test_error']:.2f}%"
        return text + f", {row['images_per_s']:.0f} img/s"

    def finish(self, it: int) -> dict:
        args, p = self.args, self.processes
        if self.history["test"] and self.history["test"][-1][0] == it:
            test_error = self.history["test"][-1][1]
            test_loss = None
        else:
            test_loss, test_error = self.evaluate()
        metrics = {
            "dataset": args.dataset, "arch": args.arch, "unit_options": unit_options(args),
            "backend": args.backend, "backend_used": self.backend_used(), "memory": memory_mode(args),
            "units_fused": [self.conversion.num_fused, self.conversion.num_units], "amp": args.amp,
            "channels_last": args.channels_last, "compile": args.compile, "cuda_graph": self.cuda_graph,
            "world_size": p.world_size,
            "iterations": it, "batch_size": args.batch_size, "test_error": test_error,
            "final_train_loss": self.history["train"][-1][1] if self.history["train"] else None,
            "wall_time_s": self.train_seconds, "images_per_s": self.train_images / max(self.train_seconds, 1e-9),
            "peak_memory_bytes": _peak_memory(self.device), "parameters": self.parameters,
            "device": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "git_commit": records.git_commit(), "torch": torch.__version__,
            "config": run_config.record(args), "overrides": self.overrides,
            "train_curve": self.history["train"], "test_curve": self.history["test"],
        }
        if test_loss is not None:
            metrics["test_loss"] = test_loss
        if getattr(args, "eval_crops", None):
            metrics["crop_errors"] = crop_errors(self, args.eval_crops)
        if p.main:
            title = f"{args.arch} on {args.dataset} ({args.backend})"
            records.write_json(self.out / "metrics.json", metrics)
            plots.training_curves(self.out / "curves.png", self.history["train"], self.history["test"], title)
            if self.history["signal"]:
                records.write_signal_csv(self.out / "signal.csv", self.history["signal"])
                plots.signal_propagation(self.out / "signal.png", self.history["signal"], title)
            print(f"done: test error {100 * test_error:.2f}% after {it} iterations, "
                  f"{metrics['images_per_s']:.0f} img/s; {self.out}", flush=True)
        return metrics

    def run_eval_only(self) -> dict:
        args, p = self.args, self.processes
        test_loss, test_error = self.evaluate()
        flags = self.model_flags()
        metrics = {"dataset": args.dataset, "arch": flags.arch, "checkpoint": str(self.resume_path),
                   "iteration": self.resumed["iteration"], "backend": args.backend,
                   "backend_used": self.backend_used(),
                   "units_fused": [self.conversion.num_fused, self.conversion.num_units],
                   "test_loss": test_loss, "test_error": test_error,
                   "peak_memory_bytes": _peak_memory(self.device), "git_commit": records.git_commit()}
        if getattr(args, "eval_crops", None):
            metrics["crop_errors"] = crop_errors(self, args.eval_crops)
        if p.main:
            self.out.mkdir(parents=True, exist_ok=True)
            records.write_json(self.out / "eval.json", metrics)
            print(f"{flags.arch} at iteration {metrics['iteration']}: test loss {test_loss:.4f}, "
                  f"test error {100 * test_error:.2f}%", flush=True)
        return metrics


def run(args: argparse.Namespace) -> dict:
    """Train (or evaluate) as the flags say; returns the final metrics."""
    device_kind = "cuda" if (args.device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda") \
        else "cpu"
    processes = distributed.setup(device_kind)
    try:
        return Trainer(args, processes).run()
    finally:
        distributed.teardown(processes)
