# channel_stats: per-channel partial statistics of an NHWC activation, in one read pass.
#
#   x [N, H, W, C] contiguous, viewed as rows [M = N*H*W, C]
#   -> pmean [T, C], pm2 [T, C], pcount [T]   (the partials of fused_preact.unit_ops: float32,
#      float64 for float64 x; accumulated in the same precision)
#
# Program (t, cb) owns channels cb*BLOCK_C ... and `tiles_per_program` consecutive tiles of
# BLOCK_M rows. Each tile is reduced two-pass in registers (tile mean, then the sum of squared
# deviations from it), and the tiles of a program are merged with Chan's formula, so data with
# mean 100 and std 0.01 keeps its variance (no E[x^2] - E[x]^2). All of it runs on x minus the
# program's first row (exact for nearby values), so tile means are small numbers whose rounding
# does not swamp the between-tile term of Chan's merge. Program t writes partial row t.
# Fuses nothing else; saves nothing. bn_finalize merges the partials.
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .runtime import check_device, interpreting
from fused_preact.unit_ops import statistics_dtype

# Tile of one loop step: BLOCK_M * BLOCK_C = TILE_ELEMENTS values spread over NUM_WARPS warps.
TILE_ELEMENTS = 4096
MIN_BLOCK_C = 16    # narrower channel counts only occur in tests; masks cover them
MAX_BLOCK_C = 64
NUM_WARPS = 4
# Enough programs to fill an H100 (132 SMs) several times; the interpreter pays ~0.1 s per program.
TARGET_PROGRAMS = 1024
TARGET_PROGRAMS_INTERPRETED = 2

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@triton.jit
def _channel_stats_kernel(
    # pointers
    x_ptr, pmean_ptr, pm2_ptr, pcount_ptr,
    # sizes
    num_rows, channels, tiles_per_program,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels

    acc_dtype = tl.float64 if FP64 else tl.float32
    first_row = pid_t * tiles_per_program * BLOCK_M
    origin = tl.load(x_ptr + first_row.to(tl.int64) * channels + cols, mask=col_ok, other=0.0)
    origin = origin.to(acc_dtype)
    mean = tl.zeros([BLOCK_C], dtype=acc_dtype)   # of x - origin
    m2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    count = tl.zeros([1], dtype=acc_dtype)   # rows merged so far (the same for every channel)

    for tile in range(0, tiles_per_program):
        rows = first_row + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < num_rows
        ok = row_ok[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * channels + cols[None, :], mask=ok, other=0.0)
        x = tl.where(ok, x.to(acc_dtype) - origin[None, :], 0.0)

        # ---- two passes over the tile in registers ----
        tile_count = tl.sum(row_ok.to(acc_dtype), axis=0)
        tile_mean = tl.sum(x, axis=0) / tl.maximum(tile_count, 1.0)
        deviation = tl.where(ok, x - tile_mean[None, :], 0.0)
        tile_m2 = tl.sum(deviation * deviation, axis=0)

        # ---- Chan's merge into the program's running statistics ----
        merged = count + tile_count
        weight = tile_count / tl.maximum(merged, 1.0)
        delta = tile_mean - mean
        mean = mean + delta * weight
        m2 = m2 + tile_m2 + delta * delta * (count * weight)
        count = merged

    stat_dtype = pmean_ptr.dtype.element_ty
    tl.store(pmean_ptr + pid_t * channels + cols, (origin + mean).to(stat_dtype), mask=col_ok)
    tl.store(pm2_ptr + pid_t * channels + cols, m2.to(stat_dtype), mask=col_ok)
    first = tl.arange(0, 1)
    tl.store(pcount_ptr + pid_t + first, count.to(stat_dtype), mask=(first == 0) & (pid_c == 0))


def _block_c(channels: int) -> int:
    return min(max(triton.next_power_of_2(channels), MIN_BLOCK_C), MAX_BLOCK_C)


def launch_plan(num_rows: int, channels: int) -> tuple[int, int, int, int]:
    """``(BLOCK_M, BLOCK_C, tiles_per_program, T)`` for ``num_rows`` x ``channels``; T = partial rows.

    A function of the shape alone, so fake (meta) implementations can size the partials.
    """
    block_c = _block_c(channels)
    block_m = TILE_ELEMENTS // block_c
    tiles = max(1, triton.cdiv(num_rows, block_m))
    target = TARGET_PROGRAMS_INTERPRETED if interpreting() else TARGET_PROGRAMS
    row_programs = max(1, min(tiles, target // triton.cdiv(channels, block_c)))
    tiles_per_program = triton.cdiv(tiles, row_programs)
    return block_m, block_c, tiles_per_program, triton.cdiv(tiles, tiles_per_program)


def partial_rows(num_rows: int, channels: int) -> int:
    """T, the number of partial rows ``channel_stats`` returns for ``[num_rows, channels]``."""
    return launch_plan(num_rows, channels)[3]


def _check_input(x: torch.Tensor) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    check_device("x", x)
    if x.dtype not in DTYPES:
        raise TypeError(f"x has dtype {x.dtype}; channel_stats supports {', '.join(map(str, DTYPES))}")
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D NHWC tensor [N, H, W, C], got shape {tuple(x.shape)}")
    if not x.is_contiguous():
        raise ValueError("x must be a contiguous NHWC tensor (a channels_last NCHW tensor .permute(0, 2, 3, 1))")
    if x.shape[-1] == 0:
        raise ValueError("x has no channels")


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Partials ``(pmean [T, C], pm2 [T, C], pcount [T])`` of NHWC ``x``'s per-channel statistics."""
    _check_input(x)
    channels = x.shape[-1]
    num_rows = x.numel() // channels
    block_m, block_c, tiles_per_program, t = launch_plan(num_rows, channels)
    stat_dtype = statistics_dtype(x.dtype)
    pmean = torch.empty(t, channels, dtype=stat_dtype, device=x.device)
    pm2 = torch.empty(t, channels, dtype=stat_dtype, device=x.device)
    pcount = torch.empty(t, dtype=stat_dtype, device=x.device)
    grid = (t, triton.cdiv(channels, block_c))
    _channel_stats_kernel[grid](
        x, pmean, pm2, pcount, num_rows, channels, tiles_per_program,
        BLOCK_M=block_m, BLOCK_C=block_c, FP64=x.dtype == torch.float64, num_warps=NUM_WARPS)
    return pmean, pm2, pcount


def aot_variants():
    """Every configuration ``channel_stats`` can launch, for the ahead-of-time compile test."""
    block_c = MIN_BLOCK_C
    while block_c <= MAX_BLOCK_C:
        for dtype, name in DTYPES.items():
            stat = DTYPES[statistics_dtype(dtype)]
            yield {
                "name": f"channel_stats_{name}_c{block_c}",
                "kernel": _channel_stats_kernel,
                "signature": {"x_ptr": f"*{name}", "pmean_ptr": f"*{stat}", "pm2_ptr": f"*{stat}",
                              "pcount_ptr": f"*{stat}", "num_rows": "i32", "channels": "i32",
                              "tiles_per_program": "i32", "BLOCK_M": "constexpr",
                              "BLOCK_C": "constexpr", "FP64": "constexpr"},
                "constexprs": {"BLOCK_M": TILE_ELEMENTS // block_c, "BLOCK_C": block_c,
                               "FP64": dtype == torch.float64},
                "num_warps": NUM_WARPS,
                "num_stages": 3,
                "tensor_cores": False,
            }
        block_c *= 2
