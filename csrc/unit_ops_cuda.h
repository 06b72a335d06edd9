// unit_ops_cuda.h -- CUDA kernels of the per-element and statistics passes of the fused unit
// (namespace fused_preact), each with exactly the signature and semantics of its _cpu counterpart
// in unit_ops.h (the spec, with the docstring of fused_preact/unit_ops.py):
//   statistics_cuda.cu   channel_stats_cuda, conv_epilogue_cuda, bn_finalize_cuda
//   elementwise_cuda.cu  bn_relu_apply_cuda, bn_relu_prologue_cuda, dgrad_epilogue_cuda,
//                        bn_relu_backward_reduce_cuda, bn_backward_finish_cuda,
//                        bn_add_relu_cuda, bn_add_relu_backward_cuda
// The public operators (channel_stats, bn_finalize, bn_relu_apply, bn_relu_backward_reduce,
// bn_backward_finish) run the same argument checks as the CPU kernels (unit_checks.cpp) and
// require CUDA tensors; the building blocks (prologue, epilogues) assume checked arguments, as on
// the CPU. Everything runs on the current stream of the tensors' device and never synchronizes
// with the host (bn_finalize reads num_batches_tracked on the device).
#pragma once

#ifdef WITH_CUDA
#include "unit_ops.h"

namespace fused_preact {

// ---- operators -------------------------------------------------------------------------------
Tensor3 channel_stats_cuda(const Tensor& x);
Tensor4 bn_finalize_cuda(const Tensor& pmean, const Tensor& pm2, const Tensor& pcount,
                         const Tensor& weight, const Tensor& bias, const OptionalTensor& running_mean,
                         const OptionalTensor& running_var, const OptionalTensor& num_batches_tracked,
                         double momentum, double eps);
Tensor bn_relu_apply_cuda(const Tensor& x, const Tensor& scale, const Tensor& shift,
                          const OptionalTensor& residual);
Tensor bn_backward_finish_cuda(const Tensor& g, const Tensor& h, const Tensor& mean,
                               const Tensor& invstd, const Tensor& weight, const Tensor& sum_g,
                               const Tensor& sum_g_xhat, double count, const OptionalTensor& add,
                               bool batch_stats);
Tensor3 bn_relu_backward_reduce_cuda(const Tensor& t, const Tensor& h, const Tensor& scale,
                                     const Tensor& shift, const Tensor& mean, const Tensor& invstd,
                                     const OptionalTensor& add);
Tensor bn_add_relu_cuda(const Tensor& h, const Tensor& scale, const Tensor& shift,
                        const Tensor& residual, const OptionalTensor& residual_scale,
                        const OptionalTensor& residual_shift);
Tensor4 bn_add_relu_backward_cuda(const Tensor& dy, const Tensor& y, const Tensor& h,
                                  const Tensor& mean, const Tensor& invstd,
                                  const OptionalTensor& residual, const OptionalTensor& residual_mean,
                                  const OptionalTensor& residual_invstd);

// ---- device halves of the conv composites' building blocks (see unit_ops.h) ---------------------
// out_dtype: x's dtype (what the CUDA conv runs in), or float32 holding x-dtype-rounded values
// for bfloat16 / float16 x (as on the CPU).
Tensor bn_relu_prologue_cuda(const Tensor& x, const Tensor& scale, const Tensor& shift,
                             at::ScalarType out_dtype);
// conv_out: in `dtype`, or float32 for bfloat16 / float16 `dtype`.
Tensor4 conv_epilogue_cuda(const Tensor& conv_out, const OptionalTensor& residual,
                           at::ScalarType dtype, bool stats);
// conv_out: in `dtype`, or float32 for bfloat16 / float16 `dtype`; h in `dtype`.
Tensor3 dgrad_epilogue_cuda(const Tensor& conv_out, const OptionalTensor& add, const Tensor& h,
                            const Tensor& scale, const Tensor& shift, const Tensor& mean,
                            const Tensor& invstd, at::ScalarType dtype);

}  // namespace fused_preact
#endif  // WITH_CUDA
