// statistics_cpu.cpp -- the CPU kernels of the per-channel BatchNorm statistics of a fused unit:
//   channel_stats         partials (pmean, pm2, pcount) of x [rows, C], one read pass
//   conv_epilogue_cpu     y = round(conv_out (+ residual)) and the partials of y, one pass
//                         (conv_bnrelu's epilogue; conv_out is float32 for bfloat16 / float16 y)
//   bn_finalize           merge partials -> mean, invstd, scale, shift; running statistics
// Partials: block k holds rows [k * kRowsPerPartial, (k + 1) * kRowsPerPartial) of the NHWC
// tensor; the blocks run in parallel, each summing its values shifted by the block's first row,
// and their squares, on at::vec lanes held in registers, in acc_t (fp32; fp64 for float64), then
// turning the sums into the block's mean and M2 in double. bn_finalize merges
// the blocks with Chan's formula in double, so a mean of 100 with std 0.01 keeps its variance.
// Running statistics follow nn.BatchNorm2d in training: running = (1 - f) running + f stat with
// the unbiased variance, f = momentum, or 1 / num_batches_tracked when momentum < 0.
// Saves nothing.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <cmath>

#include "cpu_vec.h"
#include "unit_ops.h"

namespace fused_preact {

using cpu::acc_type;

namespace {

// Partials of the values v = round_T(src (+ residual)), stored in `out` when kStore. Without
// kStore, S is T and src is read as is. Each block sums d = v - k and d * d per channel, k being
// the block's first row: mean = k + sum(d) / n and M2 = sum(d * d) - sum(d)^2 / n. Shifting by a
// value of the data keeps the sums near n * var, so a mean of 100 with std 0.01 does not cancel.
template <typename T, typename S, typename P, bool kStore, bool kResidual>
void stats_kernel(const S* src, const T* residual, T* out, int64_t rows, int64_t C, P* pmean,
                  P* pm2, P* pcount) {
  using acc_t = acc_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  const auto value = [&](int64_t i) {  // one v, as the vector code computes it
    acc_t v = static_cast<acc_t>(src[i]);
    if constexpr (kStore) {
      if constexpr (kResidual) v += static_cast<acc_t>(residual[i]);
      v = static_cast<acc_t>(static_cast<T>(v));
    }
    return v;
  };
  const int64_t blocks = partial_count(rows);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    cpu::ChannelVector<acc_t> first_row_values(C);
    std::vector<acc_t> sum_d(C), sum_dd(C);
    // Locals, not captures: the stores below may alias any memory, and would make the compiler
    // reload captured pointers for every vector.
    acc_t* const first_row = first_row_values.ptr();
    const S* const src_data = src;
    const T* const residual_data = residual;
    T* const out_data = out;
    const int64_t channels = C;
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * kRowsPerPartial, r1 = std::min(rows, r0 + kRowsPerPartial);
      for (int64_t c = 0; c < channels; ++c) first_row[c] = value(r0 * channels + c);
      cpu::reduce_rows<acc_t>(r0, r1, channels, sum_d.data(), sum_dd.data(),
                              [&](int64_t r, int64_t c, auto n, Vec& s, Vec& ss) {
        const int64_t i = r * channels + c;
        Vec v = cpu::load<acc_t>(src_data + i, n);
        if constexpr (kStore) {
          if constexpr (kResidual) v = v + cpu::load<acc_t>(residual_data + i, n);
          v = cpu::round_to<T>(v);
          cpu::store(out_data + i, v, n);
        }
        const Vec d = v - Vec::loadu(first_row + c);
        s = s + d;
        ss = at::vec::fmadd(d, d, ss);
      });
      const double count = static_cast<double>(r1 - r0);
      for (int64_t c = 0; c < C; ++c) {
        const double s = sum_d[c], ss = sum_dd[c];
        pmean[k * C + c] = static_cast<P>(first_row[c] + s / count);
        pm2[k * C + c] = static_cast<P>(std::max(ss - s * s / count, 0.0));
      }
      pcount[k] = static_cast<P>(count);
    }
  });
}

}  // namespace

Tensor3 channel_stats_cpu(const Tensor& x) {
  check_channel_stats_args(x);
  TORCH_CHECK(x.device().is_cpu(), "channel_stats: x must be a CPU tensor here, got ", x.device());
  const int64_t C = x.size(3), rows = x.numel() / C;
  auto [pmean, pm2, pcount] = empty_partials_of(x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu", [&] {
    using stat_t = acc_type<scalar_t>;
    stats_kernel<scalar_t, scalar_t, stat_t, false, false>(
        x.const_data_ptr<scalar_t>(), nullptr, nullptr, rows, C, pmean.mutable_data_ptr<stat_t>(),
        pm2.mutable_data_ptr<stat_t>(), pcount.mutable_data_ptr<stat_t>());
  });
  return {pmean, pm2, pcount};
}

Tensor4 conv_epilogue_cpu(const Tensor& conv_out, const OptionalTensor& residual,
                          at::ScalarType dtype, bool stats) {
  const int64_t C = conv_out.size(3), rows = conv_out.numel() / C;
  Tensor y = at::empty(conv_out.sizes(), conv_out.options().dtype(dtype));
  Tensor pmean, pm2, pcount;
  std::tie(pmean, pm2, pcount) =
      stats ? empty_partials_of(y) : Tensor3{empty_statistic(y), empty_statistic(y), empty_statistic(y)};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "conv_epilogue_cpu", [&] {
    const scalar_t* res = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    scalar_t* out = y.mutable_data_ptr<scalar_t>();
    // Without statistics the partials go to a scratch block the size of one partial row set.
    using stat_t = acc_type<scalar_t>;
    std::vector<stat_t> scratch;
    stat_t *m = nullptr, *v = nullptr, *n = nullptr;
    if (stats) {
      m = pmean.mutable_data_ptr<stat_t>(), v = pm2.mutable_data_ptr<stat_t>();
      n = pcount.mutable_data_ptr<stat_t>();
    } else {
      const int64_t t = partial_count(rows);
      scratch.resize(static_cast<size_t>(t * (2 * C + 1)));
      m = scratch.data(), v = m + t * C, n = v + t * C;
    }
    const auto run = [&](const auto* src) {
      using S = std::remove_cv_t<std::remove_pointer_t<decltype(src)>>;
      const auto kernel = res ? stats_kernel<scalar_t, S, stat_t, true, true>
                              : stats_kernel<scalar_t, S, stat_t, true, false>;
      kernel(src, res, out, rows, C, m, v, n);
    };
    if (conv_out.scalar_type() == dtype) {
      run(conv_out.const_data_ptr<scalar_t>());
    } else if constexpr (cpu::is_reduced<scalar_t>) {
      TORCH_CHECK(conv_out.scalar_type() == at::kFloat, "conv_epilogue_cpu: conv_out must be in y's "
                  "dtype or float32");
      run(conv_out.const_data_ptr<float>());
    } else {
      TORCH_CHECK(false, "conv_epilogue_cpu: conv_out must be in y's dtype ", dtype);
    }
  });
  return {y, pmean, pm2, pcount};
}

namespace {

// A per-channel tensor of any floating dtype (C values, maybe strided) as doubles.
std::vector<double> channel_doubles(const Tensor& t) {
  const Tensor values = t.contiguous();
  std::vector<double> out(static_cast<size_t>(values.numel()));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, values.scalar_type(), "channel_doubles", [&] {
    const scalar_t* data = values.const_data_ptr<scalar_t>();
    for (size_t c = 0; c < out.size(); ++c) out[c] = static_cast<double>(data[c]);
  });
  return out;
}

// running = (1 - f) * running + f * stat, in place, in running's dtype.
void update_running(const Tensor& running, const std::vector<double>& stat, double f) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, running.scalar_type(), "update_running", [&] {
    scalar_t* data = running.mutable_data_ptr<scalar_t>();
    for (size_t c = 0; c < stat.size(); ++c) {
      data[c] = static_cast<scalar_t>((1 - f) * static_cast<double>(data[c]) + f * stat[c]);
    }
  });
}

}  // namespace

Tensor4 bn_finalize_cpu(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                        const Tensor& weight, const Tensor& bias, const OptionalTensor& running_mean,
                        const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                        double momentum, double eps) {
  check_bn_finalize_args(pmean, pm2, pcount, weight, bias, running_mean, running_var,
                         num_batches_tracked, momentum);
  TORCH_CHECK(pmean.device().is_cpu(), "bn_finalize: pmean must be a CPU tensor here, got ",
              pmean.device());
  const int64_t T = pmean.size(0), C = pmean.size(1);
  Tensor mean = at::empty({C}, pmean.options()), invstd = at::empty({C}, pmean.options());
  Tensor scale = at::empty({C}, pmean.options()), shift = at::empty({C}, pmean.options());
  const std::vector<double> w = channel_doubles(weight), b = channel_doubles(bias);
  std::vector<double> batch_mean(C), unbiased_var(C);
  AT_DISPATCH_FLOATING_TYPES(pmean.scalar_type(), "bn_finalize_cpu", [&] {
    const scalar_t *pm = pmean.const_data_ptr<scalar_t>(), *pv = pm2.const_data_ptr<scalar_t>();
    const scalar_t* pn = pcount.const_data_ptr<scalar_t>();
    scalar_t *mean_out = mean.mutable_data_ptr<scalar_t>(), *invstd_out = invstd.mutable_data_ptr<scalar_t>();
    scalar_t *scale_out = scale.mutable_data_ptr<scalar_t>(), *shift_out = shift.mutable_data_ptr<scalar_t>();
    std::vector<double> mu(C, 0.0), m2(C, 0.0);
    double n = 0;
    for (int64_t t = 0; t < T; ++t) {  // Chan et al.'s merge, in double; empty partials are skipped
      const double nb = static_cast<double>(pn[t]);
      if (nb == 0) continue;
      const double total = n + nb;
      for (int64_t c = 0; c < C; ++c) {
        const double delta = static_cast<double>(pm[t * C + c]) - mu[c];
        mu[c] += delta * nb / total;
        m2[c] += static_cast<double>(pv[t * C + c]) + delta * delta * n * nb / total;
      }
      n = total;
    }
    for (int64_t c = 0; c < C; ++c) {
      const double istd = 1.0 / std::sqrt(m2[c] / n + eps);
      const double sc = w[c] * istd;
      mean_out[c] = static_cast<scalar_t>(mu[c]);
      invstd_out[c] = static_cast<scalar_t>(istd);
      scale_out[c] = static_cast<scalar_t>(sc);
      shift_out[c] = static_cast<scalar_t>(b[c] - mu[c] * sc);
      batch_mean[c] = mu[c];
      unbiased_var[c] = m2[c] / (n - 1);
    }
  });
  if (running_mean.has_value()) {
    const double f = momentum >= 0
                         ? momentum
                         : 1.0 / num_batches_tracked->to(at::kDouble).item<double>();
    update_running(*running_mean, batch_mean, f);
    update_running(*running_var, unbiased_var, f);
  }
  return {mean, invstd, scale, shift};
}

}  // namespace fused_preact
