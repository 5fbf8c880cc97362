// Per-element math of the logit-Laplace negative log-likelihood, shared by the CPU kernels (scalar
// tails and at::vec::Vectorized bodies) and the CUDA kernels, so the CPU tests vouch for both.
// No ATen here: the formulas are templates over a value type V and a math policy M that supplies
// log/exp/abs/sign for V (ScalarMath below for float/double; the CPU kernel adds one for Vectorized).
//
// With x' = a x + eps (a = 1 - 2 eps), l = logit(x') = ln x' - ln(1 - x'), d = l - mu, b = exp(ln b):
//   loss      = ln 2 + ln b + ln x' + ln(1 - x') + |d| / b
//   dloss/dmu  = -sign(d) / b
//   dloss/dlnb = 1 - |d| / b
//   dloss/dx   = a (1 - 2 x' + sign(d) / b) / (x' (1 - x'))
// sign is torch.sign's: 0 at d == 0 (the subgradient autograd gives |.| there) and 0 for NaN, so a NaN
// mu gives d/dmu = 0 and a NaN d/dln b, exactly as eager autograd of the formula does.
#pragma once

#include <cmath>

#include "dalle_fast/common.h"

namespace dalle_fast {
namespace logit_laplace {
// Internal linkage on purpose: the CPU build compiles this header under different target ISAs
// (logit_laplace_cpu_avx512.cpp), and each translation unit must keep its own copy of these inline
// functions rather than share one with whichever ISA the linker happens to pick.
namespace {

constexpr double kLn2 = 0.693147180559945309417232121458176568;

template <typename T> struct ScalarMath;

template <> struct ScalarMath<float> {
  using scalar = float;
  static DF_HOST_DEVICE float cst(double v) { return static_cast<float>(v); }
  static DF_HOST_DEVICE float log(float v) { return ::logf(v); }
  static DF_HOST_DEVICE float exp(float v) { return ::expf(v); }
  static DF_HOST_DEVICE float abs(float v) { return ::fabsf(v); }
  static DF_HOST_DEVICE float sign(float v) { return static_cast<float>(v > 0.f) - static_cast<float>(v < 0.f); }
};

template <> struct ScalarMath<double> {
  using scalar = double;
  static DF_HOST_DEVICE double cst(double v) { return v; }
  static DF_HOST_DEVICE double log(double v) { return ::log(v); }
  static DF_HOST_DEVICE double exp(double v) { return ::exp(v); }
  static DF_HOST_DEVICE double abs(double v) { return ::fabs(v); }
  static DF_HOST_DEVICE double sign(double v) { return static_cast<double>(v > 0.) - static_cast<double>(v < 0.); }
};

// Constants of one call, in the accumulation type (float for fp32/fp16/bf16, double for double).
template <typename acc> struct Params {
  acc a;    // 1 - 2 eps
  acc eps;
};

// The loss of one element (or one vector of elements).
template <typename V, typename M>
DF_HOST_DEVICE V nll(V x, V mu, V lnb, V a, V eps) {
  const V one = M::cst(1.0);
  const V xp = a * x + eps;
  const V lp = M::log(xp);
  const V lq = M::log(one - xp);
  const V d = lp - lq - mu;
  const V inv_b = M::exp(M::cst(0.0) - lnb);
  return (M::cst(kLn2) + lnb) + (lp + lq) + M::abs(d) * inv_b;
}

// Gradients of g * loss with respect to mu and ln b (and x when want_x). The backward needs only
// logit(x'), so it takes one log of the ratio instead of the forward's two logs.
template <typename V, typename M, bool want_x>
DF_HOST_DEVICE void nll_grad(V x, V mu, V lnb, V g, V a, V eps, V& g_mu, V& g_lnb, V& g_x) {
  const V one = M::cst(1.0);
  const V xp = a * x + eps;
  const V xq = one - xp;
  const V d = M::log(xp / xq) - mu;
  const V inv_b = M::exp(M::cst(0.0) - lnb);
  const V s = M::sign(d);
  const V w = g * inv_b;
  g_mu = M::cst(0.0) - s * w;
  g_lnb = g - M::abs(d) * w;
  if constexpr (want_x) {
    g_x = (g * a) * (one - (xp + xp) + s * inv_b) / (xp * xq);
  }
}

}  // namespace
}  // namespace logit_laplace
}  // namespace dalle_fast
