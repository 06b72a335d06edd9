// batch_stats_cuda.cu -- per-channel mean and biased variance of a 4-D activation on the GPU.
//
// Computes, for x of shape (N, C, H, W) and M = N * H * W,
//     mean_c = (1/M) sum_{n,h,w} x[n,c,h,w]      var_c = (1/M) sum_{n,h,w} (x[n,c,h,w] - mean_c)^2
// (what BatchNorm2d normalizes with in training) in one read of x, in two stages:
//   1. partials: the M = N*H*W positions ("rows") are cut into chunks; each block reduces one
//      chunk for a tile of channels to (mean, M2, count) per channel. channels_last (the fast
//      path): a warp reads 32 consecutive channels of a pixel. NCHW: a block walks one channel's
//      rows, which are contiguous within each (n, c) plane.
//   2. merge: one thread column per channel combines the chunks' partials into mean and var.
// The chunk count depends on M only (batch_stats_cuda_row_blocks), so the caller sizes the
// partials workspace and the result does not depend on the GPU model.
// Layout: channels_last or contiguous NCHW; float32, float64, float16, bfloat16 input;
// accumulates in float (double for double input).
// Fuses: mean and variance into one pass. Each thread folds batches of kUnroll values into its
// running statistics with Chan's merge (Welford's update, a batch at a time), and threads,
// blocks and chunks are combined the same way, so a large mean does not cancel the variance.
// Deterministic: no atomics, a fixed merge order for a given shape.
// Saves nothing. Includes c10 headers only, which keeps this nvcc unit quick to compile.
#ifdef WITH_CUDA

#include "batch_stats_cuda.h"

#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>

namespace fused_preact {
namespace {

// ---- launch configuration -----------------------------------------------------------------
constexpr int kTileC = 32;         // channels per block (channels_last stage 1, stage 2)
constexpr int kRowLanes = 8;       // channels_last stage 1: thread rows per block (256 threads)
constexpr int kPlaneLanes = 256;   // NCHW stage 1: threads along one plane
constexpr int kMergeLanes = 16;    // stage 2: thread rows over the chunks (512 threads)
constexpr int kUnroll = 4;         // loads in flight per thread, folded as one batch
constexpr int kMinPerThread = 16;  // do not split rows so finely that a thread reads fewer
// Chunks of rows at most: channels_last grids have ceil(C / kTileC) x chunks blocks, NCHW grids
// C x chunks blocks, so NCHW needs fewer chunks to fill a GPU.
constexpr int64_t kMaxChunksChannelsLast = 256;
constexpr int64_t kMaxChunksNCHW = 32;

template <typename acc_t>
struct Welford {
  acc_t mean;
  acc_t m2;  // sum of squared deviations from mean
  acc_t n;   // count (exact in float up to 2^24 per chunk)
};

// 1 / v, correctly rounded and inline: a double division calls a slow-path routine whose
// call frame spills registers to local memory.
__device__ __forceinline__ float reciprocal(float v) { return __frcp_rn(v); }
__device__ __forceinline__ double reciprocal(double v) { return __drcp_rn(v); }

// Chan et al.'s merge of two disjoint sets' statistics; empty sets are no-ops.
template <typename acc_t>
__device__ __forceinline__ void merge(Welford<acc_t>& a, const Welford<acc_t>& b) {
  const acc_t n = a.n + b.n;
  if (n == acc_t(0)) return;
  const acc_t delta = b.mean - a.mean;
  const acc_t wb = b.n * reciprocal(n);
  a.mean += delta * wb;
  a.m2 += b.m2 + delta * delta * a.n * wb;
  a.n = n;
}

// Welford-type fold of kUnroll values: their exact mean and M2, then one merge (one division
// per kUnroll values instead of one per value).
template <typename acc_t>
__device__ __forceinline__ void fold(Welford<acc_t>& w, const acc_t (&v)[kUnroll]) {
  acc_t sum = 0;
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) sum += v[i];
  const acc_t mean = sum * (acc_t(1) / kUnroll);
  acc_t m2 = 0;
#pragma unroll
  for (int i = 0; i < kUnroll; ++i) m2 += (v[i] - mean) * (v[i] - mean);
  merge(w, Welford<acc_t>{mean, m2, acc_t(kUnroll)});
}

// Thread's share of one strided run: elements p[i * stride] for i = begin + lane, step lanes.
template <typename scalar_t, typename acc_t>
__device__ __forceinline__ Welford<acc_t> accumulate(const scalar_t* __restrict__ p,
                                                     int64_t stride, int64_t begin, int64_t end,
                                                     int lane, int lanes) {
  Welford<acc_t> w{0, 0, 0};
  int64_t i = begin + lane;
  for (; i + int64_t(kUnroll - 1) * lanes < end; i += int64_t(kUnroll) * lanes) {
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = static_cast<acc_t>(p[(i + int64_t(u) * lanes) * stride]);
    fold(w, v);
  }
  for (; i < end; i += lanes) merge(w, Welford<acc_t>{static_cast<acc_t>(p[i * stride]), 0, 1});
  return w;
}

// Merges the statistics of the TY thread rows of each of the TX thread columns of a
// (TX, TY) block; the result is valid in thread row 0.
template <typename acc_t, int TX, int TY>
__device__ __forceinline__ void merge_thread_rows(Welford<acc_t>& w) {
  __shared__ acc_t s_mean[TY][TX], s_m2[TY][TX], s_n[TY][TX];
  const int tx = threadIdx.x, ty = threadIdx.y;
  s_mean[ty][tx] = w.mean;
  s_m2[ty][tx] = w.m2;
  s_n[ty][tx] = w.n;
  __syncthreads();
#pragma unroll
  for (int s = TY / 2; s > 0; s /= 2) {
    if (ty < s) {
      merge(w, Welford<acc_t>{s_mean[ty + s][tx], s_m2[ty + s][tx], s_n[ty + s][tx]});
      s_mean[ty][tx] = w.mean;
      s_m2[ty][tx] = w.m2;
      s_n[ty][tx] = w.n;
    }
    __syncthreads();
  }
}

// Partials buffer: three planes [chunks][C] of mean, M2 and count.
template <typename acc_t>
__device__ __forceinline__ void store_partial(const Welford<acc_t>& w, acc_t* __restrict__ part,
                                              int64_t chunks, int64_t C, int64_t chunk,
                                              int64_t c) {
  const int64_t at = chunk * C + c;
  part[at] = w.mean;
  part[chunks * C + at] = w.m2;
  part[2 * chunks * C + at] = w.n;
}

// ---- stage 1 ------------------------------------------------------------------------------
// channels_last: grid (ceil(C / kTileC), chunks), block (kTileC, kRowLanes).
// Block (tile, chunk) reduces rows [chunk * rows_per_chunk, +rows_per_chunk) of x viewed as
// (rows = N*H*W, C).
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kTileC * kRowLanes)
    partials_channels_last_kernel(const scalar_t* __restrict__ x, int64_t rows, int64_t C,
                                  int64_t rows_per_chunk, int64_t chunks,
                                  acc_t* __restrict__ part) {
  const int64_t c = int64_t(blockIdx.x) * kTileC + threadIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * rows_per_chunk;
  const int64_t end = min(begin + rows_per_chunk, rows);
  Welford<acc_t> w{0, 0, 0};
  if (c < C) w = accumulate<scalar_t, acc_t>(x + c, C, begin, end, threadIdx.y, kRowLanes);
  merge_thread_rows<acc_t, kTileC, kRowLanes>(w);
  if (threadIdx.y == 0 && c < C) store_partial(w, part, chunks, C, chunk, c);
}

// NCHW: grid (C, chunks), block (1, kPlaneLanes). Block (c, chunk) reduces rows
// [chunk * rows_per_chunk, +rows_per_chunk) of channel c, row r = n * HW + hw being the value
// x[n, c, hw]: consecutive threads read consecutive addresses within a plane.
template <typename scalar_t, typename acc_t>
__global__ void __launch_bounds__(kPlaneLanes)
    partials_nchw_kernel(const scalar_t* __restrict__ x, int64_t C, int64_t HW, int64_t rows,
                         int64_t rows_per_chunk, int64_t chunks, acc_t* __restrict__ part) {
  const int64_t c = blockIdx.x;
  const int64_t chunk = blockIdx.y;
  const int64_t begin = chunk * rows_per_chunk;
  const int64_t end = min(begin + rows_per_chunk, rows);
  // (n, hw) of row r, advanced by kPlaneLanes rows with one compare, not a division per value.
  int64_t r = begin + threadIdx.y;
  int64_t n = r / HW, hw = r - n * HW;
  const int64_t step_n = kPlaneLanes / HW, step_hw = kPlaneLanes % HW;
  auto next = [&]() {
    const acc_t v = static_cast<acc_t>(x[(n * C + c) * HW + hw]);
    n += step_n;
    hw += step_hw;
    if (hw >= HW) {
      hw -= HW;
      ++n;
    }
    return v;
  };
  Welford<acc_t> w{0, 0, 0};
  for (; r + int64_t(kUnroll - 1) * kPlaneLanes < end; r += int64_t(kUnroll) * kPlaneLanes) {
    acc_t v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) v[u] = next();
    fold(w, v);
  }
  for (; r < end; r += kPlaneLanes) merge(w, Welford<acc_t>{next(), 0, 1});
  merge_thread_rows<acc_t, 1, kPlaneLanes>(w);
  if (threadIdx.y == 0) store_partial(w, part, chunks, C, chunk, c);
}

// ---- stage 2 ------------------------------------------------------------------------------
// grid ceil(C / kTileC), block (kTileC, kMergeLanes): merges the chunks of each channel.
template <typename acc_t>
__global__ void __launch_bounds__(kTileC * kMergeLanes)
    merge_chunks_kernel(const acc_t* __restrict__ part, int64_t chunks, int64_t C,
                        acc_t inv_count, acc_t* __restrict__ mean, acc_t* __restrict__ var) {
  const int64_t c = int64_t(blockIdx.x) * kTileC + threadIdx.x;
  Welford<acc_t> w{0, 0, 0};
  if (c < C) {
    for (int64_t j = threadIdx.y; j < chunks; j += kMergeLanes) {
      const int64_t at = j * C + c;
      merge(w, Welford<acc_t>{part[at], part[chunks * C + at], part[2 * chunks * C + at]});
    }
  }
  merge_thread_rows<acc_t, kTileC, kMergeLanes>(w);
  if (threadIdx.y == 0 && c < C) {
    mean[c] = w.mean;
    var[c] = w.m2 * inv_count;  // biased: divide by M, the exact count
  }
}

// ---- host ---------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows per chunk and the number of chunks actually used (at most batch_stats_cuda_row_blocks).
struct Split {
  int64_t rows_per_chunk, chunks;
};

Split split_rows(int64_t rows, bool channels_last) {
  const int64_t rows_per_chunk = ceil_div(rows, batch_stats_cuda_row_blocks(rows, channels_last));
  return {rows_per_chunk, ceil_div(rows, rows_per_chunk)};
}

template <typename scalar_t, typename acc_t>
void launch(const scalar_t* x, int64_t N, int64_t C, int64_t HW, bool channels_last,
            acc_t* mean, acc_t* var, acc_t* part, cudaStream_t stream) {
  const int64_t rows = N * HW;
  const Split split = split_rows(rows, channels_last);
  if (channels_last) {
    const dim3 grid(static_cast<unsigned>(ceil_div(C, kTileC)),
                    static_cast<unsigned>(split.chunks));
    partials_channels_last_kernel<scalar_t, acc_t><<<grid, dim3(kTileC, kRowLanes), 0, stream>>>(
        x, rows, C, split.rows_per_chunk, split.chunks, part);
  } else {
    TORCH_CHECK(C <= INT32_MAX, "batch_stats: x has too many channels (", C, ")");
    const dim3 grid(static_cast<unsigned>(C), static_cast<unsigned>(split.chunks));
    partials_nchw_kernel<scalar_t, acc_t><<<grid, dim3(1, kPlaneLanes), 0, stream>>>(
        x, C, HW, rows, split.rows_per_chunk, split.chunks, part);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const acc_t inv_count = static_cast<acc_t>(1.0 / static_cast<double>(rows));
  merge_chunks_kernel<acc_t>
      <<<static_cast<unsigned>(ceil_div(C, kTileC)), dim3(kTileC, kMergeLanes), 0, stream>>>(
          part, split.chunks, C, inv_count, mean, var);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

int64_t batch_stats_cuda_row_blocks(int64_t rows, bool channels_last) {
  const int64_t min_rows = int64_t(channels_last ? kRowLanes : kPlaneLanes) * kMinPerThread;
  const int64_t most = channels_last ? kMaxChunksChannelsLast : kMaxChunksNCHW;
  return std::clamp<int64_t>(ceil_div(rows, min_rows), 1, most);
}

void batch_stats_cuda_launch(const void* x, c10::ScalarType dtype, int64_t n, int64_t c,
                             int64_t hw, bool channels_last, void* mean, void* var,
                             void* workspace, c10::DeviceIndex device) {
  TORCH_CHECK(n * hw > 0 && c > 0, "batch_stats: empty input reached the CUDA launcher");
  const c10::cuda::CUDAGuard guard(device);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(device).stream();
  switch (dtype) {
    case c10::ScalarType::Float:
      return launch(static_cast<const float*>(x), n, c, hw, channels_last,
                    static_cast<float*>(mean), static_cast<float*>(var),
                    static_cast<float*>(workspace), stream);
    case c10::ScalarType::Half:
      return launch(static_cast<const c10::Half*>(x), n, c, hw, channels_last,
                    static_cast<float*>(mean), static_cast<float*>(var),
                    static_cast<float*>(workspace), stream);
    case c10::ScalarType::BFloat16:
      return launch(static_cast<const c10::BFloat16*>(x), n, c, hw, channels_last,
                    static_cast<float*>(mean), static_cast<float*>(var),
                    static_cast<float*>(workspace), stream);
    case c10::ScalarType::Double:
      return launch(static_cast<const double*>(x), n, c, hw, channels_last,
                    static_cast<double*>(mean), static_cast<double*>(var),
                    static_cast<double*>(workspace), stream);
    default:
      TORCH_CHECK(false, "batch_stats: unsupported dtype ", c10::toString(dtype));
  }
}

}  // namespace fused_preact

#endif  // WITH_CUDA
