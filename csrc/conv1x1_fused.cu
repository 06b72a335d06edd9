// conv1x1_fused.cu -- the 1x1 convolutions of a pre-activation unit as tensor-core GEMMs
// (mma.sync.m16n8k16, bf16/fp16 operands, fp32 accumulation) with the BN-ReLU prologue and the
// residual / statistics / ReLU-mask epilogues fused ("mainloop fusion", as in NVIDIA's MLPerf
// ResNet). Implements conv_bnrelu, conv_dgrad and conv_wgrad of fused_preact/unit_ops.py for
// kernel size 1, stride 1 or 2 (a strided 1x1 reads every stride-th row and column).
//
// Layout: NHWC activations viewed as row matrices [pixels, channels]; a 1x1 weight is [Cout, Cin].
//   forward  y[m, co]  = sum_ci a[pix(m), ci] * W[co, ci],  a = relu(scale * x + shift)
//   dgrad    t[pix(m), ci] = sum_co dy[m, co] * W[co, ci]   (W transposed on the host)
//   wgrad    dW[co, ci] = sum_m dy[m, co] * a[pix(m), ci]   (split-K over m)
// where m runs over the output pixels (n, ho, wo) and pix(m) = (n, ho*stride, wo*stride) is the
// input pixel it reads.
// Kernels:
//   rows_gemm_kernel<T, kForward>  forward and dgrad: 128x64 output tile, K step 32, 3-stage
//       cp.async pipeline, 4 warps of 64x32, ldmatrix fragments from XOR-swizzled shared memory.
//       Forward: the A tile (x rows) gets relu(scale*x+shift) in shared memory after it lands and
//       before ldmatrix; epilogue adds the residual (fp32), rounds, stores y and, on request,
//       the partials (mean, M2, count) of each 128-row tile of y as stored, two-pass in the tile.
//       Dgrad: epilogue adds `add`, applies the ReLU mask recomputed from h, scatters g to the
//       strided input pixels and emits per-tile partial sums of g and g * xhat.
//   dgrad_untouched_kernel  stride 2: the input pixels no output reads get g = add * mask (or 0)
//       and their own partial sums.
//   wgrad_kernel<T>  dW tile 128 (Cout) x 64 (Cin) per block and split of m, both operands
//       transposed by ldmatrix.trans; the B tile (x rows) gets the same prologue as the forward
//       (the activation is recomputed, never loaded); fp32 partials per split.
//   sum_rows_kernel, reduce_splits_kernel  fixed-order reductions of the partials
//       (deterministic: no atomics, the split of the work depends on the shapes only).
// Saves nothing. Host side uses ATen's core Tensor and at::empty only (a light nvcc unit).
#ifdef WITH_CUDA

#include "conv1x1_fused.h"
#include "conv1x1_plan.h"

#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>
#include <string>
#include <type_traits>

namespace fused_preact {
namespace {

// ---- tiles (the constants shared with the host-side plan and checks: conv1x1_plan.h) -------------
using conv1x1::kChunk;
using conv1x1::kFillChannels;
using conv1x1::kFillLanes;
using conv1x1::kFillRows;
using conv1x1::kThreads;
using conv1x1::kTileK;
using conv1x1::kTileM;
using conv1x1::kTileN;
constexpr int kStages = 3;             // cp.async stages: 3 x 12 KiB of shared memory
constexpr int kWarpM = 64, kWarpN = 32;
constexpr int kFragsM = kWarpM / 16;   // m16 fragments per warp
constexpr int kFragsN = kWarpN / 8;    // n8 fragments per warp
static_assert(kThreads == (kTileM / kWarpM) * (kTileN / kWarpN) * 32, "2 x 2 warps");

using Acc = float[kFragsM][kFragsN][4];

// ---- PTX ------------------------------------------------------------------------------------
__device__ __forceinline__ uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy; zero-fills the destination when !valid (src is not read).
__device__ __forceinline__ void cp_async_16(uint16_t* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_address(dst)),
               "l"(src), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p))
               : "memory");
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_address(p))
               : "memory");
}

// d += a * b for one m16n8k16 tile (A row-major, B column-major fragments).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                          uint32_t b1) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
        "{%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// ---- element pairs: two 16-bit values in a 32-bit word ------------------------------------
template <typename T>
__device__ __forceinline__ float2 unpack2(uint32_t bits) {
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    return __bfloat1622float2(reinterpret_cast<const __nv_bfloat162&>(bits));
  } else {
    return __half22float2(reinterpret_cast<const __half2&>(bits));
  }
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {  // round to nearest even
  if constexpr (std::is_same_v<T, __nv_bfloat16>) {
    const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return reinterpret_cast<const uint32_t&>(v);
  } else {
    const __half2 v = __floats2half2_rn(lo, hi);
    return reinterpret_cast<const uint32_t&>(v);
  }
}
template <typename T>
__device__ __forceinline__ uint32_t load2(const T* p) { return *reinterpret_cast<const uint32_t*>(p); }
template <typename T>
__device__ __forceinline__ void store2(T* p, uint32_t v) { *reinterpret_cast<uint32_t*>(p) = v; }

__device__ __forceinline__ float relu(float v) { return v < 0.f ? 0.f : v; }  // NaN stays NaN

// In place: the 8 values of a 16-byte shared-memory chunk become relu(scale * v + shift), fp32
// math, rounded back to T (the pre-activation of the contract).
template <typename T>
__device__ __forceinline__ void preact_chunk(uint16_t* chunk, const float (&scale)[kChunk],
                                             const float (&shift)[kChunk]) {
  uint4 v = *reinterpret_cast<uint4*>(chunk);
  uint32_t* w = reinterpret_cast<uint32_t*>(&v);
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const float2 f = unpack2<T>(w[q]);
    w[q] = pack2<T>(relu(fmaf(scale[2 * q], f.x, shift[2 * q])),
                    relu(fmaf(scale[2 * q + 1], f.y, shift[2 * q + 1])));
  }
  *reinterpret_cast<uint4*>(chunk) = v;
}

__device__ __forceinline__ void load_channels(float (&dst)[kChunk], const float* __restrict__ src) {
#pragma unroll
  for (int i = 0; i < kChunk; ++i) dst[i] = __ldg(src + i);
}

// ---- geometry -------------------------------------------------------------------------------
// Output pixel m = (n, ho, wo) of an out_h x out_w grid -> the input pixel (n, ho*s, wo*s).
struct Geometry {
  int in_h, in_w, out_h, out_w, stride;
  __device__ __forceinline__ int64_t input_pixel(int m) const {
    if (stride == 1) return m;
    const int wo = m % out_w;
    const int rest = m / out_w;
    const int ho = rest % out_h;
    const int n = rest / out_h;
    return (int64_t(n) * in_h + int64_t(ho) * stride) * in_w + int64_t(wo) * stride;
  }
};

// ---- shared-memory tiles --------------------------------------------------------------------
// Row tiles [rows][kTileK] (K contiguous, 4 chunks of 16 bytes a row), read by ldmatrix: the
// chunk index is XORed with (row / 2) % 4, so the 8 rows of one 8x8 matrix hit 8 distinct
// 16-byte bank groups.
__device__ __forceinline__ int row_tile_offset(int row, int chunk) {
  return row * kTileK + ((chunk ^ ((row >> 1) & 3)) * kChunk);
}
// Transposed tiles [kTileK][width] (width contiguous), read by ldmatrix.trans: the chunk index is
// XORed with row % 8 within each group of 8 chunks.
template <int kWidth>
__device__ __forceinline__ int trans_tile_offset(int row, int chunk) {
  return row * kWidth + ((chunk ^ (row & 7)) * kChunk);
}

// One K step (kTileK) of the warp's 64x32 tile from row tiles: A [kTileM][kTileK], B [kTileN][kTileK].
template <typename T>
__device__ __forceinline__ void mma_row_tiles(const uint16_t* sa, const uint16_t* sb, int warp_m,
                                              int warp_n, int lane, Acc& acc) {
  const int quad = lane >> 3, r = lane & 7;  // lane supplies row r of 8x8 matrix `quad`
#pragma unroll
  for (int ks = 0; ks < kTileK / 16; ++ks) {
    uint32_t a[kFragsM][4], b[kFragsN][2];
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi) {
      const int row = warp_m * kWarpM + mi * 16 + (quad & 1) * 8 + r;
      ldmatrix_x4(a[mi], sa + row_tile_offset(row, ks * 2 + (quad >> 1)));
    }
#pragma unroll
    for (int np = 0; np < kFragsN / 2; ++np) {
      const int row = warp_n * kWarpN + np * 16 + (quad >> 1) * 8 + r;
      uint32_t t[4];
      ldmatrix_x4(t, sb + row_tile_offset(row, ks * 2 + (quad & 1)));
      b[2 * np][0] = t[0], b[2 * np][1] = t[1], b[2 * np + 1][0] = t[2], b[2 * np + 1][1] = t[3];
    }
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
  }
}

// One K step from transposed tiles: A stored [kTileK][kTileM], B stored [kTileK][kTileN].
template <typename T>
__device__ __forceinline__ void mma_trans_tiles(const uint16_t* sa, const uint16_t* sb,
                                                int warp_m, int warp_n, int lane, Acc& acc) {
  const int quad = lane >> 3, r = lane & 7;
#pragma unroll
  for (int ks = 0; ks < kTileK / 16; ++ks) {
    uint32_t a[kFragsM][4], b[kFragsN][2];
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi) {
      const int k = ks * 16 + (quad >> 1) * 8 + r;
      const int col = warp_m * kWarpM + mi * 16 + (quad & 1) * 8;
      ldmatrix_x4_trans(a[mi], sa + trans_tile_offset<kTileM>(k, col / kChunk));
    }
#pragma unroll
    for (int np = 0; np < kFragsN / 2; ++np) {
      const int k = ks * 16 + (quad & 1) * 8 + r;
      const int col = warp_n * kWarpN + np * 16 + (quad >> 1) * 8;
      uint32_t t[4];
      ldmatrix_x4_trans(t, sb + trans_tile_offset<kTileN>(k, col / kChunk));
      b[2 * np][0] = t[0], b[2 * np][1] = t[1], b[2 * np + 1][0] = t[2], b[2 * np + 1][1] = t[3];
    }
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) mma_16816<T>(acc[mi][ni], a[mi], b[ni][0], b[ni][1]);
  }
}

// The multistage pipeline over `steps` K steps: load(stage, step) issues the cp.async copies of
// a step, prepare(stage, step) runs on each thread's own landed chunks (the prologue),
// compute(stage) feeds the tensor cores. One barrier per step: it publishes the prepared stage
// and retires the stage computed in the previous step, which the next load then refills.
template <class Load, class Prepare, class Compute>
__device__ __forceinline__ void pipeline(int steps, Load&& load, Prepare&& prepare,
                                         Compute&& compute) {
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < steps) load(s, s);
    cp_async_commit();
  }
  for (int step = 0; step < steps; ++step) {
    cp_async_wait<kStages - 2>();
    const int stage = step % kStages;
    prepare(stage, step);
    __syncthreads();
    const int next = step + kStages - 1;
    if (next < steps) load(next % kStages, next);
    cp_async_commit();
    compute(stage);
  }
  cp_async_wait<0>();
}

// Sums v over the block tile's rows for each of the thread's columns: over the 8 lanes sharing
// them in a warp, then over the 2 warps along M (through `red`). Every thread gets the totals.
// Must be reached by all threads of the block.
__device__ __forceinline__ void column_sums(float (&v)[kFragsN][2], float (*red)[kTileN],
                                            int warp_m, int warp_n, int lane) {
#pragma unroll
  for (int ni = 0; ni < kFragsN; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e)
#pragma unroll
      for (int offset = 4; offset < 32; offset *= 2)
        v[ni][e] += __shfl_xor_sync(0xffffffffu, v[ni][e], offset);
  if (lane < 4) {
#pragma unroll
    for (int ni = 0; ni < kFragsN; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) red[warp_m][warp_n * kWarpN + ni * 8 + lane * 2 + e] = v[ni][e];
  }
  __syncthreads();
#pragma unroll
  for (int ni = 0; ni < kFragsN; ++ni)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int col = warp_n * kWarpN + ni * 8 + (lane & 3) * 2 + e;
      v[ni][e] = red[0][col] + red[1][col];
    }
  __syncthreads();
}

// ---- forward and dgrad ----------------------------------------------------------------------
struct RowsGemmArgs {
  const void* a;      // forward: x [N, H, W, K] (rows gathered at pix(m)); dgrad: dy [M, K]
  const void* b;      // [cols, K]: forward weight [Cout, Cin]; dgrad weight^T [Cin, Cout]
  void* out;          // forward: y [M, cols]; dgrad: g [N, H, W, cols] (rows scattered to pix(m))
  int rows, k, cols;  // M = N * Ho * Wo, reduction, columns
  Geometry geo;
  const float* scale;  // forward: prologue on A's channels (K); dgrad: ReLU mask on the columns
  const float* shift;
  const void* extra;   // forward: residual [M, cols] or null; dgrad: add [N, H, W, cols] or null
  // forward statistics (null: none): [tiles, cols], [tiles, cols], [tiles]
  float* pmean;
  float* pm2;
  float* pcount;
  // dgrad: h [N, H, W, cols] or null (then no mask, no sums), BN statistics of h, and the partial
  // sums [tiles, cols] of g and g * xhat
  const void* h;
  const float* mean;
  const float* invstd;
  float* psum_g;
  float* psum_gx;
};

template <typename T, bool kForward>
__global__ void __launch_bounds__(kThreads) rows_gemm_kernel(const RowsGemmArgs p) {
  __shared__ __align__(128) uint16_t smem_a[kStages][kTileM * kTileK];
  __shared__ __align__(128) uint16_t smem_b[kStages][kTileN * kTileK];
  __shared__ float red[kTileM / kWarpM][kTileN];

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int tile = blockIdx.x;
  const int m0 = tile * kTileM, n0 = blockIdx.y * kTileN;
  const T* __restrict__ a = static_cast<const T*>(p.a);
  const T* __restrict__ b = static_cast<const T*>(p.b);

  // This thread's chunks: A rows (tid/4 + 32j), B rows (tid/4 + 32j), both at chunk tid % 4.
  constexpr int kChunksA = kTileM * kTileK / kChunk / kThreads;  // 4
  constexpr int kChunksB = kTileN * kTileK / kChunk / kThreads;  // 2
  constexpr int kRowStep = kThreads * kChunk / kTileK;           // 32
  const int chunk = tid & 3, row0 = tid >> 2;
  const T* a_row[kChunksA];
  bool a_valid[kChunksA];
#pragma unroll
  for (int j = 0; j < kChunksA; ++j) {
    const int m = m0 + row0 + j * kRowStep;
    a_valid[j] = m < p.rows;
    const int64_t pixel = !a_valid[j] ? 0 : kForward ? p.geo.input_pixel(m) : int64_t(m);
    a_row[j] = a + pixel * p.k;
  }

  auto load = [&](int stage, int step) {
    const int k = step * kTileK + chunk * kChunk;
    const bool k_valid = k < p.k;
#pragma unroll
    for (int j = 0; j < kChunksA; ++j) {
      const bool valid = a_valid[j] && k_valid;
      cp_async_16(&smem_a[stage][row_tile_offset(row0 + j * kRowStep, chunk)],
                  valid ? a_row[j] + k : a, valid);
    }
#pragma unroll
    for (int j = 0; j < kChunksB; ++j) {
      const int n = n0 + row0 + j * kRowStep;
      const bool valid = n < p.cols && k_valid;
      cp_async_16(&smem_b[stage][row_tile_offset(row0 + j * kRowStep, chunk)],
                  valid ? b + int64_t(n) * p.k + k : b, valid);
    }
  };
  auto prepare = [&](int stage, int step) {
    if constexpr (kForward) {  // the BN-ReLU prologue on this thread's landed A chunks
      const int k = step * kTileK + chunk * kChunk;
      if (k >= p.k) return;  // zero-filled, and B is zero there too
      float scale[kChunk], shift[kChunk];
      load_channels(scale, p.scale + k);
      load_channels(shift, p.shift + k);
#pragma unroll
      for (int j = 0; j < kChunksA; ++j)
        if (a_valid[j])
          preact_chunk<T>(&smem_a[stage][row_tile_offset(row0 + j * kRowStep, chunk)], scale, shift);
    }
  };
  Acc acc = {};
  auto compute = [&](int stage) {
    mma_row_tiles<T>(smem_a[stage], smem_b[stage], warp_m, warp_n, lane, acc);
  };
  pipeline((p.k + kTileK - 1) / kTileK, load, prepare, compute);

  // ---- epilogue: accumulator (mi, ni, 2 * half + e) is row m_of(mi, half), column col_of(ni) + e
  const int group = lane >> 2, pair = (lane & 3) * 2;
  auto m_of = [&](int mi, int half) { return m0 + warp_m * kWarpM + mi * 16 + half * 8 + group; };
  auto col_of = [&](int ni) { return n0 + warp_n * kWarpN + ni * 8 + pair; };
  T* __restrict__ out = static_cast<T*>(p.out);
  const T* __restrict__ extra = static_cast<const T*>(p.extra);
  float sums[kFragsN][2] = {}, sums2[kFragsN][2] = {};

  if constexpr (kForward) {
    // y = acc (+ residual), rounded; the stored value is kept in acc for the statistics
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = m_of(mi, half);
        if (m >= p.rows) continue;
#pragma unroll
        for (int ni = 0; ni < kFragsN; ++ni) {
          const int col = col_of(ni);
          if (col >= p.cols) continue;
          float* v = &acc[mi][ni][2 * half];
          const int64_t at = int64_t(m) * p.cols + col;
          if (extra != nullptr) {
            const float2 r = unpack2<T>(load2(extra + at));
            v[0] += r.x;
            v[1] += r.y;
          }
          const uint32_t stored = pack2<T>(v[0], v[1]);
          store2(out + at, stored);
          const float2 s = unpack2<T>(stored);
          v[0] = s.x;
          v[1] = s.y;
          sums[ni][0] += s.x;
          sums[ni][1] += s.y;
        }
      }
    if (p.pmean == nullptr) return;
    // statistics of the tile, two-pass: the mean, then the squared deviations from it
    const int count = min(kTileM, p.rows - m0);
    column_sums(sums, red, warp_m, warp_n, lane);
#pragma unroll
    for (int ni = 0; ni < kFragsN; ++ni)
#pragma unroll
      for (int e = 0; e < 2; ++e) sums[ni][e] /= float(count);
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        if (m_of(mi, half) >= p.rows) continue;
#pragma unroll
        for (int ni = 0; ni < kFragsN; ++ni)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const float d = acc[mi][ni][2 * half + e] - sums[ni][e];
            sums2[ni][e] += d * d;
          }
      }
    column_sums(sums2, red, warp_m, warp_n, lane);
    if (warp_m == 0 && lane < 4) {
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) {
        const int col = col_of(ni);
        if (col >= p.cols) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          p.pmean[int64_t(tile) * p.cols + col + e] = sums[ni][e];
          p.pm2[int64_t(tile) * p.cols + col + e] = sums2[ni][e];
        }
      }
    }
    if (blockIdx.y == 0 && tid == 0) p.pcount[tile] = float(count);
  } else {
    // g = (acc + add) * !(scale * h + shift <= 0), scattered to the input pixels
    const T* __restrict__ h = static_cast<const T*>(p.h);
    int64_t pixel[kFragsM][2];
#pragma unroll
    for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int m = m_of(mi, half);
        pixel[mi][half] = m < p.rows ? p.geo.input_pixel(m) : -1;
      }
#pragma unroll
    for (int ni = 0; ni < kFragsN; ++ni) {
      const int col = col_of(ni);
      if (col >= p.cols) continue;
      float scale[2] = {}, shift[2] = {}, mean[2] = {}, invstd[2] = {};
      if (h != nullptr) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          scale[e] = __ldg(p.scale + col + e);
          shift[e] = __ldg(p.shift + col + e);
          mean[e] = __ldg(p.mean + col + e);
          invstd[e] = __ldg(p.invstd + col + e);
        }
      }
#pragma unroll
      for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          if (pixel[mi][half] < 0) continue;
          const int64_t at = pixel[mi][half] * p.cols + col;
          float v[2] = {acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]};
          if (extra != nullptr) {
            const float2 r = unpack2<T>(load2(extra + at));
            v[0] += r.x;
            v[1] += r.y;
          }
          if (h != nullptr) {
            const float2 hv2 = unpack2<T>(load2(h + at));
            const float hv[2] = {hv2.x, hv2.y};
#pragma unroll
            for (int e = 0; e < 2; ++e) {
              // the ReLU mask as threshold_backward: zero where the pre-activation is <= 0 (a NaN
              // passes v; a select, so an infinite v is zeroed, not made NaN)
              if (fmaf(scale[e], hv[e], shift[e]) <= 0.f) v[e] = 0.f;
              sums[ni][e] += v[e];
              sums2[ni][e] += v[e] * ((hv[e] - mean[e]) * invstd[e]);
            }
          }
          store2(out + at, pack2<T>(v[0], v[1]));
        }
    }
    if (h == nullptr) return;
    column_sums(sums, red, warp_m, warp_n, lane);
    column_sums(sums2, red, warp_m, warp_n, lane);
    if (warp_m == 0 && lane < 4) {
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) {
        const int col = col_of(ni);
        if (col >= p.cols) continue;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          p.psum_g[int64_t(tile) * p.cols + col + e] = sums[ni][e];
          p.psum_gx[int64_t(tile) * p.cols + col + e] = sums2[ni][e];
        }
      }
    }
  }
}

// ---- dgrad, stride 2: the input pixels no output pixel reads ------------------------------
struct UntouchedArgs {
  int64_t pixels;  // N * H * W
  int channels;    // Cin
  Geometry geo;
  const void* add;  // [pixels, channels] or null
  const void* h;    // [pixels, channels] or null
  const float* scale;
  const float* shift;
  const float* mean;
  const float* invstd;
  void* out;
  float* psum_g;    // [chunks, channels] (rows offset by the GEMM's tiles), null without h
  float* psum_gx;
};

// grid (ceil(pixels / kFillRows), ceil(channels / 64)) (conv1x1::plan's `fill`: the pixel chunks on
// x, which takes 2^31 - 1 blocks), block (8, 32): thread x owns 8 channels, thread rows step
// through the block's pixels. g = add * !(scale * h + shift <= 0), or 0.
template <typename T>
__global__ void __launch_bounds__(kFillChannels / kChunk * kFillLanes)
    dgrad_untouched_kernel(const UntouchedArgs p) {
  __shared__ float red_g[kFillLanes][kFillChannels];
  __shared__ float red_gx[kFillLanes][kFillChannels];
  const int c = blockIdx.y * kFillChannels + threadIdx.x * kChunk;
  const int64_t begin = int64_t(blockIdx.x) * kFillRows;
  const int64_t end = std::min<int64_t>(begin + kFillRows, p.pixels);
  const T* __restrict__ add = static_cast<const T*>(p.add);
  const T* __restrict__ h = static_cast<const T*>(p.h);
  T* __restrict__ out = static_cast<T*>(p.out);
  const bool active = c < p.channels;
  float scale[kChunk] = {}, shift[kChunk] = {}, mean[kChunk] = {}, invstd[kChunk] = {};
  if (active && h != nullptr) {
    load_channels(scale, p.scale + c);
    load_channels(shift, p.shift + c);
    load_channels(mean, p.mean + c);
    load_channels(invstd, p.invstd + c);
  }
  float sum_g[kChunk] = {}, sum_gx[kChunk] = {};
  for (int64_t pix = begin + threadIdx.y; active && pix < end; pix += kFillLanes) {
    const int w = int(pix % p.geo.in_w);
    const int y = int((pix / p.geo.in_w) % p.geo.in_h);
    if (y % p.geo.stride == 0 && w % p.geo.stride == 0) continue;  // written by the GEMM
    const int64_t at = pix * p.channels + c;
    uint4 g = make_uint4(0, 0, 0, 0);
    if (add != nullptr) {
      g = *reinterpret_cast<const uint4*>(add + at);
      if (h != nullptr) {
        const uint4 hv = *reinterpret_cast<const uint4*>(h + at);
        uint32_t* gw = reinterpret_cast<uint32_t*>(&g);
        const uint32_t* hw = reinterpret_cast<const uint32_t*>(&hv);
#pragma unroll
        for (int q = 0; q < 4; ++q) {
          const float2 g2 = unpack2<T>(gw[q]), h2 = unpack2<T>(hw[q]);
          float gv[2] = {g2.x, g2.y};
          const float hvv[2] = {h2.x, h2.y};
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int i = 2 * q + e;
            if (fmaf(scale[i], hvv[e], shift[i]) <= 0.f) gv[e] = 0.f;  // threshold_backward's mask
            sum_g[i] += gv[e];
            sum_gx[i] += gv[e] * ((hvv[e] - mean[i]) * invstd[i]);
          }
          gw[q] = pack2<T>(gv[0], gv[1]);
        }
      }
    }
    *reinterpret_cast<uint4*>(out + at) = g;
  }
  if (p.psum_g == nullptr) return;
  // fixed-order reduction over the thread rows
#pragma unroll
  for (int i = 0; i < kChunk; ++i) {
    red_g[threadIdx.y][threadIdx.x * kChunk + i] = sum_g[i];
    red_gx[threadIdx.y][threadIdx.x * kChunk + i] = sum_gx[i];
  }
  __syncthreads();
  const int lane = threadIdx.y * blockDim.x + threadIdx.x;  // one thread per channel of the block
  if (lane < kFillChannels && blockIdx.y * kFillChannels + lane < p.channels) {
    float g = 0.f, gx = 0.f;
    for (int r = 0; r < kFillLanes; ++r) {
      g += red_g[r][lane];
      gx += red_gx[r][lane];
    }
    const int64_t at = int64_t(blockIdx.x) * p.channels + blockIdx.y * kFillChannels + lane;
    p.psum_g[at] = g;
    p.psum_gx[at] = gx;
  }
}

// out[c] = sum over t of part[t, c], in a fixed order. grid ceil(C / 32), block (32, 16).
__global__ void __launch_bounds__(512)
    sum_rows_kernel(const float* __restrict__ part, int64_t rows, int channels, float* __restrict__ out) {
  __shared__ float red[16][32];
  const int c = blockIdx.x * 32 + threadIdx.x;
  float s = 0.f;
  if (c < channels)
    for (int64_t t = threadIdx.y; t < rows; t += 16) s += part[t * channels + c];
  red[threadIdx.y][threadIdx.x] = s;
  __syncthreads();
  if (threadIdx.y == 0 && c < channels) {
    for (int r = 1; r < 16; ++r) s += red[r][threadIdx.x];
    out[c] = s;
  }
}

// ---- wgrad ----------------------------------------------------------------------------------
struct WgradArgs {
  const void* dy;  // [M, Cout]
  const void* x;   // [N, H, W, Cin], rows gathered at pix(m)
  const float* scale;
  const float* shift;
  int rows, cout, cin;
  Geometry geo;
  int steps_per_split;  // K steps (of kTileK rows) per blockIdx.z
  float* part;          // [splits, Cout, Cin]
};

// grid (ceil(Cout / 128), ceil(Cin / 64), splits): the dW tile of the block over its split of m.
template <typename T>
__global__ void __launch_bounds__(kThreads) wgrad_kernel(const WgradArgs p) {
  __shared__ __align__(128) uint16_t smem_a[kStages][kTileK * kTileM];  // dy^T: [m][co]
  __shared__ __align__(128) uint16_t smem_b[kStages][kTileK * kTileN];  // a:    [m][ci]

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int warp_m = warp >> 1, warp_n = warp & 1;
  const int co0 = blockIdx.x * kTileM, ci0 = blockIdx.y * kTileN;
  const int total_steps = (p.rows + kTileK - 1) / kTileK;
  const int first_step = blockIdx.z * p.steps_per_split;
  const int steps = min(p.steps_per_split, total_steps - first_step);
  const T* __restrict__ dy = static_cast<const T*>(p.dy);
  const T* __restrict__ x = static_cast<const T*>(p.x);

  // A chunks: rows tid/16 + 8j, chunk tid % 16 (8 Cout); B chunks: rows tid/8 + 16j, chunk tid % 8.
  constexpr int kChunksA = kTileK * kTileM / kChunk / kThreads;  // 4
  constexpr int kChunksB = kTileK * kTileN / kChunk / kThreads;  // 2
  constexpr int kPerRowA = kTileM / kChunk, kPerRowB = kTileN / kChunk;
  const int chunk_a = tid % kPerRowA, row_a = tid / kPerRowA;
  const int chunk_b = tid % kPerRowB, row_b = tid / kPerRowB;
  const int co = co0 + chunk_a * kChunk, ci = ci0 + chunk_b * kChunk;
  const bool co_valid = co < p.cout, ci_valid = ci < p.cin;
  float scale[kChunk] = {}, shift[kChunk] = {};
  if (ci_valid) {
    load_channels(scale, p.scale + ci);
    load_channels(shift, p.shift + ci);
  }

  auto load = [&](int stage, int step) {
    const int m_base = (first_step + step) * kTileK;
#pragma unroll
    for (int j = 0; j < kChunksA; ++j) {
      const int row = row_a + j * (kThreads / kPerRowA);
      const int m = m_base + row;
      const bool valid = co_valid && m < p.rows;
      cp_async_16(&smem_a[stage][trans_tile_offset<kTileM>(row, chunk_a)],
                  valid ? dy + int64_t(m) * p.cout + co : dy, valid);
    }
#pragma unroll
    for (int j = 0; j < kChunksB; ++j) {
      const int row = row_b + j * (kThreads / kPerRowB);
      const int m = m_base + row;
      const bool valid = ci_valid && m < p.rows;
      cp_async_16(&smem_b[stage][trans_tile_offset<kTileN>(row, chunk_b)],
                  valid ? x + p.geo.input_pixel(m) * p.cin + ci : x, valid);
    }
  };
  auto prepare = [&](int stage, int step) {  // the BN-ReLU prologue, recomputed on landed x rows
    if (!ci_valid) return;
    const int m_base = (first_step + step) * kTileK;
#pragma unroll
    for (int j = 0; j < kChunksB; ++j) {
      const int row = row_b + j * (kThreads / kPerRowB);
      if (m_base + row < p.rows)  // rows past M stay zero-filled: they must add nothing
        preact_chunk<T>(&smem_b[stage][trans_tile_offset<kTileN>(row, chunk_b)], scale, shift);
    }
  };
  Acc acc = {};
  auto compute = [&](int stage) {
    mma_trans_tiles<T>(smem_a[stage], smem_b[stage], warp_m, warp_n, lane, acc);
  };
  pipeline(steps, load, prepare, compute);

  const int group = lane >> 2, pair = (lane & 3) * 2;
  float* __restrict__ part = p.part + int64_t(blockIdx.z) * p.cout * p.cin;
#pragma unroll
  for (int mi = 0; mi < kFragsM; ++mi)
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = co0 + warp_m * kWarpM + mi * 16 + half * 8 + group;
      if (row >= p.cout) continue;
#pragma unroll
      for (int ni = 0; ni < kFragsN; ++ni) {
        const int col = ci0 + warp_n * kWarpN + ni * 8 + pair;
        if (col >= p.cin) continue;
        *reinterpret_cast<float2*>(part + int64_t(row) * p.cin + col) =
            make_float2(acc[mi][ni][2 * half], acc[mi][ni][2 * half + 1]);
      }
    }
}

template <typename Out>
__device__ __forceinline__ Out from_float(float v) {
  if constexpr (std::is_same_v<Out, __nv_bfloat16>) return __float2bfloat16_rn(v);
  else if constexpr (std::is_same_v<Out, __half>) return __float2half_rn(v);
  else return v;
}

// out[i] = sum over the splits of part[s, i], in split order, rounded to Out.
template <typename Out>
__global__ void __launch_bounds__(256)
    reduce_splits_kernel(const float* __restrict__ part, int splits, int64_t n, Out* __restrict__ out) {
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += int64_t(gridDim.x) * blockDim.x) {
    float s = 0.f;
    for (int z = 0; z < splits; ++z) s += part[int64_t(z) * n + i];
    out[i] = from_float<Out>(s);
  }
}

// ---- host -----------------------------------------------------------------------------------
int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

int64_t output_size(int64_t size, int64_t stride) { return (size - 1) / stride + 1; }

// weight [Cout, Cin, 1, 1] -> [rows, cols] contiguous in `dtype` (rounded as autocast does),
// transposed to [Cin, Cout] when `transpose`, 16-byte aligned for cp.async: a weight already in
// `dtype` is returned as a view, and a view into a flat parameter buffer may start anywhere
// (a misaligned cp.async is a sticky error that kills the CUDA context), so it is copied.
at::Tensor weight_matrix(const at::Tensor& weight, c10::ScalarType dtype, bool transpose) {
  at::Tensor w = weight.reshape({weight.size(0), weight.size(1)}).to(dtype);
  if (transpose) w = w.t();
  w = w.contiguous();
  if (reinterpret_cast<uintptr_t>(w.data_ptr()) % 16 != 0) w = w.clone();
  return w;
}

dim3 dims(const conv1x1::Grid& g) {
  return dim3(static_cast<unsigned>(g.x), static_cast<unsigned>(g.y), static_cast<unsigned>(g.z));
}

template <typename T, bool kForward>
void launch_rows_gemm(const RowsGemmArgs& args, const conv1x1::Grid& grid, cudaStream_t stream) {
  rows_gemm_kernel<T, kForward><<<dims(grid), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <bool kForward>
void dispatch_rows_gemm(c10::ScalarType dtype, const RowsGemmArgs& args, const conv1x1::Grid& grid,
                        cudaStream_t stream) {
  if (dtype == at::kBFloat16) launch_rows_gemm<__nv_bfloat16, kForward>(args, grid, stream);
  else launch_rows_gemm<__half, kForward>(args, grid, stream);
}

Geometry geometry(int64_t in_h, int64_t in_w, int64_t stride) {
  return Geometry{int(in_h), int(in_w), int(output_size(in_h, stride)), int(output_size(in_w, stride)),
                  int(stride)};
}

const void* data_or_null(const std::optional<at::Tensor>& t) {
  return t.has_value() ? t->data_ptr() : nullptr;
}

void sum_rows(const at::Tensor& part, const at::Tensor& out, cudaStream_t stream) {
  const int channels = int(part.size(1));
  sum_rows_kernel<<<static_cast<unsigned>(ceil_div(channels, 32)), dim3(32, 16), 0, stream>>>(
      part.data_ptr<float>(), part.size(0), channels, out.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

// The entry points re-run the checks conv_ops.cpp ran to choose them (conv1x1_plan.cpp): a call
// they do not handle is an error here, never a launch.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1x1_bnrelu_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, int64_t stride, bool stats) {
  constexpr const char* op = "conv1x1_bnrelu_cuda";
  const std::string problem = conv1x1::bnrelu_problem(x, weight, scale, shift, residual, stride, true);
  TORCH_CHECK(problem.empty(), op, ": ", problem);
  const int64_t cin = x.size(3), cout = weight.size(0);
  const int64_t n = x.size(0), out_h = output_size(x.size(1), stride), out_w = output_size(x.size(2), stride);
  at::Tensor y = at::empty({n, out_h, out_w, cout}, x.options());
  const int64_t rows = n * out_h * out_w;
  const conv1x1::Plan plan = conv1x1::plan(rows, n * x.size(1) * x.size(2), cin, cout, stride);
  const int64_t tiles = stats ? plan.partials : 0;
  const auto f32 = x.options().dtype(at::kFloat);
  at::Tensor pmean = stats ? at::empty({tiles, cout}, f32) : at::empty({0}, f32);
  at::Tensor pm2 = stats ? at::empty({tiles, cout}, f32) : at::empty({0}, f32);
  at::Tensor pcount = at::empty({tiles}, f32);
  if (rows == 0) return {y, pmean, pm2, pcount};

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const at::Tensor w = weight_matrix(weight, x.scalar_type(), /*transpose=*/false);
  RowsGemmArgs args{};
  args.a = x.data_ptr();
  args.b = w.data_ptr();
  args.out = y.data_ptr();
  args.rows = int(rows);
  args.k = int(cin);
  args.cols = int(cout);
  args.geo = geometry(x.size(1), x.size(2), stride);
  args.scale = scale.data_ptr<float>();
  args.shift = shift.data_ptr<float>();
  args.extra = data_or_null(residual);
  if (stats) {
    args.pmean = pmean.data_ptr<float>();
    args.pm2 = pm2.data_ptr<float>();
    args.pcount = pcount.data_ptr<float>();
  }
  dispatch_rows_gemm<true>(x.scalar_type(), args, plan.forward, stream);
  return {y, pmean, pm2, pcount};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> conv1x1_dgrad_cuda(
    const at::Tensor& dy, const at::Tensor& weight, const std::optional<at::Tensor>& h,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd,
    const std::optional<at::Tensor>& add, int64_t stride, int64_t height, int64_t width) {
  constexpr const char* op = "conv1x1_dgrad_cuda";
  const std::string problem = conv1x1::dgrad_problem(dy, weight, h, scale, shift, mean, invstd, add,
                                                     stride, height, width, true);
  TORCH_CHECK(problem.empty(), op, ": ", problem);
  const int64_t n = dy.size(0), cout = dy.size(3), cin = weight.size(1);
  at::Tensor g = at::empty({n, height, width, cin}, dy.options());
  const bool with_h = h.has_value();
  const auto f32 = dy.options().dtype(at::kFloat);
  at::Tensor sum_g = with_h ? at::empty({cin}, f32) : at::empty({0}, f32);
  at::Tensor sum_gx = with_h ? at::empty({cin}, f32) : at::empty({0}, f32);
  const int64_t pixels = n * height * width, rows = dy.size(0) * dy.size(1) * dy.size(2);
  if (pixels == 0) {
    sum_g.zero_();
    sum_gx.zero_();
    return {g, sum_g, sum_gx};
  }

  const c10::cuda::CUDAGuard guard(dy.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(dy.device().index()).stream();
  const at::Tensor w_t = weight_matrix(weight, dy.scalar_type(), /*transpose=*/true);  // [Cin, Cout]
  const Geometry geo = geometry(height, width, stride);
  const conv1x1::Plan plan = conv1x1::plan(rows, pixels, cin, cout, stride);
  const int64_t gemm_tiles = plan.dgrad.x, fill_chunks = plan.fill.x;
  at::Tensor psum_g, psum_gx;
  if (with_h) {
    psum_g = at::empty({gemm_tiles + fill_chunks, cin}, f32);
    psum_gx = at::empty({gemm_tiles + fill_chunks, cin}, f32);
  }

  RowsGemmArgs args{};
  args.a = dy.data_ptr();
  args.b = w_t.data_ptr();
  args.out = g.data_ptr();
  args.rows = int(rows);
  args.k = int(cout);
  args.cols = int(cin);
  args.geo = geo;
  args.extra = data_or_null(add);
  if (with_h) {
    args.h = h->data_ptr();
    args.scale = scale->data_ptr<float>();
    args.shift = shift->data_ptr<float>();
    args.mean = mean->data_ptr<float>();
    args.invstd = invstd->data_ptr<float>();
    args.psum_g = psum_g.data_ptr<float>();
    args.psum_gx = psum_gx.data_ptr<float>();
  }
  dispatch_rows_gemm<false>(dy.scalar_type(), args, plan.dgrad, stream);

  if (fill_chunks > 0) {
    UntouchedArgs fill{};
    fill.pixels = pixels;
    fill.channels = int(cin);
    fill.geo = geo;
    fill.add = data_or_null(add);
    fill.out = g.data_ptr();
    if (with_h) {
      fill.h = args.h;
      fill.scale = args.scale;
      fill.shift = args.shift;
      fill.mean = args.mean;
      fill.invstd = args.invstd;
      fill.psum_g = args.psum_g + gemm_tiles * cin;
      fill.psum_gx = args.psum_gx + gemm_tiles * cin;
    }
    const dim3 block(kFillChannels / kChunk, kFillLanes);
    if (dy.scalar_type() == at::kBFloat16) {
      dgrad_untouched_kernel<__nv_bfloat16><<<dims(plan.fill), block, 0, stream>>>(fill);
    } else {
      dgrad_untouched_kernel<__half><<<dims(plan.fill), block, 0, stream>>>(fill);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (with_h) {
    sum_rows(psum_g, sum_g, stream);
    sum_rows(psum_gx, sum_gx, stream);
  }
  return {g, sum_g, sum_gx};
}

at::Tensor conv1x1_wgrad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& weight, int64_t stride) {
  constexpr const char* op = "conv1x1_wgrad_cuda";
  const std::string problem = conv1x1::wgrad_problem(dy, x, scale, shift, weight, stride, true);
  TORCH_CHECK(problem.empty(), op, ": ", problem);
  const int64_t cin = x.size(3), cout = dy.size(3);
  at::Tensor dweight = at::empty({cout, cin, 1, 1}, weight.options());
  const int64_t rows = dy.size(0) * dy.size(1) * dy.size(2);
  if (rows == 0) return dweight.zero_();

  const c10::cuda::CUDAGuard guard(x.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
  const conv1x1::Plan plan = conv1x1::plan(rows, x.size(0) * x.size(1) * x.size(2), cin, cout, stride);
  const int64_t splits = plan.wgrad.z;
  at::Tensor part = at::empty({splits, cout, cin}, x.options().dtype(at::kFloat));

  WgradArgs args{};
  args.dy = dy.data_ptr();
  args.x = x.data_ptr();
  args.scale = scale.data_ptr<float>();
  args.shift = shift.data_ptr<float>();
  args.rows = int(rows);
  args.cout = int(cout);
  args.cin = int(cin);
  args.geo = geometry(x.size(1), x.size(2), stride);
  args.steps_per_split = int(plan.steps_per_split);
  args.part = part.data_ptr<float>();
  if (x.scalar_type() == at::kBFloat16) wgrad_kernel<__nv_bfloat16><<<dims(plan.wgrad), kThreads, 0, stream>>>(args);
  else wgrad_kernel<__half><<<dims(plan.wgrad), kThreads, 0, stream>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const int64_t count = cout * cin;
  const unsigned blocks = static_cast<unsigned>(std::min<int64_t>(ceil_div(count, 256), 4096));
  switch (weight.scalar_type()) {
    case at::kFloat:
      reduce_splits_kernel<float><<<blocks, 256, 0, stream>>>(args.part, int(splits), count,
                                                               dweight.data_ptr<float>());
      break;
    case at::kBFloat16:
      reduce_splits_kernel<__nv_bfloat16><<<blocks, 256, 0, stream>>>(
          args.part, int(splits), count, static_cast<__nv_bfloat16*>(dweight.data_ptr()));
      break;
    default:
      reduce_splits_kernel<__half><<<blocks, 256, 0, stream>>>(args.part, int(splits), count,
                                                                static_cast<__half*>(dweight.data_ptr()));
      break;
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dweight;
}

}  // namespace fused_preact

#endif  // WITH_CUDA
