import os
import zlib

import pytest
import torch
import torch._functorch.config

# Without a GPU the Triton kernels run on CPU tensors in Triton's interpreter, which
# must be switched on before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# A custom operator whose outputs alias its inputs or each other is an error under torch.compile
# when CI is set (torch's default follows the CI variable): make it one everywhere, so a local run
# fails where CI would (older torch versions have no such switch).
if hasattr(torch._functorch.config, "error_on_custom_op_aliasing"):
    torch._functorch.config.error_on_custom_op_aliasing = True


@pytest.fixture(autouse=True)
def _seed_per_test(request):
    """Each test draws its own random inputs, reproducibly (seeded by its id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
