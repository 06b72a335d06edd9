"""``--cuda-graph``: the trainer's whole step (forward, loss, backward, SGD step) as one CUDA graph.

The step is the trainer's own (``Trainer.step``) with three changes that make it
capturable (``fused_preact.cuda_graph`` has the mechanics):

- SGD runs its fused variant (``fused=True``) and reads its learning rate from a device tensor
  (``DeviceLR``), refilled from the schedule before each replay: the schedule's
  changes (warm-up, milestones) need no re-capture. The foreach SGD the trainer
  otherwise uses turns a tensor lr into a Python number (``.item()``), which a graph
  cannot capture.
- autocast runs with its weight-cast cache off (the casts are part of the graph).
- the loss and the wrong-prediction count come back as static tensors; the trainer
  gets clones (two tiny device copies), so nothing is read back to the host until
  the end of a ``--print-freq`` window, outside the graph, as without graphs.

BN running statistics and ``num_batches_tracked`` are updated in place, so inside the
graph. The scheduler steps on the host between replays.

Refused, with a message naming the flags: a CPU device (graphs capture CUDA work),
``--amp fp16`` (the GradScaler reads its inf/NaN check back to the host every step),
``--log-signal`` (hooks added on some iterations, norms read back), several processes
(DDP's all-reduce in a graph needs NCCL capture and a side-stream DDP, untested here).
``--compile`` is accepted (a ``torch.compile``d model of the default mode is capturable once the
eager warm-up steps have compiled it), but this combination has not yet run on a GPU.
"""
from __future__ import annotations

import argparse
import contextlib
import os
from typing import Callable, Optional

import torch
from torch import nn

from ..cuda_graph import DeviceLR, GraphedStep

WARMUP_STEPS = 3   # eager steps before the capture (PyTorch's notes use a few; lazy state needs one)


def refusal(args: argparse.Namespace, device_type: Optional[str] = None, world_size: Optional[int] = None
            ) -> Optional[str]:
    """Why ``--cuda-graph`` cannot run with these flags (None when it can). The device and
    the number of processes default to what the run would use."""
    if device_type is None:
        name = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        device_type = "cuda" if name.startswith("cuda") else name
    if world_size is None:
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if device_type != "cuda":
        return (f"--cuda-graph needs a CUDA device, but this run is on {device_type}: CUDA graphs capture GPU "
                f"work only (leave out --cuda-graph on a CPU)")
    if args.amp == "fp16":
        return ("--cuda-graph with --amp fp16: the GradScaler reads its inf/NaN check back to the host every "
                "step, which a CUDA graph cannot capture; use --amp bf16 (no scaler) or --amp off")
    if getattr(args, "log_signal", False):
        return ("--cuda-graph with --log-signal: the signal recorder adds hooks on some iterations and reads "
                "norms back; log the signal in a run without --cuda-graph")
    if world_size > 1:
        return (f"--cuda-graph with {world_size} processes: capturing DDP's gradient all-reduce is not "
                f"supported here (it needs NCCL capture and DDP built on a side stream); run one process or "
                f"leave out --cuda-graph")
    return None


class CapturedTrainStep:
    """One training step per call, captured into a CUDA graph after ``warmup`` eager steps
    (``capture=True``), or run eagerly through the same code (``capture=False``).

    ``__call__(images, labels) -> (loss, wrong)``: device tensors (clones, yours to keep)
    of the batch's fp32 mean loss and its number of wrong top-1 predictions; the
    scheduler has stepped once after it, as in ``Trainer.step``.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler,
                 loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                 amp_dtype: Optional[torch.dtype], capture: bool, warmup: int = WARMUP_STEPS):
        self.model, self.optimizer, self.scheduler, self.loss_fn = model, optimizer, scheduler, loss_fn
        self.amp_dtype = amp_dtype
        self.lr = DeviceLR(optimizer)
        self.graphed = GraphedStep(self.step, capture=capture, warmup=warmup)
        self._capturable_optimizer()

    def _capturable_optimizer(self) -> None:
        """SGD groups run the fused variant (the one that reads a tensor lr on the device); other
        optimizers must have been built with ``capturable=True``. Checked again at the first
        step, since ``load_state_dict`` puts back the flags a checkpoint was saved with."""
        for index, group in enumerate(self.optimizer.param_groups):
            if isinstance(self.optimizer, torch.optim.SGD):
                group["fused"], group["foreach"] = True, False
            elif not group.get("capturable", False):
                raise ValueError(f"{type(self.optimizer).__name__} param group {index}: a graphed step needs an "
                                 f"optimizer built with capturable=True (or SGD)")

    def _autocast(self, device_type: str):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type, dtype=self.amp_dtype, cache_enabled=False)

    def step(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The step that is captured: it reads nothing back to the host."""
        with self._autocast(images.device.type):
            logits = self.model(images)
            loss = self.loss_fn(logits, labels)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with self.lr.installed():
            self.optimizer.step()
        return loss.detach(), (logits.detach().argmax(1) != labels).sum()

    def __call__(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.graphed.calls == 0:
            self._capturable_optimizer()
        self.lr.sync()
        loss, wrong = self.graphed(images, labels)
        self.scheduler.step()
        return loss.clone(), wrong.clone()
