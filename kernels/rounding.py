"""Casting to the activation dtype the way a GPU does, also in Triton's interpreter.

On a GPU an fp32 -> bf16 cast rounds to nearest even; Triton's CPU interpreter
truncates instead. Truncation is biased (always toward zero), and the bias adds up
in every reduction that follows (BN sums over thousands of values), so interpreter
runs would not show what the kernels compute on a GPU. ``cast_rounded`` rounds the
fp32 bits to nearest even by integer arithmetic before the cast when ``EMULATE``
(launchers pass ``interpreting()``); the GPU build uses the plain cast.
"""
import triton
import triton.language as tl


@triton.jit
def cast_rounded(x, dtype: tl.constexpr, EMULATE: tl.constexpr):
    if EMULATE and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        lsb = (bits >> 16) & 1
        bits = (bits + 0x7FFF + lsb) & 0xFFFF0000
        x = bits.to(tl.float32, bitcast=True)
    return x.to(dtype)
