# conv_wgrad: the weight gradient of a BN-ReLU-conv triple, its input pre-activation recomputed.
#
#   dy [N, Ho, Wo, Cout], x [N, H, W, Cin] contiguous, scale/shift [Cin] float32, the forward's
#   zero padding (left, right, top, bottom; K // 2 each by default; top and left read under the
#   EXPLICIT_PADDING switch, the default variant computes K // 2 as before)
#   dW[co, ci, kh, kw] = sum over (n, ho, wo) of dy[n, ho, wo, co] * a[n, ho*s + kh - top, wo*s + kw - left, ci]
#   with a = relu(scale * x + shift) rounded to x's dtype, zero in the padding (a = x with
#   PROLOGUE=False: scale and shift None, the original unit's first conv and projection)
#   -> dweight [Cout, Cin, K, K] contiguous, in weight's dtype
#
# One GEMM per tap, [Cout, M] x [M, Cin] with M = N*Ho*Wo output pixels: grid axis 0 is
# (tap, Cout block, Cin block), axis 1 splits the huge reduction over M into contiguous row
# ranges (split-K), so CIFAR layers with 16 channels still launch enough programs to fill a GPU.
# Each program accumulates in fp32 over its rows (the x tile is activated as it is loaded, as in
# the forward prologue) and writes its own fp32 partial [split, tap, Cout, Cin]; the partials
# are summed in a fixed order afterwards (deterministic) and laid out as [Cout, Cin, K, K].
# Nothing is saved; the activated input is never written.
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import conv_common as cc
from .runtime import interpreting
from fused_preact.unit_ops import conv_padding, padded_output_shape, statistics_dtype

# Programs to aim for with split-K: a few waves of an H100 (132 SMs); the interpreter pays per program.
TARGET_PROGRAMS = 4 * 132
TARGET_PROGRAMS_INTERPRETED = 4
# Row ranges of split-K are multiples of this (a multiple of every BLOCK_M).
SPLIT_ROW_QUANTUM = 128
# Nominal tile used to size the split (configurations may differ; the split stays valid).
NOMINAL_BLOCK_CO, NOMINAL_BLOCK_CI = 64, 64


@triton.jit
def _conv_wgrad_kernel(
    # pointers
    dy_ptr, x_ptr, scale_ptr, shift_ptr, partial_ptr,
    # sizes
    num_rows, height, width, cin, out_height, out_width, cout, kernel_size, stride, rows_per_split,
    pad_top, pad_left,
    # meta-parameters
    EXPLICIT_PADDING: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PROLOGUE: tl.constexpr = True,
):
    # BLOCK_N output channels (rows of dW) x BLOCK_K input channels (columns); BLOCK_M is the
    # reduction step over output pixels.
    acc_dtype = scale_ptr.dtype.element_ty   # fp32, fp64 for fp64 activations
    co_blocks = tl.cdiv(cout, BLOCK_N)
    ci_blocks = tl.cdiv(cin, BLOCK_K)
    pid = tl.program_id(0)
    tap = pid // (co_blocks * ci_blocks)
    pid_co = (pid // ci_blocks) % co_blocks
    pid_ci = pid % ci_blocks
    split = tl.program_id(1)
    kh = tap // kernel_size
    kw = tap % kernel_size
    if EXPLICIT_PADDING:
        pad_h = pad_top
        pad_w = pad_left
    else:
        pad_h = kernel_size // 2
        pad_w = pad_h

    co = pid_co * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < cout
    ci = pid_ci * BLOCK_K + tl.arange(0, BLOCK_K)
    row_start = split * rows_per_split
    row_end = tl.minimum(row_start + rows_per_split, num_rows)

    # ---- main loop over this split's output pixels ----
    acc = tl.zeros([BLOCK_N, BLOCK_K], dtype=acc_dtype)
    for first_row in range(row_start, row_end, BLOCK_M):
        rows = first_row + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        wo = rows % out_width
        ho = (rows // out_width) % out_height
        image = rows // (out_width * out_height)
        # dy^T tile [BLOCK_N, BLOCK_M]
        d = tl.load(dy_ptr + rows[None, :].to(tl.int64) * cout + co[:, None],
                    mask=row_ok[None, :] & co_ok[:, None], other=0.0)
        hi = ho * stride + kh - pad_h
        wi = wo * stride + kw - pad_w
        pixel_ok = row_ok & (hi >= 0) & (hi < height) & (wi >= 0) & (wi < width)
        a = cc.load_preact(x_ptr, scale_ptr, shift_ptr, (image * height + hi) * width + wi, pixel_ok, ci, cin, UPCAST_DOT,
                           PROLOGUE)
        acc = tl.dot(cc.dot_operand(d, UPCAST_DOT), cc.dot_operand(a, UPCAST_DOT), acc,
                     input_precision=DOT_PRECISION, out_dtype=acc_dtype)

    # ---- partial [split, tap, Cout, Cin] ----
    taps = kernel_size * kernel_size
    base = ((split * taps + tap) * cout).to(tl.int64) * cin
    tl.store(partial_ptr + base + co[:, None] * cin + ci[None, :], acc,
             mask=co_ok[:, None] & (ci < cin)[None, :])


_conv_wgrad_tuned = triton.autotune(
    configs=cc.autotune_configs(),
    key=["num_rows", "cin", "cout", "kernel_size", "stride", "rows_per_split", "EXPLICIT_PADDING", "PROLOGUE"],
)(_conv_wgrad_kernel)


def split_rows(num_rows: int, cin: int, cout: int, kernel_size: int) -> int:
    """Rows of each split-K range: enough ranges to fill the GPU, each a multiple of SPLIT_ROW_QUANTUM."""
    tiles = kernel_size * kernel_size * triton.cdiv(cout, NOMINAL_BLOCK_CO) * triton.cdiv(cin, NOMINAL_BLOCK_CI)
    target = TARGET_PROGRAMS_INTERPRETED if interpreting() else TARGET_PROGRAMS
    quanta = triton.cdiv(num_rows, SPLIT_ROW_QUANTUM)
    splits = max(1, min(quanta, target // tiles))
    return triton.cdiv(quanta, splits) * SPLIT_ROW_QUANTUM


def _check(dy, x, scale, shift, weight, stride, padding) -> int:
    cc.check_activation("x", x)
    cc.check_activation("dy", dy, x.dtype)
    cc.check_same_device("dy", dy, x.device)
    k = cc.check_weight(weight, x.dtype, x.device)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(f"weight has {weight.shape[1]} input channels but x has {x.shape[-1]}")
    cc.check_stride(stride)
    n, h, w, _ = x.shape
    cc.check_shape("dy", dy, (n, *padded_output_shape(h, w, k, stride, padding), weight.shape[0]))
    cc.check_prologue(scale, shift, x.shape[-1], x.dtype, x.device)
    return k


def conv_wgrad(dy: torch.Tensor, x: torch.Tensor, scale: Optional[torch.Tensor], shift: Optional[torch.Tensor],
               weight: torch.Tensor, stride: int, padding=None) -> torch.Tensor:
    """``dweight [Cout, Cin, K, K]``: the ``conv_wgrad`` operator of ``fused_preact.unit_ops``."""
    k = _check(dy, x, scale, shift, weight, stride, padding)
    pad_left, _, pad_top, _ = conv_padding(padding, k)
    n, height, width, cin = x.shape
    _, out_height, out_width, cout = dy.shape
    num_rows = n * out_height * out_width
    if num_rows == 0:
        return torch.zeros(weight.shape, dtype=weight.dtype, device=x.device)
    rows_per_split = split_rows(num_rows, cin, cout, k)
    splits = triton.cdiv(num_rows, rows_per_split)
    partial = torch.empty(splits, k * k, cout, cin, dtype=statistics_dtype(x.dtype), device=x.device)

    def grid(meta):
        return (k * k * triton.cdiv(cout, meta["BLOCK_N"]) * triton.cdiv(cin, meta["BLOCK_K"]), splits)

    config = cc.fixed_config(x.dtype)
    kernel = _conv_wgrad_tuned if config is None else _conv_wgrad_kernel
    launch_meta = {} if config is None else dict(config)
    prologue = scale is not None
    scale, shift = cc.prologue_vectors(scale, shift, x.dtype, x.device)
    kernel[grid](
        dy, x, scale, shift, partial,
        num_rows, height, width, cin, out_height, out_width, cout, k, stride, rows_per_split,
        pad_top, pad_left, EXPLICIT_PADDING=cc.explicit_padding(padding, k), PROLOGUE=prologue,
        **cc.dot_meta(x.dtype), **launch_meta)
    # [split, tap, Cout, Cin] -> [Cout, Cin, K, K]
    dweight = partial.sum(0).permute(1, 2, 0).reshape(cout, cin, k, k)
    return dweight.to(weight.dtype).contiguous()


def aot_variants():
    """Every configuration ``conv_wgrad`` can launch, for the ahead-of-time compile test.

    Kernel size and stride are runtime sizes; each configuration comes in two variants: the
    default padding K // 2 and per-side padding (EXPLICIT_PADDING, ``_pad`` in the name). The
    weight is not read (only its shape and dtype).
    """
    return cc.with_padding_variants(_unpadded_variants())


def _unpadded_variants():
    for dtype, io in cc.DTYPES.items():
        vector = "fp64" if dtype == torch.float64 else "fp32"
        for precision in cc.precision_variants(dtype):
            for prologue in (True, False):
                for config in cc.configs_for(dtype, precision):
                    blocks = {k: v for k, v in config.items() if k.startswith("BLOCK")}
                    yield {
                        "name": (f"conv_wgrad_{io}_{precision}{'' if prologue else '_raw'}"
                                 f"_m{config['BLOCK_M']}n{config['BLOCK_N']}k{config['BLOCK_K']}"),
                        "kernel": _conv_wgrad_kernel,
                        "signature": {
                            "dy_ptr": f"*{io}", "x_ptr": f"*{io}", "scale_ptr": f"*{vector}",
                            "shift_ptr": f"*{vector}", "partial_ptr": f"*{vector}",
                            **{s: "i32" for s in ("num_rows", "height", "width", "cin", "out_height", "out_width",
                                                  "cout", "kernel_size", "stride", "rows_per_split",
                                                  "pad_top", "pad_left")},
                            **{c: "constexpr" for c in ("DOT_PRECISION", "UPCAST_DOT", *blocks, "PROLOGUE")},
                        },
                        "constexprs": {"DOT_PRECISION": precision, "UPCAST_DOT": False, "PROLOGUE": prologue,
                                       **blocks},
                        "num_warps": config["num_warps"],
                        "num_stages": config["num_stages"],
                        "tensor_cores": cc.uses_tensor_cores(dtype, precision),
                    }
