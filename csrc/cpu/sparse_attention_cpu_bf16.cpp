// bf16 tiles of the CPU sparse attention kernels on the bf16 GEMM units (see sparse_attention_cpu.h).
#include <ATen/native/CPUBlas.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string_view>

#include "cpu_isa.h"
#include "sparse_attention_cpu.h"
#include "sparse_attention_cpu_bf16.h"
#include "sparse_attention_cpu_math.h"

namespace dalle_fast {
namespace sparse_cpu {
namespace {

// bf16 inputs keep bf16 operands: the tile GEMMs run through cpublas::brgemm (bf16 x bf16 -> fp32),
// 3-6x the fp32 BLAS rate where the CPU has avx512_bf16 or AMX, and nothing is upcast as a whole.
// Scores, softmax statistics, dS and the dK/dV accumulators stay fp32; P and dS are rounded to bf16
// only as GEMM operands (as ATen's CPU flash attention does). Operands are packed per query block
// (sparse_attention_cpu_bf16.h); the block's keys, whatever their segments' strides, become one
// contiguous contraction, so the P.V and dS.K products are one call per block.
inline int64_t round2(int64_t x) { return (x + 1) & ~int64_t(1); }

// Whether brgemm takes VNNI-packed bf16 here: probed once with a product it must get exactly right
// (small integers), so a CPU or torch build without the oneDNN ukernel falls back to the fp32 path
// instead of failing. DALLE_FAST_SPARSE_BF16_GEMM=0 forces the fp32 path (tests compare the two).
bool bf16_gemm_available() {
  static const bool ok = [] {
    const char* e = std::getenv("DALLE_FAST_SPARSE_BF16_GEMM");
    if (e != nullptr && std::string_view(e) == "0") return false;
#if DF_HAVE_AVX512_PACK
    if (cpu_isa() != CpuIsa::kAvx512) return false;
    constexpr int M = 3, N = 5, K = 6;
    at::BFloat16 a[M * K], b[K * N];
    float c[M * N], want[M * N] = {};
    for (int i = 0; i < M * K; ++i) a[i] = (float)(i % 7 - 3);
    for (int kk = 0; kk < K; ++kk)
      for (int j = 0; j < N; ++j) b[(kk / 2 * N + j) * 2 + kk % 2] = (float)((kk * N + j) % 5 - 2);
    for (int i = 0; i < M; ++i)
      for (int j = 0; j < N; ++j)
        for (int kk = 0; kk < K; ++kk) want[i * N + j] += (float)a[i * K + kk] * (float)((kk * N + j) % 5 - 2);
    try {
      at::native::cpublas::brgemm(M, N, K, K, N, N, false, a, b, c, true);
      at::native::cpublas::brgemm_release(true);
    } catch (const std::exception&) {
      return false;
    }
    return std::memcmp(c, want, sizeof(c)) == 0;
#else
    return false;
#endif
  }();
  return ok;
}

#if DF_HAVE_AVX512_PACK
using bf16_t = uint16_t;  // bf16 bits

inline void bgemm(int64_t M, int64_t N, int64_t K, int64_t lda, int64_t ldb, int64_t ldc, bool add, const bf16_t* A,
                  const bf16_t* B, float* C) {
  if (M == 0 || N == 0) return;
  at::native::cpublas::brgemm(M, N, K, lda, ldb, ldc, add, reinterpret_cast<const at::BFloat16*>(A),
                              reinterpret_cast<const at::BFloat16*>(B), C, true);
}

// Per-thread buffers; the destructor releases brgemm's hardware context (AMX tile state) as the
// thread leaves the parallel region.
struct Bf16Scratch {
  std::vector<float> S, dP, T, acc;
  std::vector<bf16_t> P, dS, PT, dST, Kt, Vt, Kn, Qn, dOn;
  std::vector<const bf16_t*> rows, rows2;
  std::vector<const uint32_t*> rows32;
  Bf16Scratch(const Layout& L, int64_t D, bool backward) {
    const int64_t ldp = round2(L.max_cols), mp = round2(L.max_rows);
    S.resize(mp * ldp);
    P.resize(mp * ldp);
    Kt.resize(D * ldp);
    Kn.resize(ldp * D);
    acc.resize(mp * D);
    rows.resize(std::max(ldp, mp));
    rows2.resize(std::max(ldp, mp));
    rows32.resize(std::max(ldp, mp));
    if (backward) {
      dP.resize(mp * ldp);
      dS.resize(mp * ldp);
      T.resize(ldp * mp);
      PT.resize(ldp * mp);
      dST.resize(ldp * mp);
      Vt.resize(D * ldp);
      Qn.resize(mp * D);
      dOn.resize(mp * D);
    }
  }
  ~Bf16Scratch() { at::native::cpublas::brgemm_release(true); }
  Bf16Scratch(const Bf16Scratch&) = delete;
  Bf16Scratch(Bf16Scratch&& o) = default;
};

// The block's key rows of x (one bh), in score-column order.
inline void key_rows(const Layout& L, const QueryBlock& b, const bf16_t* x, int64_t D, const bf16_t** rows) {
  for (int s = b.seg_begin; s < b.seg_end; ++s) {
    const Segment& g = L.segs[s];
    for (int j = 0; j < g.len; ++j) rows[g.col + j] = x + (int64_t)(g.k0 + j * g.stride) * D;
  }
}
inline void query_rows(const QueryBlock& b, const bf16_t* x, int64_t D, const bf16_t** rows) {
  for (int r = 0; r < b.len; ++r) rows[r] = x + (int64_t)(b.q0 + r * b.stride) * D;
}
// VNNI(X^T) for rows of X: the 32-bit words (pairs along D) transposed. ld = ldp columns.
inline void pack_transposed(const bf16_t* const* rows, int64_t n, int64_t D, int64_t ldp,
                            std::vector<const uint32_t*>& rows32, bf16_t* out) {
  for (int64_t i = 0; i < n; ++i) rows32[i] = reinterpret_cast<const uint32_t*>(rows[i]);
  transpose32_avx512(rows32.data(), n, D / 2, reinterpret_cast<uint32_t*>(out), ldp);
}
// fp32 rows (m x K, ld) -> bf16 (K x mp) transposed, pad column m zero.
inline void transpose_to_bf16(const float* x, int64_t m, int64_t K, int64_t ld, int64_t mp, Bf16Scratch& sc,
                              bf16_t* out) {
  for (int64_t r = 0; r < m; ++r) sc.rows32[r] = reinterpret_cast<const uint32_t*>(x + r * ld);
  transpose32_avx512(sc.rows32.data(), m, K, reinterpret_cast<uint32_t*>(sc.T.data()), mp);
  if (mp != m)
    for (int64_t c = 0; c < K; ++c) sc.T[c * mp + m] = 0.0f;
  to_bf16_avx512(sc.T.data(), K * mp, out);
}

void forward_kernel_bf16(const Layout& L, const bf16_t* q, const bf16_t* k, const bf16_t* v, bf16_t* o, float* lse,
                         int64_t BH, int64_t N, int64_t D, float scale) {
  const int64_t nb = (int64_t)L.blocks.size();
  auto scratch = [&] { return Bf16Scratch(L, D, false); };
  parallel_cyclic(BH * nb, BH * L.pairs * D, scratch, [&](int64_t task, Bf16Scratch& sc) {
    const int64_t bh = task % BH;
    const QueryBlock& b = L.blocks[task / BH];
    const int64_t base = bh * N * D, ldq = (int64_t)b.stride * D, K = b.ncols, ldp = round2(K);
    float* S = sc.S.data();
    key_rows(L, b, k + base, D, sc.rows.data());
    pack_transposed(sc.rows.data(), K, D, ldp, sc.rows32, sc.Kt.data());
    bgemm(b.len, K, D, ldq, ldp, ldp, false, q + base + (int64_t)b.q0 * D, sc.Kt.data(), S);
    for (int r = 0; r < b.len; ++r) {
      float* row = S + r * ldp;
      scale_inplace(row, K, scale);
      for (int s = b.seg_begin; s < b.seg_end; ++s) {
        const Segment& g = L.segs[s];
        if (g.mask_off >= 0) apply_mask(row + g.col, L.masks.data() + g.mask_off + r * g.len, g.len);
      }
      const float mx = row_max(row, K);
      const float sum = exp_sub_sum(row, K, mx);
      scale_to_bf16_avx512(row, K, 1.0f / sum, sc.P.data() + r * ldp);
      if (ldp != K) sc.P[r * ldp + K] = 0;
      lse[bh * N + b.q0 + (int64_t)r * b.stride] = mx + std::log(sum);
    }
    key_rows(L, b, v + base, D, sc.rows.data());
    vnni16_avx512(sc.rows.data(), K, D, sc.Kn.data());
    bgemm(b.len, D, ldp, ldp, D, D, false, sc.P.data(), sc.Kn.data(), sc.acc.data());
    for (int r = 0; r < b.len; ++r)
      to_bf16_avx512(sc.acc.data() + r * D, D, o + base + (int64_t)(b.q0 + r * b.stride) * D);
  });
}

void backward_kernel_bf16(const Layout& L, const bf16_t* dout, const bf16_t* q, const bf16_t* k, const bf16_t* v,
                          const bf16_t* o, const float* lse, bf16_t* dq, float* dk, float* dv, int64_t BH, int64_t G,
                          int64_t N, int64_t D, float scale) {
  const int64_t nb = (int64_t)L.blocks.size();
  auto scratch = [&] { return Bf16Scratch(L, D, true); };
  parallel_cyclic(BH * G, BH * L.pairs * D, scratch, [&](int64_t task, Bf16Scratch& sc) {
    const int64_t bh = task / G, grp = task % G;
    const int64_t base = bh * N * D;
    float* dK = dk + (G == 1 ? base : task * N * D);
    float* dV = dv + (G == 1 ? base : task * N * D);
    float *const S = sc.S.data(), *const dP = sc.dP.data();
    for (int64_t bi = grp; bi < nb; bi += G) {
      const QueryBlock& b = L.blocks[bi];
      const int64_t m = b.len, ldq = (int64_t)b.stride * D, K = b.ncols, ldp = round2(K), mp = round2(m);
      const int64_t qoff = base + (int64_t)b.q0 * D;
      key_rows(L, b, k + base, D, sc.rows.data());
      pack_transposed(sc.rows.data(), K, D, ldp, sc.rows32, sc.Kt.data());
      vnni16_avx512(sc.rows.data(), K, D, sc.Kn.data());
      key_rows(L, b, v + base, D, sc.rows2.data());
      pack_transposed(sc.rows2.data(), K, D, ldp, sc.rows32, sc.Vt.data());
      bgemm(m, K, D, ldq, ldp, ldp, false, q + qoff, sc.Kt.data(), S);
      bgemm(m, K, D, ldq, ldp, ldp, false, dout + qoff, sc.Vt.data(), dP);
      for (int r = 0; r < m; ++r) {
        const int64_t i = b.q0 + (int64_t)r * b.stride;
        float* row = S + r * ldp;
        scale_inplace(row, K, scale);
        for (int s = b.seg_begin; s < b.seg_end; ++s) {
          const Segment& g = L.segs[s];
          if (g.mask_off >= 0) apply_mask(row + g.col, L.masks.data() + g.mask_off + r * g.len, g.len);
        }
        exp_sub(row, K, lse[bh * N + i]);
        const float di = dot_bf16_avx512(dout + base + i * D, o + base + i * D, D);
        softmax_grad(dP + r * ldp, row, K, di, scale);
        to_bf16_avx512(dP + r * ldp, K, sc.dS.data() + r * ldp);
        if (ldp != K) sc.dS[r * ldp + K] = 0;
      }
      transpose_to_bf16(S, m, K, ldp, mp, sc, sc.PT.data());
      transpose_to_bf16(dP, m, K, ldp, mp, sc, sc.dST.data());
      query_rows(b, q + base, D, sc.rows.data());
      vnni16_avx512(sc.rows.data(), m, D, sc.Qn.data());
      query_rows(b, dout + base, D, sc.rows.data());
      vnni16_avx512(sc.rows.data(), m, D, sc.dOn.data());
      for (int s = b.seg_begin; s < b.seg_end; ++s) {
        const Segment& g = L.segs[s];
        const int64_t koff = (int64_t)g.k0 * D, ldk = (int64_t)g.stride * D;
        bgemm(g.len, D, mp, mp, D, ldk, true, sc.PT.data() + g.col * mp, sc.dOn.data(), dV + koff);
        bgemm(g.len, D, mp, mp, D, ldk, true, sc.dST.data() + g.col * mp, sc.Qn.data(), dK + koff);
      }
      bgemm(m, D, ldp, ldp, D, D, false, sc.dS.data(), sc.Kn.data(), sc.acc.data());
      for (int r = 0; r < m; ++r) to_bf16_avx512(sc.acc.data() + r * D, D, dq + base + (int64_t)(b.q0 + r * b.stride) * D);
    }
  });
}

inline bf16_t* bits(const at::Tensor& t) { return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>()); }
#endif

}  // namespace

// bf16 with an even head dim (the GEMMs contract D in bf16 pairs) on a CPU with bf16 brgemm.
bool use_bf16_tiles(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 && q.size(3) % 2 == 0 && bf16_gemm_available();
}

std::tuple<at::Tensor, at::Tensor> forward_bf16(const MaskSpec& ms, const at::Tensor& q_, const at::Tensor& k_,
                                                const at::Tensor& v_, double scale) {
#if DF_HAVE_AVX512_PACK
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  if (B * H > 0)
    forward_kernel_bf16(*get_layout(ms), bits(q), bits(k), bits(v), bits(out), lse.data_ptr<float>(), B * H, N, D,
                        (float)scale);
  return {out, lse};
#else
  TORCH_CHECK(false, "sparse_attention: the bf16 tiles are not built for this CPU");
#endif
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_bf16(const MaskSpec& ms, const at::Tensor& grad_out,
                                                             const at::Tensor& q_, const at::Tensor& k_,
                                                             const at::Tensor& v_, const at::Tensor& out_,
                                                             const at::Tensor& lse_, double scale) {
#if DF_HAVE_AVX512_PACK
  auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
  auto o = out_.to(q.scalar_type()).contiguous(), dout = grad_out.to(q.scalar_type()).contiguous();
  auto lse = lse_.to(at::kFloat).contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), BH = B * H;
  auto dq = at::empty_like(q);
  if (BH == 0) return {dq, at::zeros_like(k_), at::zeros_like(v_)};
  auto L = get_layout(ms);
  const int64_t G = key_groups(BH, (int64_t)L->blocks.size());
  const auto f32 = q.options().dtype(at::kFloat);
  auto dk = at::zeros(G == 1 ? q.sizes().vec() : std::vector<int64_t>{BH * G, N, D}, f32);
  auto dv = at::zeros_like(dk);
  backward_kernel_bf16(*L, bits(dout), bits(q), bits(k), bits(v), bits(o), lse.data_ptr<float>(), bits(dq),
                       dk.data_ptr<float>(), dv.data_ptr<float>(), BH, G, N, D, (float)scale);
  if (G > 1) {
    dk = dk.view({B, H, G, N, D}).sum(2);
    dv = dv.view({B, H, G, N, D}).sum(2);
  }
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type())};
#else
  TORCH_CHECK(false, "_sparse_attention_backward: the bf16 tiles are not built for this CPU");
#endif
}

}  // namespace sparse_cpu
}  // namespace dalle_fast
