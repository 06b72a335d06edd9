# bn_finalize: merge per-channel partial statistics into BatchNorm's batch statistics and
# the scale/shift of the fused BN-ReLU prologue; update the running statistics in place.
#
#   pmean [T, C], pm2 [T, C], pcount [T] (float32 partials, rows with count 0 allowed)
#   -> mean, invstd, scale = weight * invstd, shift = bias - mean * scale   (float32 [C])
#   (float64 partials, from float64 activations: float64 throughout)
#   running_mean/var <- (1 - f) * running + f * (mean, M2 / (n - 1))        (nn.BatchNorm2d)
#
# The merge (_merge_rows): a program walks a range of partial rows BLOCK_T at a time for BLOCK_C
# channels: each block is merged exactly in registers (count-weighted mean, then M2 plus the
# spread of the block's means around it, relative to the mean merged so far), and blocks are
# folded into the running result with Chan's formula. Means are carried relative to the first
# block's mean, so that mean 100 / std 0.01 data loses no digits to the large common offset.
# Two stages when there are many partials (more than GROUP_ROWS): _merge_groups_kernel, one
# program per (channel block, group of GROUP_ROWS partial rows), merges each group into one
# partial row of a [groups, C] workspace, its mean relative to the group's own origin (stored
# beside it), in parallel; then _bn_finalize_kernel,
# one program per channel block, merges the group rows the same way and finishes. (One stage over
# all partials ran cdiv(C, 16) programs that each walked every partial row: 4 programs at
# ResNet-50's stage 1, batch 256.) Both stages are Chan's merge, so the result is that of merging
# all partials at once up to the order of the additions.
# The averaging factor f is momentum, or 1 / num_batches_tracked read on the device when
# momentum < 0 (BatchNorm's momentum=None): nothing is read back to the host, so a training step
# can be captured in a CUDA graph. Saves nothing; mean and invstd are what BN backward needs.
from __future__ import annotations

import itertools
from typing import Optional

import torch
import triton
import triton.language as tl

from .runtime import check_device

BLOCK_C = 16
BLOCK_T = 128
NUM_WARPS = 4
# partial rows per program of the first stage (and the most the one-stage finalize takes)
GROUP_ROWS = 2 * BLOCK_T

TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
# dtype of the partials -> dtypes BatchNorm's weight, bias and running statistics may have
PARAMETER_DTYPES = {torch.float32: (torch.float32, torch.bfloat16, torch.float16),
                    torch.float64: (torch.float64, torch.float32)}


@triton.jit
def _divide(a, b, FP64: tl.constexpr):
    """Correctly rounded a / b (fp32 division in Triton is approximate; fp64 is IEEE)."""
    if FP64:
        return a / b
    else:
        return tl.div_rn(a, b)


@triton.jit
def _sqrt(a, FP64: tl.constexpr):
    """Correctly rounded square root."""
    if FP64:
        return tl.sqrt(a)
    else:
        return tl.sqrt_rn(a)


@triton.jit
def _origin(pmean_ptr, pcount_ptr, row_begin, row_end, cols, col_ok, channels, BLOCK_T: tl.constexpr):
    """The count-weighted mean of the first BLOCK_T rows of [row_begin, row_end): the offset the
    merge carries its means relative to (0 where those rows are all empty)."""
    rows = row_begin + tl.arange(0, BLOCK_T)
    count = tl.load(pcount_ptr + rows, mask=rows < row_end, other=0.0)
    ok = (count > 0.0)[:, None] & col_ok[None, :]
    first_means = tl.load(pmean_ptr + rows[:, None] * channels + cols[None, :], mask=ok, other=0.0)
    return tl.sum(count[:, None] * first_means, axis=0) / tl.maximum(tl.sum(count, axis=0), 1.0)


@triton.jit
def _merge_rows(pmean_ptr, pm2_ptr, pcount_ptr, porigin_ptr, row_begin, row_end, origin, cols, col_ok, channels,
                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr, ROW_ORIGINS: tl.constexpr):
    """Chan's merge of partial rows [row_begin, row_end) for the channels ``cols``: (mean - origin,
    M2, n), the mean NaN where no row has a count. Relative to `origin` (a mean of nearby data),
    `pmean - origin` is exact and the merged offset a small, precise number. With ROW_ORIGINS each
    row's mean is relative to its own origin (porigin_ptr, [rows, C]: the first stage's groups)."""
    acc_dtype = tl.float64 if FP64 else tl.float32
    mean = tl.zeros([BLOCK_C], dtype=acc_dtype)   # of the partials merged so far, minus origin
    m2 = tl.zeros([BLOCK_C], dtype=acc_dtype)
    n = tl.zeros([1], dtype=acc_dtype)
    for start in range(row_begin, row_end, BLOCK_T):
        rows = start + tl.arange(0, BLOCK_T)
        count = tl.load(pcount_ptr + rows, mask=rows < row_end, other=0.0)
        has_rows = count > 0.0   # an empty partial's mean and M2 may be anything, even NaN
        ok = has_rows[:, None] & col_ok[None, :]
        offsets = rows[:, None] * channels + cols[None, :]
        block_means = tl.load(pmean_ptr + offsets, mask=ok, other=0.0)
        block_m2s = tl.load(pm2_ptr + offsets, mask=ok, other=0.0)

        # ---- exact merge of the block, relative to the mean so far ----
        if ROW_ORIGINS:
            row_origins = tl.load(porigin_ptr + offsets, mask=ok, other=0.0)
            delta = tl.where(ok, ((row_origins - origin[None, :]) + block_means) - mean[None, :], 0.0)
        else:
            delta = tl.where(ok, (block_means - origin[None, :]) - mean[None, :], 0.0)
        block_n = tl.sum(count, axis=0)
        block_delta = tl.sum(count[:, None] * delta, axis=0) / tl.maximum(block_n, 1.0)
        spread = delta - block_delta[None, :]
        block_m2 = tl.sum(block_m2s, axis=0) + tl.sum(count[:, None] * spread * spread, axis=0)

        # ---- Chan's formula: fold the block into the running result ----
        merged = n + block_n
        weight = block_n / tl.maximum(merged, 1.0)
        mean = mean + block_delta * weight
        m2 = m2 + block_m2 + block_delta * block_delta * (n * weight)
        n = merged
    return tl.where(n > 0.0, mean, float("nan")), m2, n


@triton.jit
def _merge_groups_kernel(
    # pointers: the partials in; one merged partial row per group, and its origin, out
    pmean_ptr, pm2_ptr, pcount_ptr, gmean_ptr, gm2_ptr, gcount_ptr, gorigin_ptr,
    # sizes
    num_partials, channels,
    # meta-parameters
    GROUP_ROWS: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr, FP64: tl.constexpr,
):
    """Stage 1: program (c, g) merges partial rows [g * GROUP_ROWS, (g + 1) * GROUP_ROWS) of channel
    block c into row g of the group partials: its mean relative to its origin (the mean of its first
    BLOCK_T rows), both stored (an absolute mean of 100 rounded to float32 would lose the digits a
    std of 0.01 lives in)."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    group = tl.program_id(1)
    begin = group * GROUP_ROWS
    end = tl.minimum(begin + GROUP_ROWS, num_partials)
    origin = _origin(pmean_ptr, pcount_ptr, begin, end, cols, col_ok, channels, BLOCK_T)
    mean, m2, n = _merge_rows(pmean_ptr, pm2_ptr, pcount_ptr, pmean_ptr, begin, end, origin, cols, col_ok,
                              channels, BLOCK_T, BLOCK_C, FP64, False)
    tl.store(gmean_ptr + group * channels + cols, mean, mask=col_ok)
    tl.store(gm2_ptr + group * channels + cols, m2, mask=col_ok)
    tl.store(gorigin_ptr + group * channels + cols, origin, mask=col_ok)
    tl.store(gcount_ptr + group + tl.arange(0, 1), n, mask=tl.program_id(0) == 0)


@triton.jit
def _bn_finalize_kernel(
    # pointers: partials (with ROW_ORIGINS: the first stage's groups, their means relative to
    # porigin_ptr's), affine parameters, outputs, running statistics
    pmean_ptr, pm2_ptr, pcount_ptr, porigin_ptr, weight_ptr, bias_ptr,
    mean_ptr, invstd_ptr, scale_ptr, shift_ptr,
    running_mean_ptr, running_var_ptr, num_batches_tracked_ptr,
    # sizes and scalars
    num_partials, channels, momentum: tl.float64, eps: tl.float64,
    # meta-parameters
    BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr,
    UPDATE_RUNNING: tl.constexpr, CUMULATIVE: tl.constexpr, FP64: tl.constexpr, ROW_ORIGINS: tl.constexpr,
):
    """Stage 2 (the only one for few partials): program c merges every partial row of channel block
    c, finishes the statistics and updates the running ones."""
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    acc_dtype = tl.float64 if FP64 else tl.float32
    # momentum and eps come as float64; BatchNorm's float32 kernels round them to float32.
    # tl.full, not an assignment or tl.cast: Triton's interpreter passes a scalar argument as a
    # Python float and turns `x = <Python float>` (and cast's input) into a float32 tensor,
    # which rounded momentum to 0.1f in the float64 running-statistic update.
    momentum = tl.full([1], momentum, acc_dtype)
    eps = tl.full([1], eps, acc_dtype)
    # the origin: the first block's mean (of the groups' origins after a first stage)
    origin = _origin(porigin_ptr if ROW_ORIGINS else pmean_ptr, pcount_ptr, 0, num_partials, cols, col_ok,
                     channels, BLOCK_T)
    mean, m2, n = _merge_rows(pmean_ptr, pm2_ptr, pcount_ptr, porigin_ptr, 0, num_partials, origin, cols, col_ok,
                              channels, BLOCK_T, BLOCK_C, FP64, ROW_ORIGINS)
    mean = origin + mean
    var = _divide(m2, n, FP64)
    invstd = _divide(1.0, _sqrt(var + eps, FP64), FP64)
    scale = tl.load(weight_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype) * invstd
    shift = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(acc_dtype) - mean * scale
    tl.store(mean_ptr + cols, mean, mask=col_ok)
    tl.store(invstd_ptr + cols, invstd, mask=col_ok)
    tl.store(scale_ptr + cols, scale, mask=col_ok)
    tl.store(shift_ptr + cols, shift, mask=col_ok)

    if UPDATE_RUNNING:
        if CUMULATIVE:
            # the caller has already counted this batch: f = 1 / num_batches_tracked
            # (in float64 then rounded, as BatchNorm computes 1.0 / float(num_batches_tracked))
            batches = tl.load(num_batches_tracked_ptr + tl.arange(0, 1)).to(tl.float64)
            factor = (1.0 / batches).to(acc_dtype)
        else:
            factor = momentum
        unbiased_var = _divide(m2, n - 1.0, FP64)
        running_mean = tl.load(running_mean_ptr + cols, mask=col_ok, other=0.0)
        running_var = tl.load(running_var_ptr + cols, mask=col_ok, other=0.0)
        new_mean = (1.0 - factor) * running_mean.to(acc_dtype) + factor * mean
        new_var = (1.0 - factor) * running_var.to(acc_dtype) + factor * unbiased_var
        tl.store(running_mean_ptr + cols, new_mean.to(running_mean.dtype), mask=col_ok)
        tl.store(running_var_ptr + cols, new_var.to(running_var.dtype), mask=col_ok)


def _check_partial(name: str, tensor: torch.Tensor, shape: tuple, pmean: torch.Tensor) -> None:
    if tensor.device != pmean.device:
        raise ValueError(f"{name} is on {tensor.device} but pmean is on {pmean.device}")
    if tensor.dtype != pmean.dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but pmean has {pmean.dtype}")
    if tuple(tensor.shape) != shape or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of shape {list(shape)}, got {list(tensor.shape)}")


def _check_parameter(name: str, tensor: torch.Tensor, channels: int, dtype: torch.dtype,
                     device: torch.device) -> None:
    if tensor.device != device:
        raise ValueError(f"{name} is on {tensor.device} but pmean is on {device}")
    if tensor.dtype != dtype:
        raise TypeError(f"{name} has dtype {tensor.dtype} but weight has {dtype}; "
                        f"BatchNorm's parameters and buffers share one dtype")
    if tuple(tensor.shape) != (channels,) or not tensor.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of shape [{channels}], got {list(tensor.shape)}")


def _check_inputs(pmean, pm2, pcount, weight, bias, running_mean, running_var, num_batches_tracked,
                  momentum):
    check_device("pmean", pmean)
    if pmean.dim() != 2:
        raise ValueError(f"pmean must be [T, C], got shape {list(pmean.shape)}")
    num_partials, channels = pmean.shape
    if channels == 0:
        raise ValueError("pmean has no channels")
    if pmean.dtype not in PARAMETER_DTYPES:
        raise TypeError(f"pmean has dtype {pmean.dtype}; partials are float32 (float64 for float64 activations)")
    _check_partial("pmean", pmean, (num_partials, channels), pmean)
    _check_partial("pm2", pm2, (num_partials, channels), pmean)
    _check_partial("pcount", pcount, (num_partials,), pmean)
    if weight.dtype not in PARAMETER_DTYPES[pmean.dtype]:
        raise TypeError(f"weight has dtype {weight.dtype}; with {pmean.dtype} partials bn_finalize supports "
                        f"{', '.join(map(str, PARAMETER_DTYPES[pmean.dtype]))}")
    _check_parameter("weight", weight, channels, weight.dtype, pmean.device)
    _check_parameter("bias", bias, channels, weight.dtype, pmean.device)
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be given together (or both None)")
    if running_mean is None:
        return
    _check_parameter("running_mean", running_mean, channels, weight.dtype, pmean.device)
    _check_parameter("running_var", running_var, channels, weight.dtype, pmean.device)
    if momentum < 0:
        if num_batches_tracked is None:
            raise ValueError("num_batches_tracked is required when momentum < 0 (cumulative average)")
        if num_batches_tracked.device != pmean.device or num_batches_tracked.numel() != 1:
            raise ValueError(f"num_batches_tracked must be a one-element tensor on {pmean.device}, got "
                             f"{num_batches_tracked.numel()} elements on {num_batches_tracked.device}")
        if num_batches_tracked.dtype != torch.int64:
            raise TypeError(f"num_batches_tracked must be int64 (BatchNorm's counter), got {num_batches_tracked.dtype}")


def bn_finalize(pmean: torch.Tensor, pm2: torch.Tensor, pcount: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor, running_mean: Optional[torch.Tensor], running_var: Optional[torch.Tensor],
                num_batches_tracked: Optional[torch.Tensor], momentum: float, eps: float):
    """``(mean, invstd, scale, shift)`` (float32 [C]) from partials; updates the running statistics in place."""
    _check_inputs(pmean, pm2, pcount, weight, bias, running_mean, running_var, num_batches_tracked, momentum)
    num_partials, channels = pmean.shape
    mean, invstd, scale, shift = (torch.empty(channels, dtype=pmean.dtype, device=pmean.device)
                                  for _ in range(4))
    update = running_mean is not None
    cumulative = update and momentum < 0
    fp64 = pmean.dtype == torch.float64
    origins = None
    if num_partials > GROUP_ROWS:   # stage 1: the groups of partial rows merged in parallel
        groups = triton.cdiv(num_partials, GROUP_ROWS)
        gmean, gm2 = (torch.empty(groups, channels, dtype=pmean.dtype, device=pmean.device) for _ in range(2))
        gcount = torch.empty(groups, dtype=pmean.dtype, device=pmean.device)
        origins = torch.empty(groups, channels, dtype=pmean.dtype, device=pmean.device)
        _merge_groups_kernel[(triton.cdiv(channels, BLOCK_C), groups)](
            pmean, pm2, pcount, gmean, gm2, gcount, origins, num_partials, channels,
            GROUP_ROWS=GROUP_ROWS, BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, FP64=fp64, num_warps=NUM_WARPS)
        pmean, pm2, pcount, num_partials = gmean, gm2, gcount, groups
    _bn_finalize_kernel[(triton.cdiv(channels, BLOCK_C),)](
        pmean, pm2, pcount, origins if origins is not None else pmean, weight, bias, mean, invstd, scale, shift,
        running_mean if update else mean, running_var if update else invstd,
        num_batches_tracked if cumulative else pcount,
        num_partials, channels, float(momentum), float(eps),
        BLOCK_T=BLOCK_T, BLOCK_C=BLOCK_C, UPDATE_RUNNING=update, CUMULATIVE=cumulative,
        FP64=fp64, ROW_ORIGINS=origins is not None, num_warps=NUM_WARPS)
    return mean, invstd, scale, shift


def aot_variants():
    """Every configuration ``bn_finalize`` can launch, for the ahead-of-time compile test."""
    modes = [("no_running", False, False), ("momentum", True, False), ("cumulative", True, True)]
    for stat_dtype, parameter_dtypes in PARAMETER_DTYPES.items():
        stat = TYPE_NAMES[stat_dtype]
        for parameter in map(TYPE_NAMES.get, parameter_dtypes):
            for (mode, update, cumulative), row_origins in itertools.product(modes, (False, True)):
                running = parameter if update else stat   # without running stats: outputs stand in
                yield {
                    "name": f"bn_finalize_{stat}_{parameter}_{mode}{'_two_stage' if row_origins else ''}",
                    "kernel": _bn_finalize_kernel,
                    "signature": {
                        "pmean_ptr": f"*{stat}", "pm2_ptr": f"*{stat}", "pcount_ptr": f"*{stat}",
                        "porigin_ptr": f"*{stat}", "weight_ptr": f"*{parameter}", "bias_ptr": f"*{parameter}",
                        "mean_ptr": f"*{stat}", "invstd_ptr": f"*{stat}", "scale_ptr": f"*{stat}",
                        "shift_ptr": f"*{stat}", "running_mean_ptr": f"*{running}",
                        "running_var_ptr": f"*{running}",
                        "num_batches_tracked_ptr": "*i64" if cumulative else f"*{stat}",
                        "num_partials": "i32", "channels": "i32", "momentum": "fp64", "eps": "fp64",
                        "BLOCK_T": "constexpr", "BLOCK_C": "constexpr", "UPDATE_RUNNING": "constexpr",
                        "CUMULATIVE": "constexpr", "FP64": "constexpr", "ROW_ORIGINS": "constexpr"},
                    "constexprs": {"BLOCK_T": BLOCK_T, "BLOCK_C": BLOCK_C, "UPDATE_RUNNING": update,
                                   "CUMULATIVE": cumulative, "FP64": stat_dtype == torch.float64,
                                   "ROW_ORIGINS": row_origins},
                    "num_warps": NUM_WARPS,
                    "num_stages": 3,
                    "tensor_cores": False,
                }
        yield {
            "name": f"bn_finalize_merge_groups_{stat}",
            "kernel": _merge_groups_kernel,
            "signature": {"pmean_ptr": f"*{stat}", "pm2_ptr": f"*{stat}", "pcount_ptr": f"*{stat}",
                          "gmean_ptr": f"*{stat}", "gm2_ptr": f"*{stat}", "gcount_ptr": f"*{stat}",
                          "gorigin_ptr": f"*{stat}",
                          "num_partials": "i32", "channels": "i32", "GROUP_ROWS": "constexpr",
                          "BLOCK_T": "constexpr", "BLOCK_C": "constexpr", "FP64": "constexpr"},
            "constexprs": {"GROUP_ROWS": GROUP_ROWS, "BLOCK_T": BLOCK_T, "BLOCK_C": BLOCK_C,
                           "FP64": stat_dtype == torch.float64},
            "num_warps": NUM_WARPS,
            "num_stages": 3,
            "tensor_cores": False,
        }
