// extension.cpp -- the fused_preact operator library: schemas and their CPU / CUDA / Meta kernels.
//
// Ops (torch.ops.fused_preact.*):
//   the six operators of the fused-unit contract (fused_preact/unit_ops.py, exact same schemas):
//     channel_stats, bn_finalize, conv_bnrelu, conv_dgrad, conv_wgrad, bn_backward_finish,
//     bn_add_relu, bn_add_relu_backward
//   bn_relu_apply(x, scale, shift, residual?) -> out      relu(scale * x + shift) (+ residual), NHWC
//   bn_relu_backward_reduce(t, h, scale, shift, mean, invstd, add?) -> (g, sum_g, sum_g_xhat)
//                                                         conv_dgrad's epilogue without the conv
//   batch_stats(Tensor x) -> (Tensor mean, Tensor var)   per-channel mean and biased variance of a
//                                                         4-D activation, one read pass
//   conv_bnrelu_tensor_cores / conv_dgrad_tensor_cores / conv_wgrad_tensor_cores(<the conv
//       operator's arguments>) -> str                     why the tensor-core 1x1 kernels do not run
//                                                         that call ("" when they do)
//   conv1x1_plan(int rows, int pixels, int cin, int cout, int stride) -> str
//                                                         the 1x1 kernels' launch geometry, JSON
//   set_conv_dtype_rule(str device) -> str                the conv composites follow this device's
//                                                         dtype rule on this thread (tests)
//   built_with_cuda() -> bool                             whether CUDA kernels were compiled in
//   cpu_threads() -> int                                  how many threads at::parallel_for runs the CPU
//                                                         kernels on (torch's intra-op threads, or 1
//                                                         when built without OpenMP)
//   cpu_simd() -> str                                     the CPU kernels' instruction set: "avx512",
//                                                         "avx2" or "generic" (setup.py's choice)
// The module defines no Python functions: importing it registers the ops with the dispatcher.
#include <Python.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <set>
#include <string>
#include <vector>

#include "batch_stats.h"
#include "conv1x1_plan.h"
#include "unit_ops.h"
#include "unit_ops_cuda.h"

namespace {
bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

int64_t cpu_threads() {
  const int64_t tasks = 4 * at::get_num_threads();
  std::vector<int64_t> thread_of_task(static_cast<size_t>(tasks), -1);
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) thread_of_task[static_cast<size_t>(i)] = at::get_thread_num();
  });
  return static_cast<int64_t>(std::set<int64_t>(thread_of_task.begin(), thread_of_task.end()).size());
}

std::string conv1x1_plan(int64_t rows, int64_t pixels, int64_t cin, int64_t cout, int64_t stride) {
  TORCH_CHECK(rows >= 0 && pixels >= 0 && cin > 0 && cout > 0 && (stride == 1 || stride == 2),
              "conv1x1_plan: rows and pixels must be >= 0, cin and cout > 0, stride 1 or 2");
  return fused_preact::conv1x1::plan_json(fused_preact::conv1x1::plan(rows, pixels, cin, cout, stride));
}

std::string set_conv_dtype_rule(std::string device) { return fused_preact::set_conv_dtype_rule(device); }

std::string cpu_simd() {
#if defined(CPU_CAPABILITY_AVX512)
  return "avx512";
#elif defined(CPU_CAPABILITY_AVX2)
  return "avx2";
#else
  return "generic";
#endif
}
}  // namespace

TORCH_LIBRARY(fused_preact, m) {
  // Keep in step with fused_preact.unit_ops.SCHEMAS (tests/test_cpp_ops.py compares them).
  m.def("channel_stats(Tensor x) -> (Tensor pmean, Tensor pm2, Tensor pcount)");
  m.def("bn_finalize(Tensor pmean, Tensor pm2, Tensor pcount, Tensor weight, Tensor bias, "
        "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? num_batches_tracked, "
        "float momentum, float eps) -> (Tensor mean, Tensor invstd, Tensor scale, Tensor shift)");
  m.def("conv_bnrelu(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
        "int stride, bool stats, int[]? padding=None) "
        "-> (Tensor y, Tensor pmean, Tensor pm2, Tensor pcount)");
  m.def("conv_dgrad(Tensor dy, Tensor weight, Tensor? h, Tensor? scale, Tensor? shift, "
        "Tensor? mean, Tensor? invstd, Tensor? add, int stride, int height, int width, "
        "int[]? padding=None) -> (Tensor g, Tensor sum_g, Tensor sum_g_xhat)");
  m.def("conv_wgrad(Tensor dy, Tensor x, Tensor? scale, Tensor? shift, Tensor weight, int stride, "
        "int[]? padding=None) -> Tensor dweight");
  m.def("bn_backward_finish(Tensor g, Tensor h, Tensor mean, Tensor invstd, Tensor weight, "
        "Tensor sum_g, Tensor sum_g_xhat, float count, Tensor? add, bool batch_stats) -> Tensor dh");
  m.def("bn_add_relu(Tensor h, Tensor scale, Tensor shift, Tensor residual, Tensor? residual_scale, "
        "Tensor? residual_shift) -> Tensor y");
  m.def("bn_add_relu_backward(Tensor dy, Tensor y, Tensor h, Tensor mean, Tensor invstd, "
        "Tensor? residual, Tensor? residual_mean, Tensor? residual_invstd) "
        "-> (Tensor g, Tensor sum_g, Tensor sum_g_xhat, Tensor residual_sum_g_xhat)");
  m.def("bn_relu_apply(Tensor x, Tensor scale, Tensor shift, Tensor? residual) -> Tensor");
  m.def("bn_relu_backward_reduce(Tensor t, Tensor h, Tensor scale, Tensor shift, Tensor mean, "
        "Tensor invstd, Tensor? add) -> (Tensor g, Tensor sum_g, Tensor sum_g_xhat)");
  m.def("batch_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("conv_bnrelu_tensor_cores(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, "
        "Tensor? residual, int stride, bool stats, int[]? padding=None) -> str",
        &fused_preact::conv_bnrelu_tensor_cores);
  m.def("conv_dgrad_tensor_cores(Tensor dy, Tensor weight, Tensor? h, Tensor? scale, Tensor? shift, "
        "Tensor? mean, Tensor? invstd, Tensor? add, int stride, int height, int width, "
        "int[]? padding=None) -> str",
        &fused_preact::conv_dgrad_tensor_cores);
  m.def("conv_wgrad_tensor_cores(Tensor dy, Tensor x, Tensor? scale, Tensor? shift, Tensor weight, "
        "int stride, int[]? padding=None) -> str",
        &fused_preact::conv_wgrad_tensor_cores);
  m.def("conv1x1_plan(int rows, int pixels, int cin, int cout, int stride) -> str", &conv1x1_plan);
  m.def("set_conv_dtype_rule(str device) -> str", &set_conv_dtype_rule);
  m.def("built_with_cuda() -> bool", &built_with_cuda);
  m.def("cpu_threads() -> int", &cpu_threads);
  m.def("cpu_simd() -> str", &cpu_simd);
}

TORCH_LIBRARY_IMPL(fused_preact, CPU, m) {
  using namespace fused_preact;
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("bn_finalize", &bn_finalize_cpu);
  m.impl("conv_bnrelu", &conv_bnrelu);
  m.impl("conv_dgrad", &conv_dgrad);
  m.impl("conv_wgrad", &conv_wgrad);
  m.impl("bn_backward_finish", &bn_backward_finish_cpu);
  m.impl("bn_add_relu", &bn_add_relu_cpu);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cpu);
  m.impl("bn_relu_apply", &bn_relu_apply_cpu);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cpu);
  m.impl("batch_stats", &batch_stats_cpu);
}

TORCH_LIBRARY_IMPL(fused_preact, Meta, m) {
  using namespace fused_preact;
  m.impl("channel_stats", &channel_stats_meta);
  m.impl("bn_finalize", &bn_finalize_meta);
  m.impl("conv_bnrelu", &conv_bnrelu_meta);
  m.impl("conv_dgrad", &conv_dgrad_meta);
  m.impl("conv_wgrad", &conv_wgrad_meta);
  m.impl("bn_backward_finish", &bn_backward_finish_meta);
  m.impl("bn_add_relu", &bn_add_relu_meta);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_meta);
  m.impl("bn_relu_apply", &bn_relu_apply_meta);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_meta);
  m.impl("batch_stats", &batch_stats_meta);
}

#ifdef WITH_CUDA
// CUDA kernels of every operator (never run on a GPU yet: see notes/cpp_ops.md); the conv
// composites are the same device-generic functions as on the CPU.
TORCH_LIBRARY_IMPL(fused_preact, CUDA, m) {
  using namespace fused_preact;
  m.impl("channel_stats", &channel_stats_cuda);
  m.impl("bn_finalize", &bn_finalize_cuda);
  m.impl("conv_bnrelu", &conv_bnrelu);
  m.impl("conv_dgrad", &conv_dgrad);
  m.impl("conv_wgrad", &conv_wgrad);
  m.impl("bn_backward_finish", &bn_backward_finish_cuda);
  m.impl("bn_add_relu", &bn_add_relu_cuda);
  m.impl("bn_add_relu_backward", &bn_add_relu_backward_cuda);
  m.impl("bn_relu_apply", &bn_relu_apply_cuda);
  m.impl("bn_relu_backward_reduce", &bn_relu_backward_reduce_cuda);
  m.impl("batch_stats", &batch_stats_cuda);
}
#endif

// An empty Python module named fused_preact._C, so `import fused_preact._C` loads the library.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fused-preact operators", -1, nullptr};
  return PyModule_Create(&module);
}
