"""Test helper: the command line of a tiny, fast trainer run on the CPU.

64 synthetic 8x8 images in batches of 16 (4 iterations per epoch), a ResNet-8 run by eager
PyTorch, a window end every 2 iterations, no warm-up, lr 0.05 divided by 10 at iteration 9.
"""
from __future__ import annotations

import contextlib

import torch

ITERS_PER_EPOCH = 4


@contextlib.contextmanager
def one_thread():
    """One CPU thread for a run made by a module-scoped fixture (``one_cpu_thread`` is per test): on
    the shared 2 cores a tiny run takes 0.3 s with one thread and up to 16 s with two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def tiny_argv(out, *extra: str) -> list[str]:
    return ["--synthetic", "--synthetic-images", "64", "--image-size", "8", "--eval-batch-size", "32",
            "--arch", "cifar_resnet8", "--batch-size", "16", "--warmup-iters", "0", "--lr", "0.05",
            "--milestones", "9", "--out", str(out), "--no-progress", "--device", "cpu", "--backend", "eager",
            "--print-freq", "2", *extra]
