# conv_dgrad: the data gradient of a BN-ReLU-conv triple, up to BN backward's two reductions.
#
#   dy [N, Ho, Wo, Cout] contiguous, weight [Cout, Cin, K, K] (nn.Conv2d, any strides, float32 or
#   dy's dtype; rounded to dy's dtype on load), stride 1 or 2, the forward's zero padding
#   (left, right, top, bottom; K // 2 each by default): the kernel takes the top and left ones
#   (read under the EXPLICIT_PADDING switch; the default variant computes K // 2 as before)
#   t = conv_input_grad(dy, weight)  [N, height, width, Cin]      (+ add, when given)
#   with h (the conv's raw input) given:
#     g = t * !(scale * h + shift <= 0)                           (the ReLU mask, recomputed; a NaN
#                                                                  passes t, as torch's threshold_backward)
#     sum_g = sum(g), sum_g_xhat = sum(g * (h - mean) * invstd)   over N, H, W; [Cin] float32
#   -> g in dy's dtype (t when h is None, and both sums empty)
#
# Implicit GEMM of the transposed conv: rows are input pixels, columns input channels, the
# reduction runs over the taps that reach a pixel times Cout. With stride 2 only some taps reach
# a pixel, depending on its row and column parity, so the pixels are split into stride*stride
# parity classes (grid axis 1): within a class every row has the same taps, and the loop visits
# only those (no work on taps that a mask would zero; 1x1 stride-2 classes with no tap write
# zeros). The epilogue adds `add` in fp32, applies the mask, reduces g and g * xhat over the
# tile's rows into one partial row per program (summed afterwards in fixed order:
# deterministic), and stores g rounded. Saves nothing.
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import conv_common as cc
from fused_preact.unit_ops import conv_padding, padded_output_shape, statistics_dtype


@triton.jit
def _conv_dgrad_kernel(
    # pointers
    dy_ptr, w_ptr, h_ptr, scale_ptr, shift_ptr, mean_ptr, invstd_ptr, add_ptr, g_ptr,
    partial_g_ptr, partial_g_xhat_ptr,
    # sizes
    batch, height, width, cin, out_height, out_width, cout, kernel_size, stride,
    # weight strides (Cout, Cin, Kh, Kw)
    w_stride_co, w_stride_ci, w_stride_kh, w_stride_kw,
    # top and left zero padding (read with EXPLICIT_PADDING)
    pad_top, pad_left,
    # meta-parameters
    HAS_ADD: tl.constexpr, HAS_H: tl.constexpr, EXPLICIT_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    io_dtype = g_ptr.dtype.element_ty
    acc_dtype = partial_g_ptr.dtype.element_ty   # fp32, fp64 for fp64 activations
    if EXPLICIT_PADDING:
        pad_h = pad_top
        pad_w = pad_left
    else:
        pad_h = kernel_size // 2
        pad_w = pad_h

    # ---- the parity class (row parity, column parity) and its pixels ----
    parity_class = tl.program_id(1)
    parity_h = parity_class // stride
    parity_w = parity_class % stride
    class_height = (height - parity_h + stride - 1) // stride
    class_width = (width - parity_w + stride - 1) // stride
    class_rows = batch * class_height * class_width
    # Row blocks are laid out for the largest class (parity 0, 0); smaller classes mask the rest.
    row_blocks = tl.cdiv(batch * ((height + stride - 1) // stride) * ((width + stride - 1) // stride), BLOCK_M)
    num_col_blocks = tl.cdiv(cin, BLOCK_N)
    pid_m = tl.program_id(0) // num_col_blocks
    pid_n = tl.program_id(0) % num_col_blocks

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < class_rows
    wq = rows % class_width
    hq = (rows // class_width) % class_height
    image = rows // (class_width * class_height)
    hi = hq * stride + parity_h
    wi = wq * stride + parity_w

    # Taps reaching this class: kh = first_kh + stride * j (j < taps_h), from output row
    # ho = (hi + pad_h - kh) / stride = hq + (parity_h + pad_h - first_kh) / stride - j; same
    # for w with pad_w.
    first_kh = (parity_h + pad_h) % stride
    first_kw = (parity_w + pad_w) % stride
    taps_h = (kernel_size - first_kh + stride - 1) // stride
    taps_w = (kernel_size - first_kw + stride - 1) // stride
    ho_origin = hq + (parity_h + pad_h - first_kh) // stride
    wo_origin = wq + (parity_w + pad_w - first_kw) // stride
    image_base = image * out_height

    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < cin

    # ---- main loop: the class's taps x output-channel blocks ----
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=acc_dtype)
    k_blocks = tl.cdiv(cout, BLOCK_K)
    for step in range(0, taps_h * taps_w * k_blocks):
        tap = step // k_blocks
        jh = tap // taps_w
        jw = tap % taps_w
        co = (step % k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
        co_ok = co < cout
        ho = ho_origin - jh
        wo = wo_origin - jw
        pixel_ok = row_ok & (ho >= 0) & (ho < out_height) & (wo >= 0) & (wo < out_width)
        out_pixel = ((image_base + ho) * out_width + wo).to(tl.int64)
        d = tl.load(dy_ptr + out_pixel[:, None] * cout + co[None, :],
                    mask=pixel_ok[:, None] & co_ok[None, :], other=0.0)
        kh = first_kh + stride * jh
        kw = first_kw + stride * jw
        w = tl.load(w_ptr + co[:, None] * w_stride_co + cols[None, :] * w_stride_ci
                    + kh * w_stride_kh + kw * w_stride_kw,
                    mask=co_ok[:, None] & col_ok[None, :], other=0.0)
        w = cc.cast_rounded(w, io_dtype, UPCAST_DOT)
        acc = tl.dot(cc.dot_operand(d, UPCAST_DOT), cc.dot_operand(w, UPCAST_DOT), acc,
                     input_precision=DOT_PRECISION, out_dtype=acc_dtype)

    # ---- epilogue: add, ReLU mask, BN backward's reductions, store ----
    ok = row_ok[:, None] & col_ok[None, :]
    offsets = ((image * height + hi) * width + wi).to(tl.int64)[:, None] * cin + cols[None, :]
    if HAS_ADD:
        acc += tl.load(add_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
    if HAS_H:
        h = tl.load(h_ptr + offsets, mask=ok, other=0.0).to(acc_dtype)
        scale = tl.load(scale_ptr + cols, mask=col_ok, other=0.0)
        shift = tl.load(shift_ptr + cols, mask=col_ok, other=0.0)
        mean = tl.load(mean_ptr + cols, mask=col_ok, other=0.0)
        invstd = tl.load(invstd_ptr + cols, mask=col_ok, other=0.0)
        # the ReLU mask as torch's threshold_backward: zero where the pre-activation is <= 0, so a NaN
        # pre-activation passes the gradient, as in eager
        acc = tl.where(ok, tl.where(h * scale[None, :] + shift[None, :] <= 0, 0.0, acc), 0.0)
        xhat = (h - mean[None, :]) * invstd[None, :]
        partial_row = (parity_class * row_blocks + pid_m) * cin
        tl.store(partial_g_ptr + partial_row + cols, tl.sum(acc, axis=0), mask=col_ok)
        tl.store(partial_g_xhat_ptr + partial_row + cols, tl.sum(acc * xhat, axis=0), mask=col_ok)
    tl.store(g_ptr + offsets, cc.cast_rounded(acc, io_dtype, UPCAST_DOT), mask=ok)


_conv_dgrad_tuned = triton.autotune(
    configs=cc.autotune_configs(),
    key=["batch", "height", "width", "cin", "cout", "kernel_size", "stride", "HAS_ADD", "HAS_H", "EXPLICIT_PADDING"],
    # tiles of different BLOCK_M fill different partial rows: clear them before each trial
    reset_to_zero=["partial_g_ptr", "partial_g_xhat_ptr"],
)(_conv_dgrad_kernel)


def _check(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width, padding) -> int:
    cc.check_activation("dy", dy)
    k = cc.check_weight(weight, dy.dtype, dy.device)
    if weight.shape[0] != dy.shape[-1]:
        raise ValueError(f"weight has {weight.shape[0]} output channels but dy has {dy.shape[-1]}")
    cc.check_stride(stride)
    for name, size in (("height", height), ("width", width)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    n, out_height, out_width, _ = dy.shape
    expected = padded_output_shape(height, width, k, stride, padding)
    if (out_height, out_width) != expected:
        raise ValueError(f"dy is {out_height}x{out_width} but a {k}x{k} stride-{stride} conv of a "
                         f"{height}x{width} input with padding {list(conv_padding(padding, k))} "
                         f"gives {expected[0]}x{expected[1]}")
    input_shape = (n, height, width, weight.shape[1])
    if add is not None:
        cc.check_activation("add", add, dy.dtype)
        cc.check_same_device("add", add, dy.device)
        cc.check_shape("add", add, input_shape)
    if h is not None:
        cc.check_activation("h", h, dy.dtype)
        cc.check_same_device("h", h, dy.device)
        cc.check_shape("h", h, input_shape)
        for name, vector in (("scale", scale), ("shift", shift), ("mean", mean), ("invstd", invstd)):
            if vector is None:
                raise ValueError(f"{name} is required when h is given")
            cc.check_channel_vector(name, vector, weight.shape[1], statistics_dtype(dy.dtype), dy.device)
    return k


def conv_dgrad(dy: torch.Tensor, weight: torch.Tensor, h: Optional[torch.Tensor],
               scale: Optional[torch.Tensor], shift: Optional[torch.Tensor], mean: Optional[torch.Tensor],
               invstd: Optional[torch.Tensor], add: Optional[torch.Tensor], stride: int, height: int,
               width: int, padding=None):
    """``(g, sum_g, sum_g_xhat)``: the ``conv_dgrad`` operator of ``fused_preact.unit_ops``."""
    k = _check(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width, padding)
    pad_left, _, pad_top, _ = conv_padding(padding, k)
    n, out_height, out_width, cout = dy.shape
    cin = weight.shape[1]
    g = torch.empty(n, height, width, cin, dtype=dy.dtype, device=dy.device)
    sum_dtype = statistics_dtype(dy.dtype)
    classes = stride * stride
    # One partial row per program, sized for the smallest row block; rows of programs that a
    # larger block does not launch stay zero.
    largest_class_rows = n * triton.cdiv(height, stride) * triton.cdiv(width, stride)
    partial_rows = classes * triton.cdiv(largest_class_rows, cc.MIN_BLOCK_M) if h is not None else 0
    partial_g = torch.zeros(partial_rows, cin, dtype=sum_dtype, device=dy.device)
    partial_g_xhat = torch.zeros(partial_rows, cin, dtype=sum_dtype, device=dy.device)

    def grid(meta):
        return (triton.cdiv(largest_class_rows, meta["BLOCK_M"]) * triton.cdiv(cin, meta["BLOCK_N"]), classes)

    config = cc.fixed_config(dy.dtype)
    kernel = _conv_dgrad_tuned if config is None else _conv_dgrad_kernel
    launch_meta = {} if config is None else dict(config)
    unused = g   # pointer passed for the absent optional tensors (never read)
    kernel[grid](
        dy, weight, h if h is not None else unused, scale if h is not None else partial_g,
        shift if h is not None else partial_g, mean if h is not None else partial_g,
        invstd if h is not None else partial_g, add if add is not None else unused, g,
        partial_g, partial_g_xhat,
        n, height, width, cin, out_height, out_width, cout, k, stride, *weight.stride(), pad_top, pad_left,
        HAS_ADD=add is not None, HAS_H=h is not None, EXPLICIT_PADDING=cc.explicit_padding(padding, k),
        **cc.dot_meta(dy.dtype), **launch_meta)
    if h is None:
        empty = torch.empty(0, dtype=sum_dtype, device=dy.device)
        return g, empty, empty.clone()
    return g, partial_g.sum(0), partial_g_xhat.sum(0)


def aot_variants():
    """Every configuration ``conv_dgrad`` can launch, for the ahead-of-time compile test.

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
                for has_add in (False, True):
                    for has_h in (False, True):
                        for config in cc.configs_for(dtype, precision):
                            blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
                            name = (f"conv_dgrad_{io}_w{cc.DTYPES[weight_dtype]}_{precision}"
                                    f"{'_add' if has_add else ''}{'_h' if has_h else ''}"
                                    f"_m{config['BLOCK_M']}n{config['BLOCK_N']}k{config['BLOCK_K']}")
                            yield {
                                "name": name,
                                "kernel": _conv_dgrad_kernel,
                                "signature": {
                                    "dy_ptr": f"*{io}", "w_ptr": f"*{cc.DTYPES[weight_dtype]}",
                                    "h_ptr": f"*{io}", "scale_ptr": f"*{vector}", "shift_ptr": f"*{vector}",
                                    "mean_ptr": f"*{vector}", "invstd_ptr": f"*{vector}", "add_ptr": f"*{io}",
                                    "g_ptr": f"*{io}", "partial_g_ptr": f"*{vector}",
                                    "partial_g_xhat_ptr": f"*{vector}",
                                    **{s: "i32" for s in ("batch", "height", "width", "cin", "out_height",
                                                          "out_width", "cout", "kernel_size", "stride",
                                                          "w_stride_co", "w_stride_ci", "w_stride_kh",
                                                          "w_stride_kw", "pad_top", "pad_left")},
                                    **{c: "constexpr" for c in ("HAS_ADD", "HAS_H", "DOT_PRECISION",
                                                                "UPCAST_DOT", *blocks)},
                                },
                                "constexprs": {"HAS_ADD": has_add, "HAS_H": has_h, "DOT_PRECISION": precision,
                                               "UPCAST_DOT": False, **blocks},
                                "num_warps": config["num_warps"],
                                "num_stages": config["num_stages"],
                                "tensor_cores": cc.uses_tensor_cores(dtype, precision),
                            }
