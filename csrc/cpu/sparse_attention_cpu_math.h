// Row-wise softmax pieces of the CPU sparse attention kernel (float: SIMD, double: plain loops).
//
// The extension is compiled for the baseline x86-64 ISA (at::vec would then be its scalar fallback),
// so each float loop runs through with_cpu_isa (cpu_isa.h): compiled for AVX-512, AVX2 and the
// baseline, picked at run time from ATen's CPU capability, no ISA assumed at compile time. exp is
// a polynomial the compiler can vectorize; its error is ~1 ulp, far below fp32 GEMM rounding.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

#include "cpu_isa.h"

namespace dalle_fast {
namespace {

// e^x for x <= ~88; returns 0 below -87 (masked scores are -inf).
inline float exp_poly(float x) {
  const float t0 = x * 1.44269504088896341f;
  const float t = t0 < -126.0f ? -126.0f : t0;
  const float n = (t + 12582912.0f) - 12582912.0f;  // round to nearest (1.5 * 2^23 trick)
  const float f = (t - n) * 0.693147180559945309f;  // e^(n ln2 + f), |f| <= ln2 / 2
  float p = 1.0f / 5040;
  p = p * f + 1.0f / 720;
  p = p * f + 1.0f / 120;
  p = p * f + 1.0f / 24;
  p = p * f + 1.0f / 6;
  p = p * f + 0.5f;
  p = p * f + 1.0f;
  p = p * f + 1.0f;
  const int32_t bits = ((int32_t)n + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &bits, sizeof(float));
  return x < -87.0f ? 0.0f : p * two_n;
}

inline float row_max_f32(const float* x, int64_t n) {
  return with_cpu_isa([&] {
    float m = -std::numeric_limits<float>::infinity();
#pragma omp simd reduction(max : m)
    for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
    return m;
  });
}

inline float exp_sub_sum_f32(float* x, int64_t n, float sub) {
  return with_cpu_isa([&] {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) {
      const float e = exp_poly(x[i] - sub);
      x[i] = e;
      s += e;
    }
    return s;
  });
}

inline void scale_f32(float* x, int64_t n, float a) {
  return with_cpu_isa([&] {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] *= a;
  });
}

inline void mask_f32(float* x, const uint8_t* m, int64_t n) {
  return with_cpu_isa([&] {
    const float ninf = -std::numeric_limits<float>::infinity();
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) x[i] = m[i] ? x[i] : ninf;
  });
}

// dS = P * (dP - d) * scale, in place over dP.
inline void softmax_grad_f32(float* dp, const float* p, int64_t n, float d, float scale) {
  return with_cpu_isa([&] {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d) * scale;
  });
}

inline float dot_f32(const float* a, const float* b, int64_t n) {
  return with_cpu_isa([&] {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
    return s;
  });
}

// y += a * x
inline void axpy_f32(float* y, float a, const float* x, int64_t n) {
  return with_cpu_isa([&] {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
  });
}

// One decode query against `cnt` gathered cache rows (keys[n] * ld): s receives the probabilities
// unnormalized, out = softmax(q . K^T) V. q is pre-scaled float. One call per (batch, head), so the
// per-key work stays inside one ISA-specific function (a call per key costs as much as the key itself).
inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const uint16_t* p, int64_t i) {  // bfloat16 bits
  const uint32_t bits = (uint32_t)p[i] << 16;
  float f;
  std::memcpy(&f, &bits, sizeof(f));
  return f;
}
template <typename T>
__attribute__((always_inline)) inline void attend_one_impl(const float* q, const T* K, int64_t ldk, const T* V,
                                                           int64_t ldv, const int64_t* keys, int64_t cnt, int64_t D,
                                                           float* s, float* out) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t n = 0; n < cnt; ++n) {
    const T* kr = K + keys[n] * ldk;
    float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
    for (int64_t d = 0; d < D; ++d) acc += q[d] * load_f(kr, d);
    s[n] = acc;
    mx = acc > mx ? acc : mx;
  }
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t n = 0; n < cnt; ++n) {
    const float e = exp_poly(s[n] - mx);
    s[n] = e;
    sum += e;
  }
  for (int64_t d = 0; d < D; ++d) out[d] = 0.0f;
  for (int64_t n = 0; n < cnt; ++n) {
    const T* vr = V + keys[n] * ldv;
    const float p = s[n];
#pragma omp simd
    for (int64_t d = 0; d < D; ++d) out[d] += p * load_f(vr, d);
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) out[d] *= inv;
}
inline void attend_one_f32(const float* q, const float* K, int64_t ldk, const float* V, int64_t ldv,
                           const int64_t* keys, int64_t cnt, int64_t D, float* s, float* out) {
  return with_cpu_isa([&] {
    attend_one_impl(q, K, ldk, V, ldv, keys, cnt, D, s, out);
  });
}
inline void attend_one_bf16(const float* q, const uint16_t* K, int64_t ldk, const uint16_t* V, int64_t ldv,
                            const int64_t* keys, int64_t cnt, int64_t D, float* s, float* out) {
  return with_cpu_isa([&] {
    attend_one_impl(q, K, ldk, V, ldv, keys, cnt, D, s, out);
  });
}

// Overloads the templated kernel calls: float goes to the ISA-dispatched loops above, double to plain loops.
inline float row_max(const float* x, int64_t n) { return row_max_f32(x, n); }
inline float exp_sub_sum(float* x, int64_t n, float sub) { return exp_sub_sum_f32(x, n, sub); }
inline void exp_sub(float* x, int64_t n, float sub) { (void)exp_sub_sum_f32(x, n, sub); }
inline void scale_inplace(float* x, int64_t n, float a) { scale_f32(x, n, a); }
inline void apply_mask(float* x, const uint8_t* m, int64_t n) { mask_f32(x, m, n); }
inline void softmax_grad(float* dp, const float* p, int64_t n, float d, float scale) {
  softmax_grad_f32(dp, p, n, d, scale);
}
inline float dot(const float* a, const float* b, int64_t n) { return dot_f32(a, b, n); }
inline void axpy(float* y, float a, const float* x, int64_t n) { axpy_f32(y, a, x, n); }
inline void axpy(double* y, double a, const double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

inline double row_max(const double* x, int64_t n) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t i = 0; i < n; ++i) m = x[i] > m ? x[i] : m;
  return m;
}
inline double exp_sub_sum(double* x, int64_t n, double sub) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += (x[i] = std::exp(x[i] - sub));
  return s;
}
inline void exp_sub(double* x, int64_t n, double sub) { (void)exp_sub_sum(x, n, sub); }
inline void scale_inplace(double* x, int64_t n, double a) {
  for (int64_t i = 0; i < n; ++i) x[i] *= a;
}
inline void apply_mask(double* x, const uint8_t* m, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!m[i]) x[i] = -std::numeric_limits<double>::infinity();
}
inline void softmax_grad(double* dp, const double* p, int64_t n, double d, double scale) {
  for (int64_t i = 0; i < n; ++i) dp[i] = p[i] * (dp[i] - d) * scale;
}
inline double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

}  // namespace
}  // namespace dalle_fast
