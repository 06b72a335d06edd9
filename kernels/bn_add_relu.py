# bn_add_relu: the end of an original (post-activation) residual unit, forward and backward, in one
# elementwise pass each over NHWC.
#
#   h, residual, y, dy, g [N, H, W, C] contiguous (rows [M = N*H*W, C]); per-channel [C] float32
#   (float64 for float64 data)
#   forward:   y = relu(scale * h + shift + s),  s = residual                      (identity, option A,
#                                                                                    projection without BN)
#                                                s = rscale * residual + rshift     (projection + its BN)
#   backward:  g = dy * !(y <= 0)                (the ReLU mask from the saved output, NaN passing as in
#                                                 torch's threshold_backward: the next unit
#                                                 keeps y as its input anyway, so nothing extra is saved)
#              sum_g = sum(g), sum_g_xhat = sum(g * (h - mean)) * invstd, and with the shortcut's BN
#              residual_sum_g_xhat = sum(g * (residual - rmean)) * rinvstd   over N, H, W
#   bn_backward_finish then turns g into dh (and dh_s) per BN; sum_g serves both BNs.
#
# Program (t, cb) owns channels cb*BLOCK_C ... and `tiles_per_program` consecutive tiles of BLOCK_M
# rows (the launch plan of bn_backward_finish). The backward's sums go per program into a float32
# (float64) partial row [row_programs, C] each, summed afterwards in a fixed order (deterministic, no
# atomics); sums of g * (h - mean) are scaled by invstd once at the end. Arithmetic in fp32 (fp64),
# y and g rounded once to the data's dtype. Fuses the last BN, the shortcut's BN, the add and the
# ReLU (forward), the ReLU mask and both BNs' reductions (backward); saves nothing.
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .bn_backward_finish import DTYPES, MAX_BLOCK_C, MIN_BLOCK_C, NUM_WARPS, TILE_ELEMENTS, launch_plan
from fused_preact.unit_ops import statistics_dtype
from .rounding import cast_rounded
from .runtime import check_device, interpreting


@triton.jit
def _bn_add_relu_fwd_kernel(
    # pointers: activations [M, C], then per-channel vectors [C]
    h_ptr, residual_ptr, y_ptr, scale_ptr, shift_ptr, rscale_ptr, rshift_ptr,
    # sizes
    num_rows, channels, tiles_per_program,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RESIDUAL_BN: tl.constexpr, EMULATE_ROUNDING: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
    shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
    acc_dtype = scale.dtype
    if RESIDUAL_BN:
        rscale = tl.load(rscale_ptr + cols, mask=col_ok, other=0.0)
        rshift = tl.load(rshift_ptr + cols, mask=col_ok, other=0.0)

    first_row = pid_t * tiles_per_program * BLOCK_M
    for tile in range(0, tiles_per_program):
        rows = first_row + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows < num_rows)[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * channels + cols[None, :]
        h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        s = tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        if RESIDUAL_BN:
            s = s * rscale[None, :] + rshift[None, :]
        v = h * scale[None, :] + shift[None, :] + s
        y = tl.where(v <= 0.0, 0.0, v)   # relu that keeps a NaN, as torch.relu (tl.maximum drops it)
        tl.store(y_ptr + offsets, cast_rounded(y, y_ptr.dtype.element_ty, EMULATE_ROUNDING), mask=ok)


@triton.jit
def _bn_add_relu_bwd_kernel(
    # pointers: activations [M, C], per-channel vectors [C], partial sums [row_programs, C]
    dy_ptr, y_ptr, h_ptr, residual_ptr, g_ptr, mean_ptr, invstd_ptr, rmean_ptr, rinvstd_ptr,
    part_g_ptr, part_g_xhat_ptr, part_r_xhat_ptr,
    # sizes
    num_rows, channels, tiles_per_program,
    # meta-parameters
    BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, RESIDUAL_BN: tl.constexpr,
):
    pid_t = tl.program_id(0)
    pid_c = tl.program_id(1)
    cols = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    col_ok = cols < channels
    mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
    acc_dtype = mean.dtype
    # elementwise accumulators, reduced over rows once after the loop (no cross-warp reduction per tile)
    sum_g = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_dtype)
    sum_gc = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_dtype)     # sum(g * (h - mean))
    sum_rc = tl.zeros([BLOCK_M, BLOCK_C], dtype=acc_dtype)     # sum(g * (residual - rmean))
    if RESIDUAL_BN:
        rmean = tl.load(rmean_ptr + cols, mask=col_ok, other=0.0)

    first_row = pid_t * tiles_per_program * BLOCK_M
    for tile in range(0, tiles_per_program):
        rows = first_row + tile * BLOCK_M + tl.arange(0, BLOCK_M)
        ok = (rows < num_rows)[:, None] & col_ok[None, :]
        offsets = rows[:, None].to(tl.int64) * channels + cols[None, :]
        dy = tl.load(dy_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        y = tl.load(y_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        # torch's threshold_backward: zero where y <= 0, dy elsewhere (a NaN y passes dy, as in eager);
        # masked rows load y = 0: g = 0 there
        g = tl.where(y <= 0.0, 0.0, dy)
        tl.store(g_ptr + offsets, g.to(g_ptr.dtype.element_ty), mask=ok)
        h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        sum_g += g
        sum_gc += g * (h - mean[None, :])
        if RESIDUAL_BN:
            r = tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
            sum_rc += g * (r - rmean[None, :])

    # ---- one partial row per program; xhat's invstd applied once ----
    invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
    part = pid_t * channels + cols
    tl.store(part_g_ptr + part, tl.sum(sum_g, axis=0), mask=col_ok)
    tl.store(part_g_xhat_ptr + part, tl.sum(sum_gc, axis=0) * invstd, mask=col_ok)
    if RESIDUAL_BN:
        rinvstd = tl.load(rinvstd_ptr + cols, mask=col_ok, other=0.0)
        tl.store(part_r_xhat_ptr + part, tl.sum(sum_rc, axis=0) * rinvstd, mask=col_ok)


# ---- argument checks ----------------------------------------------------------------------------
def _check_data(name: str, t, ref: Optional[torch.Tensor], ref_name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check_device(name, t)
    if ref is None:
        if t.dtype not in DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; bn_add_relu supports {', '.join(map(str, DTYPES))}")
        if t.dim() != 4 or not t.is_contiguous():
            raise ValueError(f"{name} must be a contiguous 4-D NHWC tensor [N, H, W, C], got shape {list(t.shape)}")
        if t.numel() == 0:
            raise ValueError(f"{name} is empty, shape {list(t.shape)}")
        return
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}")
    if t.shape != ref.shape:
        raise ValueError(f"{name} has shape {list(t.shape)} but {ref_name} has {list(ref.shape)}")
    if t.dtype != ref.dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but {ref_name} has {ref.dtype}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous NHWC tensor")


def _check_vector(name: str, t, ref: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    channels, dtype = ref.shape[-1], statistics_dtype(ref.dtype)
    if t.device != ref.device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {ref.device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be {dtype}")
    if tuple(t.shape) != (channels,) or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous tensor of shape [{channels}], got {list(t.shape)}")


def _check_together(names: tuple, values: tuple) -> bool:
    given = [v is not None for v in values]
    if any(given) and not all(given):
        listed = f"{', '.join(names[:-1])} and {names[-1]}"
        raise ValueError(f"{listed} must be given together (the shortcut's BN) or all be None")
    return all(given)


# ---- launchers ----------------------------------------------------------------------------------
def bn_add_relu(h: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, residual: torch.Tensor,
                residual_scale: Optional[torch.Tensor], residual_shift: Optional[torch.Tensor]) -> torch.Tensor:
    """``y``: the ``bn_add_relu`` operator of ``fused_preact.unit_ops``."""
    _check_data("h", h, None, "")
    _check_vector("scale", scale, h)
    _check_vector("shift", shift, h)
    _check_data("residual", residual, h, "h")
    residual_bn = _check_together(("residual_scale", "residual_shift"), (residual_scale, residual_shift))
    if residual_bn:
        _check_vector("residual_scale", residual_scale, h)
        _check_vector("residual_shift", residual_shift, h)
    channels = h.shape[-1]
    num_rows = h.numel() // channels
    y = torch.empty_like(h)
    block_m, block_c, tiles_per_program, row_programs = launch_plan(num_rows, channels)
    _bn_add_relu_fwd_kernel[(row_programs, triton.cdiv(channels, block_c))](
        h, residual, y, scale, shift, residual_scale if residual_bn else scale,
        residual_shift if residual_bn else shift,
        num_rows, channels, tiles_per_program,
        BLOCK_M=block_m, BLOCK_C=block_c, RESIDUAL_BN=residual_bn, EMULATE_ROUNDING=interpreting(),
        num_warps=NUM_WARPS)
    return y


def bn_add_relu_backward(dy: torch.Tensor, y: torch.Tensor, h: torch.Tensor, mean: torch.Tensor,
                         invstd: torch.Tensor, residual: Optional[torch.Tensor],
                         residual_mean: Optional[torch.Tensor], residual_invstd: Optional[torch.Tensor]):
    """``(g, sum_g, sum_g_xhat, residual_sum_g_xhat)``: the ``bn_add_relu_backward`` operator."""
    _check_data("dy", dy, None, "")
    _check_data("y", y, dy, "dy")
    _check_data("h", h, dy, "dy")
    _check_vector("mean", mean, dy)
    _check_vector("invstd", invstd, dy)
    residual_bn = _check_together(("residual", "residual_mean", "residual_invstd"),
                                  (residual, residual_mean, residual_invstd))
    if residual_bn:
        _check_data("residual", residual, dy, "dy")
        _check_vector("residual_mean", residual_mean, dy)
        _check_vector("residual_invstd", residual_invstd, dy)
    channels = dy.shape[-1]
    num_rows = dy.numel() // channels
    g = torch.empty_like(dy)
    block_m, block_c, tiles_per_program, row_programs = launch_plan(num_rows, channels)
    stat = statistics_dtype(dy.dtype)
    partials = torch.empty(3 if residual_bn else 2, row_programs, channels, dtype=stat, device=dy.device)
    _bn_add_relu_bwd_kernel[(row_programs, triton.cdiv(channels, block_c))](
        dy, y, h, residual if residual_bn else h, g, mean, invstd,
        residual_mean if residual_bn else mean, residual_invstd if residual_bn else invstd,
        partials[0], partials[1], partials[2] if residual_bn else partials[1],
        num_rows, channels, tiles_per_program,
        BLOCK_M=block_m, BLOCK_C=block_c, RESIDUAL_BN=residual_bn, num_warps=NUM_WARPS)
    sums = [rows.sum(0) for rows in partials]   # fixed order: deterministic; separate outputs (no aliases)
    residual_sum = sums[2] if residual_bn else dy.new_empty(0, dtype=stat)
    return g, sums[0], sums[1], residual_sum


def aot_variants():
    """Every configuration of the two kernels, for the ahead-of-time compile test."""
    block_c = MIN_BLOCK_C
    while block_c <= MAX_BLOCK_C:
        for dtype, name in DTYPES.items():
            stat = DTYPES[statistics_dtype(dtype)]
            for residual_bn in (False, True):
                blocks = {"BLOCK_M": TILE_ELEMENTS // block_c, "BLOCK_C": block_c}
                sizes = {"num_rows": "i32", "channels": "i32", "tiles_per_program": "i32"}
                tag = f"{name}_c{block_c}{'_residual_bn' if residual_bn else ''}"
                yield {
                    "name": f"bn_add_relu_fwd_{tag}",
                    "kernel": _bn_add_relu_fwd_kernel,
                    "signature": {
                        "h_ptr": f"*{name}", "residual_ptr": f"*{name}", "y_ptr": f"*{name}",
                        **{p: f"*{stat}" for p in ("scale_ptr", "shift_ptr", "rscale_ptr", "rshift_ptr")},
                        **sizes, **{c: "constexpr" for c in (*blocks, "RESIDUAL_BN", "EMULATE_ROUNDING")}},
                    "constexprs": {**blocks, "RESIDUAL_BN": residual_bn, "EMULATE_ROUNDING": False},
                    "num_warps": NUM_WARPS, "num_stages": 3, "tensor_cores": False,
                }
                yield {
                    "name": f"bn_add_relu_bwd_{tag}",
                    "kernel": _bn_add_relu_bwd_kernel,
                    "signature": {
                        **{p: f"*{name}" for p in ("dy_ptr", "y_ptr", "h_ptr", "residual_ptr", "g_ptr")},
                        **{p: f"*{stat}" for p in ("mean_ptr", "invstd_ptr", "rmean_ptr", "rinvstd_ptr",
                                                   "part_g_ptr", "part_g_xhat_ptr", "part_r_xhat_ptr")},
                        **sizes, **{c: "constexpr" for c in (*blocks, "RESIDUAL_BN")}},
                    "constexprs": {**blocks, "RESIDUAL_BN": residual_bn},
                    "num_warps": NUM_WARPS, "num_stages": 3, "tensor_cores": False,
                }
        block_c *= 2
