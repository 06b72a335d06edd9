// cpu_vec.h -- at::vec helpers shared by the CPU kernels of the fused unit operators.
//
// Every CPU kernel computes in `acc_t` (float for float32 / bfloat16 / float16 storage, double for
// float64) on at::vec::Vectorized<acc_t> lanes. These helpers load and store `n <= Vec::size()`
// values of any storage type as one such vector (a short tail goes through a small buffer, so one
// code path serves full vectors and the C % Vec::size() channels left over at the end of a row),
// and round a vector to the storage type's precision (bfloat16 / float16 temporaries held in fp32).
#pragma once

#include <ATen/OpMathType.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>
#include <vector>

namespace fused_preact {
namespace cpu {

#if defined(CPU_CAPABILITY_AVX2)
// 8 bfloat16 / float16 values <-> one __m256 of floats, without going through a 16-lane vector
// (at::vec's Vectorized<BFloat16> converts 16 lanes and stores 8 through a buffer).
template <typename S>
inline __m256 float8_from(const __m128i& raw) {
  __m256 out;
  if constexpr (std::is_same_v<S, c10::BFloat16>) at::vec::cvtbf16_fp32(raw, out);
  else at::vec::cvtfp16_fp32(raw, out);
  return out;
}

template <typename S>
inline __m128i float8_to(const __m256& v) {
  if constexpr (std::is_same_v<S, c10::BFloat16>) return at::vec::cvtfp32_bf16(v);
  else return at::vec::cvtfp32_fp16(v);
}
#endif

template <typename scalar_t>
using acc_type = at::opmath_type<scalar_t>;  // float for float / half / bfloat16, double for double

template <typename T>
constexpr bool is_reduced = std::is_same_v<T, c10::BFloat16> || std::is_same_v<T, c10::Half>;

// n values of type S at p (n <= Vec::size()) as one Vectorized<acc_t>; lanes past n are zero.
template <typename acc_t, typename S>
inline at::vec::Vectorized<acc_t> load(const S* p, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    return n == Vec::size() ? Vec::loadu(p) : Vec::loadu(p, n);
  } else {
    if constexpr (is_reduced<S> && std::is_same_v<acc_t, float>) {
      if (n == Vec::size()) {
#if defined(CPU_CAPABILITY_AVX2)
        return Vec(float8_from<S>(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
#else
        Vec out;
        at::vec::load_to_float<S>(p, out);
        return out;
#endif
      }
    }
    acc_t buffer[Vec::size()] = {};
    for (int64_t i = 0; i < n; ++i) buffer[i] = static_cast<acc_t>(p[i]);
    return Vec::loadu(buffer);
  }
}

// Stores the first n lanes of v at p as type S (rounded to nearest even for bfloat16 / float16).
template <typename S, typename acc_t>
inline void store(S* p, const at::vec::Vectorized<acc_t>& v, int64_t n) {
  using Vec = at::vec::Vectorized<acc_t>;
  if constexpr (std::is_same_v<S, acc_t>) {
    v.store(p, static_cast<int>(n));
  } else if constexpr (is_reduced<S> && std::is_same_v<acc_t, float>) {
#if defined(CPU_CAPABILITY_AVX2)
    if (n == Vec::size()) {
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p), float8_to<S>(v));
      return;
    }
#endif
    at::vec::convert_from_float<S>(v, v).store(p, static_cast<int>(n));
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
#if defined(CPU_CAPABILITY_AVX2)
    return Vec(float8_from<T>(float8_to<T>(v)));
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
