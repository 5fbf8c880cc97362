// Small-batch linear layers (see linear_small_cpu.h). The kernels are compiled for AVX-512 (and
// avx512_bf16 for the bf16 one) through function target attributes only, and reached only after a
// run-time CPU check.
#include "linear_small_cpu.h"

#include "cpu_isa.h"

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define DF_AVX512BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))
#define DF_AVX512F __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq")))
#define DF_HAVE_AVX512BF16 1
#else
#define DF_HAVE_AVX512BF16 0
#endif

namespace dalle_fast {
namespace {

#if DF_HAVE_AVX512BF16
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
constexpr int kRows = 8;  // rows of W in flight: independent accumulators hide the load latency

// The two element types: a vector of kStep elements along K, its multiply-accumulate into 16 fp32
// lanes, and the rounding of a finished fp32 sum to the output type.
struct F32 {
  using T = float;
  using Vec = __m512;
  static constexpr int kStep = 16;
  DF_AVX512F static Vec load(const T* p) { return _mm512_loadu_ps(p); }
  DF_AVX512F static Vec load_tail(int64_t n, const T* p) {
    return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p);
  }
  DF_AVX512F static __m512 mac(__m512 acc, Vec w, Vec x) { return _mm512_fmadd_ps(w, x, acc); }
  static T out(float s) { return s; }
};
struct BF16 {
  using T = uint16_t;  // bf16 bits
  using Vec = __m512bh;
  static constexpr int kStep = 32;
  DF_AVX512BF16 static Vec load(const T* p) { return (__m512bh)_mm512_loadu_si512(p); }
  DF_AVX512BF16 static Vec load_tail(int64_t n, const T* p) {
    return (__m512bh)_mm512_maskz_loadu_epi16((__mmask32)((1ull << n) - 1), p);
  }
  DF_AVX512BF16 static __m512 mac(__m512 acc, Vec w, Vec x) { return _mm512_dpbf16_ps(acc, w, x); }
  static T out(float s) { return c10::BFloat16(s).x; }  // round to nearest even, as at::linear's bf16 output
};

// y[b, n .. n+R) for every b: R rows of W at a time, each chunk along K loaded once per row of x (the
// R rows stay in L1 across the batch). Compiled with avx512_bf16 enabled for both types; the fp32
// instantiation uses only AVX-512F instructions and is reached on CPUs that have those.
template <class E, int R>
DF_AVX512BF16 void rows_kernel(const typename E::T* x, int64_t B, const typename E::T* W, int64_t N, int64_t K,
                               const float* bias, typename E::T* y, int64_t n) {
  const int64_t kv = K / E::kStep * E::kStep;
  for (int64_t b = 0; b < B; ++b) {
    const typename E::T* xb = x + b * K;
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kv; k += E::kStep) {
      const auto xv = E::load(xb + k);
      for (int r = 0; r < R; ++r) acc[r] = E::mac(acc[r], E::load(W + (n + r) * K + k), xv);
    }
    if (kv < K) {
      const auto xv = E::load_tail(K - kv, xb + kv);
      for (int r = 0; r < R; ++r) acc[r] = E::mac(acc[r], E::load_tail(K - kv, W + (n + r) * K + kv), xv);
    }
    for (int r = 0; r < R; ++r)
      y[b * N + n + r] = E::out(_mm512_reduce_add_ps(acc[r]) + (bias != nullptr ? bias[n + r] : 0.0f));
  }
}

template <class E>
DF_AVX512BF16 void linear_kernel(const typename E::T* x, int64_t B, const typename E::T* W, int64_t N, int64_t K,
                                 const float* bias, typename E::T* y, int64_t n0, int64_t n1) {
  int64_t n = n0;
  for (; n + kRows <= n1; n += kRows) rows_kernel<E, kRows>(x, B, W, N, K, bias, y, n);
  for (; n < n1; ++n) rows_kernel<E, 1>(x, B, W, N, K, bias, y, n);
}
#pragma GCC diagnostic pop
#endif

}  // namespace

bool linear_small_available(at::ScalarType dtype) {
#if DF_HAVE_AVX512BF16
  return dtype == at::kFloat ? cpu_isa() == CpuIsa::kAvx512 : dtype == at::kBFloat16 && cpu_has_avx512_bf16();
#else
  (void)dtype;
  return false;
#endif
}

at::Tensor linear_small(const at::Tensor& x_, const at::Tensor& W_, const std::optional<at::Tensor>& bias) {
  const auto dt = x_.scalar_type();
  TORCH_CHECK(x_.device().is_cpu() && W_.scalar_type() == dt && (dt == at::kFloat || dt == at::kBFloat16),
              "linear_small: fp32 or bf16 CPU tensors of one dtype expected, got ", dt, " and ", W_.scalar_type());
  TORCH_CHECK(x_.dim() == 2 && W_.dim() == 2 && x_.size(1) == W_.size(1), "linear_small: x ", x_.sizes(),
              " and W ", W_.sizes(), " do not multiply");
  TORCH_CHECK(linear_small_available(dt), "linear_small: this CPU lacks the AVX-512 units for ", dt);
  const auto x = x_.contiguous(), W = W_.contiguous();
  const int64_t B = x.size(0), K = x.size(1), N = W.size(0);
  auto y = at::empty({B, N}, x.options());
  if (y.numel() == 0) return y;
  at::Tensor b32;
  if (bias.has_value() && bias->defined()) {
    TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, "linear_small: bias must be (", N, "), got ", bias->sizes());
    b32 = bias->to(at::kFloat).contiguous();
  }
#if DF_HAVE_AVX512BF16
  const float* bp = b32.defined() ? b32.data_ptr<float>() : nullptr;
  // Split the rows of W between threads only when each gets at least 256 KiB of it: below that the
  // parallel region costs more than the memory traffic it shares out.
  const int64_t bytes_per_block = kRows * K * (int64_t)x.element_size();
  const int64_t grain = std::max<int64_t>(1, ((int64_t)1 << 18) / std::max<int64_t>(1, bytes_per_block));
  const int64_t blocks = (N + kRows - 1) / kRows;
  if (dt == at::kFloat) {
    const float *xp = x.data_ptr<float>(), *Wp = W.data_ptr<float>();
    float* yp = y.data_ptr<float>();
    at::parallel_for(0, blocks, grain, [&](int64_t c0, int64_t c1) {
      linear_kernel<F32>(xp, B, Wp, N, K, bp, yp, c0 * kRows, std::min(N, c1 * kRows));
    });
  } else {
    const auto* xp = reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>());
    const auto* Wp = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
    auto* yp = reinterpret_cast<uint16_t*>(y.data_ptr<at::BFloat16>());
    at::parallel_for(0, blocks, grain, [&](int64_t c0, int64_t c1) {
      linear_kernel<BF16>(xp, B, Wp, N, K, bp, yp, c0 * kRows, std::min(N, c1 * kRows));
    });
  }
#endif
  return y;
}

}  // namespace dalle_fast
