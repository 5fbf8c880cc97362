// Operand packing for the bf16 tile GEMMs of the CPU sparse attention kernel.
//
// The GEMMs run through at::native::cpublas::brgemm (oneDNN's BRGEMM ukernel: avx512_bf16 or AMX,
// picked by oneDNN at run time), which computes C (fp32) [+]= A B with A row-major bf16 and B in
// VNNI layout: B[k][n] stored at ((k / 2) * ldb + n) * 2 + k % 2 (pairs along the contraction dim).
// Every operand that is not already in that form is packed here. ATen's own copies of such
// layouts cost ~0.5-1 ns per element, as much as the GEMM they feed, so the packing uses AVX-512
// intrinsics in functions compiled for that ISA only; callers reach them only after
// lp_gemm_available() has checked the running CPU (nothing here is assumed at compile time).
#pragma once
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DF_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define DF_HAVE_AVX512_PACK 1
#else
#define DF_HAVE_AVX512_PACK 0
#endif

namespace dalle_fast {
namespace {

#if DF_HAVE_AVX512_PACK
// GCC 12's AVX-512 headers build _mm512_undefined_*() from a self-initialized variable, which
// -Wuninitialized reports at every inlined use; the values are never read.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// In-register 16 x 16 transpose of 32-bit elements.
DF_AVX512 inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  // Each 128-bit lane now holds a 4 x 4 sub-block transposed; two rounds of lane shuffles put the
  // sub-blocks in place. Partial tiles are masked loads/stores (tests cover D and key counts off 16).
  for (int g = 0; g < 16; g += 8)
    for (int j = 0; j < 4; ++j) {
      t[g + j] = _mm512_shuffle_i32x4(r[g + j], r[g + j + 4], 0x88);
      t[g + j + 4] = _mm512_shuffle_i32x4(r[g + j], r[g + j + 4], 0xdd);
    }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// dst[c * ldd + r] = rows[r][c] for r < nrows, c < ncols (32-bit elements; rows may be anywhere).
DF_AVX512 void transpose32_avx512(const uint32_t* const* rows, int64_t nrows, int64_t ncols, uint32_t* dst,
                                  int64_t ldd) {
  for (int64_t r0 = 0; r0 < nrows; r0 += 16) {
    const int64_t nr = nrows - r0 < 16 ? nrows - r0 : 16;
    const __mmask16 rmask = (__mmask16)((1u << nr) - 1);
    for (int64_t c0 = 0; c0 < ncols; c0 += 16) {
      const int64_t nc = ncols - c0 < 16 ? ncols - c0 : 16;
      const __mmask16 cmask = (__mmask16)((1u << nc) - 1);
      __m512i v[16];
      for (int i = 0; i < 16; ++i)
        v[i] = i < nr ? _mm512_maskz_loadu_epi32(cmask, rows[r0 + i] + c0) : _mm512_setzero_si512();
      transpose16x16_epi32(v);
      for (int j = 0; j < nc; ++j) _mm512_mask_storeu_epi32(dst + (c0 + j) * ldd + r0, rmask, v[j]);
    }
  }
}

// VNNI pairs of 16-bit rows: dst[((k / 2) * n + j) * 2 + k % 2] = rows[k][j], k < nk (a missing odd
// partner row is zero), j < n.
DF_AVX512 void vnni16_avx512(const uint16_t* const* rows, int64_t nk, int64_t n, uint16_t* dst) {
  const __m512i lo_idx = _mm512_set_epi64(11, 10, 3, 2, 9, 8, 1, 0);
  const __m512i hi_idx = _mm512_set_epi64(15, 14, 7, 6, 13, 12, 5, 4);
  for (int64_t k = 0; k < nk; k += 2) {
    const uint16_t* a = rows[k];
    const uint16_t* b = k + 1 < nk ? rows[k + 1] : nullptr;
    uint16_t* out = dst + k * n;  // (k / 2) * n * 2
    for (int64_t j = 0; j < n; j += 32) {
      const int64_t c = n - j < 32 ? n - j : 32;
      const __mmask32 m = c == 32 ? ~(__mmask32)0 : (__mmask32)((1u << c) - 1);
      const __m512i x = _mm512_maskz_loadu_epi16(m, a + j);
      const __m512i y = b ? _mm512_maskz_loadu_epi16(m, b + j) : _mm512_setzero_si512();
      const __m512i ul = _mm512_unpacklo_epi16(x, y), uh = _mm512_unpackhi_epi16(x, y);
      const __m512i o0 = _mm512_permutex2var_epi64(ul, lo_idx, uh);  // pairs j .. j + 15
      const __m512i o1 = _mm512_permutex2var_epi64(ul, hi_idx, uh);  // pairs j + 16 .. j + 31
      const int64_t c0 = c < 16 ? c : 16, c1 = c - c0;
      _mm512_mask_storeu_epi32(out + 2 * j, (__mmask16)((1u << c0) - 1), o0);
      if (c1 > 0) _mm512_mask_storeu_epi32(out + 2 * j + 32, (__mmask16)((1u << c1) - 1), o1);
    }
  }
}

// bf16 (round to nearest even) of n floats.
DF_AVX512 void to_bf16_avx512(const float* x, int64_t n, uint16_t* y) {
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t c = n - i < 16 ? n - i : 16;
    const __mmask16 m = (__mmask16)((1u << c) - 1);
    const __m512i b = _mm512_castps_si512(_mm512_maskz_loadu_ps(m, x + i));
    const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
    _mm256_mask_storeu_epi16(y + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
}

// y (bf16) = x (fp32) * a for n elements; used to store the output rows.
DF_AVX512 void scale_to_bf16_avx512(const float* x, int64_t n, float a, uint16_t* y) {
  const __m512i bias = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);
  const __m512 va = _mm512_set1_ps(a);
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t c = n - i < 16 ? n - i : 16;
    const __mmask16 m = (__mmask16)((1u << c) - 1);
    const __m512i b = _mm512_castps_si512(_mm512_mul_ps(_mm512_maskz_loadu_ps(m, x + i), va));
    const __m512i r = _mm512_add_epi32(b, _mm512_add_epi32(bias, _mm512_and_si512(_mm512_srli_epi32(b, 16), one)));
    _mm256_mask_storeu_epi16(y + i, m, _mm512_cvtepi32_epi16(_mm512_srli_epi32(r, 16)));
  }
}

// sum_i a[i] * b[i] of two bf16 rows, in fp32.
DF_AVX512 float dot_bf16_avx512(const uint16_t* a, const uint16_t* b, int64_t n) {
  __m512 s = _mm512_setzero_ps();
  for (int64_t i = 0; i < n; i += 16) {
    const int64_t c = n - i < 16 ? n - i : 16;
    const __mmask16 m = (__mmask16)((1u << c) - 1);
    const __m512 x = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, a + i)), 16));
    const __m512 y = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, b + i)), 16));
    s = _mm512_fmadd_ps(x, y, s);
  }
  return _mm512_reduce_add_ps(s);
}
#pragma GCC diagnostic pop
#endif

}  // namespace
}  // namespace dalle_fast
