// unit_checks.cpp -- argument checks of the fused unit operators and their Meta (shape-only)
// kernels. Every check raises a c10::Error (RuntimeError; TypeError for a dtype) that names the
// operator and the argument. The checks use symbolic sizes, so the Meta kernels run them on the
// fake tensors of torch.compile too. Computes nothing, saves nothing.
#include "unit_ops.h"

#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>

namespace fused_preact {

namespace {

const char* dtype_name(at::ScalarType dtype) { return c10::toString(dtype); }

bool is_activation_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
         dtype == at::kBFloat16;
}

// t: exactly the given 4-D NHWC shape (n, h, w, c), x's dtype and device, contiguous.
void check_nhwc_shape(const char* op, const char* name, const Tensor& t, const c10::SymInt& n,
                      const c10::SymInt& h, const c10::SymInt& w, const c10::SymInt& c,
                      const char* ref_name, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 4 && t.sym_size(0) == n && t.sym_size(1) == h && t.sym_size(2) == w &&
                  t.sym_size(3) == c,
              op, ": ", name, " must have shape [", n, ", ", h, ", ", w, ", ", c, "], got ",
              t.sym_sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == ref.scalar_type(), op, ": ", name, " must have ", ref_name,
                   "'s dtype ", dtype_name(ref.scalar_type()), ", got ",
                   dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device ",
              ref.device(), ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (NHWC), got strides ",
              t.sym_strides());
}

const Tensor& required(const char* op, const char* name, const OptionalTensor& t,
                       const char* because) {
  TORCH_CHECK(t.has_value(), op, ": ", name, " is required ", because);
  return *t;
}

}  // namespace

c10::SymInt check_activation(const char* op, const char* name, const Tensor& x) {
  TORCH_CHECK(x.dim() == 4, op, ": ", name, " must be a 4-D NHWC tensor [N, H, W, C], got ",
              x.dim(), "-D");
  TORCH_CHECK_TYPE(is_activation_dtype(x.scalar_type()), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ",
                   dtype_name(x.scalar_type()));
  TORCH_CHECK(x.sym_numel() != 0, op, ": ", name, " is empty, shape ", x.sym_sizes());
  TORCH_CHECK(x.is_contiguous(), op, ": ", name,
              " must be contiguous NHWC (a channels_last NCHW tensor permuted to [N, H, W, C]), "
              "got strides ", x.sym_strides());
  return x.sym_size(3);
}

void check_like(const char* op, const char* name, const Tensor& t, const char* ref_name,
                const Tensor& ref) {
  check_nhwc_shape(op, name, t, ref.sym_size(0), ref.sym_size(1), ref.sym_size(2),
                   ref.sym_size(3), ref_name, ref);
}

void check_channel_vector(const char* op, const char* name, const Tensor& t,
                          const c10::SymInt& channels, const Tensor& ref) {
  TORCH_CHECK(t.dim() == 1 && t.sym_numel() == channels, op, ": ", name,
              " must be a 1-D tensor of ", channels, " channels, got shape ", t.sym_sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), op, ": ", name,
                   " must be a floating-point tensor, got ", dtype_name(t.scalar_type()));
  TORCH_CHECK(t.device() == ref.device(), op, ": ", name, " must be on the activation's device ",
              ref.device(), ", got ", t.device());
}

int64_t check_conv_weight(const char* op, const Tensor& weight, const c10::SymInt& cin,
                          const char* x_name, const Tensor& x) {
  TORCH_CHECK(weight.dim() == 4, op, ": weight must be a 4-D conv weight [Cout, Cin, K, K], got ",
              weight.dim(), "-D");
  const int64_t k = weight.sym_size(3).guard_int(__FILE__, __LINE__);
  TORCH_CHECK((k == 1 || k == 3) && weight.sym_size(2) == k, op,
              ": weight must be [Cout, Cin, K, K] with K = 1 or 3, got shape ", weight.sym_sizes());
  TORCH_CHECK(weight.sym_size(1) == cin, op, ": weight has ", weight.sym_size(1),
              " input channels but ", x_name, " has ", cin);
  TORCH_CHECK_TYPE(weight.scalar_type() == at::kFloat || weight.scalar_type() == x.scalar_type(),
                   op, ": weight must be float32 or ", x_name, "'s dtype ",
                   dtype_name(x.scalar_type()), ", got ", dtype_name(weight.scalar_type()));
  TORCH_CHECK(weight.device() == x.device(), op, ": weight must be on ", x_name, "'s device ",
              x.device(), ", got ", weight.device());
  return k;
}

c10::SymInt partial_count(const c10::SymInt& rows) {
  return (rows + (kRowsPerPartial - 1)) / kRowsPerPartial;
}

int64_t partial_count(int64_t rows) { return (rows + kRowsPerPartial - 1) / kRowsPerPartial; }

c10::SymInt conv_output_size(const c10::SymInt& size, int64_t kernel_size, int64_t stride) {
  return (size + 2 * (kernel_size / 2) - kernel_size) / stride + 1;
}

// ---- per-operator checks -------------------------------------------------------------------

void check_channel_stats_args(const Tensor& x) { check_activation("channel_stats", "x", x); }

void check_bn_finalize_args(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                            const Tensor& weight, const Tensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var,
                            const OptionalTensor& num_batches_tracked, double momentum) {
  constexpr const char* op = "bn_finalize";
  TORCH_CHECK(pmean.dim() == 2, op, ": pmean must be 2-D [T, C], got shape ", pmean.sym_sizes());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"pmean", pmean},
                                {"pm2", pm2}, {"pcount", pcount}}) {
    TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ",
                     name, " must be float32 (float64 for float64 activations), got ",
                     dtype_name(t.scalar_type()));
    TORCH_CHECK_TYPE(t.scalar_type() == pmean.scalar_type(), op, ": ", name,
                     " must have pmean's dtype ", dtype_name(pmean.scalar_type()), ", got ",
                     dtype_name(t.scalar_type()));
    TORCH_CHECK(t.device() == pmean.device(), op, ": ", name, " must be on pmean's device ",
                pmean.device(), ", got ", t.device());
    TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous");
  }
  TORCH_CHECK(pm2.dim() == 2 && pm2.sym_size(0) == pmean.sym_size(0) &&
                  pm2.sym_size(1) == pmean.sym_size(1),
              op, ": pm2 must have pmean's shape ", pmean.sym_sizes(), ", got ", pm2.sym_sizes());
  TORCH_CHECK(pcount.dim() == 1 && pcount.sym_size(0) == pmean.sym_size(0), op,
              ": pcount must be 1-D [T] with T = ", pmean.sym_size(0), ", got shape ",
              pcount.sym_sizes());
  const c10::SymInt channels = pmean.sym_size(1);
  check_channel_vector(op, "weight", weight, channels, pmean);
  check_channel_vector(op, "bias", bias, channels, pmean);
  TORCH_CHECK(running_mean.has_value() == running_var.has_value(), op,
              ": running_mean and running_var must be given together");
  if (running_mean.has_value()) {
    check_channel_vector(op, "running_mean", *running_mean, channels, pmean);
    check_channel_vector(op, "running_var", *running_var, channels, pmean);
    TORCH_CHECK(running_mean->is_contiguous() && running_var->is_contiguous(), op,
                ": running_mean and running_var must be contiguous (updated in place)");
    if (momentum < 0) {
      const Tensor& nbt = required(op, "num_batches_tracked", num_batches_tracked,
                                   "when momentum < 0 (cumulative average)");
      TORCH_CHECK(nbt.sym_numel() == 1, op, ": num_batches_tracked must hold one value, got shape ",
                  nbt.sym_sizes());
      TORCH_CHECK(nbt.device() == pmean.device(), op, ": num_batches_tracked must be on pmean's ",
                  "device ", pmean.device(), ", got ", nbt.device());
    }
  }
}

void check_bn_relu_apply_args(const Tensor& x, const Tensor& scale, const Tensor& shift,
                              const OptionalTensor& residual) {
  constexpr const char* op = "bn_relu_apply";
  const c10::SymInt channels = check_activation(op, "x", x);
  check_channel_vector(op, "scale", scale, channels, x);
  check_channel_vector(op, "shift", shift, channels, x);
  if (residual.has_value()) check_like(op, "residual", *residual, "x", x);
}

void check_bn_backward_finish_args(const Tensor& g, const Tensor& h, const Tensor& mean,
                                   const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                                   const Tensor& sum_g_xhat, const OptionalTensor& add,
                                   bool batch_stats) {
  constexpr const char* op = "bn_backward_finish";
  const c10::SymInt channels = check_activation(op, "g", g);
  check_channel_vector(op, "invstd", invstd, channels, g);
  check_channel_vector(op, "weight", weight, channels, g);
  if (batch_stats) {
    check_like(op, "h", h, "g", g);
    check_channel_vector(op, "mean", mean, channels, g);
    check_channel_vector(op, "sum_g", sum_g, channels, g);
    check_channel_vector(op, "sum_g_xhat", sum_g_xhat, channels, g);
  }
  if (add.has_value()) check_like(op, "add", *add, "g", g);
}

void check_bn_relu_backward_reduce_args(const Tensor& t, const Tensor& h, const Tensor& scale,
                                        const Tensor& shift, const Tensor& mean,
                                        const Tensor& invstd, const OptionalTensor& add) {
  constexpr const char* op = "bn_relu_backward_reduce";
  const c10::SymInt channels = check_activation(op, "t", t);
  check_like(op, "h", h, "t", t);
  check_channel_vector(op, "scale", scale, channels, t);
  check_channel_vector(op, "shift", shift, channels, t);
  check_channel_vector(op, "mean", mean, channels, t);
  check_channel_vector(op, "invstd", invstd, channels, t);
  if (add.has_value()) check_like(op, "add", *add, "t", t);
}

// The optional BN-ReLU prologue of conv_bnrelu / conv_wgrad: scale and shift both or neither.
void check_prologue(const char* op, const OptionalTensor& scale, const OptionalTensor& shift,
                    const c10::SymInt& cin, const Tensor& x) {
  TORCH_CHECK(scale.has_value() == shift.has_value(), op,
              ": scale and shift must be given together (the BN-ReLU prologue) or both be None "
              "(the conv reads x as it is)");
  if (scale.has_value()) {
    check_channel_vector(op, "scale", *scale, cin, x);
    check_channel_vector(op, "shift", *shift, cin, x);
  }
}

int64_t check_conv_bnrelu_args(const Tensor& x, const Tensor& weight, const OptionalTensor& scale,
                               const OptionalTensor& shift, const OptionalTensor& residual,
                               int64_t stride) {
  constexpr const char* op = "conv_bnrelu";
  const c10::SymInt cin = check_activation(op, "x", x);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  const int64_t k = check_conv_weight(op, weight, cin, "x", x);
  check_prologue(op, scale, shift, cin, x);
  if (residual.has_value()) {
    check_nhwc_shape(op, "residual", *residual, x.sym_size(0),
                     conv_output_size(x.sym_size(1), k, stride),
                     conv_output_size(x.sym_size(2), k, stride), weight.sym_size(0), "x", x);
  }
  return k;
}

int64_t check_conv_dgrad_args(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                              const OptionalTensor& scale, const OptionalTensor& shift,
                              const OptionalTensor& mean, const OptionalTensor& invstd,
                              const OptionalTensor& add, int64_t stride, int64_t height,
                              int64_t width) {
  constexpr const char* op = "conv_dgrad";
  const c10::SymInt cout = check_activation(op, "dy", dy);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  TORCH_CHECK(weight.dim() == 4 && weight.sym_size(0) == cout, op,
              ": weight must be [Cout, Cin, K, K] with Cout = ", cout, " (dy's channels), got shape ",
              weight.sym_sizes());
  const int64_t k = check_conv_weight(op, weight, weight.sym_size(1), "dy", dy);
  TORCH_CHECK(height >= 1 && width >= 1 &&
                  conv_output_size(height, k, stride) == dy.sym_size(1) &&
                  conv_output_size(width, k, stride) == dy.sym_size(2),
              op, ": height and width (", height, ", ", width, ") do not give dy's spatial size (",
              dy.sym_size(1), ", ", dy.sym_size(2), ") with K = ", k, " and stride ", stride);
  const c10::SymInt cin = weight.sym_size(1), n = dy.sym_size(0);
  if (add.has_value()) check_nhwc_shape(op, "add", *add, n, height, width, cin, "dy", dy);
  if (h.has_value()) {
    constexpr const char* because = "when h is given";
    check_nhwc_shape(op, "h", *h, n, height, width, cin, "dy", dy);
    check_channel_vector(op, "scale", required(op, "scale", scale, because), cin, dy);
    check_channel_vector(op, "shift", required(op, "shift", shift, because), cin, dy);
    check_channel_vector(op, "mean", required(op, "mean", mean, because), cin, dy);
    check_channel_vector(op, "invstd", required(op, "invstd", invstd, because), cin, dy);
  }
  return k;
}

int64_t check_conv_wgrad_args(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                              const OptionalTensor& shift, const Tensor& weight, int64_t stride) {
  constexpr const char* op = "conv_wgrad";
  const c10::SymInt cin = check_activation(op, "x", x);
  check_activation(op, "dy", dy);
  TORCH_CHECK(stride >= 1, op, ": stride must be >= 1, got ", stride);
  const int64_t k = check_conv_weight(op, weight, cin, "x", x);
  check_nhwc_shape(op, "dy", dy, x.sym_size(0), conv_output_size(x.sym_size(1), k, stride),
                   conv_output_size(x.sym_size(2), k, stride), weight.sym_size(0), "x", x);
  check_prologue(op, scale, shift, cin, x);
  return k;
}

void check_bn_add_relu_args(const Tensor& h, const Tensor& scale, const Tensor& shift,
                            const Tensor& residual, const OptionalTensor& residual_scale,
                            const OptionalTensor& residual_shift) {
  constexpr const char* op = "bn_add_relu";
  const c10::SymInt channels = check_activation(op, "h", h);
  check_channel_vector(op, "scale", scale, channels, h);
  check_channel_vector(op, "shift", shift, channels, h);
  check_like(op, "residual", residual, "h", h);
  TORCH_CHECK(residual_scale.has_value() == residual_shift.has_value(), op,
              ": residual_scale and residual_shift must be given together (the shortcut's BN) or both "
              "be None");
  if (residual_scale.has_value()) {
    check_channel_vector(op, "residual_scale", *residual_scale, channels, h);
    check_channel_vector(op, "residual_shift", *residual_shift, channels, h);
  }
}

void check_bn_add_relu_backward_args(const Tensor& dy, const Tensor& y, const Tensor& h,
                                     const Tensor& mean, const Tensor& invstd,
                                     const OptionalTensor& residual,
                                     const OptionalTensor& residual_mean,
                                     const OptionalTensor& residual_invstd) {
  constexpr const char* op = "bn_add_relu_backward";
  const c10::SymInt channels = check_activation(op, "dy", dy);
  check_like(op, "y", y, "dy", dy);
  check_like(op, "h", h, "dy", dy);
  check_channel_vector(op, "mean", mean, channels, dy);
  check_channel_vector(op, "invstd", invstd, channels, dy);
  TORCH_CHECK(residual.has_value() == residual_mean.has_value() &&
                  residual.has_value() == residual_invstd.has_value(),
              op, ": residual, residual_mean and residual_invstd must be given together (the "
              "shortcut's BN) or all be None");
  if (residual.has_value()) {
    check_like(op, "residual", *residual, "dy", dy);
    check_channel_vector(op, "residual_mean", *residual_mean, channels, dy);
    check_channel_vector(op, "residual_invstd", *residual_invstd, channels, dy);
  }
}

// ---- Meta kernels ----------------------------------------------------------------------------

namespace {

// Options of the statistics of activation t (float32; float64 for float64).
at::TensorOptions stat_like(const Tensor& t) { return t.options().dtype(stat_dtype(t.scalar_type())); }

}  // namespace

Tensor empty_statistic(const Tensor& ref) { return at::empty({0}, stat_like(ref)); }

Tensor3 empty_partials_of(const Tensor& y) {
  const c10::SymInt rows = y.sym_size(0) * y.sym_size(1) * y.sym_size(2);
  const c10::SymInt t = partial_count(rows);
  const auto options = stat_like(y);
  return {at::empty_symint({t, y.sym_size(3)}, options),
          at::empty_symint({t, y.sym_size(3)}, options), at::empty_symint({t}, options)};
}

Tensor3 channel_stats_meta(const Tensor& x) {
  check_channel_stats_args(x);
  return empty_partials_of(x);
}

Tensor4 bn_finalize_meta(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                         const Tensor& weight, const Tensor& bias, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                         double momentum, double /*eps*/) {
  check_bn_finalize_args(pmean, pm2, pcount, weight, bias, running_mean, running_var,
                         num_batches_tracked, momentum);
  const auto options = pmean.options();
  const c10::SymInt c = pmean.sym_size(1);
  return {at::empty_symint({c}, options), at::empty_symint({c}, options),
          at::empty_symint({c}, options), at::empty_symint({c}, options)};
}

Tensor bn_relu_apply_meta(const Tensor& x, const Tensor& scale, const Tensor& shift,
                          const OptionalTensor& residual) {
  check_bn_relu_apply_args(x, scale, shift, residual);
  return at::empty_symint(x.sym_sizes(), x.options());
}

Tensor bn_backward_finish_meta(const Tensor& g, const Tensor& h, const Tensor& mean,
                               const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                               const Tensor& sum_g_xhat, double /*count*/,
                               const OptionalTensor& add, bool batch_stats) {
  check_bn_backward_finish_args(g, h, mean, invstd, weight, sum_g, sum_g_xhat, add, batch_stats);
  return at::empty_symint(g.sym_sizes(), g.options());
}

Tensor3 bn_relu_backward_reduce_meta(const Tensor& t, const Tensor& h, const Tensor& scale,
                                     const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                     const OptionalTensor& add) {
  check_bn_relu_backward_reduce_args(t, h, scale, shift, mean, invstd, add);
  const auto options = stat_like(t);
  return {at::empty_symint(t.sym_sizes(), t.options()), at::empty_symint({t.sym_size(3)}, options),
          at::empty_symint({t.sym_size(3)}, options)};
}

Tensor4 conv_bnrelu_meta(const Tensor& x, const Tensor& weight, const OptionalTensor& scale,
                         const OptionalTensor& shift, const OptionalTensor& residual, int64_t stride,
                         bool stats) {
  const int64_t k = check_conv_bnrelu_args(x, weight, scale, shift, residual, stride);
  Tensor y = at::empty_symint({x.sym_size(0), conv_output_size(x.sym_size(1), k, stride),
                               conv_output_size(x.sym_size(2), k, stride), weight.sym_size(0)},
                              x.options());
  if (!stats) return {y, empty_statistic(x), empty_statistic(x), empty_statistic(x)};
  auto [pmean, pm2, pcount] = empty_partials_of(y);
  return {y, pmean, pm2, pcount};
}

Tensor3 conv_dgrad_meta(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                        const OptionalTensor& scale, const OptionalTensor& shift,
                        const OptionalTensor& mean, const OptionalTensor& invstd,
                        const OptionalTensor& add, int64_t stride, int64_t height, int64_t width) {
  check_conv_dgrad_args(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width);
  Tensor g = at::empty_symint({dy.sym_size(0), height, width, weight.sym_size(1)}, dy.options());
  if (!h.has_value()) return {g, empty_statistic(dy), empty_statistic(dy)};
  const auto options = stat_like(dy);
  return {g, at::empty_symint({weight.sym_size(1)}, options),
          at::empty_symint({weight.sym_size(1)}, options)};
}

Tensor conv_wgrad_meta(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                       const OptionalTensor& shift, const Tensor& weight, int64_t stride) {
  check_conv_wgrad_args(dy, x, scale, shift, weight, stride);
  return at::empty_symint(weight.sym_sizes(), weight.options());
}

Tensor bn_add_relu_meta(const Tensor& h, const Tensor& scale, const Tensor& shift,
                        const Tensor& residual, const OptionalTensor& residual_scale,
                        const OptionalTensor& residual_shift) {
  check_bn_add_relu_args(h, scale, shift, residual, residual_scale, residual_shift);
  return at::empty_symint(h.sym_sizes(), h.options());
}

Tensor4 bn_add_relu_backward_meta(const Tensor& dy, const Tensor& y, const Tensor& h,
                                  const Tensor& mean, const Tensor& invstd,
                                  const OptionalTensor& residual, const OptionalTensor& residual_mean,
                                  const OptionalTensor& residual_invstd) {
  check_bn_add_relu_backward_args(dy, y, h, mean, invstd, residual, residual_mean, residual_invstd);
  const auto options = stat_like(dy);
  const c10::SymInt c = dy.sym_size(3);
  return {at::empty_symint(dy.sym_sizes(), dy.options()), at::empty_symint({c}, options),
          at::empty_symint({c}, options),
          residual.has_value() ? at::empty_symint({c}, options) : empty_statistic(dy)};
}

}  // namespace fused_preact
