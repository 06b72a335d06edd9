// elementwise_cpu.cpp -- the CPU kernels of the per-element passes of a fused unit, NHWC:
//   bn_relu_apply            out = relu(scale[c] * x + shift[c]) (+ residual)        forward
//   bn_add_relu              y = relu(scale[c] * h + shift[c] + s), s = residual or
//                            rscale[c] * residual + rshift[c]     (original unit's end) forward
//   bn_relu_prologue_cpu     the same without residual, rounded to x's dtype and stored as
//                            float32 when the conv runs in fp32 (bfloat16 / float16 on the CPU)
//   bn_relu_backward_reduce  g = (t + add) * !(scale[c] * h + shift[c] <= 0), and per channel
//                            sum_g = sum(g), sum_g_xhat = sum(g * (h - mean) * invstd)  backward
//   bn_add_relu_backward     the same reduction with the mask read from the saved output,
//                            g = dy * !(y <= 0), plus sum(g * xhat_s) of the shortcut's BN input
//                            (a second reduction over g and h_s)                       backward
//   bn_backward_finish       dh = A[c] * g + B[c] * (h - mean[c]) + D[c] (+ add)       backward
// Layout: contiguous [rows, C] (rows = N*H*W). Arithmetic in acc_t (fp32, fp64 for float64) on
// at::vec lanes, rows in parallel (at::parallel_for). The elementwise passes walk one row at a
// time; the reduction runs per block of kRowsPerPartial rows with its sums in registers
// (cpu::reduce_rows), then adds the blocks in double in a fixed order, sum_g_xhat as
// sum(g * (h - mean)) * invstd: reproducible whatever the thread count. Fuses each line above
// into one read of its inputs; saves nothing. NaN as torch: the ReLU keeps it (clamp_min), the masks
// !(v <= 0) pass the gradient where v is NaN (threshold_backward).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>

#include "cpu_vec.h"
#include "unit_ops.h"

namespace fused_preact {

using cpu::acc_type;
using cpu::ChannelVector;

namespace {

constexpr int64_t kGrainValues = 32768;  // values per parallel task, at least

int64_t row_grain(int64_t channels) { return std::max<int64_t>(1, kGrainValues / channels); }

// A per-channel tensor (any float dtype, C values) as acc_t values padded for vector loads.
template <typename acc_t>
ChannelVector<acc_t> channel_values(const Tensor& t) {
  const Tensor values = t.to(c10::CppTypeToScalarType<acc_t>::value).contiguous();
  const int64_t channels = values.numel();
  ChannelVector<acc_t> out(channels);
  std::copy_n(values.const_data_ptr<acc_t>(), channels, out.ptr());
  return out;
}

template <typename T>
const T* optional_data(const OptionalTensor& t) {
  return t.has_value() ? t->const_data_ptr<T>() : nullptr;
}

// Where apply_kernel adds its residual.
enum class Residual {
  kNone,           // out = relu(scale * x + shift)
  kAfterRelu,      // out = relu(scale * x + shift) + residual             (bn_relu_apply)
  kBeforeRelu,     // out = relu(scale * x + shift + residual)             (bn_add_relu)
  kBnBeforeRelu,   // out = relu(scale * x + shift + rscale * residual + rshift)
};

// out as above, rounded to T, stored as O (T, or float holding T-rounded values). rscale_t /
// rshift_t: the residual's BN (kBnBeforeRelu only).
template <typename T, typename O, Residual kResidual>
void apply_kernel(const T* x, const T* residual, O* out, const Tensor& scale_t,
                  const Tensor& shift_t, int64_t rows, int64_t C,
                  const Tensor* rscale_t = nullptr, const Tensor* rshift_t = nullptr) {
  using acc_t = acc_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool kBn = kResidual == Residual::kBnBeforeRelu;
  const ChannelVector<acc_t> scale_values = channel_values<acc_t>(scale_t);
  const ChannelVector<acc_t> shift_values = channel_values<acc_t>(shift_t);
  const ChannelVector<acc_t> rscale_values = kBn ? channel_values<acc_t>(*rscale_t) : ChannelVector<acc_t>(0);
  const ChannelVector<acc_t> rshift_values = kBn ? channel_values<acc_t>(*rshift_t) : ChannelVector<acc_t>(0);
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    // Locals, not captures: the stores below may alias any memory, and would make the compiler
    // reload captured pointers for every vector.
    const acc_t* const scale = scale_values.ptr();
    const acc_t* const shift = shift_values.ptr();
    const acc_t* const rscale = rscale_values.ptr();
    const acc_t* const rshift = rshift_values.ptr();
    const int64_t channels = C;
    for (int64_t r = begin; r < end; ++r) {
      const T* x_row = x + r * channels;
      const T* residual_row = residual + (kResidual != Residual::kNone ? r * channels : 0);
      O* out_row = out + r * channels;
      cpu::for_each_vector<acc_t>(channels, [&](int64_t c, auto n) {
        Vec a = at::vec::fmadd(cpu::load<acc_t>(x_row + c, n), Vec::loadu(scale + c), Vec::loadu(shift + c));
        if constexpr (kResidual == Residual::kBeforeRelu) a = a + cpu::load<acc_t>(residual_row + c, n);
        if constexpr (kBn) {
          a = a + at::vec::fmadd(cpu::load<acc_t>(residual_row + c, n), Vec::loadu(rscale + c),
                                 Vec::loadu(rshift + c));
        }
        a = at::vec::clamp_min(a, Vec(acc_t(0)));   // clamp_min keeps a NaN, as torch.relu does
        if constexpr (kResidual == Residual::kAfterRelu) a = a + cpu::load<acc_t>(residual_row + c, n);
        if constexpr (!std::is_same_v<O, T>) a = cpu::round_to<T>(a);
        cpu::store(out_row + c, a, n);
      });
    }
  });
}

template <typename T, typename O>
void apply(const T* x, const T* residual, O* out, const Tensor& scale, const Tensor& shift,
           int64_t rows, int64_t C) {
  if (residual != nullptr) apply_kernel<T, O, Residual::kAfterRelu>(x, residual, out, scale, shift, rows, C);
  else apply_kernel<T, O, Residual::kNone>(x, nullptr, out, scale, shift, rows, C);
}

// dh = A * g + B * (h - mean) + D (+ add): A = weight * invstd, and with batch statistics
// B = -A * invstd * sum_g_xhat / count, D = -A * sum_g / count (B = D = 0 in eval).
template <typename T, bool kBatchStats, bool kAdd>
void finish_kernel(const T* g, const T* h, const T* add, T* dh, const Tensor& mean_t,
                   const Tensor& invstd_t, const Tensor& weight_t, const Tensor& sum_g_t,
                   const Tensor& sum_g_xhat_t, double count, int64_t rows, int64_t C) {
  using acc_t = acc_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  ChannelVector<acc_t> a_values = channel_values<acc_t>(weight_t), b_values(C), d_values(C), mean_values(C);
  const ChannelVector<acc_t> invstd = channel_values<acc_t>(invstd_t);
  for (int64_t c = 0; c < C; ++c) a_values[c] *= invstd.data[c];
  if constexpr (kBatchStats) {
    mean_values = channel_values<acc_t>(mean_t);
    const ChannelVector<acc_t> sum_g = channel_values<acc_t>(sum_g_t);
    const ChannelVector<acc_t> sum_g_xhat = channel_values<acc_t>(sum_g_xhat_t);
    const acc_t inv_count = static_cast<acc_t>(1.0 / count);
    for (int64_t c = 0; c < C; ++c) {
      b_values[c] = -a_values[c] * invstd.data[c] * sum_g_xhat.data[c] * inv_count;
      d_values[c] = -a_values[c] * sum_g.data[c] * inv_count;
    }
  }
  at::parallel_for(0, rows, row_grain(C), [&](int64_t begin, int64_t end) {
    const acc_t *const a = a_values.ptr(), *const b = b_values.ptr(), *const d = d_values.ptr();
    const acc_t* const mean = mean_values.ptr();  // locals: see apply
    const int64_t channels = C;
    for (int64_t r = begin; r < end; ++r) {
      const T* g_row = g + r * channels;
      const T* h_row = h + (kBatchStats ? r * channels : 0);
      const T* add_row = add + (kAdd ? r * channels : 0);
      T* dh_row = dh + r * channels;
      cpu::for_each_vector<acc_t>(channels, [&](int64_t c, auto n) {
        Vec out = cpu::load<acc_t>(g_row + c, n) * Vec::loadu(a + c);
        if constexpr (kBatchStats) {
          const Vec centered = cpu::load<acc_t>(h_row + c, n) - Vec::loadu(mean + c);
          out = at::vec::fmadd(centered, Vec::loadu(b + c), out + Vec::loadu(d + c));
        }
        if constexpr (kAdd) out = out + cpu::load<acc_t>(add_row + c, n);
        cpu::store(dh_row + c, out, n);
      });
    }
  });
}

// Where backward_reduce_kernel takes its ReLU mask from.
enum class Mask {
  kPreactivation,  // !(scale * h + shift <= 0): recomputed from the ReLU's input (conv_dgrad)
  kOutput,         // !(y <= 0): read from the ReLU's saved output (bn_add_relu_backward)
};

// g = (t + add) * mask stored as T (unless g is null); per channel sum(g) and
// sum(g * (h - mean)) * invstd (of g before rounding) into sum_g / sum_g_xhat (acc_t).
// kOutput takes y instead of scale / shift (undefined tensors then).
template <typename T, typename S, bool kAdd, Mask kMask = Mask::kPreactivation>
void backward_reduce_kernel(const S* t, const T* add, const T* h, T* g, const Tensor& scale_t,
                            const Tensor& shift_t, const Tensor& mean_t, const Tensor& invstd_t,
                            int64_t rows, int64_t C, acc_type<T>* sum_g_out,
                            acc_type<T>* sum_g_xhat_out, const T* y = nullptr) {
  using acc_t = acc_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  constexpr bool kRecompute = kMask == Mask::kPreactivation;
  const ChannelVector<acc_t> scale_values = kRecompute ? channel_values<acc_t>(scale_t) : ChannelVector<acc_t>(0);
  const ChannelVector<acc_t> shift_values = kRecompute ? channel_values<acc_t>(shift_t) : ChannelVector<acc_t>(0);
  const ChannelVector<acc_t> mean_values = channel_values<acc_t>(mean_t);
  const ChannelVector<acc_t> invstd = channel_values<acc_t>(invstd_t);
  const int64_t blocks = partial_count(rows);
  std::vector<acc_t> block_sum_g(blocks * C), block_sum_gc(blocks * C);  // sum(g), sum(g * (h - mean))
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    const acc_t *const scale = scale_values.ptr(), *const shift = shift_values.ptr();  // locals: see apply
    const acc_t* const mean = mean_values.ptr();
    const S* const t_data = t;
    const T *const add_data = add, *const h_data = h, *const y_data = y;
    T* const g_data = g;
    const int64_t channels = C;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * kRowsPerPartial, r1 = std::min(rows, r0 + kRowsPerPartial);
      cpu::reduce_rows<acc_t>(r0, r1, channels, block_sum_g.data() + k * channels,
                              block_sum_gc.data() + k * channels,
                              [&](int64_t r, int64_t c, auto n, Vec& sum_g, Vec& sum_gc) {
        const int64_t i = r * channels + c;
        Vec grad = cpu::load<acc_t>(t_data + i, n);
        if constexpr (kAdd) grad = grad + cpu::load<acc_t>(add_data + i, n);
        const Vec hv = cpu::load<acc_t>(h_data + i, n);
        // The mask as torch's threshold_backward: zero where the ReLU's input (or output) is <= 0,
        // the gradient elsewhere, so a NaN passes it, as in eager.
        const Vec zero(acc_t(0));
        if constexpr (kRecompute) {
          const Vec pre = at::vec::fmadd(hv, Vec::loadu(scale + c), Vec::loadu(shift + c));
          grad = Vec::blendv(grad, zero, pre <= zero);
        } else {
          grad = Vec::blendv(grad, zero, cpu::load<acc_t>(y_data + i, n) <= zero);
        }
        if (g_data != nullptr) cpu::store(g_data + i, grad, n);
        sum_g = sum_g + grad;
        sum_gc = at::vec::fmadd(grad, hv - Vec::loadu(mean + c), sum_gc);
      });
    }
  });
  for (int64_t c = 0; c < C; ++c) {
    double total_g = 0, total_gc = 0;
    for (int64_t k = 0; k < blocks; ++k) {
      total_g += static_cast<double>(block_sum_g[k * C + c]);
      total_gc += static_cast<double>(block_sum_gc[k * C + c]);
    }
    sum_g_out[c] = static_cast<acc_t>(total_g);
    sum_g_xhat_out[c] = static_cast<acc_t>(total_gc * static_cast<double>(invstd.data[c]));
  }
}

void check_cpu(const char* op, const char* name, const Tensor& t) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, " must be a CPU tensor here, got ", t.device());
}

}  // namespace

Tensor bn_relu_apply_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                         const OptionalTensor& residual) {
  check_bn_relu_apply_args(x, scale, shift, residual);
  check_cpu("bn_relu_apply", "x", x);
  Tensor out = at::empty_like(x);
  const int64_t C = x.size(3), rows = x.numel() / C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_apply_cpu", [&] {
    apply<scalar_t, scalar_t>(x.const_data_ptr<scalar_t>(), optional_data<scalar_t>(residual),
                              out.mutable_data_ptr<scalar_t>(), scale, shift, rows, C);
  });
  return out;
}

Tensor bn_relu_prologue_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                            at::ScalarType out_dtype) {
  Tensor out = at::empty(x.sizes(), x.options().dtype(out_dtype));
  const int64_t C = x.size(3), rows = x.numel() / C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "bn_relu_prologue_cpu", [&] {
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    if (out_dtype == x.scalar_type()) {
      apply<scalar_t, scalar_t>(data, nullptr, out.mutable_data_ptr<scalar_t>(), scale, shift, rows, C);
    } else if constexpr (cpu::is_reduced<scalar_t>) {
      TORCH_CHECK(out_dtype == at::kFloat, "bn_relu_prologue_cpu: out_dtype must be x's or float32");
      apply<scalar_t, float>(data, nullptr, out.mutable_data_ptr<float>(), scale, shift, rows, C);
    } else {
      TORCH_CHECK(false, "bn_relu_prologue_cpu: out_dtype must be x's dtype for ", x.scalar_type());
    }
  });
  return out;
}

Tensor bn_backward_finish_cpu(const Tensor& g, const Tensor& h, const Tensor& mean,
                              const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                              const Tensor& sum_g_xhat, double count, const OptionalTensor& add,
                              bool batch_stats) {
  check_bn_backward_finish_args(g, h, mean, invstd, weight, sum_g, sum_g_xhat, add, batch_stats);
  check_cpu("bn_backward_finish", "g", g);
  TORCH_CHECK(!batch_stats || count > 0, "bn_backward_finish: count must be positive, got ", count);
  Tensor dh = at::empty_like(g);
  const int64_t C = g.size(3), rows = g.numel() / C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "bn_backward_finish_cpu", [&] {
    const scalar_t* g_data = g.const_data_ptr<scalar_t>();
    const scalar_t* h_data = batch_stats ? h.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* add_data = optional_data<scalar_t>(add);
    scalar_t* dh_data = dh.mutable_data_ptr<scalar_t>();
    const auto run = [&](auto batch_stats_flag, auto add_flag) {
      finish_kernel<scalar_t, decltype(batch_stats_flag)::value, decltype(add_flag)::value>(
          g_data, h_data, add_data, dh_data, mean, invstd, weight, sum_g, sum_g_xhat, count, rows, C);
    };
    if (batch_stats) {
      add_data ? run(std::true_type{}, std::true_type{}) : run(std::true_type{}, std::false_type{});
    } else {
      add_data ? run(std::false_type{}, std::true_type{}) : run(std::false_type{}, std::false_type{});
    }
  });
  return dh;
}

Tensor3 dgrad_epilogue_cpu(const Tensor& conv_out, const OptionalTensor& add, const Tensor& h,
                           const Tensor& scale, const Tensor& shift, const Tensor& mean,
                           const Tensor& invstd, at::ScalarType dtype) {
  const int64_t C = h.size(3), rows = h.numel() / C;
  Tensor g = at::empty_like(h);
  const auto options = h.options().dtype(stat_dtype(dtype));
  Tensor sum_g = at::empty({C}, options), sum_g_xhat = at::empty({C}, options);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dgrad_epilogue_cpu", [&] {
    const scalar_t* add_data = optional_data<scalar_t>(add);
    const auto run = [&](const auto* t) {
      using S = std::remove_cv_t<std::remove_pointer_t<decltype(t)>>;
      const auto kernel = add_data ? backward_reduce_kernel<scalar_t, S, true>
                                   : backward_reduce_kernel<scalar_t, S, false>;
      kernel(t, add_data, h.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(), scale, shift,
             mean, invstd, rows, C, sum_g.mutable_data_ptr<acc_type<scalar_t>>(),
             sum_g_xhat.mutable_data_ptr<acc_type<scalar_t>>(), /*y=*/nullptr);
    };
    if (conv_out.scalar_type() == dtype) {
      run(conv_out.const_data_ptr<scalar_t>());
    } else if constexpr (cpu::is_reduced<scalar_t>) {
      TORCH_CHECK(conv_out.scalar_type() == at::kFloat, "dgrad_epilogue_cpu: conv_out must be ",
                  "in g's dtype or float32");
      run(conv_out.const_data_ptr<float>());
    } else {
      TORCH_CHECK(false, "dgrad_epilogue_cpu: conv_out must be in g's dtype ", dtype);
    }
  });
  return {g, sum_g, sum_g_xhat};
}

Tensor3 bn_relu_backward_reduce_cpu(const Tensor& t, const Tensor& h, const Tensor& scale,
                                    const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                    const OptionalTensor& add) {
  check_bn_relu_backward_reduce_args(t, h, scale, shift, mean, invstd, add);
  check_cpu("bn_relu_backward_reduce", "t", t);
  return dgrad_epilogue_cpu(t, add, h, scale, shift, mean, invstd, t.scalar_type());
}

Tensor bn_add_relu_cpu(const Tensor& h, const Tensor& scale, const Tensor& shift,
                       const Tensor& residual, const OptionalTensor& residual_scale,
                       const OptionalTensor& residual_shift) {
  check_bn_add_relu_args(h, scale, shift, residual, residual_scale, residual_shift);
  check_cpu("bn_add_relu", "h", h);
  Tensor y = at::empty_like(h);
  const int64_t C = h.size(3), rows = h.numel() / C;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "bn_add_relu_cpu", [&] {
    const scalar_t* h_data = h.const_data_ptr<scalar_t>();
    const scalar_t* r_data = residual.const_data_ptr<scalar_t>();
    scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
    if (residual_scale.has_value()) {
      apply_kernel<scalar_t, scalar_t, Residual::kBnBeforeRelu>(h_data, r_data, y_data, scale, shift, rows, C,
                                                                &*residual_scale, &*residual_shift);
    } else {
      apply_kernel<scalar_t, scalar_t, Residual::kBeforeRelu>(h_data, r_data, y_data, scale, shift, rows, C);
    }
  });
  return y;
}

Tensor4 bn_add_relu_backward_cpu(const Tensor& dy, const Tensor& y, const Tensor& h,
                                 const Tensor& mean, const Tensor& invstd,
                                 const OptionalTensor& residual, const OptionalTensor& residual_mean,
                                 const OptionalTensor& residual_invstd) {
  check_bn_add_relu_backward_args(dy, y, h, mean, invstd, residual, residual_mean, residual_invstd);
  check_cpu("bn_add_relu_backward", "dy", dy);
  const int64_t C = dy.size(3), rows = dy.numel() / C;
  Tensor g = at::empty_like(dy);
  const auto options = dy.options().dtype(stat_dtype(dy.scalar_type()));
  Tensor sum_g = at::empty({C}, options), sum_g_xhat = at::empty({C}, options);
  Tensor residual_sum_g_xhat = at::empty({residual.has_value() ? C : 0}, options);
  const Tensor none;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dy.scalar_type(), "bn_add_relu_backward_cpu", [&] {
    using acc_t = acc_type<scalar_t>;
    const scalar_t* y_data = y.const_data_ptr<scalar_t>();
    backward_reduce_kernel<scalar_t, scalar_t, false, Mask::kOutput>(
        dy.const_data_ptr<scalar_t>(), nullptr, h.const_data_ptr<scalar_t>(), g.mutable_data_ptr<scalar_t>(),
        none, none, mean, invstd, rows, C, sum_g.mutable_data_ptr<acc_t>(),
        sum_g_xhat.mutable_data_ptr<acc_t>(), y_data);
    if (residual.has_value()) {  // the shortcut BN's sum over the masked g (sum(g) is the same)
      std::vector<acc_t> unused(static_cast<size_t>(C));
      backward_reduce_kernel<scalar_t, scalar_t, false, Mask::kOutput>(
          g.const_data_ptr<scalar_t>(), nullptr, residual->const_data_ptr<scalar_t>(), nullptr, none, none,
          *residual_mean, *residual_invstd, rows, C, unused.data(),
          residual_sum_g_xhat.mutable_data_ptr<acc_t>(), y_data);
    }
  });
  return {g, sum_g, sum_g_xhat, residual_sum_g_xhat};
}

}  // namespace fused_preact
