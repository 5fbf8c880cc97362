// The per-element math of per-resblock gradient scaling (the paper's Appendix D), shared by the CPU
// and CUDA kernels (host and device, no ATen), so the CPU tests vouch for the CUDA arithmetic too.
//
// One element of a gradient g at a residual branch's boundary, with the block's scale s:
//   v = unscale ? g / s : g * s        (in the accumulation type: fp32 for 16-bit, fp64 for fp64)
//   out = v rounded to the output type, or 0 when that is NaN or +-Inf (the filter);
//   the block is flagged non-finite when the rounded value was not finite.
// Division (not a multiply by 1/s) so unscaling is exact whenever s is a power of two.
#pragma once
#include <type_traits>

#include "dalle_fast/common.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <limits>
#endif

namespace dalle_fast {
namespace resblock {

// The arithmetic type of a gradient of in_t rounded to out_t: fp64 if either is fp64, else fp32.
template <typename in_t, typename out_t>
using pair_acc_t =
    std::conditional_t<std::is_same_v<in_t, double> || std::is_same_v<out_t, double>, double, float>;

// Branch-free on the host (|v| <= max is false for NaN and +-Inf), so g++ vectorises the loops.
template <typename acc>
DF_HOST_DEVICE bool is_finite(acc v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::fabs(v) <= std::numeric_limits<acc>::max();
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

// Rounds v to out_t and filters it; `bad` becomes nonzero when the rounded value is NaN or infinite.
// (`bad` is an unsigned OR-accumulator: g++ vectorises that reduction, not one over a bool.)
template <typename out_t, typename acc>
DF_HOST_DEVICE out_t scale_filter(acc g, acc s, bool unscale, unsigned& bad) {
  const acc v = unscale ? div_rn(g, s) : g * s;
  const out_t r = static_cast<out_t>(v);
  const bool finite = is_finite(static_cast<acc>(r));
  bad |= static_cast<unsigned>(!finite);
  return finite ? r : static_cast<out_t>(0);
}

// In-place unscale of one parameter-gradient element: g / s rounded to g's type. The value is kept
// even when non-finite (the step is skipped then and the gradient is not used).
template <typename T, typename acc>
DF_HOST_DEVICE T unscale_in_place(T g, acc s, unsigned& bad) {
  const T r = static_cast<T>(div_rn(static_cast<acc>(g), s));
  bad |= static_cast<unsigned>(!is_finite(static_cast<acc>(r)));
  return r;
}

}  // namespace resblock
}  // namespace dalle_fast
