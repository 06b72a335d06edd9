// conv1x1_plan.h -- the host side of the tensor-core 1x1 conv kernels (conv1x1_fused.cu) that
// needs no CUDA: their tile constants, the launch geometry of each kernel (grids, statistics
// partials, split-K) and the question whether the kernels run a given call (the fast path's
// input checks). Built into every variant of the extension, so CPU tests and `python -m
// fused_preact.check` see the same geometry and checks a GPU run uses (conv1x1_checks.cpp; the
// ops conv1x1_plan and conv_*_tensor_cores report them).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <string>

#include "unit_ops.h"

namespace fused_preact {
namespace conv1x1 {

// ---- tiles (the kernels' own constants) ---------------------------------------------------------
constexpr int kThreads = 128;          // 4 warps, 2 x 2 over the block tile
constexpr int kTileM = 128;            // block tile rows (forward/dgrad: pixels; wgrad: Cout)
constexpr int kTileN = 64;             // block tile columns (forward: Cout; dgrad, wgrad: Cin)
constexpr int kTileK = 32;             // reduction step per pipeline stage
constexpr int kChunk = 8;              // elements per 16-byte chunk
// dgrad, stride 2: input-gradient rows and channels per block of dgrad_untouched_kernel
constexpr int kFillRows = 512;
constexpr int kFillChannels = 64;      // 8 threads x 8 channels
constexpr int kFillLanes = 32;         // thread rows
// wgrad split-K: aim at this many blocks, each with at least kMinTilesPerSplit K steps
constexpr int kWgradTargetBlocks = 512;
constexpr int kMinTilesPerSplit = 8;

// The forward epilogue writes one statistics partial per row tile; the contract's partial count
// (unit_ops.h, the Meta kernels' shapes, which torch.compile's Inductor asserts) is per
// kRowsPerPartial rows. One constant for both, or real and fake shapes differ.
static_assert(kTileM == kRowsPerPartial,
              "the 1x1 GEMM's statistics partials (one per kTileM rows) must be the contract's "
              "(one per kRowsPerPartial rows)");

// CUDA's grid limits: x up to 2^31 - 1 blocks, y and z up to 65535.
constexpr int64_t kMaxGridX = 2147483647;
constexpr int64_t kMaxGridYZ = 65535;

struct Grid {
  int64_t x = 0, y = 0, z = 0;   // all 0: the kernel is not launched
  bool fits() const { return x <= kMaxGridX && y <= kMaxGridYZ && z <= kMaxGridYZ; }
};

// The launches of one 1x1 conv of `pixels` input pixels (N * H * W), `rows` output pixels
// (N * Ho * Wo), Cin -> Cout channels, stride 1 or 2.
struct Plan {
  int64_t partials;         // statistics partial rows of the forward's y
  Grid forward;             // rows_gemm_kernel<T, true>: (row tiles, Cout tiles)
  Grid dgrad;               // rows_gemm_kernel<T, false>: (row tiles, Cin tiles)
  Grid fill;                // dgrad_untouched_kernel (stride 2 only): (pixel chunks, Cin tiles)
  Grid wgrad;               // wgrad_kernel: (Cout tiles, Cin tiles, splits of the rows)
  int64_t steps_per_split;  // wgrad: K steps (kTileK rows) per split
};

Plan plan(int64_t rows, int64_t pixels, int64_t cin, int64_t cout, int64_t stride);

// The plan as JSON (named fields; the op conv1x1_plan returns it).
std::string plan_json(const Plan& plan);

// Why the tensor-core kernels do not run this call ("" when they do): the layout, dtype,
// alignment and size checks first, the device last, so a CPU run reports every reason but that
// one. `zero_padding`: the conv's padding, less what no window reads, is zero on every side.
// The callers (conv_ops.cpp) take the composite path (ATen's conv between our prologue and
// epilogue passes) whenever the answer is not empty; the kernels' own TORCH_CHECKs stay as a
// guard.
std::string bnrelu_problem(const at::Tensor& x, const at::Tensor& weight,
                           const std::optional<at::Tensor>& scale,
                           const std::optional<at::Tensor>& shift,
                           const std::optional<at::Tensor>& residual, int64_t stride,
                           bool zero_padding);
std::string dgrad_problem(const at::Tensor& dy, const at::Tensor& weight,
                          const std::optional<at::Tensor>& h,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift,
                          const std::optional<at::Tensor>& mean,
                          const std::optional<at::Tensor>& invstd,
                          const std::optional<at::Tensor>& add, int64_t stride, int64_t height,
                          int64_t width, bool zero_padding);
std::string wgrad_problem(const at::Tensor& dy, const at::Tensor& x,
                          const std::optional<at::Tensor>& scale,
                          const std::optional<at::Tensor>& shift, const at::Tensor& weight,
                          int64_t stride, bool zero_padding);

}  // namespace conv1x1
}  // namespace fused_preact
