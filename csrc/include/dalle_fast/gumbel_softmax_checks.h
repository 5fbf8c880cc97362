// The boundary of gumbel_softmax, gumbel_softmax_hard, one_hot_argmax and _gumbel_softmax_backward:
// written once, called by cpu/gumbel_softmax_cpu.cpp and cuda/gumbel_softmax_cuda.cu. ValueError
// (TORCH_CHECK_VALUE) for shapes, devices and ranges, TypeError (TORCH_CHECK_TYPE) for dtypes,
// IndexError for dim (ATen's maybe_wrap_dim). Host only (ATen, no CUDA); reads sizes, never data.
#pragma once
#include <ATen/WrapDimUtils.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <optional>

namespace dalle_fast {

inline void gumbel_softmax_check_logits(const at::Tensor& logits, int64_t dim, const char* op) {
  const auto t = logits.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16, op,
                   ": logits must be float32, float64, float16 or bfloat16, got ", t);
  (void)at::maybe_wrap_dim(dim, logits.dim());
}

inline void gumbel_softmax_check_tau(double tau, const char* op) {
  TORCH_CHECK_VALUE(std::isfinite(tau) && tau > 0, op, ": tau must be a finite number > 0, got ", tau);
}

inline void gumbel_softmax_check_inputs(const at::Tensor& logits, const at::Tensor& seed,
                                        const std::optional<at::Tensor>& gumbels, double tau, int64_t dim) {
  constexpr const char* op = "gumbel_softmax";
  gumbel_softmax_check_logits(logits, dim, op);
  gumbel_softmax_check_tau(tau, op);
  TORCH_CHECK_TYPE(seed.scalar_type() == at::kLong, op, ": seed must be a one-element int64 tensor, got dtype ",
                   seed.scalar_type());
  TORCH_CHECK_VALUE(seed.numel() == 1, op, ": seed must be a one-element int64 tensor, got ", seed.numel(),
                    " elements");
  TORCH_CHECK_VALUE(seed.device() == logits.device(), op, ": seed must be on logits' device (", logits.device(),
                    "), got ", seed.device());
  if (gumbels.has_value()) {
    TORCH_CHECK_VALUE(gumbels->sizes() == logits.sizes(), op, ": gumbels must have logits' shape ", logits.sizes(),
                      ", got ", gumbels->sizes());
    TORCH_CHECK_TYPE(gumbels->scalar_type() == logits.scalar_type(), op, ": gumbels must have logits' dtype ",
                     logits.scalar_type(), ", got ", gumbels->scalar_type());
    TORCH_CHECK_VALUE(gumbels->device() == logits.device(), op, ": gumbels must be on logits' device (",
                      logits.device(), "), got ", gumbels->device());
  }
}

inline void gumbel_softmax_check_backward(const at::Tensor& grad, const at::Tensor& y, double tau, int64_t dim) {
  constexpr const char* op = "_gumbel_softmax_backward";
  TORCH_CHECK_VALUE(grad.sizes() == y.sizes() && grad.device() == y.device(), op,
                    ": grad and y must match in shape and device, got ", grad.sizes(), " on ", grad.device(), " and ",
                    y.sizes(), " on ", y.device());
  TORCH_CHECK_TYPE(grad.scalar_type() == y.scalar_type(), op, ": grad and y must match in dtype, got ",
                   grad.scalar_type(), " and ", y.scalar_type());
  gumbel_softmax_check_logits(y, dim, op);
  gumbel_softmax_check_tau(tau, op);
}

}  // namespace dalle_fast
