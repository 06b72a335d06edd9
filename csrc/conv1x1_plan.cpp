// conv1x1_plan.cpp -- launch geometry and input checks of the tensor-core 1x1 conv kernels
// (see conv1x1_plan.h). Host code only, built with and without CUDA; computes nothing on tensors.
#include "conv1x1_plan.h"

#include <algorithm>
#include <sstream>

namespace fused_preact {
namespace conv1x1 {

namespace {

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

std::string str(int64_t v) { return std::to_string(v); }

bool is_half_type(c10::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

bool aligned16(const at::Tensor& t) {
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// An NHWC bf16/fp16 activation the kernels read or write with 16-byte accesses ("" if it is one).
std::string activation_problem(const at::Tensor& t, const char* name, int64_t channels,
                               c10::ScalarType dtype) {
  if (t.scalar_type() != dtype) {
    return std::string(name) + " is " + c10::toString(t.scalar_type()) + ", the kernels take " +
           c10::toString(dtype) + " like the conv's input";
  }
  if (!is_half_type(t.scalar_type()))
    return std::string(name) + " is " + c10::toString(t.scalar_type()) + ", not bfloat16 or float16";
  if (t.dim() != 4) return std::string(name) + " is not 4-D NHWC";
  if (!t.is_contiguous()) return std::string(name) + " is not contiguous NHWC";
  if (t.size(3) != channels)
    return std::string(name) + " has " + str(t.size(3)) + " channels, not " + str(channels);
  if (channels % kChunk != 0)
    return std::string(name) + " has " + str(channels) + " channels, not a multiple of 8";
  if (!aligned16(t)) return std::string(name) + " data is not 16-byte aligned";
  const int64_t pixels = t.size(0) * t.size(1) * t.size(2);
  if (pixels >= (int64_t(1) << 31) || t.numel() >= (int64_t(1) << 31) * kChunk)
    return std::string(name) + " has too many pixels for the kernels' 32-bit row indices";
  return "";
}

// A per-channel float32 vector the kernels read with __ldg ("" if it is one).
std::string vector_problem(const std::optional<at::Tensor>& t, const char* name, int64_t channels) {
  if (!t.has_value()) return std::string(name) + " is missing";
  if (t->scalar_type() != at::kFloat)
    return std::string(name) + " is " + c10::toString(t->scalar_type()) + ", the kernels read float32";
  if (t->dim() != 1 || t->size(0) != channels || !t->is_contiguous())
    return std::string(name) + " is not a contiguous [" + str(channels) + "] vector";
  return "";
}

std::string weight_problem(const at::Tensor& weight, c10::ScalarType dtype) {
  if (weight.dim() != 4 || weight.size(2) != 1 || weight.size(3) != 1) return "the kernel is not 1x1";
  if (weight.scalar_type() != at::kFloat && weight.scalar_type() != dtype)
    return std::string("weight is ") + c10::toString(weight.scalar_type()) + ", not float32 or the data's dtype";
  if (weight.size(0) % kChunk != 0 || weight.size(1) % kChunk != 0)
    return "Cout or Cin is not a multiple of 8";
  if (weight.size(0) >= (int64_t(1) << 31) || weight.size(1) >= (int64_t(1) << 31))
    return "the weight is too large";
  // the kernels read a copy in the data's dtype, 16-byte aligned (weight_matrix): any view does
  return "";
}

// All on one device, and that a CUDA device (checked last: a CPU run sees the other reasons).
std::string device_problem(std::initializer_list<const at::Tensor*> tensors) {
  const at::Tensor& first = **tensors.begin();
  for (const at::Tensor* t : tensors) {
    if (t->device() != first.device()) return "its tensors are on different devices";
  }
  if (!first.is_cuda()) return "the data is not on a CUDA device";
  return "";
}

std::string first_of(std::initializer_list<std::string> problems) {
  for (const std::string& p : problems) {
    if (!p.empty()) return p;
  }
  return "";
}

}  // namespace

Plan plan(int64_t rows, int64_t pixels, int64_t cin, int64_t cout, int64_t stride) {
  Plan p{};
  p.partials = partial_count(rows);
  p.forward = Grid{ceil_div(rows, kTileM), ceil_div(cout, kTileN), 1};
  p.dgrad = Grid{ceil_div(rows, kTileM), ceil_div(cin, kTileN), 1};
  // stride 2: the input pixels no output reads; pixel chunks on x (2^31 - 1 blocks), channel tiles
  // on y. (Chunks on y stopped at 65535 * 512 = 33.5M pixels: "invalid configuration argument".)
  if (stride != 1) p.fill = Grid{ceil_div(pixels, kFillRows), ceil_div(cin, kFillChannels), 1};
  // wgrad split-K over the rows: enough blocks to fill a GPU, chosen from the shapes only
  const int64_t tiles = ceil_div(cout, kTileM) * ceil_div(cin, kTileN);
  const int64_t steps = std::max<int64_t>(ceil_div(rows, kTileK), 1);
  const int64_t max_splits = std::max<int64_t>(1, steps / kMinTilesPerSplit);
  const int64_t wanted = std::clamp<int64_t>(ceil_div(kWgradTargetBlocks, tiles), 1, max_splits);
  p.steps_per_split = ceil_div(steps, wanted);
  p.wgrad = Grid{ceil_div(cout, kTileM), ceil_div(cin, kTileN), ceil_div(steps, p.steps_per_split)};
  return p;
}

std::string plan_json(const Plan& p) {
  std::ostringstream out;
  auto grid = [&](const char* name, const Grid& g) {
    out << "\"" << name << "\": {\"x\": " << g.x << ", \"y\": " << g.y << ", \"z\": " << g.z
        << ", \"fits\": " << (g.fits() ? "true" : "false") << "}";
  };
  out << "{\"rows_per_partial\": " << kRowsPerPartial << ", \"partials\": " << p.partials << ", ";
  grid("forward", p.forward);
  out << ", ";
  grid("dgrad", p.dgrad);
  out << ", ";
  grid("fill", p.fill);
  out << ", ";
  grid("wgrad", p.wgrad);
  out << ", \"steps_per_split\": " << p.steps_per_split << "}";
  return out.str();
}

std::string bnrelu_problem(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& residual, int64_t stride,
                           bool zero_padding) {
  if (!scale.has_value()) return "the conv has no BN-ReLU prologue (raw input)";
  if (!zero_padding) return "the conv is padded";
  if (stride != 1 && stride != 2) return "the stride is not 1 or 2";
  std::string problem = weight_problem(weight, x.scalar_type());
  if (problem.empty()) problem = activation_problem(x, "x", weight.size(1), x.scalar_type());
  if (!problem.empty()) return problem;
  const int64_t rows = x.size(0) * ((x.size(1) - 1) / stride + 1) * ((x.size(2) - 1) / stride + 1);
  const Plan p = plan(rows, x.size(0) * x.size(1) * x.size(2), weight.size(1), weight.size(0), stride);
  problem = first_of({vector_problem(scale, "scale", weight.size(1)),
                      vector_problem(shift, "shift", weight.size(1)),
                      residual.has_value()
                          ? activation_problem(*residual, "residual", weight.size(0), x.scalar_type())
                          : std::string(),
                      p.forward.fits() ? std::string() : std::string("the grid is too large")});
  if (!problem.empty()) return problem;
  if (residual.has_value() && (residual->size(0) != x.size(0) ||
                               residual->size(1) != (x.size(1) - 1) / stride + 1 ||
                               residual->size(2) != (x.size(2) - 1) / stride + 1))
    return "residual does not have y's shape";
  if (residual.has_value()) return device_problem({&x, &weight, &*scale, &*shift, &*residual});
  return device_problem({&x, &weight, &*scale, &*shift});
}

std::string dgrad_problem(const at::Tensor& dy, const at::Tensor& weight,
                          const std::optional<at::Tensor>& h,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift,
                          const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& invstd,
                          const std::optional<at::Tensor>& add, int64_t stride, int64_t height,
                          int64_t width, bool zero_padding) {
  if (!zero_padding) return "the conv is padded";
  if (stride != 1 && stride != 2) return "the stride is not 1 or 2";
  std::string problem = weight_problem(weight, dy.scalar_type());
  if (problem.empty()) problem = activation_problem(dy, "dy", weight.size(0), dy.scalar_type());
  if (!problem.empty()) return problem;
  const int64_t cin = weight.size(1), n = dy.size(0);
  if (height <= 0 || width <= 0 || dy.size(1) != (height - 1) / stride + 1 ||
      dy.size(2) != (width - 1) / stride + 1)
    return "dy's size does not match the input's";
  const int64_t pixels = n * height * width;
  if (pixels >= (int64_t(1) << 31) || pixels * cin >= (int64_t(1) << 31) * kChunk)
    return "the input gradient has too many pixels for the kernels' 32-bit row indices";
  auto like_g = [&](const std::optional<at::Tensor>& t, const char* name) -> std::string {
    if (!t.has_value()) return "";
    std::string p = activation_problem(*t, name, cin, dy.scalar_type());
    if (p.empty() && (t->size(0) != n || t->size(1) != height || t->size(2) != width))
      p = std::string(name) + " does not have the input gradient's shape";
    return p;
  };
  const Plan p = plan(n * dy.size(1) * dy.size(2), pixels, cin, weight.size(0), stride);
  problem = first_of({like_g(add, "add"), like_g(h, "h"),
                      p.dgrad.fits() && p.fill.fits() ? std::string()
                                                      : std::string("the grid is too large")});
  if (!problem.empty()) return problem;
  if (h.has_value()) {
    problem = first_of({vector_problem(scale, "scale", cin), vector_problem(shift, "shift", cin),
                        vector_problem(mean, "mean", cin), vector_problem(invstd, "invstd", cin)});
    if (!problem.empty()) return problem;
    problem = device_problem({&dy, &weight, &*h, &*scale, &*shift, &*mean, &*invstd});
    if (!problem.empty()) return problem;
  }
  if (add.has_value()) return device_problem({&dy, &weight, &*add});
  return device_problem({&dy, &weight});
}

std::string wgrad_problem(const at::Tensor& dy, const at::Tensor& x,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift, const at::Tensor& weight,
                          int64_t stride, bool zero_padding) {
  if (!scale.has_value()) return "the conv has no BN-ReLU prologue (raw input)";
  if (!zero_padding) return "the conv is padded";
  if (stride != 1 && stride != 2) return "the stride is not 1 or 2";
  std::string problem = weight_problem(weight, x.scalar_type());
  if (problem.empty()) problem = activation_problem(x, "x", weight.size(1), x.scalar_type());
  if (problem.empty()) problem = activation_problem(dy, "dy", weight.size(0), x.scalar_type());
  if (!problem.empty()) return problem;
  if (dy.size(0) != x.size(0) || dy.size(1) != (x.size(1) - 1) / stride + 1 ||
      dy.size(2) != (x.size(2) - 1) / stride + 1)
    return "dy's shape does not match x's";
  const Plan p = plan(dy.size(0) * dy.size(1) * dy.size(2), x.size(0) * x.size(1) * x.size(2),
                      weight.size(1), weight.size(0), stride);
  problem = first_of({vector_problem(scale, "scale", weight.size(1)),
                      vector_problem(shift, "shift", weight.size(1)),
                      p.wgrad.fits() ? std::string() : std::string("the grid is too large")});
  if (!problem.empty()) return problem;
  return device_problem({&dy, &x, &weight, &*scale, &*shift});
}

}  // namespace conv1x1
}  // namespace fused_preact
