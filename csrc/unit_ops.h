// unit_ops.h -- tensor-level entry points of the fused unit operators (namespace fused_preact).
//
// The six operators of the contract in fused_preact/unit_ops.py (its docstring is the spec), plus
//   bn_relu_apply(x, scale, shift, residual?)          relu(scale * x + shift) (+ residual), NHWC
//   bn_relu_backward_reduce(t, h, scale, shift, mean, invstd, add?) -> (g, sum_g, sum_g_xhat)
//       g = (t + add) * !(scale * h + shift <= 0) (a NaN passes, as threshold_backward) and the two per-channel sums of BN backward
//       (conv_dgrad's epilogue on its own: the backward of a BN-ReLU that feeds no conv)
//   bn_add_relu / bn_add_relu_backward      the end of an original (post-activation) unit
//       relu(scale * h + shift + s), s = residual or residual_scale * residual + residual_shift;
//       backward g = dy * !(y <= 0) and the BN-backward sums of h (and of the residual's BN)
// Each has a CPU, a CUDA (unit_ops_cuda.h) and a Meta kernel; the conv operators are
// composites (our prologue / epilogue kernels around ATen's convolution), device-generic.
//
// Statistics partials (float32; float64 for float64 activations): T = ceil(rows / kRowsPerPartial)
// rows of [C] (rows = N*H*W), on every device and in every kernel that emits them (the 1x1
// tensor-core GEMM writes one per row tile: conv1x1_plan.h asserts kTileM == kRowsPerPartial),
// so fake (Meta) shapes match real ones.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/OptionalArrayRef.h>

#include <optional>
#include <string>
#include <tuple>

namespace fused_preact {

constexpr int64_t kRowsPerPartial = 128;

// Statistics, partials and sums are float32, float64 for float64 activations.
inline at::ScalarType stat_dtype(at::ScalarType activation) {
  return activation == at::kDouble ? at::kDouble : at::kFloat;
}

using Tensor = at::Tensor;
using OptionalTensor = std::optional<at::Tensor>;
using Tensor3 = std::tuple<Tensor, Tensor, Tensor>;
using Tensor4 = std::tuple<Tensor, Tensor, Tensor, Tensor>;

// ---- argument checks (unit_checks.cpp); each raises a c10::Error naming op and argument ------
// x: 4-D NHWC contiguous activation, float32 / float64 / float16 / bfloat16; returns C.
c10::SymInt check_activation(const char* op, const char* name, const Tensor& x);
// t: same shape, dtype, device as ref, contiguous.
void check_like(const char* op, const char* name, const Tensor& t, const char* ref_name,
                const Tensor& ref);
// t: 1-D floating tensor of `channels` elements on ref's device.
void check_channel_vector(const char* op, const char* name, const Tensor& t,
                          const c10::SymInt& channels, const Tensor& ref);
// weight: [Cout, Cin, K, K], K in (1, 3), float32 or x's dtype, on x's device; returns K.
int64_t check_conv_weight(const char* op, const Tensor& weight, const c10::SymInt& cin,
                          const char* x_name, const Tensor& x);
// Number of statistics partials for `rows` rows.
c10::SymInt partial_count(const c10::SymInt& rows);
int64_t partial_count(int64_t rows);
// The partials of NHWC activation y, uninitialized: pmean [T, C], pm2 [T, C], pcount [T] in
// stat_dtype on y's device (any device; symbolic sizes too).
Tensor3 empty_partials_of(const Tensor& y);
// An empty statistics tensor on ref's device, for an output that is not computed (call it once
// per output: an operator's outputs must not alias each other).
Tensor empty_statistic(const Tensor& ref);

// Whole-argument-list checks of each operator, shared by its CPU, CUDA and Meta kernels.
void check_channel_stats_args(const Tensor& x);
void check_bn_finalize_args(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                            const Tensor& weight, const Tensor& bias,
                            const OptionalTensor& running_mean, const OptionalTensor& running_var,
                            const OptionalTensor& num_batches_tracked, double momentum);
void check_bn_relu_apply_args(const Tensor& x, const Tensor& scale, const Tensor& shift,
                              const OptionalTensor& residual);
void check_bn_backward_finish_args(const Tensor& g, const Tensor& h, const Tensor& mean,
                                   const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                                   const Tensor& sum_g_xhat, const OptionalTensor& add,
                                   bool batch_stats);
void check_bn_relu_backward_reduce_args(const Tensor& t, const Tensor& h, const Tensor& scale,
                                        const Tensor& shift, const Tensor& mean,
                                        const Tensor& invstd, const OptionalTensor& add);
// Zero padding of a conv's activated input, per side, in F.pad's order of the operators'
// `padding` argument ([left, right, top, bottom]).
struct ConvPadding {
  int64_t left, right, top, bottom;
  bool symmetric() const { return left == right && top == bottom; }
  bool zero() const { return left == 0 && right == 0 && top == 0 && bottom == 0; }
};
// The operators' `padding`: 4 non-negative ints, or K / 2 on every side when absent; raises a
// c10::Error naming op and `padding` otherwise.
ConvPadding conv_padding(const char* op, at::OptionalIntArrayRef padding, int64_t kernel_size);
// These three return the conv's kernel size K; `padding` is checked with conv_padding, and the
// padded input must hold one window (H + top + bottom >= K, likewise W).
// conv_bnrelu / conv_wgrad: scale and shift both given (BN-ReLU prologue) or both absent (raw x).
int64_t check_conv_bnrelu_args(const Tensor& x, const Tensor& weight, const OptionalTensor& scale,
                               const OptionalTensor& shift, const OptionalTensor& residual,
                               int64_t stride, at::OptionalIntArrayRef padding);
int64_t check_conv_dgrad_args(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                              const OptionalTensor& scale, const OptionalTensor& shift,
                              const OptionalTensor& mean, const OptionalTensor& invstd,
                              const OptionalTensor& add, int64_t stride, int64_t height,
                              int64_t width, at::OptionalIntArrayRef padding);
int64_t check_conv_wgrad_args(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                              const OptionalTensor& shift, const Tensor& weight, int64_t stride,
                              at::OptionalIntArrayRef padding);
void check_bn_add_relu_args(const Tensor& h, const Tensor& scale, const Tensor& shift,
                            const Tensor& residual, const OptionalTensor& residual_scale,
                            const OptionalTensor& residual_shift);
void check_bn_add_relu_backward_args(const Tensor& dy, const Tensor& y, const Tensor& h,
                                     const Tensor& mean, const Tensor& invstd,
                                     const OptionalTensor& residual,
                                     const OptionalTensor& residual_mean,
                                     const OptionalTensor& residual_invstd);
// Output height / width of a conv with `before` + `after` zero padding:
// (size + before + after - K) / stride + 1.
c10::SymInt conv_output_size(const c10::SymInt& size, int64_t kernel_size, int64_t stride,
                             int64_t before, int64_t after);

// ---- CPU -------------------------------------------------------------------------------------
Tensor3 channel_stats_cpu(const Tensor& x);
Tensor4 bn_finalize_cpu(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                        const Tensor& weight, const Tensor& bias, const OptionalTensor& running_mean,
                        const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                        double momentum, double eps);
Tensor bn_relu_apply_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                         const OptionalTensor& residual);
Tensor bn_backward_finish_cpu(const Tensor& g, const Tensor& h, const Tensor& mean,
                              const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                              const Tensor& sum_g_xhat, double count, const OptionalTensor& add,
                              bool batch_stats);
Tensor3 bn_relu_backward_reduce_cpu(const Tensor& t, const Tensor& h, const Tensor& scale,
                                    const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                    const OptionalTensor& add);
Tensor bn_add_relu_cpu(const Tensor& h, const Tensor& scale, const Tensor& shift,
                       const Tensor& residual, const OptionalTensor& residual_scale,
                       const OptionalTensor& residual_shift);
Tensor4 bn_add_relu_backward_cpu(const Tensor& dy, const Tensor& y, const Tensor& h,
                                 const Tensor& mean, const Tensor& invstd,
                                 const OptionalTensor& residual, const OptionalTensor& residual_mean,
                                 const OptionalTensor& residual_invstd);

// Device-specific halves of the building blocks below (CPU: elementwise_cpu.cpp,
// statistics_cpu.cpp).
Tensor bn_relu_prologue_cpu(const Tensor& x, const Tensor& scale, const Tensor& shift,
                            at::ScalarType out_dtype);
Tensor4 conv_epilogue_cpu(const Tensor& conv_out, const OptionalTensor& residual,
                          at::ScalarType dtype, bool stats);
Tensor3 dgrad_epilogue_cpu(const Tensor& conv_out, const OptionalTensor& add, const Tensor& h,
                           const Tensor& scale, const Tensor& shift, const Tensor& mean,
                           const Tensor& invstd, at::ScalarType dtype);

// ---- device-generic building blocks of the conv composites -------------------------------------
// relu(scale * x + shift), rounded to x's dtype, stored as `out_dtype` (x's dtype, or float32 for
// the CPU's fp32 convolution of bfloat16 / float16 data). Dispatches on x's device.
Tensor bn_relu_prologue(const Tensor& x, const Tensor& scale, const Tensor& shift,
                        at::ScalarType out_dtype);
// y = round(conv_out (+ residual)) in `dtype`, and (stats) its partials, in one pass.
Tensor4 conv_epilogue(const Tensor& conv_out, const OptionalTensor& residual, at::ScalarType dtype,
                      bool stats);
// conv_dgrad's epilogue on conv_out = conv_input_grad(dy): add, ReLU mask, sums; g in `dtype`.
Tensor3 dgrad_epilogue(const Tensor& conv_out, const OptionalTensor& add, const OptionalTensor& h,
                       const OptionalTensor& scale, const OptionalTensor& shift,
                       const OptionalTensor& mean, const OptionalTensor& invstd,
                       at::ScalarType dtype);

// ---- conv composites (conv_ops.cpp), registered for CPU and CUDA -----------------------
Tensor4 conv_bnrelu(const Tensor& x, const Tensor& weight, const OptionalTensor& scale,
                    const OptionalTensor& shift, const OptionalTensor& residual, int64_t stride,
                    bool stats, at::OptionalIntArrayRef padding);
Tensor3 conv_dgrad(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                   const OptionalTensor& scale, const OptionalTensor& shift,
                   const OptionalTensor& mean, const OptionalTensor& invstd,
                   const OptionalTensor& add, int64_t stride, int64_t height, int64_t width,
                   at::OptionalIntArrayRef padding);
Tensor conv_wgrad(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                  const OptionalTensor& shift, const Tensor& weight, int64_t stride,
                  at::OptionalIntArrayRef padding);
// Why the tensor-core 1x1 kernels do not run such a call of the conv operator ("" when they
// do): the same checks the operators make to choose their path (conv1x1_plan.h).
std::string conv_bnrelu_tensor_cores(const Tensor& x, const Tensor& weight,
                                     const OptionalTensor& scale, const OptionalTensor& shift,
                                     const OptionalTensor& residual, int64_t stride, bool stats,
                                     at::OptionalIntArrayRef padding);
std::string conv_dgrad_tensor_cores(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                                    const OptionalTensor& scale, const OptionalTensor& shift,
                                    const OptionalTensor& mean, const OptionalTensor& invstd,
                                    const OptionalTensor& add, int64_t stride, int64_t height,
                                    int64_t width, at::OptionalIntArrayRef padding);
std::string conv_wgrad_tensor_cores(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                                    const OptionalTensor& shift, const Tensor& weight,
                                    int64_t stride, at::OptionalIntArrayRef padding);
// The composites follow the conv dtype rule of `device` ("cpu" or "cuda") on this thread, or each
// tensor's own device's (""); returns the previous choice. For tests: the CPU path under the CUDA
// rule shows what the CUDA path rounds (conv_ops.cpp, conv_dtype).
std::string set_conv_dtype_rule(const std::string& device);

// ---- Meta (unit_checks.cpp): checks and output shapes only -------------------------------------
Tensor3 channel_stats_meta(const Tensor& x);
Tensor4 bn_finalize_meta(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                         const Tensor& weight, const Tensor& bias, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                         double momentum, double eps);
Tensor bn_relu_apply_meta(const Tensor& x, const Tensor& scale, const Tensor& shift,
                          const OptionalTensor& residual);
Tensor bn_backward_finish_meta(const Tensor& g, const Tensor& h, const Tensor& mean,
                               const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                               const Tensor& sum_g_xhat, double count, const OptionalTensor& add,
                               bool batch_stats);
Tensor3 bn_relu_backward_reduce_meta(const Tensor& t, const Tensor& h, const Tensor& scale,
                                     const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                     const OptionalTensor& add);
Tensor4 conv_bnrelu_meta(const Tensor& x, const Tensor& weight, const OptionalTensor& scale,
                         const OptionalTensor& shift, const OptionalTensor& residual, int64_t stride,
                         bool stats, at::OptionalIntArrayRef padding);
Tensor3 conv_dgrad_meta(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                        const OptionalTensor& scale, const OptionalTensor& shift,
                        const OptionalTensor& mean, const OptionalTensor& invstd,
                        const OptionalTensor& add, int64_t stride, int64_t height, int64_t width,
                        at::OptionalIntArrayRef padding);
Tensor conv_wgrad_meta(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                       const OptionalTensor& shift, const Tensor& weight, int64_t stride,
                       at::OptionalIntArrayRef padding);
Tensor bn_add_relu_meta(const Tensor& h, const Tensor& scale, const Tensor& shift,
                        const Tensor& residual, const OptionalTensor& residual_scale,
                        const OptionalTensor& residual_shift);
Tensor4 bn_add_relu_backward_meta(const Tensor& dy, const Tensor& y, const Tensor& h,
                                  const Tensor& mean, const Tensor& invstd,
                                  const OptionalTensor& residual, const OptionalTensor& residual_mean,
                                  const OptionalTensor& residual_invstd);

}  // namespace fused_preact
