// The per-element math of the fused Gumbel-softmax, shared by the CPU and CUDA kernels (host and
// device, no ATen), so the CPU tests vouch for the CUDA arithmetic too.
//
// Noise definition (the same on every device, thread count and `dim`): element e of the logical
// tensor, e its flat index in row-major (contiguous) order, gets
//   r = Philox4x32-10(counter = (lo32(e/64), hi32(e/64), e % 16, 0), key = (lo32(seed), hi32(seed)))
//   bits = word (e % 64) / 16 of r,    u = (bits/2^9 + 1/2) / 2^23  in [2^-24, 1 - 2^-24]
//   g = -log(-log(u))                   (standard Gumbel, computed in the accumulation type).
// One Philox call gives the words of e, e+16, e+32, e+48, so a CPU block of 64 elements is 16
// independent calls (one vector) whose outputs land on 16 contiguous elements each.
// dalle_fast/reference/gumbel_softmax.py implements the same definition in PyTorch.
#pragma once
#include "dalle_fast/common.h"
#include "dalle_fast/philox.h"

#if !defined(__CUDA_ARCH__)
#include <cmath>
#include <cstring>
#endif

namespace dalle_fast {

constexpr int kNoiseBlock = 64;  // elements per Philox block (16 calls x 4 words)

// A tensor seen as (outer, C, inner) around the softmax dim: element (o, c, i) sits at flat index
// (o * C + c) * inner + i of the contiguous tensor, with no transposed copy. A 0-dim tensor is
// (1, 1, 1).
struct SoftmaxLayout {
  int64_t outer, C, inner;
};

DF_MATH SoftmaxLayout softmax_layout(const int64_t* sizes, int64_t ndim, int64_t dim) {
  SoftmaxLayout l{1, ndim == 0 ? 1 : sizes[dim], 1};
  for (int64_t d = 0; d < dim; ++d) l.outer *= sizes[d];
  for (int64_t d = dim + 1; d < ndim; ++d) l.inner *= sizes[d];
  return l;
}

DF_MATH float bits_as_float(uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(b);
#else
  float f;
  std::memcpy(&f, &b, sizeof f);
  return f;
#endif
}

DF_MATH uint32_t float_as_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t b;
  std::memcpy(&b, &f, sizeof b);
  return b;
#endif
}

// log for positive normal floats (the only inputs the noise produces): Cephes logf, about 1 ulp.
// Written branch-free so g++ vectorises it; libm's logf is a scalar call.
DF_MATH float noise_log(float x) {
  const uint32_t b = float_as_bits(x);
  int e = static_cast<int>((b >> 23) & 0xffu) - 126;      // x = m * 2^e, m in [0.5, 1)
  const float m = bits_as_float((b & 0x007fffffu) | 0x3f000000u);
  const bool low = m < 0.70710678118654752f;             // recentre m into [sqrt(.5), sqrt(2))
  e = low ? e - 1 : e;
  const float f = low ? m + m - 1.0f : m - 1.0f;         // exact (Sterbenz)
  const float z = f * f;
  float p = 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f;
  p = p * f + 1.1676998740e-1f;
  p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f;
  p = p * f - 1.6668057665e-1f;
  p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f;
  p = p * f + 3.3333331174e-1f;
  const float fe = static_cast<float>(e);
  float y = p * f * z - 2.12194440e-4f * fe - 0.5f * z;  // ln 2 split in two for accuracy
  return (f + y) + 0.693359375f * fe;
}

DF_MATH double noise_log(double x) {
#if defined(__CUDA_ARCH__)
  return ::log(x);
#else
  return std::log(x);
#endif
}

// exp for the softmax, where the argument is z - max(z) <= 0, -inf or NaN: Cephes expf (about
// 1 ulp), exp(x) = 0 below ln(FLT_MIN), NaN propagates. Branch-free for the vectoriser; the
// integer part comes from the 1.5 * 2^23 rounding trick, so no float->int conversion sees NaN.
DF_MATH float softmax_exp(float x) {
  constexpr float kMin = -87.33654475f;                  // ln(FLT_MIN)
  constexpr float kRound = 12582912.0f;                  // 1.5 * 2^23
  float xc = x < kMin ? kMin : x;
  xc = (xc == xc) ? xc : 0.0f;
  const float t = xc * 1.44269504088896341f + kRound;    // kRound + round(x / ln 2)
  const float n = t - kRound;
  const int ni = static_cast<int>(float_as_bits(t) - float_as_bits(kRound));
  float r = xc - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  const float z = r * r;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * z + r + 1.0f;
  const float res = p * bits_as_float(static_cast<uint32_t>(ni + 127) << 23);  // ni >= -126
  return (x == x) ? (x < kMin ? 0.0f : res) : x;
}

DF_MATH double softmax_exp(double x) {
#if defined(__CUDA_ARCH__)
  return ::exp(x);
#else
  return std::exp(x);
#endif
}

// The Philox call that carries element e's word, and which word it is.
DF_MATH Philox4 noise_philox(PhiloxKey key, uint64_t e) {
  const uint64_t block = e >> 6;
  return philox4x32_10({static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                        static_cast<uint32_t>(e & 15u), 0u}, key);
}
DF_MATH int noise_word(uint64_t e) { return static_cast<int>((e >> 4) & 3u); }

// Standard Gumbel from 32 random bits. 23 bits keep (k + 1/2) * 2^-23 exact in float, so u is
// never 0 or 1 and g stays finite (|g| <= 16.7).
template <typename acc>
DF_MATH acc gumbel_from_bits(uint32_t bits) {
  const acc u = (static_cast<acc>(static_cast<int32_t>(bits >> 9)) + acc(0.5)) * acc(1.0 / 8388608.0);
  return -noise_log(-noise_log(u));
}

template <typename acc>
DF_MATH acc gumbel_noise(PhiloxKey key, uint64_t e) {
  return gumbel_from_bits<acc>(philox_word(noise_philox(key, e), noise_word(e)));
}

// torch.max / torch.argmax semantics: NaN is larger than everything, the first index wins ties
// (and the first NaN wins among NaNs). best_i < 0 means "nothing yet".
template <typename acc>
DF_MATH bool argmax_prefers(acc v, int64_t i, acc best, int64_t best_i) {
  if (best_i < 0) return true;
  const bool v_nan = v != v, best_nan = best != best;
  if (best_nan) return v_nan && i < best_i;
  return v_nan || v > best || (v == best && i < best_i);
}

// Merges another partial argmax (value v, index i; i < 0: empty) into (best, best_i); call it
// before the max itself is updated.
template <typename acc>
DF_MATH void argmax_merge(acc& best, int64_t& best_i, acc v, int64_t i) {
  if (i >= 0 && argmax_prefers(v, i, best, best_i)) best = v, best_i = i;
}

// The softmax of a slice is all NaN exactly when its max is not finite (NaN, +inf: inf - inf;
// all -inf: -inf - -inf); the hard Gumbel-softmax then is all NaN too, like torch's
// y_hard - y_soft + y_soft.
template <typename acc>
DF_MATH bool softmax_slice_is_nan(acc m) {
  return m != m || m == acc(INFINITY) || m == acc(-INFINITY);
}

template <typename acc>
DF_MATH acc nan_max(acc a, acc b) { return (a != a || a > b) ? a : b; }

// Online softmax state (max m, sum s of exp(z - m)) for the CUDA kernels, which recompute z
// instead of keeping it. Same outputs as the two-pass form exp(z - max) / sum: -inf entries add 0;
// a +inf or NaN entry makes the sum NaN, and an all -inf slice gives exp(-inf - -inf) = NaN, so
// such slices come out all NaN, as in torch.softmax.
template <typename acc>
DF_MATH acc softmax_rescale(acc m_old, acc m_new) {
  return m_new == -INFINITY ? acc(1) : softmax_exp(m_old - m_new);
}

template <typename acc>
DF_MATH void softmax_online_add(acc& m, acc& s, acc z) {
  const acc m_new = nan_max(m, z);
  s = s * softmax_rescale(m, m_new) + (m_new == -INFINITY ? acc(0) : softmax_exp(z - m_new));
  m = m_new;
}

template <typename acc>
DF_MATH void softmax_online_merge(acc& m, acc& s, acc m2, acc s2) {
  const acc m_new = nan_max(m, m2);
  s = s * softmax_rescale(m, m_new) + s2 * softmax_rescale(m2, m_new);
  m = m_new;
}

}  // namespace dalle_fast
