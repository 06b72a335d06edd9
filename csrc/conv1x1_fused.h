// conv1x1_fused.h -- tensor-core (mma.sync) kernels for the 1x1 convolutions of a pre-activation
// unit, with the BN-ReLU prologue and the residual/statistics epilogues fused (conv1x1_fused.cu).
//
// Each function implements one contract operator of fused_preact/unit_ops.py for kernel size 1,
// stride 1 or 2, bf16/fp16 NHWC activations, fp32 accumulation; the caller (the CUDA
// implementations of torch.ops.fused_preact.conv_bnrelu / conv_dgrad / conv_wgrad) uses them when
// conv1x1::bnrelu_problem / dgrad_problem / wgrad_problem (conv1x1_plan.h) find nothing against
// the call, and cuDNN otherwise. Arguments and results are exactly the operators' (see
// unit_ops.py); a call those checks refuse raises c10::Error with the reason.
#pragma once

#ifdef WITH_CUDA
#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>

namespace fused_preact {

// conv_bnrelu: y = conv1x1(relu(scale * x + shift), weight, stride) (+ residual) in x's dtype and,
// when `stats`, the partials (pmean, pm2 [T, Cout], pcount [T], float32) of y as stored;
// otherwise those three are empty.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> conv1x1_bnrelu_cuda(
    const at::Tensor& x, const at::Tensor& weight, const at::Tensor& scale, const at::Tensor& shift,
    const std::optional<at::Tensor>& residual, int64_t stride, bool stats);

// conv_dgrad: g = (conv1x1_input_grad(dy, weight) + add) * !(scale * h + shift <= 0), NHWC
// [N, height, width, Cin] in dy's dtype, and the float32 [Cin] sums sum(g), sum(g*(h-mean)*invstd)
// (empty when h is None, and then g has no mask).
std::tuple<at::Tensor, at::Tensor, at::Tensor> conv1x1_dgrad_cuda(
    const at::Tensor& dy, const at::Tensor& weight, const std::optional<at::Tensor>& h,
    const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& shift,
    const std::optional<at::Tensor>& mean, const std::optional<at::Tensor>& invstd,
    const std::optional<at::Tensor>& add, int64_t stride, int64_t height, int64_t width);

// conv_wgrad: dweight [Cout, Cin, 1, 1] in weight's dtype, the pre-activation of x recomputed.
at::Tensor conv1x1_wgrad_cuda(const at::Tensor& dy, const at::Tensor& x, const at::Tensor& scale,
                              const at::Tensor& shift, const at::Tensor& weight, int64_t stride);

}  // namespace fused_preact
#endif  // WITH_CUDA
