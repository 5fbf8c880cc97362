// The math of the diffusion sampling ops (dynamic_threshold, guided_step), shared by the CPU and CUDA
// kernels (host and device, no ATen), so the CPU tests vouch for the CUDA arithmetic too.
//
// Schedule coefficients. A step from x_t (alpha_bar = a) to x_prev (alpha_bar = p, a <= p <= 1,
// 0 < a < 1) with the model output `pred` is linear in (x_t, pred) up to the thresholding of x0:
//   x0    = x0_xt * x_t + x0_pred * pred       eps: (x_t - sqrt(1-a) eps) / sqrt(a)
//                                               v:   sqrt(a) x_t - sqrt(1-a) v
//                                               x0:  pred
//   x0    = threshold(x0)
//   x_prev = mean_x0 * x0 + mean_xt * x_t + sigma * z
//     ddpm: the posterior q(x_prev | x_t, x0): mean_x0 = sqrt(p) beta / (1-a),
//           mean_xt = sqrt(alpha) (1-p) / (1-a), sigma^2 = beta (1-p) / (1-a), alpha = a/p, beta = 1-alpha
//     ddim: sigma = eta sqrt((1-p)/(1-a)) sqrt(1-a/p), c = sqrt(1-p-sigma^2), eps' = (x_t - sqrt(a) x0) /
//           sqrt(1-a) (the eps of the thresholded x0), x_prev = sqrt(p) x0 + c eps' + sigma z, i.e.
//           mean_x0 = sqrt(p) - c sqrt(a)/sqrt(1-a), mean_xt = c / sqrt(1-a).
// dalle_fast/reference/diffusion.py writes the same steps out in PyTorch.
//
// Noise z. Element e (flat index in x_t's contiguous order) of a step with seed and offset:
//   r = Philox4x32-10(counter = (lo32(e/64), hi32(e/64), 256 + e%16, offset), key = (lo32(seed), hi32(seed)))
//   (words 0,1) and (words 2,3) of r are two Box-Muller pairs; e takes word (e%64)/16:
//   u = (bits/2^9 + 1/2) / 2^23 for the first word of its pair, t likewise for the second,
//   z = sqrt(-2 ln u) * (cos 2 pi t for the first word of the pair, sin 2 pi t for the second).
// The block layout is the Gumbel kernel's (gumbel_softmax.h); the 256 in the third word keeps the two
// streams apart for one seed.
//
// Percentile (torch.quantile, interpolation='linear'): over the n values v of a sample sorted
// ascending, rank = q (n-1) (in double), lo = floor(rank), hi = ceil(rank), w = rank - lo,
// value = lerp(v[lo], v[hi], w) with torch's lerp formula; the scale is s = max(1, value), NaN if the
// sample holds a NaN (torch.quantile's rule).
#pragma once
#include "dalle_fast/common.h"
#include "dalle_fast/gumbel_softmax.h"  // bits_as_float, float_as_bits, noise_log
#include "dalle_fast/philox.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

namespace dalle_fast {
namespace diffusion {

enum Parameterization : int { kEps = 0, kV = 1, kX0 = 2 };
enum Sampler : int { kDdpm = 0, kDdim = 1 };
enum Threshold : int { kNone = 0, kStatic = 1, kDynamic = 2 };

constexpr uint32_t kNormalStream = 256;  // third counter word offset: the normal stream of a seed

DF_MATH double dsqrt(double x) {
#if defined(__CUDA_ARCH__)
  return ::sqrt(x);
#else
  return std::sqrt(x);
#endif
}

struct StepCoefs {
  double x0_xt, x0_pred, mean_x0, mean_xt, sigma;
};

// a = alpha_bar_t, p = alpha_bar_prev; valid for 0 < a < 1, a <= p <= 1, eta >= 0 (checked by callers).
DF_MATH StepCoefs step_coefs(double a, double p, int param, int sampler, double eta) {
  StepCoefs c;
  const double sa = dsqrt(a), s1a = dsqrt(1.0 - a);
  if (param == kEps) {
    c.x0_xt = 1.0 / sa;
    c.x0_pred = -s1a / sa;
  } else if (param == kV) {
    c.x0_xt = sa;
    c.x0_pred = -s1a;
  } else {
    c.x0_xt = 0.0;
    c.x0_pred = 1.0;
  }
  const double alpha = a / p, beta = 1.0 - alpha;
  if (sampler == kDdpm) {
    c.mean_x0 = dsqrt(p) * beta / (1.0 - a);
    c.mean_xt = dsqrt(alpha) * (1.0 - p) / (1.0 - a);
    const double var = beta * (1.0 - p) / (1.0 - a);
    c.sigma = var > 0.0 ? dsqrt(var) : 0.0;
  } else {
    const double var = (1.0 - p) / (1.0 - a) * beta;
    const double sigma = var > 0.0 ? eta * dsqrt(var) : 0.0;
    const double rest = 1.0 - p - sigma * sigma;
    const double cc = rest > 0.0 ? dsqrt(rest) : 0.0;
    c.mean_x0 = dsqrt(p) - cc * sa / s1a;
    c.mean_xt = cc / s1a;
    c.sigma = sigma;
  }
  return c;
}

// ---- the normal noise ----

DF_MATH float uniform_open(uint32_t bits) {  // (k + 1/2) 2^-23, in (0, 1), exact in float
  return (static_cast<float>(static_cast<int32_t>(bits >> 9)) + 0.5f) * (1.0f / 8388608.0f);
}

// (cos 2 pi t, sin 2 pi t) for t in (0, 1): 4t = q + f exactly, |f| <= 1/2, the angle f pi/2 in
// [-pi/4, pi/4] through Cephes' sinf/cosf polynomials, then the quadrant q. Branch-free (vectorises).
DF_MATH void sincos_2pi(float t, float* c_out, float* s_out) {
  const float v = 4.0f * t;
  const float q = static_cast<float>(static_cast<int>(v + 0.5f));  // round half up, v >= 0
  const float x = (v - q) * 1.57079632679489662f;
  const float z = x * x;
  const float sn = x + x * z * (-1.6666654611e-1f + z * (8.3321608736e-3f + z * -1.9515295891e-4f));
  const float cs = 1.0f - 0.5f * z + z * z * (4.166664568298827e-2f + z * (-1.388731625493765e-3f +
                                                                         z * 2.443315711809948e-5f));
  const int k = static_cast<int>(q) & 3;
  const float c1 = (k & 1) ? sn : cs, s1 = (k & 1) ? cs : sn;
  *c_out = (k == 1 || k == 2) ? -c1 : c1;
  *s_out = (k >= 2) ? -s1 : s1;
}

DF_MATH float box_muller(uint32_t b_radius, uint32_t b_angle, bool second) {
  float c, s;
  sincos_2pi(uniform_open(b_angle), &c, &s);
  const float r = ::sqrtf(-2.0f * noise_log(uniform_open(b_radius)));
  return r * (second ? s : c);
}

DF_MATH double box_muller_f64(uint32_t b_radius, uint32_t b_angle, bool second) {
  const double u = (static_cast<double>(b_radius >> 9) + 0.5) * (1.0 / 8388608.0);
  const double t = (static_cast<double>(b_angle >> 9) + 0.5) * (1.0 / 8388608.0);
  const double a = 6.283185307179586476925286766559 * t;
#if defined(__CUDA_ARCH__)
  const double r = ::sqrt(-2.0 * ::log(u));
  return r * (second ? ::sin(a) : ::cos(a));
#else
  const double r = std::sqrt(-2.0 * std::log(u));
  return r * (second ? std::sin(a) : std::cos(a));
#endif
}

DF_MATH Philox4 normal_philox(PhiloxKey key, uint32_t offset, uint64_t e) {
  const uint64_t block = e >> 6;
  return philox4x32_10({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                        kNormalStream + static_cast<uint32_t>(e & 15u), offset}, key);
}

// The standard normal of element e, in float (fp16/bf16/fp32 kernels) or double (fp64).
template <typename acc>
DF_MATH acc normal_noise(PhiloxKey key, uint32_t offset, uint64_t e) {
  const Philox4 r = normal_philox(key, offset, e);
  const int w = static_cast<int>((e >> 4) & 3u);
  const uint32_t br = (w < 2) ? r.x0 : r.x2, ba = (w < 2) ? r.x1 : r.x3;
  if constexpr (sizeof(acc) == sizeof(double)) return box_muller_f64(br, ba, (w & 1) != 0);
  else return box_muller(br, ba, (w & 1) != 0);
}

// ---- the percentile ----

struct Rank {
  int64_t lo, hi;
  double w;
};

// nvcc contracts a * b + c into an FMA by default; the select must round like the host (and like
// torch.quantile), so on the device the products are rounded explicitly.
DF_MATH double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

DF_MATH Rank quantile_rank(double q, int64_t n) {
  const double rank = mul_rn(q, static_cast<double>(n - 1));
  Rank r;
  r.lo = static_cast<int64_t>(rank);
  r.hi = static_cast<int64_t>(::ceil(rank));
  if (r.hi > n - 1) r.hi = n - 1;
  r.w = rank - static_cast<double>(r.lo);
  return r;
}

// at::lerp's formula (the one torch.quantile ends with).
DF_MATH double torch_lerp(double a, double b, double w) {
  return (w < 0.5) ? a + mul_rn(w, b - a) : b - mul_rn(b - a, 1.0 - w);
}

// s = max(1, lerp(v_lo, v_hi, w)); NaN stays NaN.
DF_MATH double threshold_scale(double v_lo, double v_hi, double w) {
  const double v = torch_lerp(v_lo, v_hi, w);
  return (v != v) ? v : (v > 1.0 ? v : 1.0);
}

// True when s is the percentile itself (not the floor 1), i.e. it depends on the pivot elements.
DF_MATH bool scale_is_percentile(double v_lo, double v_hi, double w) {
  const double v = torch_lerp(v_lo, v_hi, w);
  return v > 1.0;
}

// clamp(x, -s, s) / s in the accumulation type.
template <typename acc>
DF_MATH acc clamp_scale(acc x, acc s) {
  const acc c = x < -s ? -s : (x > s ? s : x);
  return c / s;
}

// Order-preserving key of |x| for the radix select: the bits of a non-negative float (or double)
// increase with its value; NaN (any sign) sorts above +inf.
DF_MATH uint32_t abs_key(float x) { return float_as_bits(x) & 0x7fffffffu; }

}  // namespace diffusion
}  // namespace dalle_fast
