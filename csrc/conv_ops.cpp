// conv_ops.cpp -- conv_bnrelu, conv_dgrad and conv_wgrad (the convolutions of a fused unit), one
// device-generic implementation registered for the CPU and CUDA keys:
//   conv_bnrelu  y = conv(relu(scale * x + shift), W, stride) (+ residual), stats partials of y
//                (scale and shift None: conv(x), no prologue: the original unit's first conv)
//   conv_dgrad   g = (conv_input_grad(dy, W) + add) * (scale * h + shift > 0), sum_g, sum_g_xhat
//   conv_wgrad   dW = conv_weight_grad(relu(scale * x + shift), dy)   (or of x, without prologue)
// On CUDA, 1x1 convs of bf16/fp16 data that conv1x1_fused_supported() accepts run the fused
// tensor-core kernels of conv1x1_fused.cu (prologue and epilogues inside the GEMM; a conv without
// prologue takes the composite path). Every other
// conv is a composite: prologue -> ATen convolution -> epilogue. The BN-ReLU prologue is our apply
// kernel into a temporary, the convolution is at::convolution / at::convolution_backward on
// channels_last views of the NHWC data (cuDNN on CUDA; oneDNN or native on the CPU), and the
// epilogue is one fused pass of ours (residual add + statistics partials; add + ReLU mask + the
// two sums), each a CPU or CUDA kernel by the data's device.
// Precision: the weight is rounded to the activation dtype; on CUDA the convolution runs in that
// dtype (fp32 accumulation), on the CPU bfloat16 / float16 data are convolved in fp32 (the
// operands hold exactly the rounded values), so y is rounded once, after the residual add.
// Saves nothing: the temporaries are freed before returning.
#include <ATen/ops/add.h>
#include <ATen/ops/convolution.h>
#include <ATen/ops/convolution_backward.h>
#include <ATen/ops/empty.h>

#include "unit_ops.h"
#ifdef WITH_CUDA
#include "conv1x1_fused.h"
#include "unit_ops_cuda.h"
#endif

namespace fused_preact {

namespace {

bool is_reduced(at::ScalarType dtype) { return dtype == at::kBFloat16 || dtype == at::kHalf; }

// The dtype the convolution runs in for activations of `dtype` on `t`'s device.
at::ScalarType conv_dtype(const Tensor& t, at::ScalarType dtype) {
  return t.is_cpu() && is_reduced(dtype) ? at::kFloat : dtype;
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

// Whether the tensor-core 1x1 kernels run this conv (data: the tensor with the conv's channels).
bool fused_conv1x1(const Tensor& data, const Tensor& weight, int64_t k) {
#ifdef WITH_CUDA
  return k == 1 && data.is_cuda() && conv1x1_fused_supported(data, weight);
#else
  (void)data, (void)weight, (void)k;
  return false;
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
                    bool stats) {
  const int64_t k = check_conv_bnrelu_args(x, weight, scale, shift, residual, stride);
#ifdef WITH_CUDA
  if (scale.has_value() && fused_conv1x1(x, weight, k)) {
    return conv1x1_bnrelu_cuda(x, weight, *scale, *shift, residual, stride, stats);
  }
#endif
  const at::ScalarType dtype = x.scalar_type(), compute = conv_dtype(x, dtype);
  Tensor conv_out;
  {
    const Tensor activated = conv_input(x, scale, shift, compute);
    conv_out = nhwc_of(at::convolution(nchw_view(activated), conv_weight(weight, dtype, compute),
                                       std::nullopt, {stride, stride}, {k / 2, k / 2}, {1, 1},
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
                   const OptionalTensor& add, int64_t stride, int64_t height, int64_t width) {
  const int64_t k = check_conv_dgrad_args(dy, weight, h, scale, shift, mean, invstd, add, stride,
                                          height, width);
#ifdef WITH_CUDA
  if (fused_conv1x1(dy, weight, k)) {
    return conv1x1_dgrad_cuda(dy, weight, h, scale, shift, mean, invstd, add, stride, height, width);
  }
#endif
  const at::ScalarType dtype = dy.scalar_type(), compute = conv_dtype(dy, dtype);
  const int64_t pad = k / 2;
  // conv_input_grad as a transposed convolution; output_padding picks the input size among the
  // `stride` sizes that give dy's.
  const int64_t out_pad_h = height - ((dy.size(1) - 1) * stride - 2 * pad + k);
  const int64_t out_pad_w = width - ((dy.size(2) - 1) * stride - 2 * pad + k);
  const Tensor t = nhwc_of(at::convolution(nchw_view(dy.to(compute)),
                                           conv_weight(weight, dtype, compute), std::nullopt,
                                           {stride, stride}, {pad, pad}, {1, 1},
                                           /*transposed=*/true, {out_pad_h, out_pad_w}, 1));
  return dgrad_epilogue(t, add, h, scale, shift, mean, invstd, dtype);
}

Tensor conv_wgrad(const Tensor& dy, const Tensor& x, const OptionalTensor& scale,
                  const OptionalTensor& shift, const Tensor& weight, int64_t stride) {
  const int64_t k = check_conv_wgrad_args(dy, x, scale, shift, weight, stride);
#ifdef WITH_CUDA
  if (scale.has_value() && fused_conv1x1(x, weight, k)) {
    return conv1x1_wgrad_cuda(dy, x, *scale, *shift, weight, stride);
  }
#endif
  const at::ScalarType dtype = x.scalar_type(), compute = conv_dtype(x, dtype);
  const Tensor activated = conv_input(x, scale, shift, compute);
  const Tensor dweight = std::get<1>(at::convolution_backward(
      nchw_view(dy.to(compute)), nchw_view(activated), conv_weight(weight, dtype, compute),
      std::nullopt, {stride, stride}, {k / 2, k / 2}, {1, 1}, /*transposed=*/false, {0, 0},
      /*groups=*/1, {false, true, false}));
  return dweight.to(weight.scalar_type()).contiguous();
}

}  // namespace fused_preact
