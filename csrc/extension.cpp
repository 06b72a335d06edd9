// extension.cpp -- the fused_preact operator library: schemas and their CPU / CUDA / Meta kernels.
//
// Ops (torch.ops.fused_preact.*):
//   batch_stats(Tensor x) -> (Tensor mean, Tensor var)   per-channel mean and biased variance of a
//                                                         4-D activation, one read pass
//   built_with_cuda() -> bool                             whether CUDA kernels were compiled in
// The module defines no Python functions: importing it registers the ops with the dispatcher.
#include <Python.h>
#include <torch/library.h>

#include "batch_stats.h"

namespace {
bool built_with_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}
}  // namespace

TORCH_LIBRARY(fused_preact, m) {
  m.def("batch_stats(Tensor x) -> (Tensor mean, Tensor var)");
  m.def("built_with_cuda() -> bool", &built_with_cuda);
}

TORCH_LIBRARY_IMPL(fused_preact, CPU, m) { m.impl("batch_stats", &fused_preact::batch_stats_cpu); }
TORCH_LIBRARY_IMPL(fused_preact, Meta, m) { m.impl("batch_stats", &fused_preact::batch_stats_meta); }
#ifdef WITH_CUDA
TORCH_LIBRARY_IMPL(fused_preact, CUDA, m) { m.impl("batch_stats", &fused_preact::batch_stats_cuda); }
#endif

// An empty Python module named fused_preact._C, so `import fused_preact._C` loads the library.
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "fused-preact operators", -1, nullptr};
  return PyModule_Create(&module);
}
