// statistics_cuda.cu -- the CUDA kernels of the per-channel BatchNorm statistics of a fused unit:
//   channel_stats_cuda   partials (pmean, pm2 [T, C], pcount [T]) of x [rows, C], one read of x
//   conv_epilogue_cuda   y = round(conv_out (+ residual)) stored in y's dtype and, with stats, the
//                        partials of y as rounded and stored, in the same pass (conv_bnrelu's
//                        epilogue; conv_out in y's dtype, or float32 for bfloat16 / float16 y)
//   bn_finalize_cuda     merge the partials -> mean, invstd, scale, shift; running statistics
// Layout: contiguous NHWC viewed as [rows = N*H*W, C]; partial t holds rows
// [t * kRowsPerPartial, (t + 1) * kRowsPerPartial), T = partial_count(rows) as on every device.
// float32 / float64 / float16 / bfloat16 data; arithmetic in at::opmath_type (fp32, fp64 for
// float64); partials in stat_dtype (the same type).
// partials_kernel: grid (T, channel tiles), block (bx, by) <= 256 threads. Thread (tx, ty) owns V
//   consecutive channels (V = 16 bytes of data when C and the pointers allow, else 1; consecutive
//   threads read consecutive channels) and every by-th row of its partial. It folds 4 rows at a
//   time into its running (mean, M2, n) -- their exact mean and M2, then Chan's merge, one
//   correctly rounded reciprocal per 4 rows shared by its V channels -- and the by thread rows
//   are merged by a tree in shared memory. No E[x^2] - E[x]^2 anywhere: a mean of 100 with
//   std 0.01 keeps its variance.
// finalize_kernel: one block per tile of 8 channels (one 32-byte sector of a float32 partial row),
//   64 thread rows over the T partials, Chan's merge in double (empty partials skipped), a tree in
//   shared memory; then var = M2 / n, invstd = 1 / sqrt(var + eps), scale, shift in double with the
//   CPU kernel's rounding points (no contraction; quotients correctly rounded without a division
//   call), stored in pmean's dtype. The running statistics are updated in place in their own
//   dtype, with f = momentum or f = 1 / num_batches_tracked read on the device: no host sync.
// Fuses: residual add, rounding, store and statistics into one pass over y; saves nothing.
// Deterministic: no atomics; every merge order is fixed by the shapes.
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
#include <tuple>
#include <type_traits>

namespace fused_preact {
namespace {

using namespace cuda;

// ---- launch configuration -------------------------------------------------------------------
constexpr int kThreads = 256;          // partials_kernel: threads per block at most
constexpr int kMaxTileX = 32;          // partials_kernel: channel vectors per block at most
constexpr int kMaxTileY = 64;          // partials_kernel: thread rows (>= 4 rows of a partial each)
constexpr int kFold = 4;               // rows folded per merge (loads in flight per thread)
constexpr int kFinalizeTileC = 8;      // finalize_kernel: channels per block at most
constexpr int kFinalizeThreads = 512;  // finalize_kernel: threads per block
constexpr int64_t kMaxGridY = 65535;

// ---- device helpers -------------------------------------------------------------------------

// 1 / v, correctly rounded and inline: a division calls a slow-path routine whose call frame
// spills registers to local memory (as in batch_stats_cuda.cu).
__device__ __forceinline__ float reciprocal(float v) { return __frcp_rn(v); }
__device__ __forceinline__ double reciprocal(double v) { return __drcp_rn(v); }

// a / b correctly rounded (Markstein: the correctly rounded reciprocal, then one exact-residual
// correction of the quotient), inline. 0 / 0 and x / 0 give NaN.
__device__ __forceinline__ double divide(double a, double b) {
  const double r = __drcp_rn(b);
  const double q = __dmul_rn(a, r);
  const double e = __fma_rn(-b, q, a);
  return __fma_rn(e, r, q);
}

// Statistics of a set of rows for V channels: mean, M2 (sum of squared deviations from the
// mean) per channel and the row count, the same for the V channels.
template <typename acc_t, int V>
struct Moments {
  acc_t mean[V];
  acc_t m2[V];
  acc_t n;
};

template <typename acc_t, int V>
__device__ __forceinline__ void clear(Moments<acc_t, V>& w) {
#pragma unroll
  for (int k = 0; k < V; ++k) w.mean[k] = w.m2[k] = acc_t(0);
  w.n = acc_t(0);
}

// Chan et al.'s merge of a disjoint set (mean, m2, nb) into w; empty sets are no-ops.
template <typename acc_t, int V>
__device__ __forceinline__ void merge(Moments<acc_t, V>& w, const acc_t (&mean)[V],
                                      const acc_t (&m2)[V], acc_t nb) {
  if (nb == acc_t(0)) return;
  if (w.n == acc_t(0)) {
#pragma unroll
    for (int k = 0; k < V; ++k) {
      w.mean[k] = mean[k];
      w.m2[k] = m2[k];
    }
    w.n = nb;
    return;
  }
  const acc_t n = w.n + nb;
  const acc_t wb = nb * reciprocal(n);
  const acc_t cross = w.n * wb;  // n_a * n_b / n
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const acc_t delta = mean[k] - w.mean[k];
    w.mean[k] += delta * wb;
    w.m2[k] += m2[k] + delta * delta * cross;
  }
  w.n = n;
}

// kFold rows of V channels: their exact mean and M2, then one merge into w.
template <typename acc_t, int V>
__device__ __forceinline__ void fold(Moments<acc_t, V>& w, const acc_t (&v)[kFold][V]) {
  static_assert(kFold == 4, "fold sums 4 rows");
  acc_t mean[V], m2[V];
#pragma unroll
  for (int k = 0; k < V; ++k) {
    const acc_t m = ((v[0][k] + v[1][k]) + (v[2][k] + v[3][k])) * acc_t(0.25);
    acc_t q = acc_t(0);
#pragma unroll
    for (int u = 0; u < kFold; ++u) {
      const acc_t d = v[u][k] - m;
      q += d * d;
    }
    mean[k] = m;
    m2[k] = q;
  }
  merge(w, mean, m2, acc_t(kFold));
}

template <typename acc_t, int V, int kMaxThreads>
__device__ __forceinline__ void put_moments(acc_t (&s_mean)[V][kMaxThreads],
                                            acc_t (&s_m2)[V][kMaxThreads],
                                            acc_t (&s_n)[kMaxThreads], int tid,
                                            const Moments<acc_t, V>& w) {
#pragma unroll
  for (int k = 0; k < V; ++k) {
    s_mean[k][tid] = w.mean[k];
    s_m2[k][tid] = w.m2[k];
  }
  s_n[tid] = w.n;
}

// Merges the statistics of the blockDim.y thread rows (a power of two) of each thread column of
// the block, a tree in a fixed order; the result is valid in thread row 0. Every thread calls it.
template <typename acc_t, int V, int kMaxThreads>
__device__ __forceinline__ void merge_thread_rows(Moments<acc_t, V>& w) {
  __shared__ acc_t s_mean[V][kMaxThreads];
  __shared__ acc_t s_m2[V][kMaxThreads];
  __shared__ acc_t s_n[kMaxThreads];
  const int bx = blockDim.x;
  const int tid = threadIdx.y * bx + threadIdx.x;
  put_moments<acc_t, V, kMaxThreads>(s_mean, s_m2, s_n, tid, w);
  __syncthreads();
  for (int s = blockDim.y >> 1; s > 0; s >>= 1) {
    if (threadIdx.y < s) {
      const int o = tid + s * bx;
      acc_t mean[V], m2[V];
#pragma unroll
      for (int k = 0; k < V; ++k) {
        mean[k] = s_mean[k][o];
        m2[k] = s_m2[k][o];
      }
      merge(w, mean, m2, s_n[o]);
      put_moments<acc_t, V, kMaxThreads>(s_mean, s_m2, s_n, tid, w);
    }
    __syncthreads();
  }
}

// ---- partials: channel_stats and conv_epilogue ----------------------------------------------
template <typename T, typename S>
struct PartialsArgs {
  const S* src;          // [rows, C]: x (channel_stats; S = T) or conv_out
  const T* residual;     // [rows, C] or null (only with out)
  T* out;                // y [rows, C]; null: src is only read
  acc_type<T>* pmean;    // [T, C]; null: no statistics (pm2 and pcount unused)
  acc_type<T>* pm2;      // [T, C]
  acc_type<T>* pcount;   // [T]
  int64_t rows, C, cols;  // cols = C / V channel vectors
};

// The values of kRows rows (r, r + step, ...) at channels [c0, c0 + V) as acc_t: with out,
// src (+ residual) rounded to T and stored there (the values as stored); else src as is.
template <int kRows, int V, typename T, typename S>
__device__ __forceinline__ void load_rows(const PartialsArgs<T, S>& a, int64_t r, int step,
                                          int64_t c0, acc_type<T> (&v)[kRows][V]) {
  using acc_t = acc_type<T>;
  Pack<S, V> s[kRows];
  Pack<T, V> res[kRows];
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
    const int64_t at = (r + int64_t(u) * step) * a.C + c0;
    s[u] = load_pack<V>(a.src + at);
    if (a.residual != nullptr) res[u] = load_pack<V>(a.residual + at);
  }
#pragma unroll
  for (int u = 0; u < kRows; ++u) {
    if (a.out == nullptr) {
#pragma unroll
      for (int k = 0; k < V; ++k) v[u][k] = static_cast<acc_t>(s[u].v[k]);
    } else {
      Pack<T, V> y;
#pragma unroll
      for (int k = 0; k < V; ++k) {
        acc_t x = static_cast<acc_t>(s[u].v[k]);
        if (a.residual != nullptr) x += static_cast<acc_t>(res[u].v[k]);
        y.v[k] = static_cast<T>(x);  // round to nearest even
        v[u][k] = static_cast<acc_t>(y.v[k]);
      }
      store_pack<V>(a.out + (r + int64_t(u) * step) * a.C + c0, y);
    }
  }
}

// grid (T, channel tiles), block (bx, by): block (t, tile) covers the rows of partial t for the
// channel vectors [tile * bx, tile * bx + bx).
template <typename T, typename S, int V>
__global__ void __launch_bounds__(kThreads) partials_kernel(const PartialsArgs<T, S> a) {
  using acc_t = acc_type<T>;
  const int by = blockDim.y;
  const int64_t part = blockIdx.x;
  const int64_t col = int64_t(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t r0 = part * kRowsPerPartial;
  const int64_t r1 = min(r0 + kRowsPerPartial, a.rows);
  const bool stats = a.pmean != nullptr;  // uniform over the grid
  Moments<acc_t, V> w;
  clear(w);
  if (col < a.cols) {
    const int64_t c0 = col * V;
    int64_t r = r0 + threadIdx.y;
    for (; r + int64_t(kFold - 1) * by < r1; r += int64_t(kFold) * by) {
      acc_t v[kFold][V];
      load_rows<kFold, V>(a, r, by, c0, v);
      if (stats) fold(w, v);
    }
    for (; r < r1; r += by) {
      acc_t v[1][V];
      load_rows<1, V>(a, r, by, c0, v);
      if (stats) {
        acc_t zero[V];
#pragma unroll
        for (int k = 0; k < V; ++k) zero[k] = acc_t(0);
        merge(w, v[0], zero, acc_t(1));
      }
    }
  }
  if (!stats) return;
  merge_thread_rows<acc_t, V, kThreads>(w);
  if (threadIdx.y == 0 && col < a.cols) {
    const int64_t at = part * a.C + col * V;
#pragma unroll
    for (int k = 0; k < V; ++k) {
      a.pmean[at + k] = w.mean[k];
      a.pm2[at + k] = w.m2[k];
    }
  }
  if (blockIdx.y == 0 && threadIdx.x == 0 && threadIdx.y == 0) {
    a.pcount[part] = static_cast<acc_t>(r1 - r0);
  }
}

// ---- bn_finalize ----------------------------------------------------------------------------
// Element types of the per-channel tensors bn_finalize reads or writes in their own dtype.
enum TypeCode : int { kF32 = 0, kF64 = 1, kF16 = 2, kBF16 = 3, kI64 = 4, kI32 = 5 };

__device__ __forceinline__ double load_as_double(const void* p, int code, int64_t i) {
  switch (code) {
    case kF32: return static_cast<double>(static_cast<const float*>(p)[i]);
    case kF64: return static_cast<const double*>(p)[i];
    case kF16: return static_cast<double>(static_cast<float>(static_cast<const c10::Half*>(p)[i]));
    case kBF16:
      return static_cast<double>(static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]));
    case kI64: return static_cast<double>(static_cast<const int64_t*>(p)[i]);
    default: return static_cast<double>(static_cast<const int32_t*>(p)[i]);
  }
}

// As Tensor::copy_ from a double tensor: float16 / bfloat16 through float, round to nearest even.
__device__ __forceinline__ void store_from_double(void* p, int code, int64_t i, double v) {
  switch (code) {
    case kF32: static_cast<float*>(p)[i] = static_cast<float>(v); break;
    case kF64: static_cast<double*>(p)[i] = v; break;
    case kF16: static_cast<c10::Half*>(p)[i] = c10::Half(static_cast<float>(v)); break;
    default: static_cast<c10::BFloat16*>(p)[i] = c10::BFloat16(static_cast<float>(v)); break;
  }
}

template <typename P>
struct FinalizeArgs {
  const P* pmean;  // [T, C]
  const P* pm2;    // [T, C]
  const P* pcount; // [T]
  int64_t T, C;
  const void* weight;          // [C], weight_code
  const void* bias;            // [C], bias_code
  void* running_mean;          // [C] or null (no update), running_mean_code
  void* running_var;           // [C], running_var_code
  const void* batches;         // num_batches_tracked (one value), or null: f = momentum
  int weight_code, bias_code, running_mean_code, running_var_code, batches_code;
  double momentum, eps;
  P* mean;
  P* invstd;
  P* scale;
  P* shift;
};

// grid ceil(C / bx), block (bx, by): thread (tx, ty) merges partials ty, ty + by, ... of channel
// blockIdx.x * bx + tx, then the by thread rows are merged and row 0 finishes the channel.
template <typename P>
__global__ void __launch_bounds__(kFinalizeThreads) finalize_kernel(const FinalizeArgs<P> a) {
  const int64_t c = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  Moments<double, 1> w;
  clear(w);
  if (c < a.C) {
    for (int64_t t = threadIdx.y; t < a.T; t += blockDim.y) {
      const double nb = static_cast<double>(a.pcount[t]);
      if (nb == 0.0) continue;  // empty partial rows are allowed, and skipped
      const double mean[1] = {static_cast<double>(a.pmean[t * a.C + c])};
      const double m2[1] = {static_cast<double>(a.pm2[t * a.C + c])};
      merge(w, mean, m2, nb);
    }
  }
  merge_thread_rows<double, 1, kFinalizeThreads>(w);
  if (threadIdx.y != 0 || c >= a.C) return;
  const double n = w.n, mu = w.mean[0], m2 = w.m2[0];
  // The CPU kernel's expressions, each operation rounded as written (no contraction).
  const double istd = __drcp_rn(__dsqrt_rn(__dadd_rn(divide(m2, n), a.eps)));
  const double sc = __dmul_rn(load_as_double(a.weight, a.weight_code, c), istd);
  const double sh = __dsub_rn(load_as_double(a.bias, a.bias_code, c), __dmul_rn(mu, sc));
  a.mean[c] = static_cast<P>(mu);
  a.invstd[c] = static_cast<P>(istd);
  a.scale[c] = static_cast<P>(sc);
  a.shift[c] = static_cast<P>(sh);
  if (a.running_mean != nullptr) {
    const double f = a.batches != nullptr
                         ? __drcp_rn(load_as_double(a.batches, a.batches_code, 0))
                         : a.momentum;
    const double keep = __dsub_rn(1.0, f);
    const double unbiased = divide(m2, __dsub_rn(n, 1.0));
    const double old_mean = load_as_double(a.running_mean, a.running_mean_code, c);
    const double old_var = load_as_double(a.running_var, a.running_var_code, c);
    store_from_double(a.running_mean, a.running_mean_code, c,
                      __dadd_rn(__dmul_rn(keep, old_mean), __dmul_rn(f, mu)));
    store_from_double(a.running_var, a.running_var_code, c,
                      __dadd_rn(__dmul_rn(keep, old_var), __dmul_rn(f, unbiased)));
  }
}

// ---- host -----------------------------------------------------------------------------------

// Channel vectors per thread column and the block shape: bx (a power of two, at most
// kMaxTileX) thread columns over the C / V channel vectors, by thread rows.
struct Tiling {
  int bx, by;
  int64_t cols, tiles;
};

Tiling tile_channels(int64_t C, int vec) {
  Tiling t{1, 1, C / vec, 0};
  while (t.bx < t.cols && t.bx < kMaxTileX) t.bx *= 2;
  t.by = std::min(kThreads / t.bx, kMaxTileY);
  t.tiles = ceil_div(t.cols, t.bx);
  return t;
}

template <typename T, typename S, int V>
void run_partials(PartialsArgs<T, S> a, const char* op) {
  const Tiling t = tile_channels(a.C, V);
  const int64_t parts = partial_count(a.rows);
  TORCH_CHECK(t.tiles <= kMaxGridY, op, ": too many channels for the CUDA kernel (", a.C, ")");
  TORCH_CHECK(parts <= INT32_MAX, op, ": too many rows for the CUDA kernel (", a.rows, ")");
  a.cols = t.cols;
  // tiles = 0 (C = 0) still writes pcount
  const dim3 grid(static_cast<unsigned>(parts),
                  static_cast<unsigned>(std::max<int64_t>(t.tiles, 1)));
  partials_kernel<T, S, V><<<grid, dim3(t.bx, t.by), 0, current_stream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// 16-byte accesses when every row starts on a 16-byte boundary of every tensor.
template <typename T, typename S>
void launch_partials(const PartialsArgs<T, S>& a, const char* op) {
  if (a.rows == 0) return;
  constexpr int kVec = 16 / sizeof(T);
  const bool vec = a.C % kVec == 0 && aligned(a.src, kVec * sizeof(S)) &&
                   aligned(a.residual, 16) && aligned(a.out, 16);
  if (vec) {
    run_partials<T, S, kVec>(a, op);
  } else {
    run_partials<T, S, 1>(a, op);
  }
}

int type_code(at::ScalarType dtype) {
  switch (dtype) {
    case at::kFloat: return kF32;
    case at::kDouble: return kF64;
    case at::kHalf: return kF16;
    case at::kBFloat16: return kBF16;
    case at::kLong: return kI64;
    case at::kInt: return kI32;
    default: return -1;
  }
}

// A per-channel (or one-value) tensor bn_finalize reads: contiguous, in a dtype the kernel
// loads (else converted to double first).
struct Operand {
  Tensor tensor;
  int code;
};

Operand operand(const Tensor& t) {
  const int code = type_code(t.scalar_type());
  if (code < 0) return {t.to(at::kDouble).contiguous(), kF64};
  return {t.contiguous(), code};
}

}  // namespace

Tensor3 channel_stats_cuda(const Tensor& x) {
  constexpr const char* op = "channel_stats";
  check_channel_stats_args(x);
  check_cuda(op, "x", x);
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t C = x.size(3), rows = x.size(0) * x.size(1) * x.size(2);
  Tensor pmean, pm2, pcount;
  std::tie(pmean, pm2, pcount) = empty_partials_of(x);
  dispatch_activation(x.scalar_type(), op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const PartialsArgs<T, T> a{x.const_data_ptr<T>(), nullptr, nullptr,
                               pmean.mutable_data_ptr<acc_t>(), pm2.mutable_data_ptr<acc_t>(),
                               pcount.mutable_data_ptr<acc_t>(), rows, C, 0};
    launch_partials(a, op);
  });
  return {pmean, pm2, pcount};
}

Tensor4 conv_epilogue_cuda(const Tensor& conv_out, const OptionalTensor& residual,
                           at::ScalarType dtype, bool stats) {
  constexpr const char* op = "conv_epilogue";
  check_cuda(op, "conv_out", conv_out);
  TORCH_CHECK(conv_out.dim() == 4 && conv_out.is_contiguous(), op,
              ": conv_out must be a contiguous 4-D NHWC tensor, got shape ", conv_out.sizes(),
              " and strides ", conv_out.strides());
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == conv_out.sizes() && residual->scalar_type() == dtype &&
                    residual->device() == conv_out.device() && residual->is_contiguous(),
                op, ": residual must be a contiguous ", c10::toString(dtype), " tensor of shape ",
                conv_out.sizes(), " on ", conv_out.device(), ", got ",
                c10::toString(residual->scalar_type()), " ", residual->sizes(), " on ",
                residual->device());
  }
  const c10::cuda::CUDAGuard guard(conv_out.device());
  const int64_t C = conv_out.size(3), rows = conv_out.size(0) * conv_out.size(1) * conv_out.size(2);
  Tensor y = at::empty(conv_out.sizes(), conv_out.options().dtype(dtype));
  Tensor pmean, pm2, pcount;
  std::tie(pmean, pm2, pcount) =
      stats ? empty_partials_of(y) : Tensor3{empty_statistic(y), empty_statistic(y), empty_statistic(y)};
  if (C == 0 && !stats) return {y, pmean, pm2, pcount};
  dispatch_activation(dtype, op, [&](auto tag) {
    using T = decltype(tag);
    using acc_t = acc_type<T>;
    const T* res = residual.has_value() ? residual->const_data_ptr<T>() : nullptr;
    T* out = y.mutable_data_ptr<T>();
    acc_t* m = stats ? pmean.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* v = stats ? pm2.mutable_data_ptr<acc_t>() : nullptr;
    acc_t* n = stats ? pcount.mutable_data_ptr<acc_t>() : nullptr;
    if (conv_out.scalar_type() == dtype) {
      const PartialsArgs<T, T> a{conv_out.const_data_ptr<T>(), res, out, m, v, n, rows, C, 0};
      launch_partials(a, op);
    } else if constexpr (is_reduced<T>) {
      TORCH_CHECK(conv_out.scalar_type() == at::kFloat, op, ": conv_out must be in y's dtype ",
                  c10::toString(dtype), " or float32, got ", c10::toString(conv_out.scalar_type()));
      const PartialsArgs<T, float> a{conv_out.const_data_ptr<float>(), res, out, m, v, n, rows, C,
                                     0};
      launch_partials(a, op);
    } else {
      TORCH_CHECK(false, op, ": conv_out must be in y's dtype ", c10::toString(dtype), ", got ",
                  c10::toString(conv_out.scalar_type()));
    }
  });
  return {y, pmean, pm2, pcount};
}

Tensor4 bn_finalize_cuda(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                         const Tensor& weight, const Tensor& bias, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                         double momentum, double eps) {
  constexpr const char* op = "bn_finalize";
  check_bn_finalize_args(pmean, pm2, pcount, weight, bias, running_mean, running_var,
                         num_batches_tracked, momentum);
  check_cuda(op, "pmean", pmean);
  const c10::cuda::CUDAGuard guard(pmean.device());
  const int64_t T = pmean.size(0), C = pmean.size(1);
  const auto options = pmean.options();
  Tensor mean = at::empty({C}, options), invstd = at::empty({C}, options);
  Tensor scale = at::empty({C}, options), shift = at::empty({C}, options);
  if (C == 0) return {mean, invstd, scale, shift};
  const Operand w = operand(weight), b = operand(bias);
  // Running statistics are written in place when the kernel can store their dtype; otherwise
  // into a double copy that is then copied back (running.copy_, as on the CPU).
  Tensor running[2], scratch[2];
  int running_code[2] = {kF64, kF64};
  Operand batches{Tensor(), kF64};
  const bool update = running_mean.has_value();
  if (update) {
    running[0] = *running_mean, running[1] = *running_var;
    for (int i = 0; i < 2; ++i) {
      running_code[i] = type_code(running[i].scalar_type());
      if (running_code[i] < 0 || running_code[i] > kBF16) {
        scratch[i] = running[i].to(at::kDouble, /*non_blocking=*/false, /*copy=*/true);
        running_code[i] = kF64;
      }
    }
    if (momentum < 0) batches = operand(*num_batches_tracked);
  }
  const auto target = [&](int i) -> void* {
    if (!update) return nullptr;
    return scratch[i].defined() ? scratch[i].mutable_data_ptr() : running[i].mutable_data_ptr();
  };
  int bx = 1;  // channels per block: a power of two, at most kFinalizeTileC
  while (bx < C && bx < kFinalizeTileC) bx *= 2;
  const dim3 block(bx, kFinalizeThreads / bx);
  const dim3 grid(static_cast<unsigned>(ceil_div(C, bx)));
  TORCH_CHECK(ceil_div(C, bx) <= INT32_MAX, op, ": too many channels (", C, ")");
  const auto launch = [&](auto tag) {
    using P = decltype(tag);
    const FinalizeArgs<P> a{pmean.const_data_ptr<P>(),
                            pm2.const_data_ptr<P>(),
                            pcount.const_data_ptr<P>(),
                            T,
                            C,
                            w.tensor.const_data_ptr(),
                            b.tensor.const_data_ptr(),
                            target(0),
                            target(1),
                            batches.tensor.defined() ? batches.tensor.const_data_ptr() : nullptr,
                            w.code,
                            b.code,
                            running_code[0],
                            running_code[1],
                            batches.code,
                            momentum,
                            eps,
                            mean.mutable_data_ptr<P>(),
                            invstd.mutable_data_ptr<P>(),
                            scale.mutable_data_ptr<P>(),
                            shift.mutable_data_ptr<P>()};
    finalize_kernel<P><<<grid, block, 0, current_stream()>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  if (pmean.scalar_type() == at::kDouble) {
    launch(double{});
  } else {
    launch(float{});
  }
  for (int i = 0; i < 2; ++i) {
    if (scratch[i].defined()) running[i].copy_(scratch[i]);
  }
  return {mean, invstd, scale, shift};
}

}  // namespace fused_preact

#endif  // WITH_CUDA
