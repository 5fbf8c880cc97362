// fp32/fp64 tiles of the CPU sparse attention kernels: the tile GEMMs on the BLAS, the row-wise
// softmax pieces in sparse_attention_cpu_math.h (see sparse_attention_cpu.h for the layout).
#include <ATen/Dispatch.h>

#include <cmath>
#include <type_traits>

#include "sparse_attention_cpu.h"
#include "sparse_attention_cpu_math.h"

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
namespace sparse_cpu {
namespace {

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

}  // namespace

void forward_tiles(const Layout& L, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                   at::Tensor& lse, double scale) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_cpu", [&] {
    forward_kernel<scalar_t>(L, q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(),
                             out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B * H, N, D, (scalar_t)scale);
  });
}

void backward_tiles(const Layout& L, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                    const at::Tensor& v, const at::Tensor& o, const at::Tensor& lse, at::Tensor& dq, at::Tensor& dk,
                    at::Tensor& dv, int64_t G, double scale) {
  const int64_t BH = q.size(0) * q.size(1), N = q.size(2), D = q.size(3);
  AT_DISPATCH_FLOATING_TYPES(q.scalar_type(), "sparse_attention_backward_cpu", [&] {
    backward_kernel<scalar_t>(L, dout.data_ptr<scalar_t>(), q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(),
                              v.data_ptr<scalar_t>(), o.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                              dq.data_ptr<scalar_t>(), dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), BH, G, N, D,
                              (scalar_t)scale);
  });
}

}  // namespace sparse_cpu
}  // namespace dalle_fast
