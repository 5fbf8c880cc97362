// Block-sparse attention over DALL-E's masks on the CPU: forward, fused backward, cached decode.
//
// Work is cut into query blocks (a few dozen queries that need nearly the same keys: a raster run
// for row/full, one image row for conv, one image column for column attention, so column attention
// needs no transposed copy: a column is a matrix with leading dimension W*D). A block's key set is
// the union of its queries' allowed keys, stored as a few strided segments that GEMM reads in place,
// plus a byte mask for the segments where some pair is not allowed. Layouts are built once per
// (kind, text_len, image_size, conv_kernel, block) from MaskSpec and cached.
// Each block holds its whole score row (block x allowed keys, never N x N), so the softmax is exact
// in one pass and no online rescaling is needed.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <string_view>
#include <tuple>
#include <vector>

#include "cpu_isa.h"
#include "dalle_fast/attention_mask.h"
#include "sparse_attention_cpu_math.h"
#include "sparse_attention_cpu_bf16.h"

// The BLAS behind at::native::cpublas::gemm (MKL in the official wheels). cpublas' float/double
// overloads are not exported to extensions, and at::mm_out costs ~1 us of dispatch per tile, so we
// call the same BLAS when the loaded torch exports it (weak: absent symbols are null), else at::mm_out.
extern "C" {
void sgemm_(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
            const int*, const float*, const int*, const float*, float*, const int*) __attribute__((weak));
void dgemm_(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
            const int*, const double*, const int*, const double*, double*, const int*) __attribute__((weak));
}

namespace dalle_fast {
namespace {

// ---------------------------------------------------------------- GEMM on row-major tiles
// C (m x n, ldc) = alpha * op(A) op(B) + beta * C, all row-major; op(A) is m x k, op(B) is k x n.
template <typename T>
void gemm_rm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, T alpha, const T* A, int64_t lda,
             const T* B, int64_t ldb, T beta, T* C, int64_t ldc) {
  if (m == 0 || n == 0) return;
  // Row-major C is column-major C^T = op(B)^T op(A)^T: swap the operands, keep the flags.
  const char ta = trans_b ? 'T' : 'N', tb = trans_a ? 'T' : 'N';
  const int M = (int)n, N = (int)m, K = (int)k, la = (int)ldb, lb = (int)lda, lc = (int)ldc;
  if constexpr (std::is_same_v<T, float>) {
    if (sgemm_ != nullptr) return sgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
  } else {
    if (dgemm_ != nullptr) return dgemm_(&ta, &tb, &M, &N, &K, &alpha, B, &la, A, &lb, &beta, C, &lc);
  }
  const auto st = c10::CppTypeToScalarType<T>::value;
  auto view = [&](const T* p, int64_t rows, int64_t cols, int64_t ld, bool trans) {
    auto t = at::from_blob(const_cast<T*>(p), {trans ? cols : rows, trans ? rows : cols}, {ld, 1},
                           at::TensorOptions().dtype(st));
    return trans ? t.t() : t;
  };
  auto a = view(A, m, k, lda, trans_a), b = view(B, k, n, ldb, trans_b);
  auto c = at::from_blob(C, {m, n}, {ldc, 1}, at::TensorOptions().dtype(st));
  if (beta == T(0)) {
    at::mm_out(c, a, b);
    if (alpha != T(1)) c.mul_(alpha);
  } else {
    at::addmm_out(c, c, a, b, beta, alpha);
  }
}

// ---------------------------------------------------------------- block layout
struct Segment {
  int k0, len, stride;  // keys k0, k0 + stride, ..., (len of them)
  int col;              // first column in the block's score row
  int64_t mask_off;     // into Layout::masks ([block rows][len] bytes), or -1: every pair allowed
};
struct QueryBlock {
  int q0, len, stride;  // queries q0, q0 + stride, ...
  int seg_begin, seg_end, ncols;
};
struct Layout {
  std::vector<QueryBlock> blocks;
  std::vector<Segment> segs;
  std::vector<uint8_t> masks;
  int max_cols = 0, max_rows = 0;
  int64_t pairs = 0;  // score elements over all blocks: the work per (batch, head)
};

MaskKind parse_kind(std::string_view kind) {
  if (kind == "full") return MaskKind::Full;
  if (kind == "row") return MaskKind::Row;
  if (kind == "column") return MaskKind::Column;
  if (kind == "conv") return MaskKind::Conv;
  TORCH_CHECK_VALUE(false, "sparse_attention: kind must be one of 'full', 'row', 'column', 'conv', got '", kind, "'");
}

// Query blocks: runs of queries whose allowed keys nearly coincide.
std::vector<QueryBlock> query_blocks(const MaskSpec& ms, int bq) {
  std::vector<QueryBlock> out;
  const int T = ms.text_len, W = ms.image_size;
  auto add = [&](int q0, int len, int stride) { out.push_back({q0, len, stride, 0, 0, 0}); };
  for (int q0 = 0; q0 < T; q0 += bq) add(q0, std::min(bq, T - q0), 1);
  if (ms.kind == MaskKind::Column) {
    for (int c = 0; c < W; ++c)
      for (int r0 = 0; r0 < W; r0 += bq) add(T + r0 * W + c, std::min(bq, W - r0), W);
  } else if (ms.kind == MaskKind::Conv) {
    for (int r = 0; r < W; ++r)
      for (int c0 = 0; c0 < W; c0 += bq) add(T + r * W + c0, std::min(bq, W - c0), 1);
  } else {
    for (int p0 = 0; p0 < W * W; p0 += bq) add(T + p0, std::min(bq, W * W - p0), 1);
  }
  return out;
}

std::shared_ptr<const Layout> build_layout(const MaskSpec& ms, int bq) {
  auto L = std::make_shared<Layout>();
  L->blocks = query_blocks(ms, bq);
  const int N = ms.seq_len();
  std::vector<uint8_t> used(N, 0);
  std::vector<int> keys;
  std::vector<uint8_t> full;
  for (auto& b : L->blocks) {
    const int qlast = b.q0 + (b.len - 1) * b.stride;
    for (int r = 0; r < b.len; ++r) {
      const int i = b.q0 + r * b.stride, cnt = ms.allowed_count(i);
      for (int n = 0; n < cnt; ++n) used[ms.allowed_key(i, n)] = 1;
    }
    keys.clear();
    for (int j = 0; j <= qlast; ++j)
      if (used[j]) keys.push_back(j), used[j] = 0;
    // A key is "full" when every query of the block may attend it: no mask needed there. Short full
    // runs are folded into the masked neighbours: one GEMM call costs more than a few mask bytes.
    const int nk = (int)keys.size();
    full.assign(nk, 1);
    for (int x = 0; x < nk; ++x)
      for (int r = 0; r < b.len && full[x]; ++r) full[x] = ms.allowed(b.q0 + r * b.stride, keys[x]);
    for (int x = 0; x < nk;) {
      int y = x;
      while (y < nk && full[y] == full[x]) ++y;
      if (full[x] && y - x < 16) std::fill(full.begin() + x, full.begin() + y, 0);
      x = y;
    }
    b.seg_begin = (int)L->segs.size();
    for (int x = 0; x < nk;) {
      int stride = 1, y = x + 1;
      if (y < nk && full[y] == full[x]) {
        stride = keys[y] - keys[x];
        while (y < nk && full[y] == full[x] && keys[y] - keys[y - 1] == stride) ++y;
      }
      Segment s{keys[x], y - x, stride, x, -1};
      if (!full[x]) {
        s.mask_off = (int64_t)L->masks.size();
        for (int r = 0; r < b.len; ++r)
          for (int j = 0; j < s.len; ++j)
            L->masks.push_back(ms.allowed(b.q0 + r * b.stride, s.k0 + j * s.stride) ? 1 : 0);
      }
      L->segs.push_back(s);
      x = y;
    }
    b.seg_end = (int)L->segs.size();
    b.ncols = nk;
    L->pairs += (int64_t)nk * b.len;
    L->max_cols = std::max(L->max_cols, nk);
    L->max_rows = std::max(L->max_rows, b.len);
  }
  return L;
}

int block_rows() {
  static const int bq = [] {
    const char* e = std::getenv("DALLE_FAST_SPARSE_BLOCK");  // tuning knob; 64 measured best here
    const int v = e ? std::atoi(e) : 64;
    return v >= 1 && v <= 1024 ? v : 64;
  }();
  return bq;
}

std::shared_ptr<const Layout> get_layout(const MaskSpec& ms) {
  static std::mutex mu;
  static std::map<std::tuple<int, int, int, int, int>, std::shared_ptr<const Layout>> cache;
  const int bq = block_rows();
  const auto key = std::make_tuple((int)ms.kind, ms.text_len, ms.image_size, ms.conv_kernel, bq);
  std::lock_guard<std::mutex> g(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (cache.size() >= 64) cache.clear();  // tests sweep many shapes; a model uses a handful
  return cache[key] = build_layout(ms, bq);
}

// ---------------------------------------------------------------- checks
MaskSpec check_and_spec(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, std::string_view kind,
                        int64_t text_len, int64_t image_size, int64_t conv_kernel) {
  TORCH_CHECK(q.dim() == 4, "sparse_attention: q must be 4-D (B, heads, N, D), got ", q.dim(), "-D");
  TORCH_CHECK(k.sizes() == q.sizes() && v.sizes() == q.sizes(),
              "sparse_attention: q, k, v must have the same shape, got ", q.sizes(), ", ", k.sizes(), ", ", v.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "sparse_attention: q, k, v must have the same dtype");
  TORCH_CHECK(at::isFloatingType(q.scalar_type()), "sparse_attention: q must be a floating tensor, got ",
              q.scalar_type());
  TORCH_CHECK(text_len >= 0, "sparse_attention: text_len must be >= 0, got ", text_len);
  TORCH_CHECK(image_size >= 1, "sparse_attention: image_size must be >= 1, got ", image_size);
  TORCH_CHECK(conv_kernel >= 1 && conv_kernel % 2 == 1, "sparse_attention: conv_kernel must be odd and positive, got ",
              conv_kernel);
  const int64_t N = text_len + image_size * image_size;
  TORCH_CHECK(N < (1 << 30), "sparse_attention: sequence too long");
  TORCH_CHECK(q.size(2) == N, "sparse_attention: q.shape[2] must equal text_len + image_size**2 = ", N, ", got ",
              q.size(2));
  TORCH_CHECK(q.size(3) >= 1 && q.size(3) <= 512, "sparse_attention: head dim D must be in [1, 512] on the CPU, got ",
              q.size(3));
  return MaskSpec{parse_kind(kind), (int)text_len, (int)image_size, (int)conv_kernel};
}

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

// Run fn(task, scratch) for tasks 0..n-1, dealt cyclically to threads (parallel_for hands out
// contiguous chunks, and neighbouring tasks cost alike: text blocks are cheap, image blocks dear).
// make_scratch() runs once per thread. Small problems (`work` multiply-adds) stay on the calling
// thread: waking a team costs more than they do, and far more on an oversubscribed machine.
constexpr int64_t kSerialWork = 1 << 18;
template <typename Init, typename F>
void parallel_cyclic(int64_t n, int64_t work, const Init& make_scratch, const F& fn) {
  const int64_t p = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), n));
  at::parallel_for(0, p, work < kSerialWork ? p : 1, [&](int64_t b, int64_t e) {
    auto scratch = make_scratch();
    for (int64_t t = b; t < e; ++t)
      for (int64_t i = t; i < n; i += p) fn(i, scratch);
  });
}

// ---------------------------------------------------------------- bf16 tiles on the bf16 GEMM units
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
#endif

// Query-block groups per (batch, head) in the backward: > 1 only when there are too few heads to
// keep every thread busy; each group then owns its dK/dV accumulators.
int64_t key_groups(int64_t BH, int64_t nb) {
  const int64_t nth = at::get_num_threads();
  const bool enough_heads = BH >= 4 * nth || (BH >= nth && BH % nth == 0);
  return enough_heads ? 1 : std::min<int64_t>(nb, (4 * nth + BH - 1) / BH);
}

#if DF_HAVE_AVX512_PACK
// bf16 with an even head dim (the GEMMs contract D in bf16 pairs) on a CPU with bf16 brgemm.
bool use_bf16_tiles(const at::Tensor& q) {
  return q.scalar_type() == at::kBFloat16 && q.size(3) % 2 == 0 && bf16_gemm_available();
}
inline bf16_t* bits(const at::Tensor& t) { return reinterpret_cast<bf16_t*>(t.data_ptr<at::BFloat16>()); }
#endif

// ---------------------------------------------------------------- forward
template <typename T>
void forward_kernel(const Layout& L, const T* q, const T* k, const T* v, T* o, T* lse, int64_t BH, int64_t N,
                    int64_t D, T scale) {
  const int64_t nb = (int64_t)L.blocks.size();
  const int64_t ncols = L.max_cols;
  auto scratch = [&] { return std::vector<T>((size_t)L.max_rows * ncols); };
  parallel_cyclic(BH * nb, BH * L.pairs * D, scratch, [&](int64_t task, std::vector<T>& S) {
    const int64_t bh = task % BH;
    const QueryBlock& b = L.blocks[task / BH];
    const int64_t base = bh * N * D, ldq = (int64_t)b.stride * D, K = b.ncols;
    const T* Q = q + base + (int64_t)b.q0 * D;
    for (int s = b.seg_begin; s < b.seg_end; ++s) {
      const Segment& g = L.segs[s];
      const int64_t ldk = (int64_t)g.stride * D;
      gemm_rm<T>(false, true, b.len, g.len, D, scale, Q, ldq, k + base + g.k0 * D, ldk, T(0), S.data() + g.col, K);
      if (g.mask_off >= 0)
        for (int r = 0; r < b.len; ++r)
          apply_mask(S.data() + r * K + g.col, L.masks.data() + g.mask_off + r * g.len, g.len);
    }
    for (int r = 0; r < b.len; ++r) {
      T* row = S.data() + r * K;
      const T mx = row_max(row, K);
      const T sum = exp_sub_sum(row, K, mx);
      scale_inplace(row, K, T(1) / sum);
      lse[bh * N + b.q0 + (int64_t)r * b.stride] = mx + std::log(sum);
    }
    T* O = o + base + (int64_t)b.q0 * D;
    for (int s = b.seg_begin; s < b.seg_end; ++s) {
      const Segment& g = L.segs[s];
      const int64_t ldv = (int64_t)g.stride * D;
      gemm_rm<T>(false, false, b.len, D, g.len, T(1), S.data() + g.col, K, v + base + g.k0 * D, ldv,
                 s == b.seg_begin ? T(0) : T(1), O, ldq);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, std::string_view kind, int64_t text_len,
                                                        int64_t image_size, int64_t conv_kernel, double scale) {
  const MaskSpec ms = check_and_spec(q_, k_, v_, kind, text_len, image_size, conv_kernel);
#if DF_HAVE_AVX512_PACK
  if (use_bf16_tiles(q_)) {
    auto q = q_.contiguous(), k = k_.contiguous(), v = v_.contiguous();
    const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
    auto out = at::empty_like(q);
    auto lse = at::empty({B, H, N}, q.options().dtype(at::kFloat));
    if (B * H > 0)
      forward_kernel_bf16(*get_layout(ms), bits(q), bits(k), bits(v), bits(out), lse.data_ptr<float>(), B * H, N, D,
                          (float)scale);
    return {out, lse};
  }
#endif
  const auto ct = compute_type(q_.scalar_type());
  // fp16 (and bf16 without bf16 GEMM units) runs in fp32 (upcast once): the tile GEMMs then take the
  // fp32 BLAS path.
  auto q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, N}, q.options());  // fp32, or fp64 for fp64 inputs
  if (B * H > 0) {
    auto L = get_layout(ms);
    AT_DISPATCH_FLOATING_TYPES(ct, "sparse_attention_cpu", [&] {
      forward_kernel<scalar_t>(*L, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                               out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B * H, N, D, (scalar_t)scale);
    });
  }
  return {out.to(q_.scalar_type()), lse};
}

// ---------------------------------------------------------------- backward
// Per block: P = exp(S - lse), dP = dO V^T, dS = P (dP - rowsum(dO o O)) scale; dQ = dS K, dK += dS^T Q,
// dV += P^T dO. dQ rows belong to one block; dK/dV rows are shared, so a (batch*head, group) task owns
// its accumulators: groups > 1 only when there are too few heads to keep every thread busy.
template <typename T>
void backward_kernel(const Layout& L, const T* dout, const T* q, const T* k, const T* v, const T* o, const T* lse,
                     T* dq, T* dk, T* dv, int64_t BH, int64_t G, int64_t N, int64_t D, T scale) {
  const int64_t nb = (int64_t)L.blocks.size(), ncols = L.max_cols;
  auto scratch = [&] { return std::vector<T>((size_t)2 * L.max_rows * ncols); };
  parallel_cyclic(BH * G, BH * L.pairs * D, scratch, [&](int64_t task, std::vector<T>& buf) {
    const int64_t bh = task / G, grp = task % G;
    const int64_t base = bh * N * D;
    T* dK = dk + (G == 1 ? base : task * N * D);
    T* dV = dv + (G == 1 ? base : task * N * D);
    T* const P = buf.data();
    T* const dP = buf.data() + (size_t)L.max_rows * ncols;
    for (int64_t bi = grp; bi < nb; bi += G) {
      const QueryBlock& b = L.blocks[bi];
      const int64_t ldq = (int64_t)b.stride * D, K = b.ncols, qoff = base + (int64_t)b.q0 * D;
      for (int s = b.seg_begin; s < b.seg_end; ++s) {
        const Segment& g = L.segs[s];
        const int64_t koff = base + (int64_t)g.k0 * D, ldk = (int64_t)g.stride * D;
        gemm_rm<T>(false, true, b.len, g.len, D, scale, q + qoff, ldq, k + koff, ldk, T(0), P + g.col, K);
        gemm_rm<T>(false, true, b.len, g.len, D, T(1), dout + qoff, ldq, v + koff, ldk, T(0), dP + g.col, K);
        if (g.mask_off >= 0)
          for (int r = 0; r < b.len; ++r) apply_mask(P + r * K + g.col, L.masks.data() + g.mask_off + r * g.len, g.len);
      }
      for (int r = 0; r < b.len; ++r) {
        const int64_t i = b.q0 + (int64_t)r * b.stride;
        exp_sub(P + r * K, K, lse[bh * N + i]);
        const T di = dot(dout + base + i * D, o + base + i * D, D);
        softmax_grad(dP + r * K, P + r * K, K, di, scale);
      }
      for (int s = b.seg_begin; s < b.seg_end; ++s) {
        const Segment& g = L.segs[s];
        const int64_t koff = (int64_t)g.k0 * D, ldk = (int64_t)g.stride * D;
        gemm_rm<T>(true, false, g.len, D, b.len, T(1), P + g.col, K, dout + qoff, ldq, T(1), dV + koff, ldk);
        gemm_rm<T>(true, false, g.len, D, b.len, T(1), dP + g.col, K, q + qoff, ldq, T(1), dK + koff, ldk);
        gemm_rm<T>(false, false, b.len, D, g.len, T(1), dP + g.col, K, k + base + koff, ldk,
                   s == b.seg_begin ? T(0) : T(1), dq + qoff, ldq);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, std::string_view kind, int64_t text_len, int64_t image_size,
    int64_t conv_kernel, double scale) {
  const MaskSpec ms = check_and_spec(q_, k_, v_, kind, text_len, image_size, conv_kernel);
  TORCH_CHECK(grad_out.sizes() == q_.sizes() && out_.sizes() == q_.sizes(),
              "_sparse_attention_backward: grad_out and out must have q's shape ", q_.sizes());
  TORCH_CHECK(lse_.dim() == 3 && lse_.size(0) == q_.size(0) && lse_.size(1) == q_.size(1) && lse_.size(2) == q_.size(2),
              "_sparse_attention_backward: lse must have shape (B, heads, N)");
#if DF_HAVE_AVX512_PACK
  if (use_bf16_tiles(q_)) {
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
  }
#endif
  const auto ct = compute_type(q_.scalar_type());
  auto q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  auto o = out_.to(ct).contiguous(), dout = grad_out.to(ct).contiguous();
  auto lse = lse_.to(ct).contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), BH = B * H;
  auto dq = at::empty_like(q);
  if (BH == 0) return {dq.to(q_.scalar_type()), at::zeros_like(k_), at::zeros_like(v_)};
  auto L = get_layout(ms);
  const int64_t G = key_groups(BH, (int64_t)L->blocks.size());
  auto dk = at::zeros(G == 1 ? q.sizes().vec() : std::vector<int64_t>{BH * G, N, D}, q.options());
  auto dv = at::zeros_like(dk);
  AT_DISPATCH_FLOATING_TYPES(ct, "sparse_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(*L, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), BH, G, N, D,
                              (scalar_t)scale);
  });
  if (G > 1) {
    dk = dk.view({B, H, G, N, D}).sum(2);
    dv = dv.view({B, H, G, N, D}).sum(2);
  }
  const auto st = q_.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

// ---------------------------------------------------------------- decode
// One query per (batch, head) at `position`: gathers exactly MaskSpec::allowed_count keys through
// allowed_key, reading the caches in place (any batch/head/sequence strides, unit stride in D).
// A cache row as float: the row itself for float, else converted into tmp (D elements).
inline const float* row_as_acc(const float* r, int64_t, float*) { return r; }
inline const double* row_as_acc(const double* r, int64_t, double*) { return r; }
template <typename scalar_t>
const float* row_as_acc(const scalar_t* r, int64_t D, float* tmp) {
  for (int64_t d = 0; d < D; ++d) tmp[d] = (float)r[d];
  return tmp;
}

template <typename scalar_t>
void decode_kernel(const MaskSpec& ms, int position, const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc,
                   at::Tensor& out, double scale) {
  using acc = acc_t<scalar_t>;
  const int64_t B = q.size(0), H = q.size(1), D = q.size(3), cnt = ms.allowed_count(position);
  std::vector<int64_t> keys(cnt);
  for (int64_t n = 0; n < cnt; ++n) keys[n] = ms.allowed_key(position, (int)n);
  const scalar_t *qp = q.data_ptr<scalar_t>(), *kp = kc.data_ptr<scalar_t>(), *vp = vc.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const int64_t ks = kc.stride(2), vs = vc.stride(2);
  // Memory-bound: worth a second thread sooner than the GEMM-bound kernels.
  const int64_t grain = std::max<int64_t>(1, (kSerialWork / 8) / std::max<int64_t>(1, cnt * D));
  at::parallel_for(0, B * H, grain, [&](int64_t b0, int64_t b1) {
    std::vector<acc> qv(D), s(cnt), ov(D), tmp(D);
    for (int64_t bh = b0; bh < b1; ++bh) {
      const int64_t b = bh / H, h = bh % H;
      const scalar_t* qr = qp + b * q.stride(0) + h * q.stride(1);
      const scalar_t* K = kp + b * kc.stride(0) + h * kc.stride(1);
      const scalar_t* V = vp + b * vc.stride(0) + h * vc.stride(1);
      for (int64_t d = 0; d < D; ++d) qv[d] = (acc)qr[d] * (acc)scale;
      scalar_t* orow = op + bh * D;
      if constexpr (std::is_same_v<scalar_t, float> || std::is_same_v<scalar_t, at::BFloat16>) {
        if constexpr (std::is_same_v<scalar_t, float>) {
          attend_one_f32(qv.data(), K, ks, V, vs, keys.data(), cnt, D, s.data(), orow);
        } else {
          attend_one_bf16(qv.data(), reinterpret_cast<const uint16_t*>(K), ks, reinterpret_cast<const uint16_t*>(V),
                          vs, keys.data(), cnt, D, s.data(), ov.data());
          for (int64_t d = 0; d < D; ++d) orow[d] = (scalar_t)ov[d];
        }
        continue;
      }
      for (int64_t n = 0; n < cnt; ++n) s[n] = dot(qv.data(), row_as_acc(K + keys[n] * ks, D, tmp.data()), D);
      const acc mx = row_max(s.data(), cnt);
      const acc sum = exp_sub_sum(s.data(), cnt, mx);
      std::fill(ov.begin(), ov.end(), acc(0));
      for (int64_t n = 0; n < cnt; ++n) axpy(ov.data(), s[n], row_as_acc(V + keys[n] * vs, D, tmp.data()), D);
      for (int64_t d = 0; d < D; ++d) orow[d] = (scalar_t)(ov[d] / sum);
    }
  });
}

at::Tensor sparse_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       int64_t position, std::string_view kind, int64_t text_len, int64_t image_size,
                                       int64_t conv_kernel, double scale) {
  // The checks of the whole op live here, as ValueError/TypeError: the Python wrapper of a sampling step
  // stays thin (a step is tens of microseconds).
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 1, "sparse_attention_decode: q must be (B, heads, 1, D), got ",
                    q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(),
                    "sparse_attention_decode: k_cache and v_cache must be 4-D caches (B, heads, L, D) of one shape, "
                    "got ", k_cache.sizes(), " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(0) == q.size(0) && k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3),
                    "sparse_attention_decode: caches ", k_cache.sizes(), " do not match q ", q.sizes());
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(),
                   "sparse_attention_decode: q, k_cache, v_cache must have the same dtype, got ", q.scalar_type(), ", ",
                   k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()), "sparse_attention_decode: q must be a floating tensor, got ",
                   q.scalar_type());
  TORCH_CHECK_VALUE(text_len >= 0, "sparse_attention_decode: text_len must be >= 0, got ", text_len);
  TORCH_CHECK_VALUE(image_size >= 1, "sparse_attention_decode: image_size must be >= 1, got ", image_size);
  TORCH_CHECK_VALUE(conv_kernel >= 1 && conv_kernel % 2 == 1,
                    "sparse_attention_decode: conv_kernel must be odd and positive, got ", conv_kernel);
  const int64_t N = text_len + image_size * image_size;
  TORCH_CHECK_VALUE(position >= 0 && position < N, "sparse_attention_decode: position must be in [0, ", N, "), got ",
                    position);
  TORCH_CHECK_VALUE(k_cache.size(2) > position, "sparse_attention_decode: the caches hold ", k_cache.size(2),
                    " positions, position ", position, " is past their end");
  const MaskSpec ms{parse_kind(kind), (int)text_len, (int)image_size, (int)conv_kernel};
  // Only the unit stride along D is required: copying a cache would cost O(L) per step.
  auto kc = k_cache.stride(3) == 1 ? k_cache : k_cache.contiguous();
  auto vc = v_cache.stride(3) == 1 ? v_cache : v_cache.contiguous();
  auto qc = q.stride(3) == 1 ? q : q.contiguous();
  auto out = at::empty({q.size(0), q.size(1), 1, q.size(3)}, q.options());
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sparse_attention_decode_cpu", [&] {
    decode_kernel<scalar_t>(ms, (int)position, qc, kc, vc, out, scale);
  });
  return out;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention", &dalle_fast::sparse_attention_cpu);
  m.impl("_sparse_attention_backward", &dalle_fast::sparse_attention_backward_cpu);
  m.impl("sparse_attention_decode", &dalle_fast::sparse_attention_decode_cpu);
}
