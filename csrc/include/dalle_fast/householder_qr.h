// Batched Householder QR (PowerSGD's orthogonalisation, dalle_fast.distributed): the scalar math of
// one reflection, shared by the CPU kernel (cpu/householder_qr_cpu.cpp) and the CUDA kernel
// (cuda/householder_qr_cuda.cu), and the argument checks both run at the op boundary.
//
// For the column x = A[k:, k] (after the earlier reflections) with norm ||x||:
//   alpha = -sign(x0) ||x||  (sign(0) = +1, so v0 never cancels),  v = x - alpha e1,
//   tau = 2 / ||v||^2,  H = I - tau v v^T maps x to alpha e1.
// A zero column (||x|| = 0) gets tau = 0 (H = I): Q keeps an orthonormal column there, where
// Gram-Schmidt divides 0 by 0. R's diagonal is alpha; Q's column k is multiplied by sign(alpha) so
// that R has a non-negative diagonal, which makes Q unique for a full-rank input.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>

#include "dalle_fast/common.h"

namespace dalle_fast {

// 1 / x. On the device the correctly rounded reciprocal intrinsics: a double division there calls a
// slow-path subroutine whose call frame shows up as a ptxas spill.
template <typename acc>
DF_HOST_DEVICE acc reciprocal(acc x) {
#if defined(__CUDA_ARCH__)
  if constexpr (sizeof(acc) == 8) return __drcp_rn(x); else return __frcp_rn(x);
#else
  return acc(1) / x;
#endif
}

template <typename acc>
struct Reflection {
  acc alpha;  // R[k, k] before the sign fix
  acc v0;     // first element of v (the others are x[1:])
  acc tau;    // 2 / ||v||^2, 0 for a zero column
};

// scale = max |x_i| (> 0 or the column is zero), sumsq = sum (x_i / scale)^2 over the column,
// tail = sum (x_i / scale)^2 over x[1:]; x0 the first element.
template <typename acc>
DF_HOST_DEVICE Reflection<acc> householder_reflection(acc x0, acc scale, acc sumsq, acc tail) {
  Reflection<acc> r;
  if (!(scale > acc(0))) {  // zero column (or NaN scale: tau 0 keeps the NaN out of Q's other columns)
    r.alpha = acc(0);
    r.v0 = acc(1);
    r.tau = acc(0);
    return r;
  }
  const acc norm = scale * sqrt(sumsq);
  r.alpha = x0 >= acc(0) ? -norm : norm;
  r.v0 = x0 - r.alpha;  // |v0| = |x0| + norm: no cancellation
  const acc s0 = r.v0 * reciprocal(scale);
  const acc vnorm2_scaled = s0 * s0 + tail;  // ||v||^2 / scale^2
  r.tau = acc(2) * reciprocal(vnorm2_scaled * scale * scale);
  return r;
}

// The boundary checks of dalle_fast::householder_qr, run by the CPU and the CUDA kernel.
inline void householder_qr_check(const at::Tensor& a, double eps) {
  TORCH_CHECK_VALUE(a.dim() == 3, "householder_qr: A must be a batch of matrices (batch, rows, cols), got ",
                    a.dim(), " dimensions");
  const auto t = a.scalar_type();
  TORCH_CHECK_TYPE(t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16,
                   "householder_qr: A must be float32, float64, float16 or bfloat16, got ", t);
  TORCH_CHECK_VALUE(a.size(1) >= a.size(2), "householder_qr: A must be tall (rows >= cols), got ",
                    a.size(1), " rows and ", a.size(2), " cols; transpose it first");
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "householder_qr: eps must be finite and >= 0, got ", eps);
}

}  // namespace dalle_fast
