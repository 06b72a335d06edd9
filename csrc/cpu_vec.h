// cpu_vec.h -- at::vec helpers shared by the CPU kernels of the fused unit operators.
//
// Every CPU kernel computes in `acc_t` (float for float32 / bfloat16 / float16 storage, double for
// float64) on at::vec::Vectorized<acc_t> lanes, walking each NHWC row with for_each_vector: whole
// vectors first, then the C % Vec::size() channels left over through a small buffer. These
// helpers load and store either kind of vector in any storage type and round a vector to the
// storage type's precision (bfloat16 / float16 temporaries held in fp32). The lane count is
// at::vec's for the CPU_CAPABILITY the file is built for (setup.py: AVX-512, AVX2 or generic).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fused_preact {
namespace cpu {

// Vec::size() bfloat16 / float16 values <-> one register of floats (8 lanes on AVX2, 16 on
// AVX-512), without going through at::vec's Vectorized<BFloat16>, which converts twice as many
// lanes and stores half of them through a buffer. Rounding is to nearest even, as
// c10::BFloat16 / c10::Half round (a NaN stays a NaN, not necessarily with the same bits).
#if defined(CPU_CAPABILITY_AVX512)
#define FUSED_PREACT_FLOAT_LANES 1
using FloatReg = __m512;
using HalfReg = __m256i;  // Vec::size() 16-bit values
inline HalfReg load_half_reg(const void* p) { return _mm256_loadu_si256(static_cast<const __m256i*>(p)); }
inline void store_half_reg(void* p, const HalfReg& v) { _mm256_storeu_si256(static_cast<__m256i*>(p), v); }
#elif defined(CPU_CAPABILITY_AVX2)
#define FUSED_PREACT_FLOAT_LANES 1
using FloatReg = __m256;
using HalfReg = __m128i;
inline HalfReg load_half_reg(const void* p) { return _mm_loadu_si128(static_cast<const __m128i*>(p)); }
inline void store_half_reg(void* p, const HalfReg& v) { _mm_storeu_si128(static_cast<__m128i*>(p), v); }
#endif

#if defined(FUSED_PREACT_FLOAT_LANES)
template <typename S>
inline FloatReg floats_from(const HalfReg& raw) {
  FloatReg out;
  if constexpr (std::is_same_v<S, c10::BFloat16>) at::vec::cvtbf16_fp32(raw, out);
  else at::vec::cvtfp16_fp32(raw, out);
  return out;
}

template <typename S>
inline HalfReg floats_to(const FloatReg& v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) return at::vec::cvtfp32_bf16(v);
  else return at::vec::cvtfp32_fp16(v);
}
#endif

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for float / half / bfloat16, double for double

template <typename T>
constexpr bool is_reduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// A whole vector: Vec::size() values, the compile-time count of the loads and stores below.
struct Whole {};

// for_each_vector(C, body) walks one row of C channels as body(c, Whole{}) for each whole vector
// and body(c, n) once for the n < Vec::size() channels left at the end, so a kernel writes its
// per-vector body once as a generic lambda and the whole vectors compile without tail checks.
template <typename acc_t, typename Body>
inline void for_each_vector(int64_t C, Body&& body) {
  constexpr int64_t V = at::vec::Vectorized<acc_t>::size();
  int64_t c = 0;
  for (; c + V <= C; c += V) body(c, Whole{});
  if (c < C) body(c, C - c);
}

// reduce_rows(r0, r1, C, sum0, sum1, body): two per-channel sums over rows [r0, r1) of a
// [rows, C] tensor, accumulated in registers. body(r, c, n, acc0, acc1) adds row r's channels
// [c, c + n) to the two accumulators (n is Whole{} or a count). Channels go in groups of
// kRegisterVectors whole vectors, each group over all the rows with its accumulators held in
// registers (no store-to-load chain from row to row); the vectors left over go over the rows
// one at a time, the last one possibly partial. sum0 / sum1 receive C sums each.
constexpr int kRegisterVectors = 4;

template <typename acc_t, typename Body>
inline void reduce_rows(int64_t r0, int64_t r1, int64_t C, acc_t* sum0, acc_t* sum1, Body&& body) {
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr int64_t V = Vec::size();
  int64_t c0 = 0;
  for (; c0 + kRegisterVectors * V <= C; c0 += kRegisterVectors * V) {
    Vec acc0[kRegisterVectors], acc1[kRegisterVectors];
    for (int j = 0; j < kRegisterVectors; ++j) acc0[j] = acc1[j] = Vec(acc_t(0));
    for (int64_t r = r0; r < r1; ++r) {
      for (int j = 0; j < kRegisterVectors; ++j) body(r, c0 + j * V, Whole{}, acc0[j], acc1[j]);
    }
    for (int j = 0; j < kRegisterVectors; ++j) {
      acc0[j].store(sum0 + c0 + j * V);
      acc1[j].store(sum1 + c0 + j * V);
    }
  }
  for (; c0 < C; c0 += V) {
    const int64_t n = std::min<int64_t>(V, C - c0);
    Vec acc0(acc_t(0)), acc1(acc_t(0));
    if (n == V) {
      for (int64_t r = r0; r < r1; ++r) body(r, c0, Whole{}, acc0, acc1);
    } else {
      for (int64_t r = r0; r < r1; ++r) body(r, c0, n, acc0, acc1);
    }
    acc0.store(sum0 + c0, static_cast<int>(n));
    acc1.store(sum1 + c0, static_cast<int>(n));
  }
}

// Values of type S at p as one Vectorized<acc_t>: a whole vector, or n < Vec::size() values with
// the lanes past n zero.
template <typename acc_t, typename S>
inline at::vec::Vectorized<acc_t> load(const S* p, Whole) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    return Vec::loadu(p);
  } else if constexpr (is_reduced<S> && std::is_same_v<acc_t, float>) {
#if defined(FUSED_PREACT_FLOAT_LANES)
    return Vec(floats_from<S>(load_half_reg(p)));
#else
    Vec out;
    at::vec::load_to_float<S>(p, out);
    return out;
#endif
  } else {
    acc_t buffer[Vec::size()];
    for (int64_t i = 0; i < Vec::size(); ++i) buffer[i] = static_cast<acc_t>(p[i]);
    return Vec::loadu(buffer);
  }
}

template <typename acc_t, typename S>
inline at::vec::Vectorized<acc_t> load(const S* p, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    return Vec::loadu(p, n);
  } else {
    acc_t buffer[Vec::size()] = {};
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(p[i]);
    return Vec::loadu(buffer);
  }
}

// Stores v at p as type S (rounded to nearest even for bfloat16 / float16): a whole vector, or
// its first n lanes.
template <typename S, typename acc_t>
inline void store(S* p, const at::vec::Vectorized<acc_t>& v, Whole) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    v.store(p);
  } else if constexpr (is_reduced<S> && std::is_same_v<acc_t, float>) {
#if defined(FUSED_PREACT_FLOAT_LANES)
    store_half_reg(p, floats_to<S>(v));
#else
    at::vec::convert_from_float<S>(v, v).store(p, Vec::size());
#endif
  } else {
    acc_t buffer[Vec::size()];
    v.store(buffer);
    for (int64_t i = 0; i < Vec::size(); ++i) p[i] = static_cast<S>(buffer[i]);
  }
}

template <typename S, typename acc_t>
inline void store(S* p, const at::vec::Vectorized<acc_t>& v, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    v.store(p, static_cast<int>(n));
  } else {
    acc_t buffer[Vec::size()];
    v.store(buffer);
    for (int64_t i = 0; i < n; ++i) p[i] = static_cast<S>(buffer[i]);
  }
}

// v rounded to the precision of storage type T, still as acc_t lanes.
template <typename T, typename acc_t>
inline at::vec::Vectorized<acc_t> round_to(const at::vec::Vectorized<acc_t>& v) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<T, acc_t>) {
    return v;
  } else if constexpr (is_reduced<T> && std::is_same_v<acc_t, float>) {
#if defined(FUSED_PREACT_FLOAT_LANES)
    return Vec(floats_from<T>(floats_to<T>(v)));
#else
    return std::get<0>(at::vec::convert_to_float<T>(at::vec::convert_from_float<T>(v, v)));
#endif
  } else {
    acc_t buffer[Vec::size()];
    v.store(buffer);
    for (int64_t i = 0; i < Vec::size(); ++i) buffer[i] = static_cast<acc_t>(static_cast<T>(buffer[i]));
    return Vec::loadu(buffer);
  }
}

// Per-channel float32 vector as acc_t values padded to a whole number of vectors (zeros past C),
// so kernels can load coefficients of channel c with Vec::loadu(data + c) for any c < C.
template <typename acc_t>
struct ChannelVector {
  explicit ChannelVector(int64_t channels)
      : data(static_cast<size_t>(channels + at::vec::Vectorized<acc_t>::size()), acc_t(0)) {}
  acc_t* ptr() { return data.data(); }
  const acc_t* ptr() const { return data.data(); }
  acc_t& operator[](int64_t c) { return data[static_cast<size_t>(c)]; }
  std::vector<acc_t> data;
};

}  // namespace cpu
}  // namespace fused_preact
