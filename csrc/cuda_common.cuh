// cuda_common.cuh -- what the CUDA kernels of the fused unit operators share
// (statistics_cuda.cu, elementwise_cuda.cu): the accumulation type, 16-byte packs of a row's
// channels, and the host-side checks, stream and dtype dispatch of their launchers.
#pragma once

#ifdef WITH_CUDA
#include <ATen/OpMathType.h>
#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <type_traits>

namespace fused_preact {
namespace cuda {

template <typename T>
using acc_type = at::opmath_type<T>;  // float for float / half / bfloat16, double for double

template <typename T>
constexpr bool is_reduced = std::is_same_v<T, c10::Half> || std::is_same_v<T, c10::BFloat16>;

// ---- device: V values of one row, loaded / stored as one 16-byte (or V-element) access ------
template <typename T, int V>
struct alignas(sizeof(T) * V) Pack {
  T v[V];
};

template <int V, typename T>
__device__ __forceinline__ Pack<T, V> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T, V>*>(p);
}

template <int V, typename T>
__device__ __forceinline__ void store_pack(T* p, const Pack<T, V>& v) {
  *reinterpret_cast<Pack<T, V>*>(p) = v;
}

// ---- host ----------------------------------------------------------------------------------
inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

inline bool aligned(const void* p, size_t bytes) {
  return p == nullptr || reinterpret_cast<uintptr_t>(p) % bytes == 0;
}

inline void check_cuda(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor here, got ", t.device());
}

inline cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

// Calls f(T{}) for activation dtype T.
template <typename F>
void dispatch_activation(at::ScalarType dtype, const char* op, const F& f) {
  switch (dtype) {
    case at::kFloat: return f(float{});
    case at::kDouble: return f(double{});
    case at::kHalf: return f(c10::Half{});
    case at::kBFloat16: return f(c10::BFloat16{});
    default:
      TORCH_CHECK_TYPE(false, op, ": unsupported dtype ", c10::toString(dtype));
  }
}

}  // namespace cuda
}  // namespace fused_preact
#endif  // WITH_CUDA
