// CUDA kernel of the batched Householder QR (schema in csrc/ops.cpp, reflection math and checks in
// include/dalle_fast/householder_qr.h, the same the CPU kernel runs; Python in dalle_fast/ops/householder_qr.py).
//
// One thread block per matrix. PowerSGD's matrices are tall and skinny (rows up to 4 d_model, a few
// dozen to a few hundred columns), so a block walks the rows with all its threads and reduces each
// column's norm and each dot product in shared memory; the matrix lives in an fp32 (fp64) scratch in
// global memory, column by column, so the row loops read coalesced. Q is formed in a second scratch by
// applying the reflections backwards to the identity's first columns, then stored in A's dtype.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "dalle_fast/householder_qr.h"

namespace dalle_fast {
namespace {

constexpr int kThreads = 256;

// Sum (or max) over the block; every thread gets the result. `red` holds kThreads / 32 values.
template <typename acc, bool kMax>
__device__ acc block_reduce(acc v, acc* red) {
  for (int o = 16; o > 0; o >>= 1) {
    const acc w = __shfl_xor_sync(0xffffffffu, v, o);
    v = kMax ? (w > v ? w : v) : v + w;
  }
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  __syncthreads();  // red may still be read by the previous reduction
  if (lane == 0) red[warp] = v;
  __syncthreads();
  acc r = red[0];
  for (int w = 1; w < kThreads / 32; ++w) r = kMax ? (red[w] > r ? red[w] : r) : r + red[w];
  return r;
}

// y[k:] -= tau * (v . y[k:]) v, v = (v0, x[1:]) over len rows.
template <typename acc>
__device__ void reflect(const acc* x, acc* y, int64_t len, acc v0, acc tau, acc* red) {
  acc part = 0;
  for (int64_t i = 1 + threadIdx.x; i < len; i += kThreads) part += x[i] * y[i];
  const acc dot = block_reduce<acc, false>(part, red) + v0 * y[0];
  const acc s = tau * dot;
  __syncthreads();  // every thread has read y[0]
  if (threadIdx.x == 0) y[0] -= s * v0;
  for (int64_t i = 1 + threadIdx.x; i < len; i += kThreads) y[i] -= s * x[i];
  __syncthreads();
}

template <typename scalar_t>
__global__ void __launch_bounds__(kThreads) householder_qr_kernel(
    const scalar_t* __restrict__ a, int64_t sb, int64_t sr, int64_t sc, scalar_t* __restrict__ q,
    acc_t<scalar_t>* __restrict__ work, acc_t<scalar_t>* __restrict__ qw, Reflection<acc_t<scalar_t>>* refl_all,
    int64_t m, int64_t n, acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  __shared__ acc red[kThreads / 32];
  const int64_t b = blockIdx.x;
  a += b * sb;
  work += b * m * n;
  qw += b * m * n;
  q += b * m * n;
  Reflection<acc>* refl = refl_all + b * n;
  for (int64_t e = threadIdx.x; e < m * n; e += kThreads) {
    const int64_t j = e / m, i = e - j * m;
    work[e] = static_cast<acc>(a[i * sr + j * sc]) + (i == j ? eps : acc(0));
    qw[e] = i == j ? acc(1) : acc(0);
  }
  __syncthreads();
  for (int64_t k = 0; k < n; ++k) {
    const acc* x = work + k * m + k;
    const int64_t len = m - k;
    acc mx = 0, bad = 0;
    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const acc v = fabs(x[i]);
      if (isfinite(v)) mx = v > mx ? v : mx; else bad = 1;
    }
    const acc scale = block_reduce<acc, true>(mx, red);
    const acc nonfinite = block_reduce<acc, true>(bad, red);
    acc tail_part = 0;
    if (scale > acc(0)) {
      const acc inv = reciprocal(scale);
      for (int64_t i = 1 + threadIdx.x; i < len; i += kThreads) tail_part += (x[i] * inv) * (x[i] * inv);
    }
    const acc tail = block_reduce<acc, false>(tail_part, red);
    const acc x0 = x[0];
    Reflection<acc> r;
    if (nonfinite > acc(0)) {
      r.alpha = NAN; r.v0 = 1; r.tau = NAN;
    } else {
      const acc s0 = scale > acc(0) ? x0 * reciprocal(scale) : acc(0);
      r = householder_reflection<acc>(x0, scale, tail + s0 * s0, tail);
    }
    if (threadIdx.x == 0) refl[k] = r;
    if (r.tau == acc(0)) continue;
    for (int64_t j = k + 1; j < n; ++j) reflect<acc>(x, work + j * m + k, len, r.v0, r.tau, red);
  }
  __syncthreads();
  for (int64_t k = n - 1; k >= 0; --k) {
    const Reflection<acc> r = refl[k];
    if (r.tau == acc(0)) continue;
    const acc* x = work + k * m + k;
    for (int64_t j = k; j < n; ++j) reflect<acc>(x, qw + j * m + k, m - k, r.v0, r.tau, red);
  }
  __syncthreads();
  for (int64_t e = threadIdx.x; e < m * n; e += kThreads) {
    const int64_t i = e / n, j = e - i * n;
    const acc sign = refl[j].alpha < acc(0) ? acc(-1) : acc(1);
    q[e] = static_cast<scalar_t>(sign * qw[j * m + i]);
  }
}

at::Tensor householder_qr_cuda(const at::Tensor& a, double eps) {
  householder_qr_check(a, eps);
  TORCH_CHECK_VALUE(a.is_cuda(), "householder_qr (CUDA): A must be a CUDA tensor");
  // float64 stays on the CPU: the double kernel's division and square root slow paths cost a ptxas spill,
  // and PowerSGD orthogonalises fp32 (or 16-bit) P
  TORCH_CHECK_TYPE(a.scalar_type() != at::kDouble,
                   "householder_qr (CUDA): A must be float32, float16 or bfloat16 on CUDA (float64: use the CPU)");
  const c10::cuda::CUDAGuard guard(a.device());
  const int64_t batch = a.size(0), m = a.size(1), n = a.size(2);
  at::Tensor q = at::empty({batch, m, n}, a.options().memory_format(at::MemoryFormat::Contiguous));
  if (q.numel() == 0) return q;
  TORCH_CHECK_VALUE(batch <= 2147483647LL, "householder_qr: at most 2^31 - 1 matrices per call, got ", batch);
  at::Tensor work = at::empty({2, batch, m, n}, a.options().dtype(at::kFloat));
  at::Tensor refl = at::empty({batch * n * static_cast<int64_t>(sizeof(Reflection<float>))},
                              a.options().dtype(at::kByte));
  float* wp = work.mutable_data_ptr<float>();
  auto launch = [&](auto zero) {
    using scalar_t = decltype(zero);
    householder_qr_kernel<scalar_t><<<static_cast<unsigned>(batch), kThreads, 0,
                                      at::cuda::getCurrentCUDAStream()>>>(
        a.const_data_ptr<scalar_t>(), a.stride(0), a.stride(1), a.stride(2), q.mutable_data_ptr<scalar_t>(), wp,
        wp + batch * m * n, reinterpret_cast<Reflection<float>*>(refl.mutable_data_ptr<uint8_t>()), m, n,
        static_cast<float>(eps));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  };
  AT_DISPATCH_SWITCH(a.scalar_type(), "householder_qr_cuda",
                     AT_DISPATCH_CASE(at::kFloat, [&] { launch(scalar_t(0)); })
                     AT_DISPATCH_CASE(at::kHalf, [&] { launch(scalar_t(0)); })
                     AT_DISPATCH_CASE(at::kBFloat16, [&] { launch(scalar_t(0)); }));
  return q;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("householder_qr", &dalle_fast::householder_qr_cuda);
}
