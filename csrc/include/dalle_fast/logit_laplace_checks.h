// The boundary of logit_laplace_loss and _logit_laplace_loss_backward, written once and called by
// cpu/logit_laplace_cpu.cpp and cuda/logit_laplace_cuda.cu (with the batch-row layout both accept).
// ValueError (TORCH_CHECK_VALUE) for shapes, devices, ranges and x's values, TypeError
// (TORCH_CHECK_TYPE) for dtypes. Host only: ATen core, no CUDA.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

namespace dalle_fast {
namespace logit_laplace {

enum Reduction : int { kNone = 0, kSum = 1, kMean = 2 };

inline Reduction parse_reduction(const std::string& r) {
  if (r == "none") return kNone;
  if (r == "sum") return kSum;
  if (r == "mean") return kMean;
  TORCH_CHECK_VALUE(false, "logit_laplace_loss: reduction must be 'none', 'sum' or 'mean', got '", r, "'");
}

// Shapes, dtypes, devices and eps; x's values ([0, 1], not NaN) are checked inside the forward kernel.
inline void check_inputs(const at::Tensor& x, const at::Tensor& stats, double eps) {
  TORCH_CHECK_VALUE(x.dim() == 4, "logit_laplace_loss: x must be (B, C, H, W), got ", x.dim(), " dims ", x.sizes());
  TORCH_CHECK_VALUE(stats.dim() == 4, "logit_laplace_loss: stats must be (B, 2C, H, W), got ", stats.dim(), " dims ",
                    stats.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()), "logit_laplace_loss: x must be a floating tensor, got ",
                   x.scalar_type());
  TORCH_CHECK_TYPE(stats.scalar_type() == x.scalar_type(), "logit_laplace_loss: stats must have x's dtype (",
                   x.scalar_type(), "), got ", stats.scalar_type());
  TORCH_CHECK_VALUE(stats.device() == x.device(), "logit_laplace_loss: x and stats must be on one device, got ",
                    x.device(), " and ", stats.device());
  TORCH_CHECK_VALUE(stats.size(0) == x.size(0) && stats.size(1) == 2 * x.size(1) && stats.size(2) == x.size(2) &&
                        stats.size(3) == x.size(3),
                    "logit_laplace_loss: stats must be (B, 2C, H, W) = ", x.size(0), "x", 2 * x.size(1), "x",
                    x.size(2), "x", x.size(3), " for x of shape ", x.sizes(),
                    " (first C channels mu, last C ln b), got ", stats.sizes());
  TORCH_CHECK_VALUE(eps > 0.0 && eps < 0.5, "logit_laplace_loss: eps must be in (0, 0.5), got ", eps);
}

// The backward's extra input: grad has x's shape for 'none', is a scalar otherwise.
inline void check_backward_grad(const at::Tensor& grad, const at::Tensor& x, Reduction red,
                                const std::string& reduction) {
  TORCH_CHECK_VALUE(grad.device() == x.device(), "_logit_laplace_loss_backward: grad must be on x's device (",
                    x.device(), "), got ", grad.device());
  TORCH_CHECK_TYPE(at::isFloatingType(grad.scalar_type()), "_logit_laplace_loss_backward: grad must be a floating "
                   "tensor, got ", grad.scalar_type());
  if (red == kNone) {
    TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "_logit_laplace_loss_backward: grad must have x's shape ",
                      x.sizes(), " for reduction 'none', got ", grad.sizes());
  } else {
    TORCH_CHECK_VALUE(grad.numel() == 1, "_logit_laplace_loss_backward: grad must be a scalar for reduction '",
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

// x's values are checked inside the forward kernels (no separate pass); both devices report alike.
inline void check_x_values(bool any_outside) {
  TORCH_CHECK_VALUE(!any_outside, "logit_laplace_loss: x must lie in [0, 1] (found a value outside it or NaN)");
}

}  // namespace logit_laplace
}  // namespace dalle_fast
