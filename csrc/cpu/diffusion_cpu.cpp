// CPU kernels of dynamic_threshold and guided_step (schemas in csrc/ops.cpp, math in
// include/dalle_fast/diffusion.h, checks in include/dalle_fast/diffusion_checks.h, Python side in
// dalle_fast/ops/diffusion.py).
//
// Work is split over samples (at::parallel_for over dim 0). Per sample:
//  1. x0 (guided_step: from cond, uncond and x_t in one pass; dynamic_threshold: x0 itself) is
//     written to a per-thread scratch in the accumulation type, with |x0|;
//  2. the percentile of |x0| by selection, not sorting (diffusion_cpu_select.h): near either end
//     (p = 0.995) one vectorised pass keeping the k most extreme values, elsewhere an 11-bit
//     histogram of the float bits then nth_element on the target bins;
//  3. one output pass: clamp(x0, -s, s) / s, and for guided_step the DDPM / DDIM update with the
//     normal noise drawn in blocks of 64 elements (16 Philox calls, one vector per round).
// The element loops are always-inline and reached through with_cpu_isa (cpu_isa.h), which compiles
// them for AVX-512, AVX2 and the baseline and picks one from the running CPU, never assumed at compile time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_isa.h"
#include "dalle_fast/diffusion.h"
#include "diffusion_cpu_select.h"
#include "dalle_fast/diffusion_checks.h"

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DF_HAVE_AVX2_PHILOX 1
#endif

namespace dalle_fast {
namespace diffusion {

namespace {

template <typename acc>
acc* thread_scratch(std::vector<acc>& buf, int64_t n) {
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// First flat index in the sample whose |x| is v (the element s depends on), for the backward.
template <typename acc>
int64_t find_abs(const acc* v, int64_t n, double target) {
  for (int64_t i = 0; i < n; ++i)
    if (static_cast<double>(std::abs(v[i])) == target) return i;
  return -1;
}

// Scale of one sample from its x0 values (acc); pivots written when asked.
template <typename acc>
double sample_scale(const acc* x0, int64_t n, double percentile, std::vector<acc>& cand, int64_t* pivots,
                    select::Method method) {
  const Rank r = quantile_rank(percentile, n);
  const select::Percentile p = select::percentile(x0, n, r, cand, method);
  const double s = p.nan ? static_cast<double>(NAN) : threshold_scale(p.v_lo, p.v_hi, r.w);
  if (pivots) {
    const bool depends = !p.nan && scale_is_percentile(p.v_lo, p.v_hi, r.w);
    pivots[0] = depends ? find_abs(x0, n, p.v_lo) : -1;
    pivots[1] = depends ? find_abs(x0, n, p.v_hi) : -1;
  }
  return s;
}

template <typename T>
DF_INLINE void to_acc(const T* x, acc_t<T>* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t<T>>(x[i]);
}

template <typename T>
DF_INLINE void clamp_store(const acc_t<T>* x0, acc_t<T> s, T* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<T>(clamp_scale(x0[i], s));
}

// ---- dynamic_threshold ----

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_threshold_cpu(const at::Tensor& x_in, double percentile,
                                                                     bool return_pivots) {
  check_dynamic_threshold(x_in, percentile);
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), n = B ? x.numel() / B : 0;
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor scale = at::empty({B}, x.options().dtype(at::kDouble));
  at::Tensor pivots = at::empty(return_pivots ? at::IntArrayRef{B, 2} : at::IntArrayRef{0},
                                x.options().dtype(at::kLong));
  if (B == 0) return {out, scale, pivots};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_threshold_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    double* sp = scale.mutable_data_ptr<double>();
    int64_t* pp = return_pivots ? pivots.mutable_data_ptr<int64_t>() : nullptr;
    const select::Method method = select::forced_method();
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / n), [&](int64_t b0, int64_t b1) {
      thread_local std::vector<acc> buf, cand;
      acc* v = thread_scratch(buf, n);
      for (int64_t b = b0; b < b1; ++b) {
        with_cpu_isa([&] { to_acc<scalar_t>(xp + b * n, v, n); });
        sp[b] = sample_scale(v, n, percentile, cand, pp ? pp + 2 * b : nullptr, method);
        with_cpu_isa([&] { clamp_store<scalar_t>(v, static_cast<acc>(sp[b]), op + b * n, n); });
      }
    });
  });
  return {out, scale, pivots};
}

}  // namespace

// d out / d x with s differentiated through: s = lerp(|x_lo|, |x_hi|, w) at the pivots (when s > 1).
// Composite of ATen ops (not a hot path), registered for CPU here and for CUDA in diffusion_cuda.cu.
at::Tensor dynamic_threshold_backward(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& scale,
                                      const at::Tensor& pivots, double percentile) {
  check_threshold_backward(grad, x, scale, pivots, percentile);
  const int64_t B = x.size(0);
  if (B == 0) return at::zeros_like(x);
  const auto work = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  const at::Tensor xf = x.reshape({B, -1}).to(work), gf = grad.reshape({B, -1}).to(work);
  const at::Tensor s = scale.to(work).unsqueeze(1);
  const at::Tensor mask = xf.abs() <= s;
  at::Tensor gx = at::where(mask, gf / s, at::zeros({}, gf.options()));
  // d out_i / d s = -x_i / s^2 where unclamped (the clamped outputs are +-1 whatever s is).
  const at::Tensor d_s = -(at::where(mask, gf * xf, at::zeros({}, gf.options())).sum(1, true)) / (s * s);
  const Rank r = quantile_rank(percentile, xf.size(1));
  const at::Tensor valid = (pivots.select(1, 0) >= 0).unsqueeze(1).to(work);
  const at::Tensor idx = pivots.clamp_min(0);
  const at::Tensor w = at::tensor({1.0 - r.w, r.w}, gf.options().dtype(at::kDouble)).to(work);
  gx.scatter_add_(1, idx, xf.gather(1, idx).sign() * w * d_s * valid);
  return gx.to(x.scalar_type()).reshape(x.sizes());
}

namespace {

// ---- guided_step ----

template <typename acc>
struct StepArgs {
  acc guidance, x0_xt, x0_pred, mean_x0, mean_xt, sigma;
};

template <typename T>
DF_INLINE void x0_estimate(const T* cond, const T* uncond, const T* xt, acc_t<T>* x0, const StepArgs<acc_t<T>>& a,
                               int64_t n) {
  using acc = acc_t<T>;
  if (uncond) {
    for (int64_t i = 0; i < n; ++i) {
      const acc u = static_cast<acc>(uncond[i]);
      const acc pred = u + a.guidance * (static_cast<acc>(cond[i]) - u);
      x0[i] = a.x0_xt * static_cast<acc>(xt[i]) + a.x0_pred * pred;
    }
  } else {
    for (int64_t i = 0; i < n; ++i) x0[i] = a.x0_xt * static_cast<acc>(xt[i]) + a.x0_pred * static_cast<acc>(cond[i]);
  }
}

// Box-Muller on the 16 Philox outputs of a noise block: the 64 normals in element order.
DF_INLINE void box_muller_block(const uint32_t* x0, const uint32_t* x1, const uint32_t* x2, const uint32_t* x3,
                                float* out) {
  // radius sqrt(-2 ln u) of the 32 first words, as simple loops over arrays (one combined loop stays
  // scalar with g++ 12)
  alignas(64) float r[32];
  for (int j = 0; j < 16; ++j) r[j] = uniform_open(x0[j]), r[16 + j] = uniform_open(x2[j]);
  for (int j = 0; j < 32; ++j) r[j] = -2.0f * noise_log(r[j]);
  for (int j = 0; j < 32; ++j) r[j] = noise_sqrt(r[j]);
  const float* r0 = r;
  const float* r1 = r + 16;
  for (int j = 0; j < 16; ++j) {
    float c0, s0, c1, s1;
    sincos_2pi(uniform_open(x1[j]), &c0, &s0);
    sincos_2pi(uniform_open(x3[j]), &c1, &s1);
    out[j] = r0[j] * c0, out[16 + j] = r0[j] * s0, out[32 + j] = r1[j] * c1, out[48 + j] = r1[j] * s1;
  }
}

// The 64 standard normals of noise block `block`, in element order: 16 Philox calls round-major (as
// gumbel_softmax_cpu.cpp's noise_block), then Box-Muller on the word pairs. Portable version.
template <typename acc>
void normal_block(PhiloxKey key, uint32_t offset, uint64_t block, acc* out) {
  alignas(64) uint32_t x0[16], x1[16], x2[16], x3[16];
  for (uint32_t j = 0; j < 16; ++j) {
    x0[j] = static_cast<uint32_t>(block);
    x1[j] = static_cast<uint32_t>(block >> 32);
    x2[j] = kNormalStream + j;
    x3[j] = offset;
  }
  for (uint32_t r = 0; r < 10; ++r) {
    const PhiloxKey k{key.k0 + r * kPhiloxW0, key.k1 + r * kPhiloxW1};
    for (int j = 0; j < 16; ++j) {
      const Philox4 o = philox_round({x0[j], x1[j], x2[j], x3[j]}, k);
      x0[j] = o.x0, x1[j] = o.x1, x2[j] = o.x2, x3[j] = o.x3;
    }
  }
  if constexpr (sizeof(acc) == sizeof(double)) {
    for (int j = 0; j < 16; ++j) {
      out[j] = box_muller_f64(x0[j], x1[j], false);
      out[16 + j] = box_muller_f64(x0[j], x1[j], true);
      out[32 + j] = box_muller_f64(x2[j], x3[j], false);
      out[48 + j] = box_muller_f64(x2[j], x3[j], true);
    }
  } else {
    box_muller_block(x0, x1, x2, x3, out);
  }
}

#ifdef DF_HAVE_AVX2_PHILOX
// The same block with the Philox rounds in AVX2 (g++ leaves the 32x32->64 multiplies of the portable
// loop scalar on AVX2): 8 lanes per register, two registers per word. Reached only when
// cpu_isa() reports AVX2 or AVX-512 (csrc/cpu/cpu_isa.h).
__attribute__((target("avx2,fma"), always_inline)) inline void mulhilo(__m256i a, __m256i m, __m256i* hi,
                                                                      __m256i* lo) {
  const __m256i even = _mm256_mul_epu32(a, m);
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(a, 32), m);
  *lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  *hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// Box-Muller of 8 lanes in AVX2: radius words br, angle words ba -> (r cos 2 pi t, r sin 2 pi t).
__attribute__((target("avx2,fma"), always_inline)) inline __m256 uniform_open_avx2(__m256i bits) {
  const __m256 k = _mm256_cvtepi32_ps(_mm256_srli_epi32(bits, 9));
  return _mm256_mul_ps(_mm256_add_ps(k, _mm256_set1_ps(0.5f)), _mm256_set1_ps(1.0f / 8388608.0f));
}

// noise_log (gumbel_softmax.h) lane-wise, the same Cephes steps.
__attribute__((target("avx2,fma"), always_inline)) inline __m256 noise_log_avx2(__m256 x) {
  const __m256i b = _mm256_castps_si256(x);
  __m256i e = _mm256_sub_epi32(_mm256_srli_epi32(b, 23), _mm256_set1_epi32(126));  // x > 0: no sign bit
  const __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(b, _mm256_set1_epi32(0x007fffff)),
                                                       _mm256_set1_epi32(0x3f000000)));
  const __m256 low = _mm256_cmp_ps(m, _mm256_set1_ps(0.70710678118654752f), _CMP_LT_OQ);
  e = _mm256_add_epi32(e, _mm256_castps_si256(low));  // low lanes are all ones: e - 1
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 f = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(low, m)), one);
  const __m256 z = _mm256_mul_ps(f, f);
  __m256 p = _mm256_set1_ps(7.0376836292e-2f);
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.1514610310e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.1676998740e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.2420140846e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.4249322787e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-1.6668057665e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.0000714765e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(-2.4999993993e-1f));
  p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(3.3333331174e-1f));
  const __m256 fe = _mm256_cvtepi32_ps(e);
  __m256 y = _mm256_mul_ps(_mm256_mul_ps(p, f), z);
  y = _mm256_fmadd_ps(_mm256_set1_ps(-2.12194440e-4f), fe, y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(_mm256_set1_ps(0.693359375f), fe, _mm256_add_ps(f, y));
}

// sincos_2pi (diffusion.h) lane-wise.
__attribute__((target("avx2,fma"), always_inline)) inline void sincos_2pi_avx2(__m256 t, __m256* c_out,
                                                                             __m256* s_out) {
  const __m256 v = _mm256_mul_ps(_mm256_set1_ps(4.0f), t);
  const __m256i qi = _mm256_cvttps_epi32(_mm256_add_ps(v, _mm256_set1_ps(0.5f)));
  const __m256 x = _mm256_mul_ps(_mm256_sub_ps(v, _mm256_cvtepi32_ps(qi)), _mm256_set1_ps(1.57079632679489662f));
  const __m256 z = _mm256_mul_ps(x, x);
  __m256 ps = _mm256_fmadd_ps(z, _mm256_set1_ps(-1.9515295891e-4f), _mm256_set1_ps(8.3321608736e-3f));
  ps = _mm256_fmadd_ps(z, ps, _mm256_set1_ps(-1.6666654611e-1f));
  const __m256 sn = _mm256_fmadd_ps(_mm256_mul_ps(x, z), ps, x);
  __m256 pc = _mm256_fmadd_ps(z, _mm256_set1_ps(2.443315711809948e-5f), _mm256_set1_ps(-1.388731625493765e-3f));
  pc = _mm256_fmadd_ps(z, pc, _mm256_set1_ps(4.166664568298827e-2f));
  const __m256 cs = _mm256_fmadd_ps(_mm256_mul_ps(z, z), pc, _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z,
                                                                             _mm256_set1_ps(1.0f)));
  const __m256i k = _mm256_and_si256(qi, _mm256_set1_epi32(3));
  const __m256 odd = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(k, _mm256_set1_epi32(1)),
                                                            _mm256_set1_epi32(1)));
  const __m256 c1 = _mm256_blendv_ps(cs, sn, odd), s1 = _mm256_blendv_ps(sn, cs, odd);
  // cos negated in quadrants 1 and 2 (bit 1 of k + 1), sin in 2 and 3 (bit 1 of k): sign bit = bit 1 << 30
  const __m256i neg_c = _mm256_slli_epi32(_mm256_and_si256(_mm256_add_epi32(k, _mm256_set1_epi32(1)),
                                                           _mm256_set1_epi32(2)), 30);
  const __m256i neg_s = _mm256_slli_epi32(_mm256_and_si256(k, _mm256_set1_epi32(2)), 30);
  *c_out = _mm256_xor_ps(c1, _mm256_castsi256_ps(neg_c));
  *s_out = _mm256_xor_ps(s1, _mm256_castsi256_ps(neg_s));
}

// The two normals of 8 Box-Muller pairs: out_c[i] = r cos, out_s[i] = r sin.
__attribute__((target("avx2,fma"), always_inline)) inline void box_muller_avx2(__m256i br, __m256i ba, float* out_c,
                                                                             float* out_s) {
  const __m256 r = _mm256_sqrt_ps(_mm256_mul_ps(_mm256_set1_ps(-2.0f), noise_log_avx2(uniform_open_avx2(br))));
  __m256 c, s;
  sincos_2pi_avx2(uniform_open_avx2(ba), &c, &s);
  _mm256_storeu_ps(out_c, _mm256_mul_ps(r, c));
  _mm256_storeu_ps(out_s, _mm256_mul_ps(r, s));
}

__attribute__((target("avx2,fma"))) void normal_block_avx2(PhiloxKey key, uint32_t offset, uint64_t block,
                                                            float* out) {
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  __m256i x0[2], x1[2], x2[2], x3[2];
  for (int h = 0; h < 2; ++h) {
    x0[h] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block)));
    x1[h] = _mm256_set1_epi32(static_cast<int>(static_cast<uint32_t>(block >> 32)));
    x2[h] = _mm256_add_epi32(lane, _mm256_set1_epi32(static_cast<int>(kNormalStream + 8 * h)));
    x3[h] = _mm256_set1_epi32(static_cast<int>(offset));
  }
  const __m256i m0 = _mm256_set1_epi32(static_cast<int>(kPhiloxM0));
  const __m256i m1 = _mm256_set1_epi32(static_cast<int>(kPhiloxM1));
  for (uint32_t r = 0; r < 10; ++r) {
    const __m256i k0 = _mm256_set1_epi32(static_cast<int>(key.k0 + r * kPhiloxW0));
    const __m256i k1 = _mm256_set1_epi32(static_cast<int>(key.k1 + r * kPhiloxW1));
    for (int h = 0; h < 2; ++h) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo(x0[h], m0, &hi0, &lo0);
      mulhilo(x2[h], m1, &hi1, &lo1);
      x0[h] = _mm256_xor_si256(_mm256_xor_si256(hi1, x1[h]), k0);
      x1[h] = lo1;
      x2[h] = _mm256_xor_si256(_mm256_xor_si256(hi0, x3[h]), k1);
      x3[h] = lo0;
    }
  }
  // Box-Muller straight from the registers: word pair (0, 1) gives elements j and 16 + j, pair (2, 3)
  // elements 32 + j and 48 + j (j = 8 h .. 8 h + 7)
  for (int h = 0; h < 2; ++h) {
    box_muller_avx2(x0[h], x1[h], out + 8 * h, out + 16 + 8 * h);
    box_muller_avx2(x2[h], x3[h], out + 32 + 8 * h, out + 48 + 8 * h);
  }
}
#endif

template <typename acc>
using NormalBlockFn = void (*)(PhiloxKey, uint32_t, uint64_t, acc*);

template <typename acc>
NormalBlockFn<acc> pick_normal_block() {
#ifdef DF_HAVE_AVX2_PHILOX
  if constexpr (sizeof(acc) == sizeof(float)) {
    if (cpu_isa() != CpuIsa::kDefault) return &normal_block_avx2;
  }
#endif
  return &normal_block<acc>;
}

template <typename acc>
DF_INLINE acc threshold_value(acc v, int kind, acc s) {
  // static: clamp to [-s, s] with s = 1 passed in (written with the constant 1, g++ 12 left the loop
  // scalar and branchy: 6x the time of no thresholding on data that often leaves [-1, 1])
  return kind == kDynamic ? clamp_scale(v, s) : (kind == kStatic ? (v < -s ? -s : (v > s ? s : v)) : v);
}

// x_prev (and x0) of elements [i0, i0 + len) of one sample, z the noise of those elements or null.
template <typename T, int kKind, bool kNoise, bool kX0>
DF_INLINE void update_run(const acc_t<T>* __restrict x0, const T* __restrict xt, const acc_t<T>* __restrict z,
                          T* __restrict out, T* __restrict x0_out, const StepArgs<acc_t<T>>& a, acc_t<T> s,
                          int64_t len) {
  using acc = acc_t<T>;
  for (int64_t i = 0; i < len; ++i) {
    const acc v = threshold_value(x0[i], kKind, s);
    acc y = a.mean_x0 * v + a.mean_xt * static_cast<acc>(xt[i]);
    if constexpr (kNoise) y += a.sigma * z[i];
    out[i] = static_cast<T>(y);
    if constexpr (kX0) x0_out[i] = static_cast<T>(v);
  }
}

// The update of one sample (flat elements base .. base + n), the noise drawn block by block of the
// flat index so every element gets the noise of its global index.
template <typename T, int kKind, bool kNoise, bool kX0>
DF_INLINE void update(const acc_t<T>* x0, const T* xt, T* out, T* x0_out, const StepArgs<acc_t<T>>& a, acc_t<T> s,
                          int64_t base, int64_t n, PhiloxKey key, uint32_t offset) {
  static const NormalBlockFn<acc_t<T>> normal_block_fn = pick_normal_block<acc_t<T>>();
  using acc = acc_t<T>;
  if constexpr (!kNoise) {
    update_run<T, kKind, false, kX0>(x0, xt + base, nullptr, out + base, x0_out ? x0_out + base : nullptr, a, s, n);
  } else {
    alignas(64) acc blk[kNoiseBlock];
    for (int64_t i = 0; i < n;) {
      const uint64_t e = static_cast<uint64_t>(base + i);
      const int64_t start = static_cast<int64_t>(e & (kNoiseBlock - 1));
      const int64_t len = std::min<int64_t>(kNoiseBlock - start, n - i);
      normal_block_fn(key, offset, e >> 6, blk);
      update_run<T, kKind, true, kX0>(x0 + i, xt + base + i, blk + start, out + base + i,
                                      x0_out ? x0_out + base + i : nullptr, a, s, len);
      i += len;
    }
  }
}

template <typename T, int kKind>
void update_dispatch(bool noise, bool want_x0, const acc_t<T>* x0, const T* xt, T* out, T* x0_out,
                     const StepArgs<acc_t<T>>& a, acc_t<T> s, int64_t base, int64_t n, PhiloxKey key, uint32_t offset) {
  with_cpu_isa([&] {
    if (noise && want_x0) update<T, kKind, true, true>(x0, xt, out, x0_out, a, s, base, n, key, offset);
    else if (noise) update<T, kKind, true, false>(x0, xt, out, x0_out, a, s, base, n, key, offset);
    else if (want_x0) update<T, kKind, false, true>(x0, xt, out, x0_out, a, s, base, n, key, offset);
    else update<T, kKind, false, false>(x0, xt, out, x0_out, a, s, base, n, key, offset);
  });
}

std::tuple<at::Tensor, at::Tensor> guided_step_cpu(const at::Tensor& cond_in,
                                                   const std::optional<at::Tensor>& uncond_in,
                                                   const at::Tensor& xt_in, const at::Tensor& alpha_bar_t,
                                                   const at::Tensor& alpha_bar_prev, double guidance,
                                                   const std::string& parameterization, const std::string& sampler,
                                                   double eta, const std::string& threshold, double percentile,
                                                   const at::Tensor& seed, int64_t offset, bool return_x0) {
  check_guided_step(cond_in, uncond_in, xt_in, alpha_bar_t, alpha_bar_prev, guidance, eta, threshold, percentile,
                    seed, offset);
  const int param = parse_parameterization(parameterization), samp = parse_sampler(sampler);
  const int kind = parse_threshold(threshold);
  const at::Tensor xt = xt_in.contiguous(), cond = cond_in.contiguous();
  const at::Tensor uncond = uncond_in.has_value() ? uncond_in->contiguous() : at::Tensor();
  const at::Tensor ab_t = alpha_bar_t.contiguous(), ab_p = alpha_bar_prev.contiguous();
  const int64_t B = xt.size(0), n = B ? xt.numel() / B : 0;
  const double* ap = ab_t.const_data_ptr<double>();
  const double* pp = ab_p.const_data_ptr<double>();
  for (int64_t b = 0; b < B; ++b) check_alpha_bars(ap[b], pp[b], b);
  const PhiloxKey key = philox_key_from_seed(static_cast<uint64_t>(seed.item<int64_t>()));
  at::Tensor out = at::empty(xt.sizes(), xt.options());
  at::Tensor x0_out = at::empty(return_x0 ? xt.sizes() : at::IntArrayRef{0}, xt.options());
  if (B == 0) return {out, x0_out};
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt.scalar_type(), "guided_step_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* cp = cond.const_data_ptr<scalar_t>();
    const scalar_t* up = uncond.defined() ? uncond.const_data_ptr<scalar_t>() : nullptr;
    const scalar_t* xp = xt.const_data_ptr<scalar_t>();
    scalar_t* op = out.mutable_data_ptr<scalar_t>();
    scalar_t* x0p = return_x0 ? x0_out.mutable_data_ptr<scalar_t>() : nullptr;
    const select::Method method = select::forced_method();
    at::parallel_for(0, B, std::max<int64_t>(1, 32768 / n), [&](int64_t b0, int64_t b1) {
      thread_local std::vector<acc> buf, cand;
      acc* v = thread_scratch(buf, n);
      for (int64_t b = b0; b < b1; ++b) {
        const StepCoefs c = step_coefs(ap[b], pp[b], param, samp, eta);
        const StepArgs<acc> a{static_cast<acc>(guidance), static_cast<acc>(c.x0_xt), static_cast<acc>(c.x0_pred),
                              static_cast<acc>(c.mean_x0), static_cast<acc>(c.mean_xt), static_cast<acc>(c.sigma)};
        const int64_t base = b * n;
        with_cpu_isa([&] { x0_estimate<scalar_t>(cp + base, up ? up + base : nullptr, xp + base, v, a, n); });
        const acc s =
            kind == kDynamic ? static_cast<acc>(sample_scale(v, n, percentile, cand, nullptr, method)) : acc(1);
        const bool noise = c.sigma != 0.0, want_x0 = x0p != nullptr;
        const uint32_t off = static_cast<uint32_t>(offset);
        if (kind == kDynamic)
          update_dispatch<scalar_t, kDynamic>(noise, want_x0, v, xp, op, x0p, a, s, base, n, key, off);
        else if (kind == kStatic)
          update_dispatch<scalar_t, kStatic>(noise, want_x0, v, xp, op, x0p, a, s, base, n, key, off);
        else
          update_dispatch<scalar_t, kNone>(noise, want_x0, v, xp, op, x0p, a, s, base, n, key, off);
      }
    });
  });
  return {out, x0_out};
}

}  // namespace
}  // namespace diffusion
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("dynamic_threshold", &dalle_fast::diffusion::dynamic_threshold_cpu);
  m.impl("_dynamic_threshold_backward", &dalle_fast::diffusion::dynamic_threshold_backward);
  m.impl("guided_step", &dalle_fast::diffusion::guided_step_cpu);
}
