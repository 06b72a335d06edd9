# conv_common: what the three implicit-GEMM conv kernels share.
#
#   - load_preact: a [BLOCK_M, BLOCK_K] tile of the conv input's pre-activation
#     a = relu(scale[c] * x + shift[c]) (fp32, fp64 for fp64 x; NaN stays NaN as in torch.relu),
#     zero in the spatial padding and
#     past the last channel, rounded to x's dtype: the prologue of the forward and of wgrad.
#     With PROLOGUE False the tile is x as it is (the original unit's first conv and projection),
#     and the launchers pass a placeholder for scale / shift (prologue_vectors).
#   - dot_operand: the upcast of dot operands to fp32 under the interpreter (whose bf16/fp16
#     tl.dot multiplies raw bits).
#   - tile configurations (one place per backend), argument checks with errors naming the
#     argument, and the Triton type names the ahead-of-time compile test needs.
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from .rounding import cast_rounded
from .runtime import check_device, dot_precision, interpreting
from fused_preact.unit_ops import statistics_dtype

# Activation dtypes the conv kernels take, with their Triton pointer type names.
DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
KERNEL_SIZES = (1, 3)
STRIDES = (1, 2)


# ---------------------------------------------------------------------------------------------
# tile configurations
# ---------------------------------------------------------------------------------------------
# BLOCK_M rows of the implicit GEMM (output pixels for forward and wgrad's reduction, input
# pixels for dgrad), BLOCK_N output columns, BLOCK_K reduction step (channels of one tap).
# Tensor-core friendly: every block is a multiple of 16. Tuned on an H100 later; for now one
# large tile for wide layers and one small tile for CIFAR's 16/32-channel layers (more programs).
GPU_CONFIGS = (
    {"BLOCK_M": 128, "BLOCK_N": 64, "BLOCK_K": 32, "num_warps": 8, "num_stages": 3},
    {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 4, "num_stages": 4},
)
# float64 runs for gradient checks, not speed: one small tile (fp64 registers are twice as wide).
# 4 warps: 16 B of stack on sm_80; 2 stages: 8 B of stack in dgrad add+h on sm_90; 8 warps, 1 stage: none spills
FP64_CONFIG = {"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 16, "num_warps": 8, "num_stages": 1}
# The interpreter pays per program, not per element: one large tile, few programs.
INTERPRETER_CONFIG = {"BLOCK_M": 128, "BLOCK_N": 32, "BLOCK_K": 32, "num_warps": 4, "num_stages": 1}
# The smallest BLOCK_M any configuration uses (sizes per-tile partial buffers from shapes alone).
MIN_BLOCK_M = min(c["BLOCK_M"] for c in GPU_CONFIGS + (FP64_CONFIG, INTERPRETER_CONFIG))


def autotune_configs(configs=GPU_CONFIGS) -> list:
    return [triton.Config({k: v for k, v in c.items() if k.startswith("BLOCK")},
                          num_warps=c["num_warps"], num_stages=c["num_stages"]) for c in configs]


def fixed_config(dtype: torch.dtype) -> Optional[dict]:
    """The one configuration to launch without autotuning, or None to autotune."""
    if interpreting():
        return INTERPRETER_CONFIG
    configs = configs_for(dtype, dot_precision(dtype))
    return configs[0] if len(configs) == 1 else None


def configs_for(dtype: torch.dtype, precision: str) -> tuple:
    """Every configuration a launcher can use on a GPU for ``dtype`` activations and ``precision``.

    float64 runs for gradient checks, and float32 'ieee' products run on FMA units (the large
    tile spills on sm_80 there): neither is a speed path, so both take the small tile only.
    """
    if dtype == torch.float64:
        return (FP64_CONFIG,)
    if dtype == torch.float32 and precision == "ieee":
        return (GPU_CONFIGS[-1],)
    return GPU_CONFIGS


def precision_variants(dtype: torch.dtype) -> tuple:
    """The ``DOT_PRECISION`` values a launcher can pass for ``dtype``."""
    return ("ieee", "tf32") if dtype == torch.float32 else ("ieee",)


def uses_tensor_cores(dtype: torch.dtype, precision: str) -> bool:
    """Whether the dot compiles to HMMA/HGMMA (fp64 uses DMMA, fp32 'ieee' uses FMA)."""
    return dtype in (torch.bfloat16, torch.float16) or (dtype == torch.float32 and precision == "tf32")


def explicit_padding(padding, kernel_size: int) -> bool:
    """The EXPLICIT_PADDING switch of the conv kernels: whether ``padding`` (checked, [left, right,
    top, bottom] or None) differs from the default ``K // 2`` per side, whose variant computes its
    offsets from the kernel size (the default path's code stays as it was)."""
    return padding is not None and tuple(padding) != (kernel_size // 2,) * 4


def dot_meta(dtype: torch.dtype) -> dict:
    """Constexprs of the product: its fp32 precision and the interpreter's upcast of 16-bit operands."""
    return {"DOT_PRECISION": dot_precision(dtype),
            "UPCAST_DOT": interpreting() and dtype in (torch.bfloat16, torch.float16)}


def with_padding_variants(variants):
    """Each ahead-of-time variant with ``EXPLICIT_PADDING`` off, then its twin with it on (per-side
    padding read from the kernel's pad_top / pad_left), named with ``_pad`` before the tile."""
    for v in variants:
        signature = {**v["signature"], "EXPLICIT_PADDING": "constexpr"}
        yield {**v, "signature": signature, "constexprs": {**v["constexprs"], "EXPLICIT_PADDING": False}}
        switches, tile = v["name"].rsplit("_m", 1)
        yield {**v, "name": f"{switches}_pad_m{tile}", "signature": signature,
               "constexprs": {**v["constexprs"], "EXPLICIT_PADDING": True}}


# ---------------------------------------------------------------------------------------------
# kernel helpers
# ---------------------------------------------------------------------------------------------
@triton.jit
def dot_operand(tile, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        return tile.to(tl.float32)
    return tile


@triton.jit
def load_preact(x_ptr, scale_ptr, shift_ptr, pixel, pixel_ok, channel, channels, EMULATE_ROUNDING: tl.constexpr,
                PROLOGUE: tl.constexpr = True):
    """relu(scale * x + shift) at ``pixel`` [BLOCK_M] x ``channel`` [BLOCK_K], in x's dtype.

    Computed in scale's dtype (fp32, fp64 for fp64 x); zero where ``pixel_ok`` is false (the
    spatial padding, rows past the end) or the channel is past the last, after the activation.
    Without ``PROLOGUE``: x itself, zero there too.
    """
    channel_ok = channel < channels
    ok = pixel_ok[:, None] & channel_ok[None, :]
    x = tl.load(x_ptr + pixel[:, None].to(tl.int64) * channels + channel[None, :], mask=ok, other=0.0)
    if not PROLOGUE:
        return x
    scale = tl.load(scale_ptr + channel, mask=channel_ok, other=0.0)
    shift = tl.load(shift_ptr + channel, mask=channel_ok, other=0.0)
    v = x.to(scale.dtype) * scale[None, :] + shift[None, :]
    a = tl.where(v <= 0.0, 0.0, v)   # relu that keeps a NaN, as torch.relu (tl.maximum would drop it)
    return cast_rounded(tl.where(ok, a, 0.0), x_ptr.dtype.element_ty, EMULATE_ROUNDING)


# ---------------------------------------------------------------------------------------------
# argument checks
# ---------------------------------------------------------------------------------------------
def check_activation(name: str, t, dtype: Optional[torch.dtype] = None) -> None:
    """``t`` is a contiguous 4-D NHWC tensor of a supported dtype (``dtype`` when given)."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check_device(name, t)
    if t.dtype not in DTYPES:
        raise TypeError(f"{name} has dtype {t.dtype}; the Triton convs support "
                        f"{', '.join(map(str, DTYPES))}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype} but must match {dtype}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be a 4-D NHWC tensor [N, H, W, C], got shape {tuple(t.shape)}")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous NHWC tensor "
                         "(a channels_last NCHW tensor .permute(0, 2, 3, 1))")


def check_shape(name: str, t: torch.Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must be {tuple(shape)}")


def check_weight(weight, activation_dtype: torch.dtype, device: torch.device) -> int:
    """``weight`` is an nn.Conv2d weight [Cout, Cin, K, K], K in (1, 3); returns K."""
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    check_device("weight", weight)
    if weight.device != device:
        raise ValueError(f"weight is on {weight.device} but the activations are on {device}")
    if weight.dim() != 4 or weight.shape[2] != weight.shape[3] or weight.shape[2] not in KERNEL_SIZES:
        raise ValueError(f"weight must be [Cout, Cin, K, K] with K in {KERNEL_SIZES}, "
                         f"got shape {tuple(weight.shape)}")
    if weight.dtype not in (torch.float32, activation_dtype):
        raise TypeError(f"weight has dtype {weight.dtype}; it must be float32 or the activation dtype "
                        f"{activation_dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight has no channels: shape {tuple(weight.shape)}")
    return weight.shape[2]


def check_channel_vector(name: str, t, channels: int, dtype: torch.dtype, device: torch.device) -> None:
    """``t`` is a [channels] vector of ``dtype`` (per-channel BN data) on ``device``."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(t).__name__}")
    check_device(name, t)
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
    if t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}; it must be {dtype}")
    if tuple(t.shape) != (channels,):
        raise ValueError(f"{name} has shape {tuple(t.shape)} but must be [{channels}] (one value per channel)")
    if not t.is_contiguous():
        raise ValueError(f"{name} must be contiguous")


def check_prologue(scale, shift, channels: int, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether a conv has its BN-ReLU prologue: ``scale`` and ``shift`` both given (checked as
    [channels] vectors) or both None (the conv reads x as it is)."""
    if (scale is None) != (shift is None):
        raise ValueError("scale and shift must be given together (the BN-ReLU prologue) or both be None "
                         "(the conv reads x as it is)")
    if scale is None:
        return False
    vector_dtype = statistics_dtype(dtype)
    check_channel_vector("scale", scale, channels, vector_dtype, device)
    check_channel_vector("shift", shift, channels, vector_dtype, device)
    return True


def prologue_vectors(scale, shift, dtype: torch.dtype, device: torch.device) -> tuple:
    """``(scale, shift)`` to launch with: the given vectors, or one placeholder value of the
    statistics dtype (never read, it types the kernel's accumulator) when there is no prologue."""
    if scale is not None:
        return scale, shift
    placeholder = torch.zeros(1, dtype=statistics_dtype(dtype), device=device)
    return placeholder, placeholder


def check_stride(stride) -> None:
    if isinstance(stride, bool) or not isinstance(stride, int) or stride not in STRIDES:
        raise ValueError(f"stride must be one of {STRIDES}, got {stride!r}")


def check_same_device(name: str, t: torch.Tensor, device: torch.device) -> None:
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but the activations are on {device}")
