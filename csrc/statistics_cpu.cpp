// statistics_cpu.cpp -- the CPU kernels of the per-channel BatchNorm statistics of a fused unit:
//   channel_stats         partials (pmean, pm2, pcount) of x [rows, C], one read pass
//   conv_epilogue_cpu     y = round(conv_out (+ residual)) and the partials of y, one pass
//                         (conv_bnrelu's epilogue; conv_out is float32 for bfloat16 / float16 y)
//   bn_finalize           merge partials -> mean, invstd, scale, shift; running statistics
// Partials: block k holds rows [k * kRowsPerPartial, (k + 1) * kRowsPerPartial) of the NHWC
// tensor; the blocks run in parallel, each a Welford update per row on at::vec lanes in acc_t
// (fp32; fp64 for float64), one reciprocal per row shared by its channels. bn_finalize merges
// the blocks with Chan's formula in double, so a mean of 100 with std 0.01 keeps its variance.
// Running statistics follow nn.BatchNorm2d in training: running = (1 - f) running + f stat with
// the unbiased variance, f = momentum, or 1 / num_batches_tracked when momentum < 0.
// Saves nothing.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <cmath>

#include "cpu_vec.h"
#include "unit_ops.h"

namespace fused_preact {

using cpu::acc_type;

namespace {

// Partials of the values v = round_T(src (+ residual)); with `out` given they are stored there.
// Without `out`, S is T and src is read as is.
template <typename T, typename S, typename P>
void stats_kernel(const S* src, const T* residual, T* out, int64_t rows, int64_t C, P* pmean,
                  P* pm2, P* pcount) {
  using acc_t = acc_type<T>;
  using Vec = at::vec::Vectorized<acc_t>;
  const int64_t blocks = partial_count(rows);
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mean(C + Vec::size()), m2(C + Vec::size());
    for (int64_t k = begin; k < end; ++k) {
      std::fill(mean.begin(), mean.end(), acc_t(0));
      std::fill(m2.begin(), m2.end(), acc_t(0));
      const int64_t r0 = k * kRowsPerPartial, r1 = std::min(rows, r0 + kRowsPerPartial);
      for (int64_t r = r0; r < r1; ++r) {
        const Vec inv_n(acc_t(1) / static_cast<acc_t>(r - r0 + 1));
        const int64_t row = r * C;
        for (int64_t c = 0; c < C; c += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), C - c);
          Vec v = cpu::load<acc_t>(src + row + c, n);
          if (out != nullptr) {
            if (residual != nullptr) v = v + cpu::load<acc_t>(residual + row + c, n);
            v = cpu::round_to<T>(v);
            cpu::store(out + row + c, v, n);
          }
          const Vec mu = Vec::loadu(mean.data() + c);
          const Vec delta = v - mu;
          const Vec mu_new = at::vec::fmadd(delta, inv_n, mu);
          mu_new.store(mean.data() + c);
          at::vec::fmadd(delta, v - mu_new, Vec::loadu(m2.data() + c)).store(m2.data() + c);
        }
      }
      for (int64_t c = 0; c < C; ++c) {
        pmean[k * C + c] = static_cast<P>(mean[c]);
        pm2[k * C + c] = static_cast<P>(m2[c]);
      }
      pcount[k] = static_cast<P>(r1 - r0);
    }
  });
}

Tensor3 empty_partials(int64_t rows, int64_t C, const Tensor& like) {
  const auto options = like.options().dtype(stat_dtype(like.scalar_type()));
  const int64_t t = partial_count(rows);
  return {at::empty({t, C}, options), at::empty({t, C}, options), at::empty({t}, options)};
}

}  // namespace

Tensor3 channel_stats_cpu(const Tensor& x) {
  check_channel_stats_args(x);
  TORCH_CHECK(x.device().is_cpu(), "channel_stats: x must be a CPU tensor here, got ", x.device());
  const int64_t C = x.size(3), rows = x.numel() / C;
  auto [pmean, pm2, pcount] = empty_partials(rows, C, x);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "channel_stats_cpu", [&] {
    using stat_t = acc_type<scalar_t>;
    stats_kernel<scalar_t>(x.const_data_ptr<scalar_t>(), nullptr, nullptr, rows, C,
                           pmean.mutable_data_ptr<stat_t>(), pm2.mutable_data_ptr<stat_t>(),
                           pcount.mutable_data_ptr<stat_t>());
  });
  return {pmean, pm2, pcount};
}

Tensor4 conv_epilogue_cpu(const Tensor& conv_out, const OptionalTensor& residual,
                          at::ScalarType dtype, bool stats) {
  const int64_t C = conv_out.size(3), rows = conv_out.numel() / C;
  Tensor y = at::empty(conv_out.sizes(), conv_out.options().dtype(dtype));
  Tensor pmean, pm2, pcount;
  if (stats) {
    std::tie(pmean, pm2, pcount) = empty_partials(rows, C, y);
  } else {
    // three distinct empty tensors: an operator's outputs must not alias each other
    const auto options = conv_out.options().dtype(stat_dtype(dtype));
    pmean = at::empty({0}, options), pm2 = at::empty({0}, options), pcount = at::empty({0}, options);
  }
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
    const auto run = [&](const auto* src) { stats_kernel<scalar_t>(src, res, out, rows, C, m, v, n); };
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

Tensor4 bn_finalize_cpu(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                        const Tensor& weight, const Tensor& bias, const OptionalTensor& running_mean,
                        const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                        double momentum, double eps) {
  check_bn_finalize_args(pmean, pm2, pcount, weight, bias, running_mean, running_var,
                         num_batches_tracked, momentum);
  TORCH_CHECK(pmean.device().is_cpu(), "bn_finalize: pmean must be a CPU tensor here, got ",
              pmean.device());
  const int64_t T = pmean.size(0), C = pmean.size(1);
  const auto options = pmean.options().dtype(at::kDouble);  // results in double, then pmean's dtype
  Tensor mean = at::empty({C}, options), invstd = at::empty({C}, options);
  Tensor scale = at::empty({C}, options), shift = at::empty({C}, options);
  const Tensor w = weight.to(at::kDouble).contiguous(), b = bias.to(at::kDouble).contiguous();
  const Tensor pmean64 = pmean.to(at::kDouble), pm264 = pm2.to(at::kDouble);
  const Tensor pcount64 = pcount.to(at::kDouble);
  const double *pm = pmean64.const_data_ptr<double>(), *pv = pm264.const_data_ptr<double>();
  const double* pn = pcount64.const_data_ptr<double>();
  std::vector<double> batch_mean(C), unbiased_var(C);
  for (int64_t c = 0; c < C; ++c) {
    double mu = 0, m2 = 0, n = 0;
    for (int64_t t = 0; t < T; ++t) {  // Chan et al.'s merge; empty partials are skipped
      const double nb = pn[t];
      if (nb == 0) continue;
      const double delta = pm[t * C + c] - mu, total = n + nb;
      mu += delta * nb / total;
      m2 += pv[t * C + c] + delta * delta * n * nb / total;
      n = total;
    }
    const double istd = 1.0 / std::sqrt(m2 / n + eps);
    const double sc = w.const_data_ptr<double>()[c] * istd;
    mean.mutable_data_ptr<double>()[c] = mu;
    invstd.mutable_data_ptr<double>()[c] = istd;
    scale.mutable_data_ptr<double>()[c] = sc;
    shift.mutable_data_ptr<double>()[c] = b.const_data_ptr<double>()[c] - mu * sc;
    batch_mean[c] = mu;
    unbiased_var[c] = m2 / (n - 1);
  }
  if (running_mean.has_value()) {
    const double f = momentum >= 0
                         ? momentum
                         : 1.0 / num_batches_tracked->to(at::kDouble).item<double>();
    for (auto [running, stat] : {std::pair<const Tensor&, std::vector<double>&>{*running_mean, batch_mean},
                                 {*running_var, unbiased_var}}) {
      const Tensor old = running.to(at::kDouble).contiguous();
      for (int64_t c = 0; c < C; ++c) {
        stat[c] = (1 - f) * old.const_data_ptr<double>()[c] + f * stat[c];
      }
      running.copy_(at::from_blob(stat.data(), {C}, options));
    }
  }
  const at::ScalarType out = pmean.scalar_type();
  return {mean.to(out), invstd.to(out), scale.to(out), shift.to(out)};
}

}  // namespace fused_preact
