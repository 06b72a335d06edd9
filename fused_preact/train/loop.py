"""The training run: model, data, optimizer and schedule from the flags, the
iteration loop, evaluation, checkpoints, logs and the final figures.

The loop never waits for the device inside a window of ``--print-freq``
iterations: losses and errors stay on the device and are read back once per
window, where their finiteness is checked, the progress bar moves, and stop
requests (SIGINT, SIGTERM, ``--stop-after-iters``) are agreed on by all processes.
Windows end at fixed iterations (multiples of ``--print-freq``, epoch ends), so
all processes stop at the same iteration.
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
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from .. import dispatch
from ..convert import convert_to_fused
from ..models import create_model
from . import checkpoint, distributed, graph_step, plots, records
from .augment import BatchAugment
from .crop_eval import crop_errors
from .data import IMAGENET_MEAN, IMAGENET_STD, channel_stats, imagenet_datasets, load_cifar, \
    num_classes_of, synthetic_images
from .options import dataset_kind, memory_mode, unit_options
from .signal_log import SignalRecorder
from .streams import DeviceStream, LoaderStream, device_eval_batches, loader_eval_batches

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
CHECKPOINT_FORMAT = 1
NO_ITERATION = 2**62


class NonFiniteLoss(RuntimeError):
    """The training loss became NaN or infinite."""


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
        if self.resumed is not None and self.resumed.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"--resume {str(self.resume_path)!r} is not a checkpoint of this trainer")

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

    def build_optimizer(self) -> None:
        args = self.args
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=args.lr, momentum=args.momentum,
                                         weight_decay=args.weight_decay, fused=True if self.cuda_graph else None)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self.schedule)
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=args.amp == "fp16")
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
            "format": CHECKPOINT_FORMAT, "args": vars(self.args), "iteration": iteration,
            "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
            "stream": self.stream.state_dict(), "rng": rngs, "history": self.history,
            "train_seconds": self.train_seconds, "train_images": self.train_images,
        }

    def save(self, iteration: int) -> None:
        state = self.state(iteration)   # every process joins the RNG gather
        if self.processes.main:
            checkpoint.save_atomic(state, self.out / "checkpoint.pt")

    def restore(self) -> int:
        saved = self.resumed
        self.optimizer.load_state_dict(saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        self.scaler.load_state_dict(saved["scaler"])
        self.stream.load_state_dict(saved["stream"])
        rng = saved["rng"][self.processes.rank] if self.processes.rank < len(saved["rng"]) else saved["rng"][0]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and self.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.device)
        self.history = saved["history"]
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

    def run(self) -> dict:
        args, p = self.args, self.processes
        self.build_data()
        self.build_model()
        if args.eval_only:
            return self.run_eval_only()
        self.build_optimizer()
        self.history = {"train": [], "test": [], "signal": []}
        self.train_seconds, self.train_images = 0.0, 0
        start = self.restore() if self.resumed is not None else 0
        if self.resumed is None:   # training randomness (dropout) of this process; a resume restores it
            torch.manual_seed(args.seed * 1000 + p.rank + 1)
        if p.main:
            self.out.mkdir(parents=True, exist_ok=True)
            records.write_json(self.out / "args.json", vars(args))
        recorder = SignalRecorder(self.model) if args.log_signal else None
        log = records.EpochLog(self.out) if p.main else None
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

        losses, wrongs = [], []
        epoch_loss, epoch_wrong, epoch_count = 0.0, 0.0, 0
        window_start, window_first = time.perf_counter(), start
        local_batch = args.batch_size // p.world_size
        it = start
        stopped: Optional[str] = None
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

                    # -- window end: read back, check, agree on stopping -----------
                    window_losses = torch.stack(losses).float().cpu()
                    window_wrong = torch.stack(wrongs).sum().item()
                    if p.distributed:   # the global batch's mean loss and wrong count
                        summed = distributed.all_sum(window_losses.tolist() + [window_wrong], self.device, p)
                        window_losses = torch.tensor(summed[:-1]) / p.world_size
                        window_wrong = summed[-1]
                    bad = (~torch.isfinite(window_losses)).nonzero()
                    first_bad = window_first + int(bad[0]) + 1 if len(bad) else NO_ITERATION
                    first_bad, last_signal = distributed.all_min([first_bad, -(requests.signal or 0)],
                                                                 self.device, p)
                    first_bad, stop_signal = int(first_bad), -int(last_signal)
                    if first_bad != NO_ITERATION:
                        where = f"after the checkpoint at iteration {self._saved_at()}" \
                            if (self.out / "checkpoint.pt").exists() else "with no checkpoint written yet"
                        message = (f"the training loss is not finite at iteration {first_bad} "
                                   f"(of {self.total_iters}); stopping, {where} kept")
                        if p.main:   # a record of the divergence for whoever compares runs
                            records.write_json(self.out / "diverged.json",
                                               {"iteration": first_bad, "total_iterations": self.total_iters,
                                                "message": message})
                        raise NonFiniteLoss(message)
                    now = time.perf_counter()
                    seconds, n = now - window_start, it - window_first
                    self.train_seconds += seconds
                    self.train_images += n * args.batch_size
                    mean_loss = window_losses.mean().item()
                    window_error = window_wrong / (n * args.batch_size)
                    epoch_loss += window_losses.sum().item()
                    epoch_wrong += window_wrong
                    epoch_count += n
                    self.history["train"].append((it, mean_loss))
                    if progress is not None:
                        progress.update(n)
                        progress.set_postfix(loss=f"{mean_loss:.3f}", err=f"{100 * window_error:.1f}%",
                                             img_s=f"{n * args.batch_size / seconds:.0f}")
                    losses, wrongs = [], []

                    if epoch_end or it == self.total_iters:
                        epoch = math.ceil(it / self.batches_per_epoch)
                        row = {"epoch": epoch, "iteration": it, "lr": args.lr * self.schedule(it - 1),
                               "train_loss": epoch_loss / max(epoch_count, 1),
                               "train_error": epoch_wrong / max(epoch_count * args.batch_size, 1),
                               "images_per_s": self.train_images / max(self.train_seconds, 1e-9),
                               "elapsed_s": self.train_seconds}
                        if epoch % args.eval_every == 0 or it == self.total_iters:
                            row["test_loss"], row["test_error"] = self.evaluate()
                            self.history["test"].append((it, row["test_error"]))
                        if log is not None:
                            log.write(row)
                            if progress is not None:
                                progress.write(self._describe(row))
                        epoch_loss, epoch_wrong, epoch_count = 0.0, 0.0, 0
                        self.save(it)
                    if stop_signal or asked_stop:
                        stopped = signal.Signals(stop_signal).name if stop_signal else "--stop-after-iters"
                        if not epoch_end:
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

    def _saved_at(self) -> int:
        return checkpoint.load(self.out / "checkpoint.pt")["iteration"]

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
