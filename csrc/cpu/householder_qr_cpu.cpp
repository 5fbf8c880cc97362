// CPU kernel of the batched Householder QR (schema in csrc/ops.cpp, reflection math and checks in
// include/dalle_fast/householder_qr.h, Python side in dalle_fast/ops/householder_qr.py).
//
// One matrix per work item (at::parallel_for over the batch). Each matrix is copied once into an
// accumulation-type scratch stored column by column (cols x rows), so every dot product and update
// walks contiguous memory and vectorises; eps is added to the diagonal in the copy. Q is formed by
// applying the reflections backwards to the first cols columns of the identity, in a second
// column-major scratch, and stored transposed into the output in A's dtype. The copies walk A and Q
// row by row (contiguous for row-major input), and the whole matrix runs through with_cpu_isa
// (cpu_isa.h), so the dot products and updates are compiled for AVX2 / AVX-512 and picked at run time.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_isa.h"
#include "dalle_fast/householder_qr.h"

namespace dalle_fast {
namespace {

// 32 independent partial sums: without -ffast-math the compiler may not reorder one sum, so a single
// accumulator runs at one FMA latency per element; 32 make four 8-float vector accumulators, enough
// independent FMA chains to cover the latency (one 8-wide accumulator ran at a quarter of the FMA rate).
constexpr int kLanes = 32;

template <typename acc>
acc dot_tail(const acc* x, const acc* y, int64_t n) {
  acc p[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) p[l] += x[i + l] * y[i + l];
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) p[l] += p[l + w];
  acc s = p[0];
  for (; i < n; ++i) s += x[i] * y[i];
  return s;
}

// scale = max |x_i| and finite = no x_i is NaN or infinite, branch free (|x| <= max is false for both) with
// eight partial results, so the loop vectorises (a running max and an && chain do not).
template <typename acc>
void column_stats(const acc* x, int64_t len, acc& scale, bool& finite) {
  acc p[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  unsigned b[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  const acc big = std::numeric_limits<acc>::max();
  int64_t i = 0;
  for (; i + 8 <= len; i += 8)
    for (int l = 0; l < 8; ++l) {
      const acc a = std::fabs(x[i + l]);
      p[l] = a > p[l] ? a : p[l];
      b[l] |= static_cast<unsigned>(!(a <= big));
    }
  acc m = 0;
  unsigned bad = 0;
  for (int l = 0; l < 8; ++l) {
    m = p[l] > m ? p[l] : m;
    bad |= b[l];
  }
  for (; i < len; ++i) {
    const acc a = std::fabs(x[i]);
    m = a > m ? a : m;
    bad |= static_cast<unsigned>(!(a <= big));
  }
  scale = m;
  finite = bad == 0;
}

// sum (x_i * inv)^2 with kLanes partial sums (as dot_tail).
template <typename acc>
acc scaled_sumsq(const acc* x, int64_t n, acc inv) {
  acc p[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int l = 0; l < kLanes; ++l) {
      const acc v = x[i + l] * inv;
      p[l] += v * v;
    }
  for (int w = kLanes / 2; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) p[l] += p[l + w];
  acc s = p[0];
  for (; i < n; ++i) s += (x[i] * inv) * (x[i] * inv);
  return s;
}

// v = (v0, col[1:]) of reflection k lives in work[k][k:], with v0 kept apart.
template <typename scalar_t>
void qr_one(const scalar_t* a, int64_t sr, int64_t sc, scalar_t* q_out, int64_t m, int64_t n, double eps,
            std::vector<acc_t<scalar_t>>& work, std::vector<acc_t<scalar_t>>& qw,
            std::vector<Reflection<acc_t<scalar_t>>>& refl, int64_t ld) {
  using acc = acc_t<scalar_t>;
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) work[j * ld + i] = static_cast<acc>(a[i * sr + j * sc]);
  for (int64_t j = 0; j < n; ++j) work[j * ld + j] += static_cast<acc>(eps);

  for (int64_t k = 0; k < n; ++k) {
    acc* x = work.data() + k * ld + k;
    const int64_t len = m - k;
    acc scale;
    bool finite;
    column_stats(x, len, scale, finite);
    acc sumsq = 0, tail = 0;
    if (finite && scale > 0) {
      const acc inv = acc(1) / scale;
      tail = scaled_sumsq(x + 1, len - 1, inv);
      sumsq = tail + (x[0] * inv) * (x[0] * inv);
    }
    // a non-finite column propagates NaN into Q (the caller detects it and skips the update)
    Reflection<acc> r = finite ? householder_reflection<acc>(x[0], scale, sumsq, tail)
                               : Reflection<acc>{acc(NAN), acc(1), acc(NAN)};
    refl[k] = r;
    if (r.tau == acc(0)) continue;
    for (int64_t j = k + 1; j < n; ++j) {
      acc* y = work.data() + j * ld + k;
      const acc s = r.tau * (r.v0 * y[0] + dot_tail(x + 1, y + 1, len - 1));
      y[0] -= s * r.v0;
      for (int64_t i = 1; i < len; ++i) y[i] -= s * x[i];
    }
  }

  std::fill(qw.begin(), qw.end(), acc(0));
  for (int64_t j = 0; j < n; ++j) qw[j * ld + j] = acc(1);
  for (int64_t k = n - 1; k >= 0; --k) {
    const Reflection<acc>& r = refl[k];
    if (r.tau == acc(0)) continue;
    const acc* x = work.data() + k * ld + k;
    const int64_t len = m - k;
    for (int64_t j = k; j < n; ++j) {  // columns j < k of H_{k+1}..H_{n-1} e_j are zero below row k
      acc* y = qw.data() + j * ld + k;
      const acc s = r.tau * (r.v0 * y[0] + dot_tail(x + 1, y + 1, len - 1));
      y[0] -= s * r.v0;
      for (int64_t i = 1; i < len; ++i) y[i] -= s * x[i];
    }
  }
  for (int64_t j = 0; j < n; ++j)
    if (refl[j].alpha < acc(0))
      for (int64_t i = 0; i < m; ++i) qw[j * ld + i] = -qw[j * ld + i];
  for (int64_t i = 0; i < m; ++i)
    for (int64_t j = 0; j < n; ++j) q_out[i * n + j] = static_cast<scalar_t>(qw[j * ld + i]);
}

}  // namespace

at::Tensor householder_qr_cpu(const at::Tensor& a, double eps) {
  householder_qr_check(a, eps);
  TORCH_CHECK_VALUE(a.device().is_cpu(), "householder_qr (CPU): A must be a CPU tensor");
  const int64_t batch = a.size(0), m = a.size(1), n = a.size(2);
  at::Tensor q = at::empty({batch, m, n}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return q;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "householder_qr_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const scalar_t* ap = a.const_data_ptr<scalar_t>();
    scalar_t* qp = q.mutable_data_ptr<scalar_t>();
    const int64_t sb = a.stride(0), sr = a.stride(1), sc = a.stride(2);
    at::parallel_for(0, batch, 1, [&](int64_t begin, int64_t end) {
      // column stride: m padded so that it is never a multiple of 4 KiB (with m = 1024, 2048, 4096 the
      // columns otherwise share L1 sets and evict each other: 4x slower at 4096 x 16)
      const int64_t ld = (m + 15) / 16 * 16 + 16;
      std::vector<acc> work(ld * n), qw(ld * n);
      std::vector<Reflection<acc>> refl(n);
      for (int64_t b = begin; b < end; ++b)
        with_cpu_isa([&] { qr_one<scalar_t>(ap + b * sb, sr, sc, qp + b * m * n, m, n, eps, work, qw, refl, ld); });
    });
  });
  return q;
}

}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("householder_qr", &dalle_fast::householder_qr_cpu);
}
