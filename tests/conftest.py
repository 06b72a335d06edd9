import os
import zlib

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
# must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws its own random inputs, reproducibly (seeded by its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
