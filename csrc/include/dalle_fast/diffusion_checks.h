// Boundary checks of dynamic_threshold and guided_step, shared by cpu/diffusion_cpu.cpp and
// cuda/diffusion_cuda.cu. ATen core only, nothing nvcc cannot read, no CUDA.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <optional>
#include <string>

#include "dalle_fast/diffusion.h"

namespace dalle_fast {
namespace diffusion {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_percentile(double q, const char* op) {
  TORCH_CHECK_VALUE(q > 0.0 && q <= 1.0, op, ": percentile must be in (0, 1], got ", q);
}

// x: (B, ...) with at least one element per sample; returns the number of elements per sample.
inline int64_t check_threshold_input(const at::Tensor& x, const char* op, const char* name) {
  TORCH_CHECK_TYPE(is_float_type(x.scalar_type()), op, ": ", name,
                   " must be float32, float64, float16 or bfloat16, got ", x.scalar_type());
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", name, " must have a batch dim (B, ...), got a 0-dim tensor");
  const int64_t b = x.size(0);
  const int64_t n = b == 0 ? 0 : x.numel() / b;
  TORCH_CHECK_VALUE(b == 0 || n > 0, op, ": ", name, " must have at least one element per sample, got shape ",
                    x.sizes());
  return n;
}

inline void check_dynamic_threshold(const at::Tensor& x, double percentile) {
  check_threshold_input(x, "dynamic_threshold", "x0");
  check_percentile(percentile, "dynamic_threshold");
}

inline void check_threshold_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                     const at::Tensor& pivots, double percentile) {
  const char* op = "_dynamic_threshold_backward";
  check_threshold_input(x, op, "x");
  check_percentile(percentile, op);
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes() && grad.scalar_type() == x.scalar_type() &&
                        grad.device() == x.device(),
                    op, ": grad must match x in shape, dtype and device, got ", grad.sizes(), " ",
                    grad.scalar_type(), " for x ", x.sizes(), " ", x.scalar_type());
  TORCH_CHECK_VALUE(scale.dim() == 1 && scale.size(0) == x.size(0) && scale.scalar_type() == at::kDouble &&
                        scale.device() == x.device(),
                    op, ": scale must be a float64 (B,) tensor on x's device, got ", scale.sizes(), " ",
                    scale.scalar_type());
  TORCH_CHECK_VALUE(pivots.dim() == 2 && pivots.size(0) == x.size(0) && pivots.size(1) == 2 &&
                        pivots.scalar_type() == at::kLong && pivots.device() == x.device(),
                    op, ": pivots must be an int64 (B, 2) tensor on x's device, got ", pivots.sizes(), " ",
                    pivots.scalar_type());
}

inline Parameterization parse_parameterization(const std::string& s) {
  if (s == "eps") return kEps;
  if (s == "v") return kV;
  if (s == "x0") return kX0;
  TORCH_CHECK_VALUE(false, "guided_step: parameterization must be 'eps', 'v' or 'x0', got '", s, "'");
}

inline Sampler parse_sampler(const std::string& s) {
  if (s == "ddpm") return kDdpm;
  if (s == "ddim") return kDdim;
  TORCH_CHECK_VALUE(false, "guided_step: sampler must be 'ddpm' or 'ddim', got '", s, "'");
}

inline Threshold parse_threshold(const std::string& s) {
  if (s == "dynamic") return kDynamic;
  if (s == "static") return kStatic;
  if (s == "none") return kNone;
  TORCH_CHECK_VALUE(false, "guided_step: threshold must be 'dynamic', 'static' or 'none', got '", s, "'");
}

// Everything but the values of alpha_bar_t / alpha_bar_prev (which need the data: the CPU kernel
// checks them, the Python wrapper checks them before a CUDA launch).
inline void check_guided_step(const at::Tensor& cond, const std::optional<at::Tensor>& uncond, const at::Tensor& x_t,
                              const at::Tensor& alpha_bar_t, const at::Tensor& alpha_bar_prev, double guidance,
                              double eta, const std::string& threshold, double percentile, const at::Tensor& seed,
                              int64_t offset) {
  const char* op = "guided_step";
  check_threshold_input(x_t, op, "x_t");
  auto same = [&](const at::Tensor& t, const char* name) {
    TORCH_CHECK_VALUE(t.sizes() == x_t.sizes(), op, ": ", name, " must have x_t's shape ", x_t.sizes(), ", got ",
                      t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == x_t.scalar_type(), op, ": ", name, " must have x_t's dtype ",
                     x_t.scalar_type(), ", got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == x_t.device(), op, ": ", name, " must be on x_t's device ", x_t.device(),
                      ", got ", t.device());
  };
  same(cond, "cond");
  if (uncond.has_value()) same(*uncond, "uncond");
  for (const auto* t : {&alpha_bar_t, &alpha_bar_prev}) {
    const char* name = t == &alpha_bar_t ? "alpha_bar_t" : "alpha_bar_prev";
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x_t.size(0) && t->scalar_type() == at::kDouble &&
                          t->device() == x_t.device(),
                      op, ": ", name, " must be a float64 tensor of shape (B,) = (", x_t.size(0),
                      ",) on x_t's device, got ", t->scalar_type(), " ", t->sizes(), " on ", t->device());
  }
  TORCH_CHECK_VALUE(std::isfinite(guidance) && guidance >= 0.0, op, ": guidance must be a finite number >= 0, got ",
                    guidance);
  TORCH_CHECK_VALUE(std::isfinite(eta) && eta >= 0.0, op, ": eta must be a finite number >= 0, got ", eta);
  if (parse_threshold(threshold) == kDynamic) check_percentile(percentile, op);
  TORCH_CHECK_VALUE(seed.scalar_type() == at::kLong && seed.numel() == 1 && seed.device() == x_t.device(), op,
                    ": seed must be a one-element int64 tensor on x_t's device, got ", seed.scalar_type(), " with ",
                    seed.numel(), " elements on ", seed.device());
  TORCH_CHECK_VALUE(offset >= 0 && offset <= 0xffffffffLL, op, ": offset must be in [0, 2^32), got ", offset);
}

// The values of one sample's schedule (host side).
inline void check_alpha_bars(double a, double p, int64_t sample) {
  TORCH_CHECK_VALUE(a > 0.0 && a < 1.0 && a <= p && p <= 1.0,
                    "guided_step: need 0 < alpha_bar_t < 1 and alpha_bar_t <= alpha_bar_prev <= 1, got alpha_bar_t=",
                    a, ", alpha_bar_prev=", p, " for sample ", sample);
}

// The backward of dynamic_threshold: a composite of ATen ops (cpu/diffusion_cpu.cpp), registered for
// both devices.
at::Tensor dynamic_threshold_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& pivots, double percentile);

}  // namespace diffusion
}  // namespace dalle_fast
