// The per-element math of per-resblock gradient scaling (the paper's Appendix D), shared by the CPU
// and CUDA kernels (host and device, no ATen), so the CPU tests vouch for the CUDA arithmetic too.
//
// One element of a gradient g at a residual branch's boundary, with the block's scale s:
//   v = unscale ? g / s : g * s        (in the accumulation type: fp32 for 16-bit, fp64 for fp64)
//   out = v rounded to the output type, or 0 when that is NaN or +-Inf (the filter);
//   the block is flagged non-finite when the rounded value was not finite.
// Division (not a multiply by 1/s) so unscaling is exact whenever s is a power of two.
#pragma once
#include "dalle_fast/common.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace dalle_fast {
namespace resblock {

template <typename acc>
DF_HOST_DEVICE bool is_finite(acc v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

// Correctly rounded division even under nvcc's --use_fast_math (whose '/' is approximate), so the
// CUDA kernels give the CPU kernels' bits.
DF_HOST_DEVICE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}
DF_HOST_DEVICE double div_rn(double a, double b) { return a / b; }

// Rounds v to out_t and filters it; sets *bad when the rounded value is NaN or infinite.
template <typename out_t, typename acc>
DF_HOST_DEVICE out_t scale_filter(acc g, acc s, bool unscale, bool* bad) {
  const acc v = unscale ? div_rn(g, s) : g * s;
  const out_t r = static_cast<out_t>(v);
  if (is_finite(static_cast<acc>(r))) return r;
  *bad = true;
  return static_cast<out_t>(0);
}

// In-place unscale of one parameter-gradient element: g / s rounded to g's type. The value is kept
// even when non-finite (the step is skipped then and the gradient is not used).
template <typename T, typename acc>
DF_HOST_DEVICE T unscale_in_place(T g, acc s, bool* bad) {
  const T r = static_cast<T>(div_rn(static_cast<acc>(g), s));
  if (!is_finite(static_cast<acc>(r))) *bad = true;
  return r;
}

}  // namespace resblock
}  // namespace dalle_fast
