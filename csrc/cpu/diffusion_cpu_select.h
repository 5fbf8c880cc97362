// The two order statistics of |v| that torch.quantile interpolates, for the CPU kernels of
// dynamic_threshold and guided_step (diffusion_cpu.cpp). Two exact selections, one answer:
//  - extreme-k: when the rank is within k of either end (k = n - lo for a high percentile, hi + 1 for
//    a low one; the default p = 0.995 keeps about n / 200), one pass keeps the k most extreme values
//    seen so far in a buffer and a threshold (the k-th of them). An element that does not beat the
//    threshold (nearly all of them, after the first few hundred) costs one compare: the pass tests a
//    block of 32 at once (AVX2 intrinsics when cpu_isa() allows, then only the survivors' bits are
//    visited; else a portable loop GCC vectorises for the baseline). When the buffer fills,
//    nth_element keeps its k most extreme values and raises the threshold. Inputs ordered so that
//    nearly every element survives (ascending data) would make it churn: past a budget of twice the
//    survivors random order gives, it gives up and the histogram runs instead.
//  - histogram (any rank): an 11-bit histogram of the order-preserving bits of |v| finds the bins
//    holding the two ranks; nth_element on the elements of those bins picks the lower one, the
//    minimum of what lies above it the upper one.
// Both return the values std::abs gives (-0 as +0); a NaN anywhere in the sample makes both NaN
// (torch.quantile's rule), whichever path. DALLE_FAST_THRESHOLD_SELECT=histogram / extreme forces one
// path (read per call; the tests compare the two; forced extreme-k never gives up), anything else or
// unset picks by the rank.
#pragma once
#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <limits>
#include <string_view>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#endif

#include "cpu_isa.h"
#include "dalle_fast/diffusion.h"

namespace dalle_fast {
namespace diffusion {
namespace select {

struct Percentile {
  double v_lo, v_hi;  // the two order statistics torch.quantile interpolates
  bool nan;
};

enum class Method { kAuto, kHistogram, kExtreme };

// The path the tests may force (DALLE_FAST_THRESHOLD_SELECT); read once per op call.
inline Method forced_method() {
  const char* e = std::getenv("DALLE_FAST_THRESHOLD_SELECT");
  if (e == nullptr) return Method::kAuto;
  const std::string_view s(e);
  return s == "histogram" ? Method::kHistogram : (s == "extreme" ? Method::kExtreme : Method::kAuto);
}

// ---- histogram ----

constexpr int kBins = 2048;

// 11 high bits of |v|'s order-preserving bit pattern (NaN lands at the top; NaN is tracked apart).
inline int bin_of(float v) { return static_cast<int>(abs_key(v) >> 20); }
inline int bin_of(double v) {
  uint64_t b;
  std::memcpy(&b, &v, sizeof b);
  return static_cast<int>((b >> 52) & 0x7ffu);
}

// The lo-th and hi-th smallest of |v[0..n)| (hi = lo or lo + 1).
template <typename acc>
Percentile histogram(const acc* v, int64_t n, const Rank& r, std::vector<acc>& cand) {
  int64_t hist[kBins] = {};
  bool nan = false;
  for (int64_t i = 0; i < n; ++i) {
    const acc a = std::abs(v[i]);
    nan |= a != a;
    ++hist[bin_of(a)];
  }
  if (nan) return {NAN, NAN, true};
  int64_t below = 0, below_lo = 0;
  int b_lo = -1, b_hi = -1;
  for (int b = 0; b < kBins; ++b) {
    if (b_lo < 0 && below + hist[b] > r.lo) b_lo = b, below_lo = below;
    if (below + hist[b] > r.hi) {
      b_hi = b;
      break;
    }
    below += hist[b];
  }
  cand.clear();
  for (int64_t i = 0; i < n; ++i) {
    const acc a = std::abs(v[i]);
    const int b = bin_of(a);
    if (b >= b_lo && b <= b_hi) cand.push_back(a);
  }
  const int64_t k = r.lo - below_lo;
  std::nth_element(cand.begin(), cand.begin() + k, cand.end());
  const double lo = static_cast<double>(cand[k]);
  double hi = lo;
  if (r.hi != r.lo) hi = static_cast<double>(*std::min_element(cand.begin() + k + 1, cand.end()));
  return {lo, hi, false};
}

// ---- extreme-k ----

constexpr int64_t kBlock = 32;  // elements tested per vector step

// Keeps the k most extreme of buf[0..m) (largest when kTop) in buf[0..k), the k-th of them at k - 1.
// Out of line: it runs a few times per sample, the scan loop stays small.
#if defined(__GNUC__)
#define DF_SELECT_NOINLINE __attribute__((noinline))
#else
#define DF_SELECT_NOINLINE
#endif
template <bool kTop, typename acc>
DF_SELECT_NOINLINE void keep_extreme(acc* buf, int64_t m, int64_t k) {
  if constexpr (kTop) std::nth_element(buf, buf + (k - 1), buf + m, std::greater<acc>());
  else std::nth_element(buf, buf + (k - 1), buf + m);
}

enum class Scan { kDone, kNan, kGaveUp };

// The k most extreme values seen so far: buf[0..m) holds them and the later survivors, t is the k-th
// most extreme of the values when the buffer was last trimmed (nothing that does not beat it can be
// among the final k).
template <bool kTop, typename acc>
struct Extremes {
  acc* buf;
  int64_t k, cap, budget, m = 0, pushed = 0;
  acc t = 0;

  // The first cap values all go in, then the buffer keeps its k most extreme.
  DF_INLINE Scan start(const acc* v) {
    bool nan = false;
    for (int64_t i = 0; i < cap; ++i) {
      const acc a = std::abs(v[i]);
      nan |= a != a;
      buf[i] = a;
    }
    if (nan) return Scan::kNan;
    trim(cap);
    return Scan::kDone;
  }
  DF_INLINE void trim(int64_t len) {
    keep_extreme<kTop>(buf, len, k);
    t = buf[k - 1];
    m = k;
  }
  // One element that may beat the threshold (the vector tests let NaN through too).
  DF_INLINE Scan take(acc a) {
    if (a != a) return Scan::kNan;
    if (kTop ? a > t : a < t) {
      buf[m++] = a;
      if (m == cap) {
        pushed += cap - k;
        if (pushed > budget) return Scan::kGaveUp;
        trim(m);
      }
    }
    return Scan::kDone;
  }
  DF_INLINE Scan tail(const acc* v, int64_t i, int64_t n) {
    for (; i < n; ++i) {
      const Scan s = take(std::abs(v[i]));
      if (s != Scan::kDone) return s;
    }
    trim(m);
    return Scan::kDone;
  }
};

// Elements cap..n of v (n > cap) through e, a block of 32 at a time: a block where nothing beats the
// threshold and nothing is NaN (an unordered compare is true for NaN: one test each) costs that one
// test. Portable; GCC vectorises the block test for the baseline ISA.
template <bool kTop, typename acc>
Scan scan_portable(const acc* v, int64_t n, Extremes<kTop, acc>& e) {
  int64_t i = e.cap;
  for (; i + kBlock <= n; i += kBlock) {
    const acc* p = v + i;
    const acc t = e.t;
    int any = 0;
    for (int64_t j = 0; j < kBlock; ++j) {
      const acc a = std::abs(p[j]);
      any |= kTop ? static_cast<int>(!(a <= t)) : static_cast<int>(!(a >= t));
    }
    if (any) {  // a branch-free mask of the block's survivors, then only those (as the AVX2 scan does)
      uint32_t mask = 0;
      for (int64_t j = 0; j < kBlock; ++j) {
        const acc a = std::abs(p[j]);
        mask |= static_cast<uint32_t>(kTop ? !(a <= t) : !(a >= t)) << j;
      }
      for (; mask != 0; mask &= mask - 1) {
        const Scan s = e.take(std::abs(p[std::countr_zero(mask)]));
        if (s != Scan::kDone) return s;
      }
    }
  }
  return e.tail(v, i, n);
}

#if defined(__x86_64__) && defined(__GNUC__)
#define DF_HAVE_AVX2_SELECT 1
// The same scan in AVX2: the block test is 4 (float) or 8 (double) compares, and a block that has
// survivors visits only them (movemask, then its set bits). Reached only when cpu_isa() reports AVX2
// or AVX-512 (an AVX-512 CPU runs this too).
template <bool kTop, typename acc>
__attribute__((target("avx2"))) Scan scan_avx2(const acc* v, int64_t n, Extremes<kTop, acc>& e) {
  constexpr int kPred = kTop ? _CMP_NLE_UQ : _CMP_NGE_UQ;  // beats t, or NaN
  int64_t i = e.cap;
  for (; i + kBlock <= n; i += kBlock) {
    const acc* p = v + i;
    uint32_t mask = 0;
    if constexpr (sizeof(acc) == sizeof(float)) {
      const __m256 abs_bits = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
      const __m256 t = _mm256_set1_ps(e.t);
      __m256 c[4];
      for (int h = 0; h < 4; ++h) c[h] = _mm256_cmp_ps(_mm256_and_ps(_mm256_loadu_ps(p + 8 * h), abs_bits), t, kPred);
      const __m256 any = _mm256_or_ps(_mm256_or_ps(c[0], c[1]), _mm256_or_ps(c[2], c[3]));
      if (_mm256_testz_ps(any, any)) continue;
      for (int h = 0; h < 4; ++h) mask |= static_cast<uint32_t>(_mm256_movemask_ps(c[h])) << (8 * h);
    } else {
      const __m256d abs_bits = _mm256_castsi256_pd(_mm256_set1_epi64x(0x7fffffffffffffffLL));
      const __m256d t = _mm256_set1_pd(e.t);
      __m256d c[8];
      for (int h = 0; h < 8; ++h) c[h] = _mm256_cmp_pd(_mm256_and_pd(_mm256_loadu_pd(p + 4 * h), abs_bits), t, kPred);
      const __m256d any = _mm256_or_pd(_mm256_or_pd(_mm256_or_pd(c[0], c[1]), _mm256_or_pd(c[2], c[3])),
                                       _mm256_or_pd(_mm256_or_pd(c[4], c[5]), _mm256_or_pd(c[6], c[7])));
      if (_mm256_testz_pd(any, any)) continue;
      for (int h = 0; h < 8; ++h) mask |= static_cast<uint32_t>(_mm256_movemask_pd(c[h])) << (4 * h);
    }
    for (; mask != 0; mask &= mask - 1) {  // the survivors (take tests each against the current t)
      const Scan s = e.take(std::abs(p[std::countr_zero(mask)]));
      if (s != Scan::kDone) return s;
    }
  }
  return e.tail(v, i, n);
}
#endif

// The k most extreme of |v[0..n)| into buf[0..k) (k-th at k - 1); buf holds cap >= k values, n > cap.
template <bool kTop, typename acc>
Scan extreme_scan(const acc* v, int64_t n, int64_t k, acc* buf, int64_t cap, int64_t budget) {
  Extremes<kTop, acc> e{buf, k, cap, budget};
  const Scan s = e.start(v);
  if (s != Scan::kDone) return s;
#ifdef DF_HAVE_AVX2_SELECT
  if (cpu_isa() != CpuIsa::kDefault) return scan_avx2(v, n, e);
#endif
  return scan_portable(v, n, e);
}

// The rank's order statistics from the k most extreme values (kTop: k = n - lo, the lo-th smallest
// is their minimum, buf[k - 1], the (lo + 1)-th the next one up; else k = hi + 1, the hi-th smallest
// is their maximum, the (hi - 1)-th the next one down).
template <bool kTop, typename acc>
Percentile from_extremes(const acc* buf, int64_t k, const Rank& r) {
  const double kth = static_cast<double>(buf[k - 1]);
  if (r.hi == r.lo) return {kth, kth, false};
  if constexpr (kTop) return {kth, static_cast<double>(*std::min_element(buf, buf + (k - 1))), false};
  else return {static_cast<double>(*std::max_element(buf, buf + (k - 1))), kth, false};
}

// Extreme-k pays off while k is small: its cost is the scan plus nth_element over about
// 2 k ln(n / 2k) survivors (~10 ns each, measured), the histogram's ~2 ns per element at any rank.
// Measured on one sample (AVX2, EPYC): 7x faster at n = 12288, p = 0.995; 8x at n = 196608; even at
// k = n / 70 (n = 196608, p = 0.985), 3x at k = n / 33 (n = 12288, p = 0.97); slower beyond.
inline bool prefer_extreme(int64_t k, int64_t n) { return k * 64 <= n || k <= 256; }

// The lo-th and hi-th smallest of |v[0..n)| by whichever selection fits (or `method` forces).
template <typename acc>
Percentile percentile(const acc* v, int64_t n, const Rank& r, std::vector<acc>& cand, Method method) {
  const int64_t k_top = n - r.lo, k_bottom = r.hi + 1;
  const bool top = k_top <= k_bottom;
  const int64_t k = top ? k_top : k_bottom;
  const bool extreme = method == Method::kExtreme || (method == Method::kAuto && prefer_extreme(k, n));
  if (extreme) {
    const int64_t cap = std::max<int64_t>(2 * k, k + 512);
    if (n <= cap) {  // small sample: one nth_element on all of it
      if (static_cast<int64_t>(cand.size()) < n) cand.resize(n);
      bool nan = false;
      for (int64_t i = 0; i < n; ++i) {
        cand[i] = std::abs(v[i]);
        nan |= cand[i] != cand[i];
      }
      if (nan) return {NAN, NAN, true};
      if (top) {
        keep_extreme<true>(cand.data(), n, k);
        return from_extremes<true>(cand.data(), k, r);
      }
      keep_extreme<false>(cand.data(), n, k);
      return from_extremes<false>(cand.data(), k, r);
    }
    if (static_cast<int64_t>(cand.size()) < cap) cand.resize(cap);
    // give up past twice the survivors of a random order, k (1 + ln(n / k)) (ascending data would
    // push every element); never when forced, so the tests see the churning path too
    const int64_t budget =
        method == Method::kExtreme
            ? std::numeric_limits<int64_t>::max()
            : 2 * static_cast<int64_t>(static_cast<double>(k) * (1.0 + std::log(static_cast<double>(n) / k))) + cap;
    acc* buf = cand.data();
    const Scan s =
        top ? extreme_scan<true>(v, n, k, buf, cap, budget) : extreme_scan<false>(v, n, k, buf, cap, budget);
    if (s == Scan::kNan) return {NAN, NAN, true};
    if (s == Scan::kDone) return top ? from_extremes<true>(buf, k, r) : from_extremes<false>(buf, k, r);
  }
  return histogram(v, n, r, cand);
}

}  // namespace select
}  // namespace diffusion
}  // namespace dalle_fast
