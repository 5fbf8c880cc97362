// Boundary checks and the raw kernel arguments of logit_laplace_loss, shared by the CPU entry
// (logit_laplace_cpu.cpp), its per-ISA kernels (logit_laplace_cpu_{avx2,avx512}.cpp) and the CUDA
// entry (cuda/logit_laplace_cuda.cu). ATen core only: no at::vec, nothing nvcc cannot read. The
// per-element math (dalle_fast/logit_laplace.h) is not included here: the per-ISA files must include
// it only after raising their target.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "dalle_fast/common.h"

namespace dalle_fast {
namespace logit_laplace {

// Elements summed into one partial of a 'sum'/'mean' forward. Chunks never straddle a batch row
// and the partials are added in chunk order, so the result does not depend on the thread count.
constexpr int64_t kChunk = 16384;

enum Reduction : int { kNone = 0, kSum = 1, kMean = 2 };

inline Reduction parse_reduction(const std::string& r) {
  if (r == "none") return kNone;
  if (r == "sum") return kSum;
  if (r == "mean") return kMean;
  TORCH_CHECK(false, "logit_laplace_loss: reduction must be 'none', 'sum' or 'mean', got '", r, "'");
}

// Shapes, dtypes, devices and eps; x's values ([0, 1], not NaN) are checked inside the forward kernel.
inline void check_inputs(const at::Tensor& x, const at::Tensor& stats, double eps) {
  TORCH_CHECK(x.dim() == 4, "logit_laplace_loss: x must be (B, C, H, W), got ", x.dim(), " dims ", x.sizes());
  TORCH_CHECK(stats.dim() == 4, "logit_laplace_loss: stats must be (B, 2C, H, W), got ", stats.dim(), " dims ",
              stats.sizes());
  TORCH_CHECK(at::isFloatingType(x.scalar_type()), "logit_laplace_loss: x must be a floating tensor, got ",
              x.scalar_type());
  TORCH_CHECK(stats.scalar_type() == x.scalar_type(), "logit_laplace_loss: stats must have x's dtype (",
              x.scalar_type(), "), got ", stats.scalar_type());
  TORCH_CHECK(stats.device() == x.device(), "logit_laplace_loss: x and stats must be on one device, got ",
              x.device(), " and ", stats.device());
  TORCH_CHECK(stats.size(0) == x.size(0) && stats.size(1) == 2 * x.size(1) && stats.size(2) == x.size(2) &&
                  stats.size(3) == x.size(3),
              "logit_laplace_loss: stats must be (B, 2C, H, W) = ", x.size(0), "x", 2 * x.size(1), "x", x.size(2),
              "x", x.size(3), " for x of shape ", x.sizes(), " (first C channels mu, last C ln b), got ",
              stats.sizes());
  TORCH_CHECK(eps > 0.0 && eps < 0.5, "logit_laplace_loss: eps must be in (0, 0.5), got ", eps);
}

// The backward's extra input: grad has x's shape for 'none', is a scalar otherwise.
inline void check_backward_grad(const at::Tensor& grad, const at::Tensor& x, Reduction red,
                                const std::string& reduction) {
  TORCH_CHECK(grad.device() == x.device(), "_logit_laplace_loss_backward: grad must be on x's device");
  if (red == kNone) {
    TORCH_CHECK(grad.sizes() == x.sizes(), "_logit_laplace_loss_backward: grad must have x's shape ",
                x.sizes(), " for reduction 'none', got ", grad.sizes());
  } else {
    TORCH_CHECK(grad.numel() == 1, "_logit_laplace_loss_backward: grad must be a scalar for reduction '",
                reduction, "', got shape ", grad.sizes());
  }
}

// A tensor whose every batch row t[b] is one contiguous block (any stride between rows): the
// kernels address element i of row b as b * row_stride + i (row_stride >= 0). A channel slice of a
// wider decoder output qualifies without a copy; anything else is made contiguous.
inline at::Tensor rows_contiguous(const at::Tensor& t) {
  if (t.size(0) == 0 || t.numel() == 0) return t.contiguous();
  if (t.stride(0) >= 0 && t.select(0, 0).is_contiguous()) return t;
  return t.contiguous();
}

inline int64_t row_stride(const at::Tensor& t) {
  // A batch of one may carry any stride(0); it is never used then.
  return t.size(0) > 1 ? t.stride(0) : t.numel();
}

// Everything one CPU kernel call needs, as raw pointers; outputs are contiguous.
struct CpuArgs {
  at::ScalarType dtype;
  const void* x = nullptr;      // row b at b * x_stride
  const void* stats = nullptr;  // row b at b * s_stride: mu [0, M), ln b [M, 2M)
  const void* grad = nullptr;   // backward, reduction 'none': (B, C, H, W) contiguous; else nullptr
  void* out = nullptr;          // forward 'none': (B, C, H, W) contiguous
  void* grad_stats = nullptr;   // backward: (B, 2C, H, W) contiguous
  void* grad_x = nullptr;       // backward: (B, C, H, W) contiguous, or nullptr when not wanted
  int64_t B = 0, M = 0, x_stride = 0, s_stride = 0;
  double eps = 0.1;
  double gscale = 1.0;          // backward 'sum'/'mean': the gradient of every element
  bool store_loss = false;      // forward: write `out` ('none') ...
  double* partials = nullptr;   // ... or one partial sum per chunk ('sum'/'mean')
  uint8_t* bad = nullptr;       // forward: per chunk, 1 if some x is outside [0, 1] or NaN
};

inline int64_t chunks_per_row(int64_t M) { return (M + kChunk - 1) / kChunk; }

// One implementation per instruction set, compiled in its own translation unit with
// at::vec::Vectorized of that ISA; logit_laplace_cpu.cpp picks one at run time.
#define DALLE_FAST_LL_DECLARE(NS)                \
  namespace NS {                                 \
  void forward(const CpuArgs& args);             \
  void backward(const CpuArgs& args);            \
  }
DALLE_FAST_LL_DECLARE(cpu_default)
DALLE_FAST_LL_DECLARE(cpu_avx2)
DALLE_FAST_LL_DECLARE(cpu_avx512)
#undef DALLE_FAST_LL_DECLARE

}  // namespace logit_laplace
}  // namespace dalle_fast
