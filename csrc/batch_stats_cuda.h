// batch_stats_cuda.h -- raw-pointer launcher of the batch_stats CUDA kernels (batch_stats_cuda.cu).
//
// Kept free of ATen so that the one nvcc translation unit includes c10 headers only: an nvcc
// unit that includes ATen costs minutes of build time. Tensors are checked and allocated in
// batch_stats.cpp.
#pragma once

#ifdef WITH_CUDA
#include <c10/core/Device.h>
#include <c10/core/ScalarType.h>

#include <cstdint>

namespace fused_preact {

// Blocks the first stage splits the n * hw rows into; the caller passes a workspace of
// 3 * batch_stats_cuda_row_blocks(...) * c accumulator values (double for double input, else float).
int64_t batch_stats_cuda_row_blocks(int64_t rows, bool channels_last);

// x: n * c * hw values of type `dtype` on device `device`, channels_last (n, hw, c) when
// `channels_last`, else NCHW (n, c, hw). mean, var: c values each, double for double input,
// float otherwise. Runs on the current stream of `device`; requires n * hw > 0 and c > 0.
void batch_stats_cuda_launch(const void* x, c10::ScalarType dtype, int64_t n, int64_t c,
                             int64_t hw, bool channels_last, void* mean, void* var,
                             void* workspace, c10::DeviceIndex device);

}  // namespace fused_preact
#endif  // WITH_CUDA
