// batch_stats.h -- tensor-level entry points of fused_preact::batch_stats (see batch_stats.cpp).
//
// Computes per-channel mean and biased variance of a 4-D (N, C, H, W) tensor, channels at dim 1,
// stored contiguous NCHW or channels_last. Statistics are float32 (float64 for float64 input).
#pragma once

#include <ATen/core/Tensor.h>

#include <tuple>

namespace fused_preact {

// Raises a c10::Error naming the argument unless x is a non-empty 4-D float tensor in NCHW or
// channels_last memory order. Works on symbolic (fake / meta) tensors too.
void check_batch_stats_input(const at::Tensor& x);

// Statistics dtype: float64 for float64 input, float32 otherwise.
at::ScalarType batch_stats_dtype(at::ScalarType input);

std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x);
std::tuple<at::Tensor, at::Tensor> batch_stats_meta(const at::Tensor& x);
#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& x);
#endif

}  // namespace fused_preact
