# bn_backward_finish: the last, elementwise step of BatchNorm's backward, in one pass over NHWC.
#
#   g, h, add, dh [N, H, W, C] contiguous (rows [M = N*H*W, C]); per-channel float32 [C]
#   (float64 for float64 g):
#   mean, invstd, sum_g = sum(g), sum_g_xhat = sum(g * xhat) (from conv_dgrad's epilogue), weight
#   batch statistics:  dh = weight * invstd * (g - sum_g / count - xhat * sum_g_xhat / count),
#                      xhat = (h - mean) * invstd
#   running statistics (eval): dh = weight * invstd * g
#   dh += add when given (a gradient joining here, e.g. the identity shortcut's)
#
# Program (t, cb) owns channels cb*BLOCK_C ... and `tiles_per_program` consecutive tiles of
# BLOCK_M rows; it computes the per-channel coefficients once and reuses them for all its tiles.
# xhat is formed from h - mean (not as a * h + b), so mean-100 / std-0.01 activations keep
# their digits. Arithmetic in fp32 (fp64 for fp64 tensors), dh stored in g's dtype. Saves nothing.
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from fused_preact.unit_ops import statistics_dtype
from .rounding import cast_rounded
from .runtime import check_device, interpreting

TILE_ELEMENTS = 4096
MIN_BLOCK_C = 16    # narrower channel counts only occur in tests; masks cover them
MAX_BLOCK_C = 128
NUM_WARPS = 8
# Enough programs to keep an H100 (132 SMs) busy; the interpreter pays ~0.1 s per program.
TARGET_PROGRAMS = 2048
TARGET_PROGRAMS_INTERPRETED = 2

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


@triton.jit
def _bn_backward_finish_kernel(
    # pointers: activations [M, C], then per-channel vectors [C]
    g_ptr, h_ptr, add_ptr, dh_ptr,
    mean_ptr, invstd_ptr, weight_ptr, sum_g_ptr, sum_g_xhat_ptr,
    # sizes and scalars
    num_rows, channels, tiles_per_program, inv_count: tl.float64,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    BATCH_STATS: tl.constexpr, HAS_ADD: tl.constexpr, FP64: tl.constexpr, EMULATE_ROUNDING: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    acc_dtype = tl.float64 if FP64 else tl.float32
    if not FP64:   # inv_count comes as float64
        inv_count = tl.cast(inv_count, tl.float32)

    # ---- per-channel coefficients, once per program ----
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype)
    gain = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype) * invstd
    if BATCH_STATS:
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype)
        mean_g = tl.load(sum_g_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype) * inv_count
        mean_g_xhat = tl.load(sum_g_xhat_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype) * inv_count

    # ---- one elementwise pass over the program's rows ----
    first_row = pid_t * tiles_per_program * BLOCK_M
    for tile in range(0, tiles_per_program):
        rows = first_row + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows < num_rows)[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * channels + cols[None, :]
        g = tl.load(g_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        if BATCH_STATS:
            h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
            xhat = (h - mean[None, :]) * invstd[None, :]
            dh = gain[None, :] * (g - mean_g[None, :] - xhat * mean_g_xhat[None, :])
        else:
            dh = gain[None, :] * g
        if HAS_ADD:
            dh += tl.load(add_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        tl.store(dh_ptr + offsets, cast_rounded(dh, dh_ptr.dtype.element_ty, EMULATE_ROUNDING), mask=ok)


def launch_plan(num_rows: int, channels: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_C, tiles_per_program, row_programs)`` for ``num_rows`` x ``channels``."""
    block_c = min(max(triton.next_power_of_2(channels), MIN_BLOCK_C), MAX_BLOCK_C)
    block_m = TILE_ELEMENTS // block_c
    tiles = max(1, triton.cdiv(num_rows, block_m))
    target = TARGET_PROGRAMS_INTERPRETED if interpreting() else TARGET_PROGRAMS
    row_programs = max(1, min(tiles, target // triton.cdiv(channels, block_c)))
    tiles_per_program = triton.cdiv(tiles, row_programs)
    return block_m, block_c, tiles_per_program, triton.cdiv(tiles, tiles_per_program)


def _check_activation(name: str, tensor: torch.Tensor, g: torch.Tensor) -> None:
    if tensor.device != g.device:
        raise ValueError(f"{name} is on {tensor.device} but g is on {g.device}")
    if tensor.shape != g.shape:
        raise ValueError(f"{name} has shape {list(tensor.shape)} but g has {list(g.shape)}")
    if tensor.dtype != g.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but g has {g.dtype}")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous NHWC tensor")


def _check_channel_vector(name: str, tensor: torch.Tensor, g: torch.Tensor, dtypes) -> None:
    channels = g.shape[-1]
    if tensor.device != g.device:
        raise ValueError(f"{name} is on {tensor.device} but g is on {g.device}")
    if tensor.dtype not in dtypes:
        raise TypeError(f"{name} has dtype {tensor.dtype}; expected one of {', '.join(map(str, dtypes))}")
    if tuple(tensor.shape) != (channels,) or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of shape [{channels}] (g's channels), "
                         f"got {list(tensor.shape)}")


def _check_inputs(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, add, batch_stats):
    check_device("g", g)
    if g.dtype not in DTYPES:
        raise TypeError(f"g has dtype {g.dtype}; bn_backward_finish supports {', '.join(map(str, DTYPES))}")
    if g.dim() != 4 or not g.is_contiguous():
        raise ValueError(f"g must be a contiguous 4-D NHWC tensor [N, H, W, C], got shape {list(g.shape)}")
    if g.shape[-1] == 0:
        raise ValueError("g has no channels")
    stat_dtype = statistics_dtype(g.dtype)
    _check_channel_vector("invstd", invstd, g, (stat_dtype,))
    _check_channel_vector("weight", weight, g, WEIGHT_DTYPES)
    if add is not None:
        _check_activation("add", add, g)
    if batch_stats:
        _check_activation("h", h, g)
        for name, vector in (("mean", mean), ("sum_g", sum_g), ("sum_g_xhat", sum_g_xhat)):
            _check_channel_vector(name, vector, g, (stat_dtype,))
        if not count > 0:
            raise ValueError(f"count must be positive with batch statistics, got {count}")


def bn_backward_finish(g: torch.Tensor, h: torch.Tensor, mean: torch.Tensor, invstd: torch.Tensor,
                       weight: torch.Tensor, sum_g: torch.Tensor, sum_g_xhat: torch.Tensor, count: float,
                       add: Optional[torch.Tensor], batch_stats: bool) -> torch.Tensor:
    """``dh`` (NHWC, g's dtype): BatchNorm's input gradient from the gradient ``g`` of its output."""
    _check_inputs(g, h, mean, invstd, weight, sum_g, sum_g_xhat, count, add, batch_stats)
    channels = g.shape[-1]
    num_rows = g.numel() // channels
    dh = torch.empty_like(g)
    if num_rows == 0:
        return dh
    # a BatchNorm weight of another dtype is converted here (C values) rather than compiled for
    weight = weight.to(invstd.dtype)
    block_m, block_c, tiles_per_program, row_programs = launch_plan(num_rows, channels)
    grid = (row_programs, triton.cdiv(channels, block_c))
    # unused pointers (constexpr-disabled branches) point at g / invstd
    _bn_backward_finish_kernel[grid](
        g, h if batch_stats else g, add if add is not None else g, dh,
        mean if batch_stats else invstd, invstd, weight,
        sum_g if batch_stats else invstd, sum_g_xhat if batch_stats else invstd,
        num_rows, channels, tiles_per_program, 1.0 / float(count) if batch_stats else 1.0,
        BLOCK_M=block_m, BLOCK_C=block_c, BATCH_STATS=bool(batch_stats), HAS_ADD=add is not None,
        FP64=g.dtype == torch.float64, EMULATE_ROUNDING=interpreting(), num_warps=NUM_WARPS)
    return dh


def aot_variants():
    """Every configuration ``bn_backward_finish`` can launch, for the ahead-of-time compile test."""
    block_c = MIN_BLOCK_C
    while block_c <= MAX_BLOCK_C:
        for dtype, name in DTYPES.items():
            stat = DTYPES[statistics_dtype(dtype)]
            for batch_stats in (True, False):
                for has_add in (True, False):
                    yield {
                        "name": (f"bn_backward_finish_{name}_c{block_c}"
                                 f"{'_batch' if batch_stats else '_running'}{'_add' if has_add else ''}"),
                        "kernel": _bn_backward_finish_kernel,
                        "signature": {
                            "g_ptr": f"*{name}", "h_ptr": f"*{name}", "add_ptr": f"*{name}",
                            "dh_ptr": f"*{name}", "mean_ptr": f"*{stat}", "invstd_ptr": f"*{stat}",
                            "weight_ptr": f"*{stat}", "sum_g_ptr": f"*{stat}", "sum_g_xhat_ptr": f"*{stat}",
                            "num_rows": "i32", "channels": "i32", "tiles_per_program": "i32",
                            "inv_count": "fp64", "BLOCK_M": "constexpr", "BLOCK_C": "constexpr",
                            "BATCH_STATS": "constexpr", "HAS_ADD": "constexpr", "FP64": "constexpr",
                            "EMULATE_ROUNDING": "constexpr"},
                        "constexprs": {"BLOCK_M": TILE_ELEMENTS // block_c, "BLOCK_C": block_c,
                                       "BATCH_STATS": batch_stats, "HAS_ADD": has_add,
                                       "FP64": dtype == torch.float64, "EMULATE_ROUNDING": False},
                        "num_warps": NUM_WARPS,
                        "num_stages": 3,
                        "tensor_cores": False,
                    }
        block_c *= 2
