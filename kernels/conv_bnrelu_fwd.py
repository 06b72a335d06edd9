# conv_bnrelu_fwd: y = conv(pad(relu(scale * x + shift)), weight, stride) (+ residual), NHWC, with
# the partial statistics of y for the next BN; the forward of a BN-ReLU-conv triple. PROLOGUE=False
# (scale and shift None): y = conv(pad(x)), the original unit's first conv and its projection.
#
#   x [N, H, W, Cin] contiguous, weight [Cout, Cin, K, K] (nn.Conv2d, any strides, float32 or
#   x's dtype; rounded to x's dtype on load), scale/shift [Cin] float32, zero padding
#   (left, right, top, bottom) of the activated input (K // 2 each by default; any non-negative
#   sides: the kernel takes the top and left ones, the output size carries the others; the
#   EXPLICIT_PADDING switch reads them, the default variant computes K // 2 as before)
#   -> y [N, Ho, Wo, Cout] in x's dtype; pmean/pm2 [T, Cout], pcount [T] float32 when stats
#
# Implicit GEMM: rows are output pixels (M = N*Ho*Wo), columns output channels, the reduction
# runs over the K*K taps times Cin in BLOCK_K steps (one flat loop, so it pipelines even when
# Cin fits one step). Prologue: each x tile is activated in fp32 as it is loaded, zeroed in the
# padding after the activation, rounded to x's dtype and fed to tl.dot (fp32 accumulation).
# Epilogue: the residual is added in fp32, y is rounded and stored, and with STATS each block
# of STATS_ROWS rows emits the mean and M2 of the stored y per channel, two-pass in registers
# and relative to the block's first row (so mean-100/std-0.01 outputs keep their variance);
# partial row t covers output rows t*STATS_ROWS ... (T = ceil(M / STATS_ROWS), any tile size).
# The activated input is never written; saves nothing (the caller keeps x and the statistics).
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import conv_common as cc
from fused_preact.unit_ops import conv_padding, padded_output_shape, statistics_dtype

# Rows per partial-statistics row (divides every BLOCK_M).
STATS_ROWS = 64


@triton.jit
def _conv_bnrelu_fwd_kernel(
    # pointers
    x_ptr, w_ptr, scale_ptr, shift_ptr, residual_ptr, y_ptr, pmean_ptr, pm2_ptr, pcount_ptr,
    # sizes
    num_rows, height, width, cin, out_height, out_width, cout, kernel_size, stride, num_partials,
    pad_top, pad_left,
    # weight strides (Cout, Cin, Kh, Kw)
    w_stride_co, w_stride_ci, w_stride_kh, w_stride_kw,
    # meta-parameters
    HAS_RESIDUAL: tl.constexpr, STATS: tl.constexpr, STATS_ROWS: tl.constexpr, EXPLICIT_PADDING: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr = True,
):
    # Output-channel blocks of one row block are neighbours in launch order: they share its x.
    num_col_blocks = tl.cdiv(cout, BLOCK_N)
    pid_m = tl.program_id(0) // num_col_blocks
    pid_n = tl.program_id(0) % num_col_blocks
    io_dtype = y_ptr.dtype.element_ty
    acc_dtype = scale_ptr.dtype.element_ty   # fp32, fp64 for fp64 activations

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < num_rows
    wo = rows % out_width
    ho = (rows // out_width) % out_height
    image_base = (rows // (out_width * out_height)) * height
    if EXPLICIT_PADDING:
        hi_origin = ho * stride - pad_top
        wi_origin = wo * stride - pad_left
    else:
        pad = kernel_size // 2
        hi_origin = ho * stride - pad
        wi_origin = wo * stride - pad
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < cout

    # ---- main loop: taps x input-channel blocks ----
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    k_blocks = tl.cdiv(cin, BLOCK_K)
    for step in range(0, kernel_size * kernel_size * k_blocks):
        tap = step // k_blocks
        kh = tap // kernel_size
        kw = tap % kernel_size
        ci = (step % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        hi = hi_origin + kh
        wi = wi_origin + kw
        pixel_ok = row_ok & (hi >= 0) & (hi < height) & (wi >= 0) & (wi < width)
        a = cc.load_preact(x_ptr, scale_ptr, shift_ptr, (image_base + hi) * width + wi, pixel_ok, ci, cin, UPCAST_DOT,
                           PROLOGUE)
        w = tl.load(w_ptr + ci[:, None] * w_stride_ci + cols[None, :] * w_stride_co
                    + kh * w_stride_kh + kw * w_stride_kw,
                    mask=(ci[:, None] < cin) & col_ok[None, :], other=0.0)
        w = cc.cast_rounded(w, io_dtype, UPCAST_DOT)
        acc = tl.dot(cc.dot_operand(a, UPCAST_DOT), cc.dot_operand(w, UPCAST_DOT), acc,
                     input_precision=DOT_PRECISION, out_dtype=acc_dtype)

    # ---- epilogue: residual, store ----
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * cout + cols[None, :]
    if HAS_RESIDUAL:
        acc += tl.load(residual_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
    y = cc.cast_rounded(acc, io_dtype, UPCAST_DOT)
    tl.store(y_ptr + offsets, y, mask=ok)

    # ---- epilogue: partial statistics of the stored y, per STATS_ROWS-row block ----
    if STATS:
        stored = y.to(acc_dtype)
        block_of_row = tl.arange(0, BLOCK_M) // STATS_ROWS
        for block in tl.static_range(BLOCK_M // STATS_ROWS):
            t = pid_m * (BLOCK_M // STATS_ROWS) + block
            in_block = row_ok & (block_of_row == block)
            count = tl.sum(in_block.to(acc_dtype), axis=0)
            # relative to the block's first row: exact for nearby values, small sums
            first_row = in_block & (tl.arange(0, BLOCK_M) % STATS_ROWS == 0)
            origin = tl.sum(tl.where(first_row[:, None], stored, 0.0), axis=0)
            shifted = tl.where(in_block[:, None], stored - origin[None, :], 0.0)
            mean = tl.sum(shifted, axis=0) / tl.maximum(count, 1.0)
            deviation = tl.where(in_block[:, None], shifted - mean[None, :], 0.0)
            m2 = tl.sum(deviation * deviation, axis=0)
            t_ok = t < num_partials
            tl.store(pmean_ptr + t * cout + cols, (origin + mean).to(pmean_ptr.dtype.element_ty),
                     mask=col_ok & t_ok)
            tl.store(pm2_ptr + t * cout + cols, m2.to(pm2_ptr.dtype.element_ty), mask=col_ok & t_ok)
            if pid_n == 0:
                tl.store(pcount_ptr + t, count.to(pcount_ptr.dtype.element_ty), mask=t_ok)


_conv_bnrelu_fwd_tuned = triton.autotune(
    configs=cc.autotune_configs(),
    key=["num_rows", "cin", "cout", "kernel_size", "stride", "HAS_RESIDUAL", "STATS", "EXPLICIT_PADDING",
         "PROLOGUE"],
)(_conv_bnrelu_fwd_kernel)


def stats_rows(n: int, out_height: int, out_width: int) -> int:
    """T, the number of partial-statistics rows of an output [n, out_height, out_width, C]."""
    return triton.cdiv(n * out_height * out_width, STATS_ROWS)


def _check(x, weight, scale, shift, residual, stride, padding) -> tuple:
    """Checks the arguments; returns K and the output's (Ho, Wo)."""
    cc.check_activation("x", x)
    k = cc.check_weight(weight, x.dtype, x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but x has {x.shape[-1]}")
    cc.check_prologue(scale, shift, x.shape[-1], x.dtype, x.device)
    cc.check_stride(stride)
    n, h, w, _ = x.shape
    out_shape = padded_output_shape(h, w, k, stride, padding)
    if residual is not None:
        cc.check_activation("residual", residual, x.dtype)
        cc.check_same_device("residual", residual, x.device)
        cc.check_shape("residual", residual, (n, *out_shape, weight.shape[0]))
    return k, out_shape


def conv_bnrelu_fwd(x: torch.Tensor, weight: torch.Tensor, scale: Optional[torch.Tensor],
                    shift: Optional[torch.Tensor], residual: Optional[torch.Tensor], stride: int, stats: bool,
                    padding=None):
    """``(y, pmean, pm2, pcount)``: the ``conv_bnrelu`` operator of ``fused_preact.unit_ops``."""
    k, (out_height, out_width) = _check(x, weight, scale, shift, residual, stride, padding)
    pad_left, _, pad_top, _ = conv_padding(padding, k)
    n, height, width, cin = x.shape
    cout = weight.shape[0]
    num_rows = n * out_height * out_width
    y = torch.empty(n, out_height, out_width, cout, dtype=x.dtype, device=x.device)
    partial_dtype = statistics_dtype(x.dtype)
    num_partials = stats_rows(n, out_height, out_width) if stats else 0
    pmean = torch.empty(num_partials, cout, dtype=partial_dtype, device=x.device)
    pm2 = torch.empty(num_partials, cout, dtype=partial_dtype, device=x.device)
    pcount = torch.empty(num_partials, dtype=partial_dtype, device=x.device)
    if num_rows == 0:
        return y, pmean, pm2, pcount

    def grid(meta):
        return (triton.cdiv(num_rows, meta["BLOCK_M"]) * triton.cdiv(cout, meta["BLOCK_N"]),)

    config = cc.fixed_config(x.dtype)
    kernel = _conv_bnrelu_fwd_tuned if config is None else _conv_bnrelu_fwd_kernel
    launch_meta = {} if config is None else dict(config)
    prologue = scale is not None
    scale, shift = cc.prologue_vectors(scale, shift, x.dtype, x.device)
    kernel[grid](
        x, weight, scale, shift, residual if residual is not None else y, y, pmean, pm2, pcount,
        num_rows, height, width, cin, out_height, out_width, cout, k, stride, num_partials,
        pad_top, pad_left, *weight.stride(),
        HAS_RESIDUAL=residual is not None, STATS=bool(stats), STATS_ROWS=STATS_ROWS,
        EXPLICIT_PADDING=cc.explicit_padding(padding, k), PROLOGUE=prologue,
        **cc.dot_meta(x.dtype), **launch_meta)
    return y, pmean, pm2, pcount


def aot_variants():
    """Every configuration ``conv_bnrelu_fwd`` can launch, for the ahead-of-time compile test.

    Kernel size and stride are runtime sizes (one compile serves 1x1/3x3, stride 1/2); each
    configuration comes in two variants: the default padding K // 2 and per-side padding
    (EXPLICIT_PADDING, ``_pad`` in the name).
    """
    return cc.with_padding_variants(_unpadded_variants())


def _unpadded_variants():
    for dtype, io in cc.DTYPES.items():
        vector = "fp64" if dtype == torch.float64 else "fp32"
        for weight_dtype in dict.fromkeys((torch.float32, dtype)):
            for precision in cc.precision_variants(dtype):
                # without a prologue: the original unit's first conv and projection (no residual)
                for residual, stats, prologue in ((False, False, True), (False, True, True), (True, False, True),
                                                  (True, True, True), (False, False, False), (False, True, False)):
                    for config in cc.configs_for(dtype, precision):
                        blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
                        name = (f"conv_bnrelu_fwd_{io}_w{cc.DTYPES[weight_dtype]}_{precision}"
                                f"{'_residual' if residual else ''}{'_stats' if stats else ''}"
                                f"{'' if prologue else '_raw'}"
                                f"_m{config['BLOCK_M']}n{config['BLOCK_N']}k{config['BLOCK_K']}")
                        yield {
                            "name": name,
                            "kernel": _conv_bnrelu_fwd_kernel,
                            "signature": {
                                "x_ptr": f"*{io}", "w_ptr": f"*{cc.DTYPES[weight_dtype]}",
                                "scale_ptr": f"*{vector}", "shift_ptr": f"*{vector}",
                                "residual_ptr": f"*{io}", "y_ptr": f"*{io}", "pmean_ptr": f"*{vector}",
                                "pm2_ptr": f"*{vector}", "pcount_ptr": f"*{vector}",
                                **{s: "i32" for s in ("num_rows", "height", "width", "cin", "out_height",
                                                      "out_width", "cout", "kernel_size", "stride",
                                                      "num_partials", "pad_top", "pad_left",
                                                      "w_stride_co", "w_stride_ci",
                                                      "w_stride_kh", "w_stride_kw")},
                                **{c: "constexpr" for c in ("HAS_RESIDUAL", "STATS", "STATS_ROWS",
                                                            "DOT_PRECISION", "UPCAST_DOT", *blocks,
                                                            "PROLOGUE")},
                            },
                            "constexprs": {"HAS_RESIDUAL": residual, "STATS": stats, "PROLOGUE": prologue,
                                           "STATS_ROWS": STATS_ROWS, "DOT_PRECISION": precision,
                                           "UPCAST_DOT": False, **blocks},
                            "num_warps": config["num_warps"],
                            "num_stages": config["num_stages"],
                            "tensor_cores": cc.uses_tensor_cores(dtype, precision),
                        }
