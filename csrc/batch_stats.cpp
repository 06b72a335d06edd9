// batch_stats.cpp -- per-channel mean and biased variance of a 4-D activation: input checks,
// the CPU kernel, the Meta (shape-only) kernel and the tensor-level CUDA entry.
//
// Computes, for x of shape (N, C, H, W) and M = N * H * W,
//     mean_c = (1/M) sum_{n,h,w} x[n,c,h,w]      var_c = (1/M) sum_{n,h,w} (x[n,c,h,w] - mean_c)^2
// i.e. the statistics BatchNorm2d normalizes with in training (biased variance).
// Layout: contiguous NCHW or channels_last (NHWC); channels_last is the fast path.
// Fuses: mean and variance into one read of x. Each chunk of rows runs Welford's update and the
// chunks are combined with Chan's parallel merge, so a large mean (say 100 with std 0.01) does not
// cancel the variance as E[x^2] - E[x]^2 would. The CPU kernel accumulates in double.
// Saves nothing.
#include "batch_stats.h"

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

#ifdef WITH_CUDA
#include "batch_stats_cuda.h"
#endif

#include <algorithm>
#include <type_traits>
#include <vector>

namespace fused_preact {

void check_batch_stats_input(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 4, "batch_stats: x must be a 4-D tensor (N, C, H, W), got ", x.dim(),
              "-D");
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              "batch_stats: x must be float32, float64, float16 or bfloat16, got ",
              c10::getDtypeNames(dtype).first);
  TORCH_CHECK(x.sym_size(0) * x.sym_size(2) * x.sym_size(3) != 0,
              "batch_stats: x has an empty batch (N*H*W == 0), shape ", x.sym_sizes());
  TORCH_CHECK(x.is_contiguous() || x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "batch_stats: x must be contiguous in NCHW or channels_last memory format, got "
              "shape ", x.sym_sizes(), " and strides ", x.sym_strides());
}

at::ScalarType batch_stats_dtype(at::ScalarType input) {
  return input == at::kDouble ? at::kDouble : at::kFloat;
}

namespace {

// Chunking depends on the shape only, never on the thread count: results are reproducible.
constexpr int64_t kMaxChunks = 64;      // channels_last: at most this many row chunks
constexpr int64_t kMinChunkRows = 256;  // ... of at least this many rows
constexpr int64_t kPlaneLanes = 8;      // NCHW: Welford lanes across one H*W plane
constexpr int64_t kGrainValues = 32768; // NCHW: values per parallel task, at least

struct Stats {
  double mean = 0.0;
  double m2 = 0.0;  // sum of squared deviations from mean
  int64_t n = 0;
};

// Chan et al.'s merge of two disjoint sets' statistics; an empty b leaves a unchanged.
inline void merge(Stats& a, const Stats& b) {
  const int64_t n = a.n + b.n;
  if (b.n == 0) return;
  const double delta = b.mean - a.mean;
  const double wb = static_cast<double>(b.n) / static_cast<double>(n);
  a.mean += delta * wb;
  a.m2 += b.m2 + delta * delta * static_cast<double>(a.n) * wb;
  a.n = n;
}

// Welford over `rows` contiguous rows of `width` values; column j accumulates into mean[j] and
// m2[j], which already hold `n0` values each. All columns share the count, so 1/n is one scalar
// per row and the inner loop vectorizes.
template <typename scalar_t>
void welford_rows(const scalar_t* x, int64_t rows, int64_t width, int64_t n0, double* mean,
                  double* m2) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* row = x + r * width;
    const double inv_n = 1.0 / static_cast<double>(n0 + r + 1);
    for (int64_t j = 0; j < width; ++j) {
      const double v = static_cast<double>(row[j]);
      const double d = v - mean[j];
      mean[j] += d * inv_n;
      m2[j] += d * (v - mean[j]);
    }
  }
}

// channels_last: x is (rows = N*H*W, C). Chunks of rows in parallel, then merge per channel.
template <typename scalar_t>
std::vector<Stats> stats_channels_last(const scalar_t* x, int64_t rows, int64_t C) {
  const int64_t chunk_rows = std::max((rows + kMaxChunks - 1) / kMaxChunks, kMinChunkRows);
  const int64_t chunks = (rows + chunk_rows - 1) / chunk_rows;
  std::vector<double> mean(chunks * C, 0.0), m2(chunks * C, 0.0);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t k = begin; k < end; ++k) {
      const int64_t r0 = k * chunk_rows;
      welford_rows(x + r0 * C, std::min(chunk_rows, rows - r0), C, 0, &mean[k * C], &m2[k * C]);
    }
  });
  std::vector<Stats> out(C);
  for (int64_t k = 0; k < chunks; ++k) {
    const int64_t n = std::min(chunk_rows, rows - k * chunk_rows);
    for (int64_t c = 0; c < C; ++c) merge(out[c], Stats{mean[k * C + c], m2[k * C + c], n});
  }
  return out;
}

// NCHW: each (n, c) plane of HW contiguous values in parallel (kPlaneLanes Welford lanes, then
// the HW % kPlaneLanes tail), then merge the N planes of each channel.
template <typename scalar_t>
std::vector<Stats> stats_nchw(const scalar_t* x, int64_t N, int64_t C, int64_t HW) {
  std::vector<Stats> planes(N * C);
  const int64_t grain = std::max<int64_t>(1, kGrainValues / HW);
  at::parallel_for(0, N * C, grain, [&](int64_t begin, int64_t end) {
    for (int64_t p = begin; p < end; ++p) {
      const scalar_t* plane = x + p * HW;
      const int64_t rows = HW / kPlaneLanes, tail = HW % kPlaneLanes;
      double mean[kPlaneLanes] = {}, m2[kPlaneLanes] = {};
      welford_rows(plane, rows, kPlaneLanes, 0, mean, m2);
      welford_rows(plane + rows * kPlaneLanes, tail > 0 ? 1 : 0, tail, rows, mean, m2);
      Stats s;
      for (int64_t j = 0; j < kPlaneLanes; ++j) {
        merge(s, Stats{mean[j], m2[j], rows + (j < tail ? 1 : 0)});
      }
      planes[p] = s;
    }
  });
  std::vector<Stats> out(C);
  for (int64_t n = 0; n < N; ++n) {
    for (int64_t c = 0; c < C; ++c) merge(out[c], planes[n * C + c]);
  }
  return out;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> batch_stats_cpu(const at::Tensor& x) {
  check_batch_stats_input(x);
  TORCH_CHECK(x.device().is_cpu(), "batch_stats: x must be a CPU tensor here, got ", x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto options = x.options().dtype(batch_stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({C}, options), var = at::empty({C}, options);
  // When both layouts match (C == 1 or H*W == 1) they describe the same memory order.
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "batch_stats_cpu",
                                  [&] {
    using out_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* data = x.const_data_ptr<scalar_t>();
    const std::vector<Stats> stats =
        channels_last ? stats_channels_last(data, N * HW, C) : stats_nchw(data, N, C, HW);
    out_t* mean_out = mean.mutable_data_ptr<out_t>();
    out_t* var_out = var.mutable_data_ptr<out_t>();
    for (int64_t c = 0; c < C; ++c) {
      mean_out[c] = static_cast<out_t>(stats[c].mean);
      var_out[c] = static_cast<out_t>(stats[c].m2 / static_cast<double>(stats[c].n));
    }
  });
  return {mean, var};
}

std::tuple<at::Tensor, at::Tensor> batch_stats_meta(const at::Tensor& x) {
  check_batch_stats_input(x);
  const auto options = x.options().dtype(batch_stats_dtype(x.scalar_type()));
  return {at::empty_symint({x.sym_size(1)}, options), at::empty_symint({x.sym_size(1)}, options)};
}

#ifdef WITH_CUDA
std::tuple<at::Tensor, at::Tensor> batch_stats_cuda(const at::Tensor& x) {
  check_batch_stats_input(x);
  TORCH_CHECK(x.is_cuda(), "batch_stats: x must be a CUDA tensor here, got ", x.device());
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  const auto options = x.options().dtype(batch_stats_dtype(x.scalar_type()));
  at::Tensor mean = at::empty({C}, options), var = at::empty({C}, options);
  if (C == 0) return {mean, var};
  const bool channels_last = x.is_contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor workspace =
      at::empty({3 * batch_stats_cuda_row_blocks(N * HW, channels_last) * C}, options);
  batch_stats_cuda_launch(x.const_data_ptr(), x.scalar_type(), N, C, HW, channels_last,
                          mean.mutable_data_ptr(), var.mutable_data_ptr(),
                          workspace.mutable_data_ptr(), x.device().index());
  return {mean, var};
}
#endif

}  // namespace fused_preact
