// elementwise_cuda.cu -- the CUDA kernels of the per-element passes of a fused unit, NHWC:
//   bn_relu_apply_cuda            out = relu(scale[c] * x + shift[c]) (+ residual)       forward
//   bn_add_relu_cuda              y = relu(scale[c] * h + shift[c] + s), s = residual or
//                                 rscale[c] * residual + rshift[c] (the same kernel, residual
//                                 added before the ReLU)                                 forward
//   bn_relu_prologue_cuda         the same without residual (the conv input's pre-activation),
//                                 stored in x's dtype, or as float32 holding x-rounded values
//   dgrad_epilogue_cuda           g = (t + add) * !(scale[c] * h + shift[c] <= 0) in g's dtype, and
//                                 per channel sum_g = sum(g), sum_g_xhat = sum(g * (h - mean) *
//                                 invstd) of g before rounding (conv_dgrad's epilogue; t in g's
//                                 dtype or float32 for bfloat16 / float16 g)
//   bn_relu_backward_reduce_cuda  the checked operator around dgrad_epilogue_cuda        backward
//   bn_add_relu_backward_cuda     the same reduction with the mask read from the saved output
//                                 (g = dy * !(y <= 0)); with a shortcut BN a second reduction over
//                                 g and h_s (g not stored again) gives its sum_g_xhat    backward
//   bn_backward_finish_cuda       dh = A[c] * g + B[c] * (h - mean[c]) + D[c] (+ add)    backward
// Layout: contiguous [rows, C] (rows = N*H*W). float32 / float64 / float16 / bfloat16 data,
// arithmetic in at::opmath_type (fp32; fp64 for float64), with the CPU kernels' rounding points:
// one rounding to the storage dtype at the end, an FMA where the CPU kernel calls fmadd and no
// contraction elsewhere. Per-channel vectors (any float dtype) are converted to that type on the
// device first (a no-op for float32 vectors of float32 / bfloat16 / float16 data).
// Launch: block (bx, by) of 256 threads at most; thread column tx owns V consecutive channels
// (V = 16 bytes of data when C and the pointers allow, else 1: consecutive threads read
// consecutive channels, one 16-byte access per tensor and row) and keeps their coefficients in
// registers; bx is the power of two covering C / V, at most 32. Elementwise kernels: grid
// (row blocks, channel tiles), both grid-stride, 4 rows of single values or 2 rows of 16-byte
// vectors in flight per thread (registers <= 128). The reduction (two blocks per multiprocessor,
// 128 registers at most; one row of 16-bit 16-byte vectors in flight): one block per partial of
// kRowsPerPartial rows and channel tile, a fixed-order tree over its thread rows into a [T, C]
// workspace, then one thread column per channel adds the T partials in double in a fixed order
// (sum_partials_kernel): deterministic, no atomics.
// Fuses each line above into one read of its inputs (bn_backward_finish computes its per-channel
// coefficients in the same kernel); saves nothing.
// Host side: ATen's core Tensor and at::empty only, dtype dispatch by hand (a light nvcc unit).
#ifdef WITH_CUDA

#include "unit_ops_cuda.h"
#include "cuda_common.cuh"

#include <ATen/OpMathType.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace fused_preact {
namespace {

using namespace cuda;

// ---- launch configuration -------------------------------------------------------------------
constexpr int kThreads = 256;         // threads per block at most
constexpr int kMaxTileX = 32;         // channel vectors per block at most
constexpr int kReduceMaxTileY = 64;   // reduction: thread rows (>= 4 rows of a partial each)
// Rows in flight per thread: 4 of single values, 2 of 16-byte vectors (registers stay <= 128).
template <int V>
constexpr int kUnroll = V == 1 ? 4 : 2;
// backward_reduce_kernel: one row of 16-byte vectors in flight for 16-bit data, whose 8 channels'
// coefficients (scale, shift, mean, invstd) and two sums hold 48 registers: with two rows the bf16
// variants took 143-147 registers, and spilled 32-40 bytes when held to 128.
template <typename T, int V>
constexpr int kReduceUnroll = V == 8 && sizeof(T) == 2 ? 1 : kUnroll<V>;
constexpr int kSumTileC = 8;          // sum_partials_kernel: channels per block at most
constexpr int kSumThreads = 512;      // sum_partials_kernel: threads per block
constexpr int64_t kMaxRowBlocks = 16384;  // elementwise grids: blocks at most (grid-stride)
constexpr int64_t kMaxGridY = 65535;

// ---- device helpers -------------------------------------------------------------------------

// Operations rounded as written: nvcc would otherwise contract a * b + c into one FMA where the
// CPU kernel rounds the product.
__device__ __forceinline__ float mul_rn(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float add_rn(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float sub_rn(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float fma_rn(float a, float b, float c) { return __fmaf_rn(a, b, c); }
__device__ __forceinline__ double fma_rn(double a, double b, double c) { return __fma_rn(a, b, c); }

// max(v, 0) as at::vec::maximum: NaN stays NaN, -0 becomes +0.
template <typename acc_t>
__device__ __forceinline__ acc_t relu(acc_t v) {
  return !(v <= acc_t(0)) ? v : acc_t(0);
}

// acc_t value rounded to T, stored as O (T, or float holding the T-rounded value).
template <typename T, typename O, typename acc_t>
__device__ __forceinline__ O to_storage(acc_t v) {
  if constexpr (std::is_same_v<O, T>) {
    return static_cast<T>(v);
  } else {
    return static_cast<O>(static_cast<acc_t>(static_cast<T>(v)));
  }
}

template <typename acc_t, int V>
__device__ __forceinline__ void load_channels(acc_t (&dst)[V], const acc_t* __restrict__ src,
                                              int64_t c0) {
#pragma unroll
  for (int k = 0; k < V; ++k) dst[k] = src[c0 + k];
}

// ---- bn_relu_apply / prologue ---------------------------------------------------------------
template <typename T, typename O>
struct ApplyArgs {
  const T* x;                    // [rows, C]
  const T* residual;             // [rows, C] or null
  O* out;                        // [rows, C]
  const acc_type<T>* scale;      // [C]
  const acc_type<T>* shift;      // [C]
  int64_t rows, C, cols, tiles;  // cols = C / V channel vectors, tiles of blockDim.x of them
  // bn_add_relu: the residual is added before the ReLU, after its own BN when rscale is set
  bool residual_before_relu = false;
  const acc_type<T>* rscale = nullptr;  // [C] or null
  const acc_type<T>* rshift = nullptr;  // [C] or null
};

template <typename T, typename O, int V>
__global__ void __launch_bounds__(kThreads) apply_kernel(const ApplyArgs<T, O> a) {
  using acc_t = acc_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t tile = blockIdx.y; tile < a.tiles; tile += gridDim.y) {
    const int64_t col = tile * blockDim.x + threadIdx.x;
    if (col >= a.cols) continue;
    const int64_t c0 = col * V;
    acc_t scale[V], shift[V], rscale[V], rshift[V];
    load_channels(scale, a.scale, c0);
    load_channels(shift, a.shift, c0);
    if (a.rscale != nullptr) {
      load_channels(rscale, a.rscale, c0);
      load_channels(rshift, a.rshift, c0);
    }
    constexpr int U = kUnroll<V>;
#pragma unroll 1
    for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < a.rows; r += U * step) {
      Pack<T, V> xv[U], rv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + u * step;
        if (row < a.rows) {
          xv[u] = load_pack<V>(a.x + row * a.C + c0);
          if (a.residual != nullptr) rv[u] = load_pack<V>(a.residual + row * a.C + c0);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + u * step;
        if (row < a.rows) {
          Pack<O, V> o;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            acc_t v = fma_rn(static_cast<acc_t>(xv[u].v[k]), scale[k], shift[k]);
            if (a.residual_before_relu) {
              const acc_t r = static_cast<acc_t>(rv[u].v[k]);
              v = relu(add_rn(v, a.rscale != nullptr ? fma_rn(r, rscale[k], rshift[k]) : r));
            } else {
              v = relu(v);
              if (a.residual != nullptr) v = add_rn(v, static_cast<acc_t>(rv[u].v[k]));
            }
            o.v[k] = to_storage<T, O>(v);
          }
          store_pack<V>(a.out + row * a.C + c0, o);
        }
      }
    }
  }
}

// ---- bn_backward_finish ---------------------------------------------------------------------
template <typename T>
struct FinishArgs {
  const T* g;                      // [rows, C]
  const T* h;                      // [rows, C] (batch_stats only)
  const T* add;                    // [rows, C] or null
  T* dh;                           // [rows, C]
  const acc_type<T>* weight;       // [C]
  const acc_type<T>* invstd;       // [C]
  const acc_type<T>* mean;         // [C] (batch_stats only)
  const acc_type<T>* sum_g;        // [C] (batch_stats only)
  const acc_type<T>* sum_g_xhat;   // [C] (batch_stats only)
  acc_type<T> inv_count;           // 1 / count (batch_stats only)
  bool batch_stats;
  int64_t rows, C, cols, tiles;
};

template <typename T, int V>
__global__ void __launch_bounds__(kThreads) finish_kernel(const FinishArgs<T> a) {
  using acc_t = acc_type<T>;
  const int64_t step = int64_t(gridDim.x) * blockDim.y;
  for (int64_t tile = blockIdx.y; tile < a.tiles; tile += gridDim.y) {
    const int64_t col = tile * blockDim.x + threadIdx.x;
    if (col >= a.cols) continue;
    const int64_t c0 = col * V;
    // A = weight * invstd; with batch statistics B = -A * invstd * sum_g_xhat / count and
    // D = -A * sum_g / count (the CPU kernel's order of the products).
    acc_t A[V], B[V], D[V], M[V];
#pragma unroll
    for (int k = 0; k < V; ++k) {
      const acc_t istd = a.invstd[c0 + k];
      A[k] = mul_rn(a.weight[c0 + k], istd);
      B[k] = D[k] = M[k] = acc_t(0);
      if (a.batch_stats) {
        M[k] = a.mean[c0 + k];
        B[k] = mul_rn(mul_rn(mul_rn(-A[k], istd), a.sum_g_xhat[c0 + k]), a.inv_count);
        D[k] = mul_rn(mul_rn(-A[k], a.sum_g[c0 + k]), a.inv_count);
      }
    }
    constexpr int U = kUnroll<V>;
#pragma unroll 1
    for (int64_t r = int64_t(blockIdx.x) * blockDim.y + threadIdx.y; r < a.rows; r += U * step) {
      Pack<T, V> gv[U], hv[U], av[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + u * step;
        if (row < a.rows) {
          const int64_t at = row * a.C + c0;
          gv[u] = load_pack<V>(a.g + at);
          if (a.batch_stats) hv[u] = load_pack<V>(a.h + at);
          if (a.add != nullptr) av[u] = load_pack<V>(a.add + at);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + u * step;
        if (row < a.rows) {
          Pack<T, V> o;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            acc_t v = mul_rn(static_cast<acc_t>(gv[u].v[k]), A[k]);
            if (a.batch_stats) {
              const acc_t centered = sub_rn(static_cast<acc_t>(hv[u].v[k]), M[k]);
              v = fma_rn(centered, B[k], add_rn(v, D[k]));
            }
            if (a.add != nullptr) v = add_rn(v, static_cast<acc_t>(av[u].v[k]));
            o.v[k] = static_cast<T>(v);
          }
          store_pack<V>(a.dh + row * a.C + c0, o);
        }
      }
    }
  }
}

// ---- dgrad epilogue / bn_relu_backward_reduce -----------------------------------------------
template <typename T, typename S>
struct ReduceArgs {
  const S* t;                    // [rows, C]: the incoming gradient (conv_input_grad)
  const T* add;                  // [rows, C] or null
  const T* h;                    // [rows, C]
  T* g;                          // [rows, C], or null: not stored
  const acc_type<T>* scale;      // [C] (mask recomputed from h: y null)
  const acc_type<T>* shift;      // [C] (mask recomputed from h: y null)
  const acc_type<T>* mean;       // [C]
  const acc_type<T>* invstd;     // [C]
  acc_type<T>* part_g;           // [T, C]: per-partial sums of g
  acc_type<T>* part_g_xhat;      // [T, C]: per-partial sums of g * xhat
  int64_t rows, C, cols;
  const T* y = nullptr;          // [rows, C] or null: the mask is !(y <= 0) (the ReLU's saved output)
};

// Adds the values of the blockDim.y thread rows (a power of two) of each thread column, a tree in
// a fixed order; the result is valid in thread row 0. Every thread calls it.
template <typename acc_t, int V, int kMaxThreads>
__device__ __forceinline__ void sum_thread_rows(acc_t (&x)[V], acc_t (&y)[V]) {
  __shared__ acc_t s_x[V][kMaxThreads];
  __shared__ acc_t s_y[V][kMaxThreads];
  const int bx = blockDim.x;
  const int tid = threadIdx.y * bx + threadIdx.x;
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_x[k][tid] = x[k];
    s_y[k][tid] = y[k];
  }
  __syncthreads();
  for (int s = blockDim.y >> 1; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      const int o = tid + s * bx;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        x[k] += s_x[k][o];
        y[k] += s_y[k][o];
        s_x[k][tid] = x[k];
        s_y[k][tid] = y[k];
      }
    }
    __syncthreads();
  }
}

// grid (T, channel tiles), block (bx, by): block (p, tile) covers the rows of partial p for the
// channel vectors [tile * bx, tile * bx + bx) and writes their sums to row p of the workspace.
// Two blocks per multiprocessor in the launch bounds hold it to 128 registers (kReduceUnroll).
template <typename T, typename S, int V>
__global__ void __launch_bounds__(kThreads, 2) backward_reduce_kernel(const ReduceArgs<T, S> a) {
  using acc_t = acc_type<T>;
  const int by = blockDim.y;
  const int64_t part = blockIdx.x;
  const int64_t col = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t r0 = part * kRowsPerPartial;
  const int64_t r1 = min(r0 + kRowsPerPartial, a.rows);
  acc_t sum_g[V], sum_gx[V];
#pragma unroll
  for (int k = 0; k < V; ++k) sum_g[k] = sum_gx[k] = acc_t(0);
  if (col < a.cols) {
    const int64_t c0 = col * V;
    acc_t scale[V], shift[V], mean[V], invstd[V];
    if (a.y == nullptr) {
      load_channels(scale, a.scale, c0);
      load_channels(shift, a.shift, c0);
    }
    load_channels(mean, a.mean, c0);
    load_channels(invstd, a.invstd, c0);
    constexpr int U = kReduceUnroll<T, V>;
#pragma unroll 1
    for (int64_t r = r0 + threadIdx.y; r < r1; r += int64_t(U) * by) {
      Pack<S, V> tv[U];
      Pack<T, V> hv[U], av[U], yv[U];
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + int64_t(u) * by;
        if (row < r1) {
          const int64_t at = row * a.C + c0;
          tv[u] = load_pack<V>(a.t + at);
          hv[u] = load_pack<V>(a.h + at);
          if (a.add != nullptr) av[u] = load_pack<V>(a.add + at);
          if (a.y != nullptr) yv[u] = load_pack<V>(a.y + at);
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int64_t row = r + int64_t(u) * by;
        if (row < r1) {
          Pack<T, V> o;
#pragma unroll
          for (int k = 0; k < V; ++k) {
            acc_t grad = static_cast<acc_t>(tv[u].v[k]);
            if (a.add != nullptr) grad = add_rn(grad, static_cast<acc_t>(av[u].v[k]));
            const acc_t hx = static_cast<acc_t>(hv[u].v[k]);
            const acc_t pre = a.y != nullptr ? static_cast<acc_t>(yv[u].v[k])
                                             : fma_rn(hx, scale[k], shift[k]);
            grad = pre <= acc_t(0) ? acc_t(0) : grad;  // threshold_backward: a NaN pre passes grad
            o.v[k] = static_cast<T>(grad);
            const acc_t xhat = mul_rn(sub_rn(hx, mean[k]), invstd[k]);
            sum_g[k] = add_rn(sum_g[k], grad);
            sum_gx[k] = fma_rn(grad, xhat, sum_gx[k]);
          }
          if (a.g != nullptr) store_pack<V>(a.g + row * a.C + c0, o);
        }
      }
    }
  }
  sum_thread_rows<acc_t, V, kThreads>(sum_g, sum_gx);
  if (threadIdx.y == 0 && col < a.cols) {
    const int64_t at = part * a.C + col * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a.part_g[at + k] = sum_g[k];
      a.part_g_xhat[at + k] = sum_gx[k];
    }
  }
}

// grid ceil(C / bx), block (bx, by): thread (tx, ty) adds partials ty, ty + by, ... of channel
// blockIdx.x * bx + tx in double, then the thread rows are added by a tree (fixed order).
template <typename acc_t>
__global__ void __launch_bounds__(kSumThreads)
    sum_partials_kernel(const acc_t* __restrict__ part_g, const acc_t* __restrict__ part_g_xhat,
                        int64_t parts, int64_t C, acc_t* __restrict__ sum_g,
                        acc_t* __restrict__ sum_g_xhat) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  double total[1] = {0.0}, total_x[1] = {0.0};
  if (c < C) {
    for (int64_t p = threadIdx.y; p < parts; p += blockDim.y) {
      total[0] += static_cast<double>(part_g[p * C + c]);
      total_x[0] += static_cast<double>(part_g_xhat[p * C + c]);
    }
  }
  sum_thread_rows<double, 1, kSumThreads>(total, total_x);
  if (threadIdx.y == 0 && c < C) {
    sum_g[c] = static_cast<acc_t>(total[0]);
    sum_g_xhat[c] = static_cast<acc_t>(total_x[0]);
  }
}

// ---- host -----------------------------------------------------------------------------------

// t: a contiguous tensor of ref's shape on ref's device, in `dtype`.
void check_operand(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                   at::ScalarType dtype) {
  TORCH_CHECK(t.sizes() == ref.sizes() && t.device() == ref.device() && t.is_contiguous() &&
                  t.scalar_type() == dtype,
              op, ": ", name, " must be a contiguous ", c10::toString(dtype), " tensor of shape ",
              ref.sizes(), " on ", ref.device(), ", got ", c10::toString(t.scalar_type()), " ",
              t.sizes(), " on ", t.device());
}

// A 1-D tensor of C values on ref's device.
void check_vector(const char* op, const char* name, const Tensor& t, int64_t C, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.numel() == C && t.device() == ref.device(), op, ": ", name,
              " must be a 1-D tensor of ", C, " values on ", ref.device(), ", got shape ",
              t.sizes(), " on ", t.device());
}

// A per-channel vector (any float dtype) as contiguous acc_t values on its device.
template <typename acc_t>
Tensor channel_values(const Tensor& t) {
  return t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
}

int64_t rows_of(const Tensor& t) { return t.size(0) * t.size(1) * t.size(2); }

// The block shape: bx thread columns (a power of two, at most kMaxTileX) over the C / V channel
// vectors, by thread rows (at most max_by), kThreads threads at most.
struct Tiling {
  int bx, by;
  int64_t cols, tiles;
};

Tiling tile_channels(int64_t C, int vec, int max_by) {
  Tiling t{1, 1, C / vec, 0};
  while (t.bx < t.cols && t.bx < kMaxTileX) t.bx *= 2;
  t.by = std::min(kThreads / t.bx, max_by);
  t.tiles = ceil_div(t.cols, t.bx);
  return t;
}

// Grid of an elementwise kernel: row blocks x channel tiles, both walked grid-stride.
dim3 elementwise_grid(const Tiling& t, int64_t rows, int unroll) {
  const int64_t gy = std::min(t.tiles, kMaxGridY);
  const int64_t gx = std::min(ceil_div(rows, int64_t(t.by) * unroll),
                              std::max<int64_t>(1, kMaxRowBlocks / gy));
  return dim3(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
}

template <typename T, typename O, int V>
void run_apply(ApplyArgs<T, O> a) {
  const Tiling t = tile_channels(a.C, V, kThreads);
  a.cols = t.cols, a.tiles = t.tiles;
  const dim3 grid = elementwise_grid(t, a.rows, kUnroll<V>);
  apply_kernel<T, O, V><<<grid, dim3(t.bx, t.by), 0, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename O>
void launch_apply(const ApplyArgs<T, O>& a) {
  if (a.rows == 0 || a.C == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  if (a.C % kVec == 0 && aligned(a.x, 16) && aligned(a.residual, 16) &&
      aligned(a.out, kVec * sizeof(O))) {
    run_apply<T, O, kVec>(a);
  } else {
    run_apply<T, O, 1>(a);
  }
}

template <typename T, int V>
void run_finish(FinishArgs<T> a) {
  const Tiling t = tile_channels(a.C, V, kThreads);
  a.cols = t.cols, a.tiles = t.tiles;
  const dim3 grid = elementwise_grid(t, a.rows, kUnroll<V>);
  finish_kernel<T, V><<<grid, dim3(t.bx, t.by), 0, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, typename S, int V>
void run_reduce(ReduceArgs<T, S> a, const char* op) {
  const Tiling t = tile_channels(a.C, V, kReduceMaxTileY);
  const int64_t parts = partial_count(a.rows);
  TORCH_CHECK(t.tiles <= kMaxGridY, op, ": too many channels for the CUDA kernel (", a.C, ")");
  TORCH_CHECK(parts <= INT32_MAX, op, ": too many rows for the CUDA kernel (", a.rows, ")");
  a.cols = t.cols;
  const dim3 grid(static_cast<unsigned>(parts), static_cast<unsigned>(t.tiles));
  backward_reduce_kernel<T, S, V><<<grid, dim3(t.bx, t.by), 0, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// g and the per-partial sums, then the sums of the partials into sum_g / sum_g_xhat.
template <typename T, typename S>
void launch_reduce(const ReduceArgs<T, S>& a, acc_type<T>* sum_g, acc_type<T>* sum_g_xhat,
                   const char* op) {
  constexpr int kVec = 16 / sizeof(T);
  if (a.C % kVec == 0 && aligned(a.t, kVec * sizeof(S)) && aligned(a.add, 16) &&
      aligned(a.h, 16) && aligned(a.g, 16) && aligned(a.y, 16)) {
    run_reduce<T, S, kVec>(a, op);
  } else {
    run_reduce<T, S, 1>(a, op);
  }
  int bx = 1;  // channels per block: a power of two, at most kSumTileC
  while (bx < a.C && bx < kSumTileC) bx *= 2;
  const int64_t blocks = ceil_div(a.C, bx);
  TORCH_CHECK(blocks <= INT32_MAX, op, ": too many channels for the CUDA kernel (", a.C, ")");
  sum_partials_kernel<acc_type<T>>
      <<<static_cast<unsigned>(blocks), dim3(bx, kSumThreads / bx), 0, current_stream()>>>(
          a.part_g, a.part_g_xhat, partial_count(a.rows), a.C, sum_g, sum_g_xhat);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

Tensor bn_relu_apply_cuda(const Tensor& x, const Tensor& scale, const Tensor& shift,
                          const OptionalTensor& residual) {
  constexpr const char* op = "bn_relu_apply";
  check_bn_relu_apply_args(x, scale, shift, residual);
  check_cuda(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options());
  const int64_t C = x.size(3), rows = rows_of(x);
  dispatch_activation(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const Tensor sc = channel_values<acc_t>(scale), sh = channel_values<acc_t>(shift);
    launch_apply(ApplyArgs<T, T>{x.const_data_ptr<T>(),
                                 residual.has_value() ? residual->const_data_ptr<T>() : nullptr,
                                 out.mutable_data_ptr<T>(), sc.const_data_ptr<acc_t>(),
                                 sh.const_data_ptr<acc_t>(), rows, C, 0, 0});
  });
  return out;
}

Tensor bn_relu_prologue_cuda(const Tensor& x, const Tensor& scale, const Tensor& shift,
                             at::ScalarType out_dtype) {
  constexpr const char* op = "bn_relu_prologue";
  check_cuda(op, "x", x);
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous(), op, ": x must be a contiguous 4-D NHWC tensor, ",
              "got shape ", x.sizes(), " and strides ", x.strides());
  const int64_t C = x.size(3), rows = rows_of(x);
  check_vector(op, "scale", scale, C, x);
  check_vector(op, "shift", shift, C, x);
  const c10::cuda::CUDAGuard guard(x.device());
  Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  dispatch_activation(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const Tensor sc = channel_values<acc_t>(scale), sh = channel_values<acc_t>(shift);
    if (out_dtype == x.scalar_type()) {
      launch_apply(ApplyArgs<T, T>{x.const_data_ptr<T>(), nullptr, out.mutable_data_ptr<T>(),
                                   sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(), rows, C,
                                   0, 0});
    } else if constexpr (is_reduced<T>) {
      TORCH_CHECK(out_dtype == at::kFloat, op, ": out_dtype must be x's dtype or float32, got ",
                  c10::toString(out_dtype));
      launch_apply(ApplyArgs<T, float>{x.const_data_ptr<T>(), nullptr,
                                       out.mutable_data_ptr<float>(), sc.const_data_ptr<acc_t>(),
                                       sh.const_data_ptr<acc_t>(), rows, C, 0, 0});
    } else {
      TORCH_CHECK(false, op, ": out_dtype must be x's dtype ", c10::toString(x.scalar_type()),
                  ", got ", c10::toString(out_dtype));
    }
  });
  return out;
}

Tensor bn_backward_finish_cuda(const Tensor& g, const Tensor& h, const Tensor& mean,
                               const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                               const Tensor& sum_g_xhat, double count, const OptionalTensor& add,
                               bool batch_stats) {
  constexpr const char* op = "bn_backward_finish";
  check_bn_backward_finish_args(g, h, mean, invstd, weight, sum_g, sum_g_xhat, add, batch_stats);
  check_cuda(op, "g", g);
  TORCH_CHECK(!batch_stats || count > 0, op, ": count must be positive, got ", count);
  const c10::cuda::CUDAGuard guard(g.device());
  Tensor dh = at::empty(g.sizes(), g.options());
  const int64_t C = g.size(3), rows = rows_of(g);
  dispatch_activation(g.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const Tensor w = channel_values<acc_t>(weight), istd = channel_values<acc_t>(invstd);
    Tensor mu, sg, sgx;
    if (batch_stats) {
      mu = channel_values<acc_t>(mean);
      sg = channel_values<acc_t>(sum_g);
      sgx = channel_values<acc_t>(sum_g_xhat);
    }
    FinishArgs<T> a{g.const_data_ptr<T>(),
                    batch_stats ? h.const_data_ptr<T>() : nullptr,
                    add.has_value() ? add->const_data_ptr<T>() : nullptr,
                    dh.mutable_data_ptr<T>(),
                    w.const_data_ptr<acc_t>(),
                    istd.const_data_ptr<acc_t>(),
                    batch_stats ? mu.const_data_ptr<acc_t>() : nullptr,
                    batch_stats ? sg.const_data_ptr<acc_t>() : nullptr,
                    batch_stats ? sgx.const_data_ptr<acc_t>() : nullptr,
                    batch_stats ? static_cast<acc_t>(1.0 / count) : acc_t(0),
                    batch_stats,
                    rows,
                    C,
                    0,
                    0};
    if (rows == 0 || C == 0) return;
    constexpr int kVec = 16 / sizeof(T);
    if (C % kVec == 0 && aligned(a.g, 16) && aligned(a.h, 16) && aligned(a.add, 16) &&
        aligned(a.dh, 16)) {
      run_finish<T, kVec>(a);
    } else {
      run_finish<T, 1>(a);
    }
  });
  return dh;
}

Tensor3 dgrad_epilogue_cuda(const Tensor& conv_out, const OptionalTensor& add, const Tensor& h,
                            const Tensor& scale, const Tensor& shift, const Tensor& mean,
                            const Tensor& invstd, at::ScalarType dtype) {
  constexpr const char* op = "dgrad_epilogue";
  check_cuda(op, "h", h);
  TORCH_CHECK(h.dim() == 4 && h.is_contiguous() && h.scalar_type() == dtype, op,
              ": h must be a contiguous 4-D NHWC ", c10::toString(dtype), " tensor, got ",
              c10::toString(h.scalar_type()), " of shape ", h.sizes(), " and strides ",
              h.strides());
  TORCH_CHECK(conv_out.sizes() == h.sizes() && conv_out.device() == h.device() &&
                  conv_out.is_contiguous(),
              op, ": conv_out must be a contiguous tensor of h's shape ", h.sizes(), " on ",
              h.device(), ", got ", conv_out.sizes(), " on ", conv_out.device());
  if (add.has_value()) check_operand(op, "add", *add, h, dtype);
  const int64_t C = h.size(3), rows = rows_of(h);
  check_vector(op, "scale", scale, C, h);
  check_vector(op, "shift", shift, C, h);
  check_vector(op, "mean", mean, C, h);
  check_vector(op, "invstd", invstd, C, h);
  const c10::cuda::CUDAGuard guard(h.device());
  Tensor g = at::empty(h.sizes(), h.options());
  const auto options = h.options().dtype(stat_dtype(dtype));
  Tensor sum_g = at::empty({C}, options), sum_g_xhat = at::empty({C}, options);
  if (C == 0) return {g, sum_g, sum_g_xhat};
  if (rows == 0) {
    sum_g.zero_();
    sum_g_xhat.zero_();
    return {g, sum_g, sum_g_xhat};
  }
  const int64_t parts = partial_count(rows);
  const Tensor workspace = at::empty({2, parts, C}, options);
  dispatch_activation(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const Tensor sc = channel_values<acc_t>(scale), sh = channel_values<acc_t>(shift);
    const Tensor mu = channel_values<acc_t>(mean), istd = channel_values<acc_t>(invstd);
    acc_t* part = workspace.mutable_data_ptr<acc_t>();
    const auto run = [&](const auto* t) {
      using S = std::remove_cv_t<std::remove_pointer_t<decltype(t)>>;
      const ReduceArgs<T, S> a{t,
                               add.has_value() ? add->const_data_ptr<T>() : nullptr,
                               h.const_data_ptr<T>(),
                               g.mutable_data_ptr<T>(),
                               sc.const_data_ptr<acc_t>(),
                               sh.const_data_ptr<acc_t>(),
                               mu.const_data_ptr<acc_t>(),
                               istd.const_data_ptr<acc_t>(),
                               part,
                               part + parts * C,
                               rows,
                               C,
                               0};
      launch_reduce(a, sum_g.mutable_data_ptr<acc_t>(), sum_g_xhat.mutable_data_ptr<acc_t>(), op);
    };
    if (conv_out.scalar_type() == dtype) {
      run(conv_out.const_data_ptr<T>());
    } else if constexpr (is_reduced<T>) {
      TORCH_CHECK(conv_out.scalar_type() == at::kFloat, op, ": conv_out must be in g's dtype ",
                  c10::toString(dtype), " or float32, got ", c10::toString(conv_out.scalar_type()));
      run(conv_out.const_data_ptr<float>());
    } else {
      TORCH_CHECK(false, op, ": conv_out must be in g's dtype ", c10::toString(dtype), ", got ",
                  c10::toString(conv_out.scalar_type()));
    }
  });
  return {g, sum_g, sum_g_xhat};
}

Tensor3 bn_relu_backward_reduce_cuda(const Tensor& t, const Tensor& h, const Tensor& scale,
                                     const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                     const OptionalTensor& add) {
  check_bn_relu_backward_reduce_args(t, h, scale, shift, mean, invstd, add);
  check_cuda("bn_relu_backward_reduce", "t", t);
  return dgrad_epilogue_cuda(t, add, h, scale, shift, mean, invstd, t.scalar_type());
}

Tensor bn_add_relu_cuda(const Tensor& h, const Tensor& scale, const Tensor& shift,
                        const Tensor& residual, const OptionalTensor& residual_scale,
                        const OptionalTensor& residual_shift) {
  constexpr const char* op = "bn_add_relu";
  check_bn_add_relu_args(h, scale, shift, residual, residual_scale, residual_shift);
  check_cuda(op, "h", h);
  const c10::cuda::CUDAGuard guard(h.device());
  Tensor y = at::empty(h.sizes(), h.options());
  const int64_t C = h.size(3), rows = rows_of(h);
  dispatch_activation(h.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const Tensor sc = channel_values<acc_t>(scale), sh = channel_values<acc_t>(shift);
    Tensor rsc, rsh;
    if (residual_scale.has_value()) {
      rsc = channel_values<acc_t>(*residual_scale);
      rsh = channel_values<acc_t>(*residual_shift);
    }
    ApplyArgs<T, T> a{h.const_data_ptr<T>(), residual.const_data_ptr<T>(), y.mutable_data_ptr<T>(),
                      sc.const_data_ptr<acc_t>(), sh.const_data_ptr<acc_t>(), rows, C, 0, 0};
    a.residual_before_relu = true;
    if (residual_scale.has_value()) {
      a.rscale = rsc.const_data_ptr<acc_t>();
      a.rshift = rsh.const_data_ptr<acc_t>();
    }
    launch_apply(a);
  });
  return y;
}

Tensor4 bn_add_relu_backward_cuda(const Tensor& dy, const Tensor& y, const Tensor& h,
                                  const Tensor& mean, const Tensor& invstd,
                                  const OptionalTensor& residual, const OptionalTensor& residual_mean,
                                  const OptionalTensor& residual_invstd) {
  constexpr const char* op = "bn_add_relu_backward";
  check_bn_add_relu_backward_args(dy, y, h, mean, invstd, residual, residual_mean, residual_invstd);
  check_cuda(op, "dy", dy);
  const c10::cuda::CUDAGuard guard(dy.device());
  const at::ScalarType dtype = dy.scalar_type();
  const int64_t C = dy.size(3), rows = rows_of(dy);
  Tensor g = at::empty(dy.sizes(), dy.options());
  const auto options = dy.options().dtype(stat_dtype(dtype));
  Tensor sum_g = at::empty({C}, options), sum_g_xhat = at::empty({C}, options);
  Tensor residual_sum_g_xhat = at::empty({residual.has_value() ? C : 0}, options);
  const int64_t parts = partial_count(rows);
  const Tensor workspace = at::empty({2, parts, C}, options);
  const Tensor unused_sum_g = at::empty({C}, options);
  dispatch_activation(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const Tensor mu = channel_values<acc_t>(mean), istd = channel_values<acc_t>(invstd);
    acc_t* part = workspace.mutable_data_ptr<acc_t>();
    ReduceArgs<T, T> a{dy.const_data_ptr<T>(), nullptr, h.const_data_ptr<T>(), g.mutable_data_ptr<T>(),
                       nullptr, nullptr, mu.const_data_ptr<acc_t>(), istd.const_data_ptr<acc_t>(),
                       part, part + parts * C, rows, C, 0};
    a.y = y.const_data_ptr<T>();
    launch_reduce(a, sum_g.mutable_data_ptr<acc_t>(), sum_g_xhat.mutable_data_ptr<acc_t>(), op);
    if (residual.has_value()) {  // the shortcut BN's sum over the masked g (its sum(g) is the same)
      const Tensor rmu = channel_values<acc_t>(*residual_mean);
      const Tensor ristd = channel_values<acc_t>(*residual_invstd);
      ReduceArgs<T, T> b{g.const_data_ptr<T>(), nullptr, residual->const_data_ptr<T>(), nullptr,
                         nullptr, nullptr, rmu.const_data_ptr<acc_t>(), ristd.const_data_ptr<acc_t>(),
                         part, part + parts * C, rows, C, 0};
      b.y = a.y;
      launch_reduce(b, unused_sum_g.mutable_data_ptr<acc_t>(),
                    residual_sum_g_xhat.mutable_data_ptr<acc_t>(), op);
    }
  });
  return {g, sum_g, sum_g_xhat, residual_sum_g_xhat};
}

}  // namespace fused_preact

#endif  // WITH_CUDA
