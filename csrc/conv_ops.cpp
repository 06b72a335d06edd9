// conv_ops.cpp -- conv_bnrelu, conv_dgrad and conv_wgrad (the convolutions of a fused unit), one
// device-generic implementation registered for the CPU and CUDA keys:
//   conv_bnrelu  y = conv(relu(scale * x + shift), W, stride) (+ residual), stats partials of y
//                (scale and shift None: conv(x), no prologue: the original unit's first conv)
//   conv_dgrad   g = (conv_input_grad(dy, W) + add) * (scale * h + shift > 0), sum_g, sum_g_xhat
//   conv_wgrad   dW = conv_weight_grad(relu(scale * x + shift), dy)   (or of x, without prologue)
// On CUDA, 1x1 convs of bf16/fp16 data that the checks of conv1x1_plan.h accept run the fused
// tensor-core kernels of conv1x1_fused.cu (prologue and epilogues inside the GEMM; a conv without
// prologue takes the composite path; conv_*_tensor_cores say why a call does not). Every other
// conv is a composite: prologue -> ATen convolution -> epilogue. The BN-ReLU prologue is our apply
// kernel into a temporary, the convolution is at::convolution / at::convolution_backward on
// channels_last views of the NHWC data (cuDNN on CUDA; oneDNN or native on the CPU), and the
// epilogue is one fused pass of ours (residual add + statistics partials; add + ReLU mask + the
// two sums), each a CPU or CUDA kernel by the data's device.
// Precision (conv_dtype): the weight is rounded to the activation dtype; on CUDA the convolution
// runs in that dtype (fp32 accumulation, rounded once at its output), except where a residual
// (conv_bnrelu) or a joining gradient (conv_dgrad's add) is added to its output: then it runs on
// float32 copies of the rounded operands (exact in TF32 too) and writes float32, so the sum is
// formed in fp32 and rounded once, as the contract and the 1x1 kernels do (a bf16 conv output
// plus the residual would be rounded twice). On the CPU bfloat16 / float16 data are always
// convolved in fp32. set_conv_dtype_rule lets a test run the CPU path under the CUDA rule.
// Padding: the operators' optional `padding` ([left, right, top, bottom], zero after the BN-ReLU)
// defaults to K / 2 per side. Symmetric padding is ATen's own conv padding (no copy; the default
// path is unchanged). Asymmetric padding loses its part past the last window first (a stride-2
// "SAME" (0, 1) pad of an odd size is never read, and becomes symmetric); if still asymmetric, the
// forward and wgrad pad the activated temporary with zeros (one more copy of it), and dgrad runs
// the transposed conv with the smaller side's padding and crops the gradient of the larger side's
// rows and columns in the NHWC copy it makes anyway. The 1x1 tensor-core kernels run only
// unpadded 1x1 convs.
// Saves nothing: the temporaries are freed before returning.
#include <ATen/ops/add.h>
#include <ATen/ops/constant_pad_nd.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "conv1x1_plan.h"
#include "unit_ops.h"
#ifdef WITH_CUDA
#include "conv1x1_fused.h"
#include "unit_ops_cuda.h"
#endif

namespace fused_preact {

namespace {

bool is_reduced(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// The device whose dtype rule the composites follow on this thread: kind "" is each tensor's
// own device (set_conv_dtype_rule changes it, for tests of one device's rule on another).
thread_local std::string t_dtype_rule;

// The dtype the convolution runs in for activations of `dtype` on `t`'s device; `addend`: a
// residual or gradient is added to its output before the one rounding to `dtype`.
at::ScalarType conv_dtype(const Tensor& t, at::ScalarType dtype, bool addend) {
  if (!is_reduced(dtype)) return dtype;
  const bool cpu_rule = t_dtype_rule.empty() ? t.is_cpu() : t_dtype_rule == "cpu";
  return cpu_rule || addend ? at::kFloat : dtype;
}

Tensor nchw_view(const Tensor& nhwc) { return nhwc.permute({0, 3, 1, 2}); }

Tensor nhwc_of(const Tensor& nchw) { return nchw.permute({0, 2, 3, 1}).contiguous(); }

// The weight rounded to the activation dtype, held in the conv dtype, channels_last.
Tensor conv_weight(const Tensor& weight, at::ScalarType dtype, at::ScalarType compute) {
  return weight.to(dtype).to(compute).contiguous(at::MemoryFormat::ChannelsLast);
}

// An empty statistics tensor for activations like `like`.
Tensor empty_float(const Tensor& like) {
  return at::empty({0}, like.options().dtype(stat_dtype(like.scalar_type())));
}

// The padding after the last row (column) that a window reads, at most `after`: what a conv of
// `size` rows with `before` + `after` padding uses of it (the output size does not change).
int64_t reached_after(int64_t size, int64_t before, int64_t after, int64_t k, int64_t stride) {
  const int64_t out = (size + before + after - k) / stride + 1;
  return std::min(after, std::max<int64_t>(0, (out - 1) * stride + k - before - size));
}

// The checked padding of a conv of a height x width input; asymmetric padding without its unread
// bottom/right part.
ConvPadding read_padding(const char* op, at::OptionalIntArrayRef padding, int64_t k,
                         int64_t stride, int64_t height, int64_t width) {
  ConvPadding pad = conv_padding(op, padding, k);
  if (pad.symmetric()) return pad;
  pad.bottom = reached_after(height, pad.top, pad.bottom, k, stride);
  pad.right = reached_after(width, pad.left, pad.right, k, stride);
  return pad;
}

// The activated NHWC input of a conv with `pad` and the symmetric padding ATen adds to it:
// itself and (top, left) when `pad` is symmetric, else a zero-padded copy and no padding.
std::pair<Tensor, std::vector<int64_t>> padded_input(const Tensor& activated, const ConvPadding& pad) {
  if (pad.symmetric()) return {activated, {pad.top, pad.left}};
  // NHWC: (C before, C after, W before, W after, H before, H after)
  return {at::constant_pad_nd(activated, {0, 0, pad.left, pad.right, pad.top, pad.bottom}, 0),
          {0, 0}};
}

}  // namespace

// ---- device dispatch of the building blocks ----------------------------------------------------

Tensor bn_relu_prologue(const Tensor& x, const Tensor& scale, const Tensor& shift,
                        at::ScalarType out_dtype) {
#ifdef WITH_CUDA
  if (x.is_cuda()) return bn_relu_prologue_cuda(x, scale, shift, out_dtype);
#endif
  return bn_relu_prologue_cpu(x, scale, shift, out_dtype);
}

Tensor4 conv_epilogue(const Tensor& conv_out, const OptionalTensor& residual, at::ScalarType dtype,
                      bool stats) {
#ifdef WITH_CUDA
  if (conv_out.is_cuda()) return conv_epilogue_cuda(conv_out, residual, dtype, stats);
#endif
  return conv_epilogue_cpu(conv_out, residual, dtype, stats);
}

Tensor3 dgrad_epilogue(const Tensor& conv_out, const OptionalTensor& add, const OptionalTensor& h,
                       const OptionalTensor& scale, const OptionalTensor& shift,
                       const OptionalTensor& mean, const OptionalTensor& invstd,
                       at::ScalarType dtype) {
  if (!h.has_value()) {  // no BN-ReLU below: g = t (+ add), rounded once
    Tensor g = add.has_value() ? at::add(conv_out, *add) : conv_out;
    return {g.to(dtype), empty_float(conv_out), empty_float(conv_out)};
  }
#ifdef WITH_CUDA
  if (conv_out.is_cuda()) {
    return dgrad_epilogue_cuda(conv_out, add, *h, *scale, *shift, *mean, *invstd, dtype);
  }
#endif
  return dgrad_epilogue_cpu(conv_out, add, *h, *scale, *shift, *mean, *invstd, dtype);
}

namespace {

// Why the tensor-core 1x1 kernels do not run a conv of kernel size k, given the shapes' own
// answer (conv1x1::*_problem): "" when they do.
std::string tensor_core_problem(int64_t k, const std::string& problem) {
  if (k != 1) return "the kernel is 3x3";
#ifdef WITH_CUDA
  return problem;
#else
  return problem.empty() ? "the extension was built without its CUDA part" : problem;
#endif
}

}  // namespace

namespace {

// The conv's input in the conv dtype: relu(scale * x + shift) (the BN-ReLU prologue), or x itself.
Tensor conv_input(const Tensor& x, const OptionalTensor& scale, const OptionalTensor& shift,
                  at::ScalarType compute) {
  if (scale.has_value()) return bn_relu_prologue(x, *scale, *shift, compute);
  return x.to(compute);
}

}  // namespace

// ---- the composites ----------------------------------------------------------------------------

Tensor4 conv_bnrelu(const Tensor& x, const Tensor& weight, const OptionalTensor& scale,
                    const OptionalTensor& shift, const OptionalTensor& residual, int64_t stride,
                    bool stats, at::OptionalIntArrayRef padding) {
  const int64_t k = check_conv_bnrelu_args(x, weight, scale, shift, residual, stride, padding);
  const ConvPadding pad = read_padding("conv_bnrelu", padding, k, stride, x.size(1), x.size(2));
#ifdef WITH_CUDA
  if (k == 1 && conv1x1::bnrelu_problem(x, weight, scale, shift, residual, stride, pad.zero()).empty()) {
    return conv1x1_bnrelu_cuda(x, weight, *scale, *shift, residual, stride, stats);
  }
#endif
  const at::ScalarType dtype = x.scalar_type(), compute = conv_dtype(x, dtype, residual.has_value());
  Tensor conv_out;
  {
    const auto [input, conv_pad] = padded_input(conv_input(x, scale, shift, compute), pad);
    conv_out = nhwc_of(at::convolution(nchw_view(input), conv_weight(weight, dtype, compute),
                                       std::nullopt, {stride, stride}, conv_pad, {1, 1},
                                       /*transposed=*/false, {0, 0}, /*groups=*/1));
  }
  if (!stats && !residual.has_value() && compute == dtype) {
    return {conv_out, empty_float(x), empty_float(x), empty_float(x)};
  }
  return conv_epilogue(conv_out, residual, dtype, stats);
}

Tensor3 conv_dgrad(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                   const OptionalTensor& scale, const OptionalTensor& shift,
                   const OptionalTensor& mean, const OptionalTensor& invstd,
                   const OptionalTensor& add, int64_t stride, int64_t height, int64_t width,
                   at::OptionalIntArrayRef padding) {
  const int64_t k = check_conv_dgrad_args(dy, weight, h, scale, shift, mean, invstd, add, stride,
                                          height, width, padding);
  const ConvPadding pad = read_padding("conv_dgrad", padding, k, stride, height, width);
#ifdef WITH_CUDA
  if (k == 1 && conv1x1::dgrad_problem(dy, weight, h, scale, shift, mean, invstd, add, stride, height,
                                       width, pad.zero()).empty()) {
    return conv1x1_dgrad_cuda(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width);
  }
#endif
  const at::ScalarType dtype = dy.scalar_type(), compute = conv_dtype(dy, dtype, add.has_value());
  // conv_input_grad as a transposed convolution with the smaller side's padding: the gradient of
  // the input extended by the rest of the padding (top - pad_h rows above, bottom - pad_h below;
  // likewise columns), whose size output_padding (< stride) picks among the `stride` sizes that
  // give dy's; the input's rows and columns are cropped from it.
  const int64_t pad_h = std::min(pad.top, pad.bottom), pad_w = std::min(pad.left, pad.right);
  const int64_t out_pad_h = height + pad.top + pad.bottom - ((dy.size(1) - 1) * stride + k);
  const int64_t out_pad_w = width + pad.left + pad.right - ((dy.size(2) - 1) * stride + k);
  const Tensor extended = at::convolution(nchw_view(dy.to(compute)),
                                          conv_weight(weight, dtype, compute), std::nullopt,
                                          {stride, stride}, {pad_h, pad_w}, {1, 1},
                                          /*transposed=*/true, {out_pad_h, out_pad_w}, 1);
  const Tensor t = nhwc_of(extended.narrow(2, pad.top - pad_h, height)
                               .narrow(3, pad.left - pad_w, width));
  return dgrad_epilogue(t, add, h, scale, shift, mean, invstd, dtype);
}

Tensor conv_wgrad(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                  const OptionalTensor& shift, const Tensor& weight, int64_t stride,
                  at::OptionalIntArrayRef padding) {
  const int64_t k = check_conv_wgrad_args(dy, x, scale, shift, weight, stride, padding);
  const ConvPadding pad = read_padding("conv_wgrad", padding, k, stride, x.size(1), x.size(2));
#ifdef WITH_CUDA
  if (k == 1 && conv1x1::wgrad_problem(dy, x, scale, shift, weight, stride, pad.zero()).empty()) {
    return conv1x1_wgrad_cuda(dy, x, *scale, *shift, weight, stride);
  }
#endif
  const at::ScalarType dtype = x.scalar_type(), compute = conv_dtype(x, dtype, false);
  const auto [input, conv_pad] = padded_input(conv_input(x, scale, shift, compute), pad);
  const Tensor dweight = std::get<1>(at::convolution_backward(
      nchw_view(dy.to(compute)), nchw_view(input), conv_weight(weight, dtype, compute),
      std::nullopt, {stride, stride}, conv_pad, {1, 1}, /*transposed=*/false, {0, 0},
      /*groups=*/1, {false, true, false}));
  return dweight.to(weight.scalar_type()).contiguous();
}

// ---- which path runs a call (diagnostics: python -m fused_preact.check, tests) -------------------

std::string conv_bnrelu_tensor_cores(const Tensor& x, const Tensor& weight,
                                     const OptionalTensor& scale, const OptionalTensor& shift,
                                     const OptionalTensor& residual, int64_t stride, bool stats,
                                     at::OptionalIntArrayRef padding) {
  (void)stats;
  const int64_t k = check_conv_bnrelu_args(x, weight, scale, shift, residual, stride, padding);
  const ConvPadding pad = read_padding("conv_bnrelu", padding, k, stride, x.size(1), x.size(2));
  return tensor_core_problem(
      k, conv1x1::bnrelu_problem(x, weight, scale, shift, residual, stride, pad.zero()));
}

std::string conv_dgrad_tensor_cores(const Tensor& dy, const Tensor& weight, const OptionalTensor& h,
                                    const OptionalTensor& scale, const OptionalTensor& shift,
                                    const OptionalTensor& mean, const OptionalTensor& invstd,
                                    const OptionalTensor& add, int64_t stride, int64_t height,
                                    int64_t width, at::OptionalIntArrayRef padding) {
  const int64_t k = check_conv_dgrad_args(dy, weight, h, scale, shift, mean, invstd, add, stride,
                                          height, width, padding);
  const ConvPadding pad = read_padding("conv_dgrad", padding, k, stride, height, width);
  return tensor_core_problem(k, conv1x1::dgrad_problem(dy, weight, h, scale, shift, mean, invstd,
                                                       add, stride, height, width, pad.zero()));
}

std::string conv_wgrad_tensor_cores(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                                    const OptionalTensor& shift, const Tensor& weight,
                                    int64_t stride, at::OptionalIntArrayRef padding) {
  const int64_t k = check_conv_wgrad_args(dy, x, scale, shift, weight, stride, padding);
  const ConvPadding pad = read_padding("conv_wgrad", padding, k, stride, x.size(1), x.size(2));
  return tensor_core_problem(
      k, conv1x1::wgrad_problem(dy, x, scale, shift, weight, stride, pad.zero()));
}

std::string set_conv_dtype_rule(const std::string& device) {
  TORCH_CHECK(device.empty() || device == "cpu" || device == "cuda",
              "set_conv_dtype_rule: device must be '', 'cpu' or 'cuda', got '", device, "'");
  std::string previous = t_dtype_rule;
  t_dtype_rule = device;
  return previous;
}

}  // namespace fused_preact
