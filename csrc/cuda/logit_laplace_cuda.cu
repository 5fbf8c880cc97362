// logit_laplace_loss on CUDA: a grid-stride elementwise kernel over the B*C*H*W elements, with the
// per-element math of dalle_fast/logit_laplace.h (the same code the CPU kernels run, so the CPU tests
// vouch for it), and for 'sum'/'mean' a deterministic two-stage reduction: a fixed grid of at most
// kMaxBlocks blocks, each thread summing a fixed grid-stride subsequence, a fixed-shape block tree
// into one partial per block, then one block adding the partials in a fixed tree. No atomics touch
// the sum, and the grid does not depend on the device, so the result is the same run to run.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "dalle_fast/logit_laplace.h"
#include "dalle_fast/logit_laplace_checks.h"

namespace dalle_fast {
namespace logit_laplace {
namespace {

constexpr int kThreads = 256;
constexpr int kMaxBlocks = 1024;  // stage 1 of the reduction; also the partials' count bound
constexpr int kWarps = kThreads / 32;

// Element idx = b * M + i of x lives at b * x_stride + i, mu at b * s_stride + i, ln b M further.
struct Geometry {
  int64_t M, x_stride, s_stride;
};

template <typename acc>
__device__ __forceinline__ acc warp_sum(acc v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
  return v;
}

// Fixed-shape tree over the block; the total is valid in thread 0.
template <typename acc>
__device__ __forceinline__ acc block_sum(acc v, acc* shared) {
  v = warp_sum(v);
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) shared[warp] = v;
  __syncthreads();
  v = threadIdx.x < kWarps ? shared[threadIdx.x] : acc(0);
  if (warp == 0) v = warp_sum(v);
  return v;
}

template <typename scalar_t, typename index_t, bool store_loss>
__global__ void __launch_bounds__(kThreads)
forward_kernel(const scalar_t* __restrict__ x, const scalar_t* __restrict__ stats, scalar_t* __restrict__ out,
               double* __restrict__ partials, int* __restrict__ bad, index_t n, Geometry geo, acc_t<scalar_t> a,
               acc_t<scalar_t> eps) {
  using acc = acc_t<scalar_t>;
  __shared__ acc shared[kWarps];
  const index_t M = static_cast<index_t>(geo.M);
  acc sum = acc(0);
  bool out_of_range = false;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<index_t>(gridDim.x) * kThreads) {
    const index_t b = idx / M, i = idx - b * M;
    const int64_t xo = static_cast<int64_t>(b) * geo.x_stride + i;
    const int64_t so = static_cast<int64_t>(b) * geo.s_stride + i;
    const acc xv = static_cast<acc>(x[xo]);
    out_of_range |= !(xv >= acc(0) && xv <= acc(1));  // NaN fails too
    const acc y = nll<acc, ScalarMath<acc>>(xv, static_cast<acc>(stats[so]), static_cast<acc>(stats[so + M]), a, eps);
    if constexpr (store_loss) {
      out[idx] = static_cast<scalar_t>(y);
    } else {
      sum += y;
    }
  }
  if (out_of_range) *bad = 1;  // every writer stores the same value
  if constexpr (!store_loss) {
    sum = block_sum(sum, shared);
    if (threadIdx.x == 0) partials[blockIdx.x] = static_cast<double>(sum);
  }
}

// Stage 2: one block adds the per-block partials (in double) and writes the scalar in the output dtype.
template <typename scalar_t>
__global__ void __launch_bounds__(kThreads)
finish_kernel(const double* __restrict__ partials, int count, double scale, scalar_t* __restrict__ out) {
  __shared__ double shared[kWarps];
  double v = 0.0;
  for (int k = threadIdx.x; k < count; k += kThreads) v += partials[k];
  v = block_sum(v, shared);
  if (threadIdx.x == 0) *out = static_cast<scalar_t>(v * scale);
}

template <typename scalar_t, typename index_t, bool want_x, bool per_element_grad>
__global__ void __launch_bounds__(kThreads)
backward_kernel(const scalar_t* __restrict__ grad, const scalar_t* __restrict__ x,
                const scalar_t* __restrict__ stats, scalar_t* __restrict__ grad_stats,
                scalar_t* __restrict__ grad_x, index_t n, Geometry geo, acc_t<scalar_t> a, acc_t<scalar_t> eps,
                acc_t<scalar_t> grad_scale) {
  using acc = acc_t<scalar_t>;
  const index_t M = static_cast<index_t>(geo.M);
  // 'sum'/'mean': the one upstream gradient, read on the device (no host synchronisation).
  const acc g_all = per_element_grad ? acc(0) : static_cast<acc>(grad[0]) * grad_scale;
  for (index_t idx = static_cast<index_t>(blockIdx.x) * kThreads + threadIdx.x; idx < n;
       idx += static_cast<index_t>(gridDim.x) * kThreads) {
    const index_t b = idx / M, i = idx - b * M;
    const int64_t xo = static_cast<int64_t>(b) * geo.x_stride + i;
    const int64_t so = static_cast<int64_t>(b) * geo.s_stride + i;
    const int64_t go = static_cast<int64_t>(b) * 2 * M + i;  // grad_stats is contiguous
    const acc g = per_element_grad ? static_cast<acc>(grad[idx]) : g_all;
    acc g_mu, g_lnb, g_x = acc(0);
    nll_grad<acc, ScalarMath<acc>, want_x>(static_cast<acc>(x[xo]), static_cast<acc>(stats[so]),
                                           static_cast<acc>(stats[so + M]), g, a, eps, g_mu, g_lnb, g_x);
    grad_stats[go] = static_cast<scalar_t>(g_mu);
    grad_stats[go + M] = static_cast<scalar_t>(g_lnb);
    if constexpr (want_x) grad_x[idx] = static_cast<scalar_t>(g_x);
  }
}

// 32-bit indexing when every element offset fits (the common case: a cheaper division by M).
bool fits_int32(int64_t n, int64_t B, const Geometry& geo) {
  const int64_t lim = std::numeric_limits<int32_t>::max(), last = std::max<int64_t>(B - 1, 0);
  return 2 * n < lim && last * geo.x_stride + geo.M < lim && last * geo.s_stride + 2 * geo.M < lim;
}

int blocks_for(int64_t n, int cap) {
  return static_cast<int>(std::max<int64_t>(1, std::min<int64_t>((n + kThreads - 1) / kThreads, cap)));
}

at::Tensor forward_cuda(const at::Tensor& x_in, const at::Tensor& stats_in, double eps, std::string reduction) {
  check_inputs(x_in, stats_in, eps);
  const Reduction red = parse_reduction(reduction);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_contiguous(x_in), stats = rows_contiguous(stats_in);
  const int64_t n = x.numel();
  if (red == kNone && n == 0) return at::empty(x.sizes(), x.options());
  if (n == 0) return at::full({}, red == kSum ? 0.0 : std::numeric_limits<double>::quiet_NaN(), x.options());
  const Geometry geo{x.size(1) * x.size(2) * x.size(3), row_stride(x), row_stride(stats)};
  const bool i32 = fits_int32(n, x.size(0), geo);
  at::Tensor bad = at::zeros({1}, x.options().dtype(at::kInt));
  at::Tensor out = red == kNone ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                                : at::empty({}, x.options());
  const int blocks = blocks_for(n, red == kNone ? 65535 : kMaxBlocks);
  at::Tensor partials = at::empty({red == kNone ? 0 : blocks}, x.options().dtype(at::kDouble));
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_laplace_loss_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc a = static_cast<acc>(1.0 - 2.0 * eps), e = static_cast<acc>(eps);
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* sp = stats.const_data_ptr<scalar_t>();
    auto launch = [&](auto index_tag) {
      using index_t = decltype(index_tag);
      if (red == kNone) {
        forward_kernel<scalar_t, index_t, true><<<blocks, kThreads, 0, stream>>>(
            xp, sp, out.mutable_data_ptr<scalar_t>(), nullptr, bad.mutable_data_ptr<int>(),
            static_cast<index_t>(n), geo, a, e);
      } else {
        forward_kernel<scalar_t, index_t, false><<<blocks, kThreads, 0, stream>>>(
            xp, sp, nullptr, partials.mutable_data_ptr<double>(), bad.mutable_data_ptr<int>(),
            static_cast<index_t>(n), geo, a, e);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    if (i32) launch(int32_t{}); else launch(int64_t{});
    if (red != kNone) {
      finish_kernel<scalar_t><<<1, kThreads, 0, stream>>>(partials.const_data_ptr<double>(), blocks,
                                                          red == kMean ? 1.0 / static_cast<double>(n) : 1.0,
                                                          out.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
  });
  // Reading the flag synchronises with the stream: the price of a clear error for x outside [0, 1].
  check_x_values(bad.item<int>() != 0);
  return out;
}

std::tuple<at::Tensor, at::Tensor> backward_cuda(const at::Tensor& grad, const at::Tensor& x_in,
                                                 const at::Tensor& stats_in, double eps, std::string reduction,
                                                 bool compute_grad_x) {
  check_inputs(x_in, stats_in, eps);
  const Reduction red = parse_reduction(reduction);
  check_backward_grad(grad, x_in, red, reduction);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = rows_contiguous(x_in), stats = rows_contiguous(stats_in);
  at::Tensor grad_stats = at::empty(stats.sizes(), stats.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_x = compute_grad_x
                          ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                          : at::empty({0}, x.options());
  const int64_t n = x.numel();
  if (n == 0) return {grad_stats, grad_x};
  const at::Tensor g = grad.to(x.scalar_type()).contiguous().view({-1});
  const Geometry geo{x.size(1) * x.size(2) * x.size(3), row_stride(x), row_stride(stats)};
  const bool i32 = fits_int32(n, x.size(0), geo);
  const int blocks = blocks_for(n, 65535);
  const double scale = red == kMean ? 1.0 / static_cast<double>(n) : 1.0;
  auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "logit_laplace_loss_backward_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const acc a = static_cast<acc>(1.0 - 2.0 * eps), e = static_cast<acc>(eps), s = static_cast<acc>(scale);
    const auto* gp = g.const_data_ptr<scalar_t>();
    const auto* xp = x.const_data_ptr<scalar_t>();
    const auto* sp = stats.const_data_ptr<scalar_t>();
    auto* gsp = grad_stats.mutable_data_ptr<scalar_t>();
    auto* gxp = compute_grad_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
    auto launch = [&](auto index_tag, auto want_x_tag, auto per_elem_tag) {
      using index_t = decltype(index_tag);
      constexpr bool want_x = decltype(want_x_tag)::value, per_elem = decltype(per_elem_tag)::value;
      backward_kernel<scalar_t, index_t, want_x, per_elem><<<blocks, kThreads, 0, stream>>>(
          gp, xp, sp, gsp, gxp, static_cast<index_t>(n), geo, a, e, s);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    };
    auto by_flags = [&](auto index_tag) {
      const bool per_elem = red == kNone;
      if (compute_grad_x && per_elem) launch(index_tag, std::true_type{}, std::true_type{});
      else if (compute_grad_x) launch(index_tag, std::true_type{}, std::false_type{});
      else if (per_elem) launch(index_tag, std::false_type{}, std::true_type{});
      else launch(index_tag, std::false_type{}, std::false_type{});
    };
    if (i32) by_flags(int32_t{}); else by_flags(int64_t{});
  });
  return {grad_stats, grad_x};
}

}  // namespace
}  // namespace logit_laplace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("logit_laplace_loss", &dalle_fast::logit_laplace::forward_cuda);
  m.impl("_logit_laplace_loss_backward", &dalle_fast::logit_laplace::backward_cuda);
}
