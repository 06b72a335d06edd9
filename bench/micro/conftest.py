"""pytest-benchmark micro-benchmarks of each fused operator (run: pytest bench/micro --benchmark-only).

Outside the test suite's ``testpaths``: a normal ``pytest`` run never collects them.
Without a GPU the Triton kernels run in Triton's interpreter, switched on here before
triton is imported, exactly as the test suite does.
"""
import os
import sys
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))   # `bench` importable
