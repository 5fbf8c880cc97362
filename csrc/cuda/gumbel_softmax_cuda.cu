// CUDA kernels of the fused Gumbel-softmax. The per-element math (Philox noise, exp, online
// softmax, argmax rules) is include/dalle_fast/gumbel_softmax.h, the same code the CPU kernels run,
// so the CPU tests vouch for it; this file only lays the work out.
//  - inner > 1 (dVAE logits (B, 8192, 32, 32), dim=1): a block is 32 consecutive inner positions
//    (one warp-wide row of 128 B, coalesced) times `splits` threads along C; each thread keeps an
//    online (max, sum, argmax) over its rows, the splits are merged in shared memory, then every
//    thread recomputes z for its rows (noise is a pure function of seed and index) and stores.
//  - inner == 1 (dim=-1): one block of 256 threads per row, strided along C, reduced with warp
//    shuffles and shared memory.
// The seed is read from device memory, so drawing it never synchronises the host.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/WrapDimUtils.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "dalle_fast/gumbel_softmax.h"
#include "dalle_fast/gumbel_softmax_checks.h"

namespace dalle_fast {
namespace {

enum class Noise { kSeed, kGiven, kNone };

constexpr int kWarp = 32;
constexpr int kMaxSplits = 32;   // threads along C per 32-column block (block <= 1024 threads)
constexpr int kRowThreads = 256;

template <typename T>
struct FwdParams {
  const T* x;
  const T* gumbels;      // kGiven
  const int64_t* seed;   // kSeed: one int64 on the device
  T* soft;               // null: not wanted
  T* hard;               // null: not hard
  SoftmaxLayout lay;
  acc_t<T> inv_tau;
  bool nan_fill;
};

template <typename T, Noise kNoise>
__device__ __forceinline__ acc_t<T> load_z(const FwdParams<T>& p, PhiloxKey key, int64_t e) {
  using acc = acc_t<T>;
  acc v = static_cast<acc>(p.x[e]);
  if constexpr (kNoise == Noise::kSeed) v += gumbel_noise<acc>(key, static_cast<uint64_t>(e));
  if constexpr (kNoise == Noise::kGiven) v += static_cast<acc>(p.gumbels[e]);
  return v * p.inv_tau;
}

template <typename T>
__device__ __forceinline__ PhiloxKey key_of(const FwdParams<T>& p) {
  return p.seed ? philox_key_from_seed(static_cast<uint64_t>(*p.seed)) : PhiloxKey{0u, 0u};
}

// Partial reduction of one thread or group: online softmax (m, s) and argmax (am, ai).
template <typename acc>
struct Partial {
  acc m, s, am;
  int64_t ai;
  __device__ __forceinline__ void init() { m = -INFINITY, s = acc(0), am = -INFINITY, ai = -1; }
  __device__ __forceinline__ void add(acc z, int64_t c, bool track_argmax) {
    if (track_argmax) argmax_merge(am, ai, z, c);
    softmax_online_add(m, s, z);
  }
  __device__ __forceinline__ void merge(const Partial& o) {
    argmax_merge(am, ai, o.am, o.ai);
    softmax_online_merge(m, s, o.m, o.s);
  }
};

// 1 / x; fp64 through __drcp_rn (correctly rounded) because the fp64 division's slow-path
// subroutine call made ptxas spill around it.
__device__ __forceinline__ float reciprocal(float x) { return 1.0f / x; }
__device__ __forceinline__ double reciprocal(double x) { return __drcp_rn(x); }

template <typename T>
__device__ __forceinline__ T hard_value(bool nan_slice, bool hot) {
  return nan_slice ? static_cast<T>(NAN) : static_cast<T>(hot ? 1.0f : 0.0f);
}

// grid.x: outer * ceil(inner / 32) tiles; block (32, splits).
template <typename T, Noise kNoise, bool kHard>
__global__ void __launch_bounds__(kWarp * kMaxSplits) columns_forward_kernel(FwdParams<T> p) {
  using acc = acc_t<T>;
  __shared__ Partial<acc> part[kMaxSplits][kWarp];
  const int64_t C = p.lay.C, inner = p.lay.inner, tiles = (inner + kWarp - 1) / kWarp;
  const int64_t o = blockIdx.x / tiles, i = (blockIdx.x % tiles) * kWarp + threadIdx.x;
  const bool active = i < inner;
  const PhiloxKey key = key_of(p);
  const int split = threadIdx.y, splits = blockDim.y;
  Partial<acc> mine;
  mine.init();
  if (active)
    for (int64_t c = split; c < C; c += splits) mine.add(load_z<T, kNoise>(p, key, (o * C + c) * inner + i), c, kHard);
  part[split][threadIdx.x] = mine;
  __syncthreads();
  if (split == 0) {
    for (int k = 1; k < splits; ++k) mine.merge(part[k][threadIdx.x]);  // in split order: deterministic
    part[0][threadIdx.x] = mine;
  }
  __syncthreads();
  const Partial<acc> all = part[0][threadIdx.x];
  if (!active) return;
  const acc inv_s = reciprocal(all.s);
  const bool nan_slice = p.nan_fill && softmax_slice_is_nan(all.m);
  for (int64_t c = split; c < C; c += splits) {
    const int64_t e = (o * C + c) * inner + i;
    if (p.soft) p.soft[e] = static_cast<T>(softmax_exp(load_z<T, kNoise>(p, key, e) - all.m) * inv_s);
    if constexpr (kHard) p.hard[e] = hard_value<T>(nan_slice, c == all.ai);
  }
}

template <typename acc>
__device__ __forceinline__ Partial<acc> shuffle_down(const Partial<acc>& v, int delta) {
  Partial<acc> r;
  r.m = __shfl_down_sync(0xffffffffu, v.m, delta);
  r.s = __shfl_down_sync(0xffffffffu, v.s, delta);
  r.am = __shfl_down_sync(0xffffffffu, v.am, delta);
  r.ai = __shfl_down_sync(0xffffffffu, v.ai, delta);
  return r;
}

// One block of kRowThreads per row (grid-stride over rows).
template <typename T, Noise kNoise, bool kHard>
__global__ void rows_forward_kernel(FwdParams<T> p) {
  using acc = acc_t<T>;
  __shared__ Partial<acc> warp_part[kRowThreads / kWarp];
  __shared__ Partial<acc> row_part;
  const int64_t C = p.lay.C;
  const PhiloxKey key = key_of(p);
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t o = blockIdx.x; o < p.lay.outer; o += gridDim.x) {
    Partial<acc> mine;
    mine.init();
    for (int64_t c = threadIdx.x; c < C; c += kRowThreads) mine.add(load_z<T, kNoise>(p, key, o * C + c), c, kHard);
    for (int d = kWarp / 2; d > 0; d /= 2) mine.merge(shuffle_down(mine, d));
    if (lane == 0) warp_part[warp] = mine;
    __syncthreads();
    if (threadIdx.x == 0) {
      Partial<acc> all = warp_part[0];
      for (int w = 1; w < kRowThreads / kWarp; ++w) all.merge(warp_part[w]);
      all.s = reciprocal(all.s);  // one thread: the rest only read 1 / sum
      row_part = all;
    }
    __syncthreads();
    const acc m = row_part.m, inv_s = row_part.s;
    const int64_t hot = row_part.ai;
    const bool nan_slice = p.nan_fill && softmax_slice_is_nan(m);
    for (int64_t c = threadIdx.x; c < C; c += kRowThreads) {
      const int64_t e = o * C + c;
      if (p.soft) p.soft[e] = static_cast<T>(softmax_exp(load_z<T, kNoise>(p, key, e) - m) * inv_s);
      if constexpr (kHard) p.hard[e] = hard_value<T>(nan_slice, c == hot);
    }
    __syncthreads();  // row_part / warp_part are reused by the next row
  }
}

template <typename T>
__global__ void __launch_bounds__(kWarp * kMaxSplits) columns_backward_kernel(const T* g, const T* y, T* dx, SoftmaxLayout lay, acc_t<T> inv_tau) {
  using acc = acc_t<T>;
  __shared__ acc part[kMaxSplits][kWarp];
  const int64_t C = lay.C, inner = lay.inner, tiles = (inner + kWarp - 1) / kWarp;
  const int64_t o = blockIdx.x / tiles, i = (blockIdx.x % tiles) * kWarp + threadIdx.x;
  const bool active = i < inner;
  const int split = threadIdx.y, splits = blockDim.y;
  acc dot = 0;
  if (active)
    for (int64_t c = split; c < C; c += splits) {
      const int64_t e = (o * C + c) * inner + i;
      dot += static_cast<acc>(g[e]) * static_cast<acc>(y[e]);
    }
  part[split][threadIdx.x] = dot;
  __syncthreads();
  if (split == 0) {
    for (int k = 1; k < splits; ++k) dot += part[k][threadIdx.x];
    part[0][threadIdx.x] = dot;
  }
  __syncthreads();
  dot = part[0][threadIdx.x];
  if (!active) return;
  for (int64_t c = split; c < C; c += splits) {
    const int64_t e = (o * C + c) * inner + i;
    const acc yv = static_cast<acc>(y[e]);
    dx[e] = static_cast<T>(yv * (static_cast<acc>(g[e]) - dot) * inv_tau);
  }
}

template <typename T>
__global__ void __launch_bounds__(kRowThreads) rows_backward_kernel(const T* g, const T* y, T* dx, SoftmaxLayout lay,
                                                                    acc_t<T> inv_tau) {
  using acc = acc_t<T>;
  __shared__ acc warp_dot[kRowThreads / kWarp];
  __shared__ acc row_dot;
  const int64_t C = lay.C;
  const int lane = threadIdx.x % kWarp, warp = threadIdx.x / kWarp;
  for (int64_t o = blockIdx.x; o < lay.outer; o += gridDim.x) {
    acc dot = 0;
    for (int64_t c = threadIdx.x; c < C; c += kRowThreads) dot += static_cast<acc>(g[o * C + c]) * static_cast<acc>(y[o * C + c]);
    for (int d = kWarp / 2; d > 0; d /= 2) dot += __shfl_down_sync(0xffffffffu, dot, d);
    if (lane == 0) warp_dot[warp] = dot;
    __syncthreads();
    if (threadIdx.x == 0) {
      acc total = 0;
      for (int w = 0; w < kRowThreads / kWarp; ++w) total += warp_dot[w];
      row_dot = total;
    }
    __syncthreads();
    dot = row_dot;
    for (int64_t c = threadIdx.x; c < C; c += kRowThreads) {
      const int64_t e = o * C + c;
      const acc yv = static_cast<acc>(y[e]);
      dx[e] = static_cast<T>(yv * (static_cast<acc>(g[e]) - dot) * inv_tau);
    }
    __syncthreads();
  }
}

// Threads along C per 32-column block: enough blocks x threads to fill the device, no more
// splits than rows.
int column_splits(int64_t tiles, int64_t C) {
  const int64_t target = int64_t(at::cuda::getCurrentDeviceProperties()->multiProcessorCount) * 2048;
  int splits = 1;
  while (splits < kMaxSplits && tiles * kWarp * splits < target && splits * 2 <= C) splits *= 2;
  return splits;
}

int64_t row_blocks(int64_t outer) { return std::min<int64_t>(outer, int64_t(1) << 20); }

int64_t column_blocks(const SoftmaxLayout& lay) {
  const int64_t blocks = lay.outer * ((lay.inner + kWarp - 1) / kWarp);
  TORCH_CHECK(blocks < (int64_t(1) << 31), "gumbel_softmax: tensor too large for the CUDA grid (",
              blocks, " blocks of 32 positions)");
  return blocks;
}

template <typename T, Noise kNoise, bool kHard>
void launch_forward(const FwdParams<T>& p) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (p.lay.inner == 1) {
    rows_forward_kernel<T, kNoise, kHard><<<row_blocks(p.lay.outer), kRowThreads, 0, stream>>>(p);
  } else {
    const int64_t blocks = column_blocks(p.lay);
    const dim3 block(kWarp, column_splits(blocks, p.lay.C));
    columns_forward_kernel<T, kNoise, kHard><<<blocks, block, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, Noise kNoise>
void launch_forward(const FwdParams<T>& p) {
  if (p.hard) launch_forward<T, kNoise, true>(p);
  else launch_forward<T, kNoise, false>(p);
}

std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, const at::Tensor* seed, const at::Tensor* gumbels,
                                           Noise noise, double tau, int64_t dim, bool want_soft, bool want_hard,
                                           bool nan_fill) {
  const c10::cuda::CUDAGuard guard(logits.device());
  dim = at::maybe_wrap_dim(dim, logits.dim());
  const at::Tensor x = logits.contiguous();
  const at::Tensor g = gumbels ? gumbels->contiguous() : at::Tensor();
  at::Tensor soft = at::empty(want_soft ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor hard = at::empty(want_hard ? x.sizes() : at::IntArrayRef{0}, x.options());
  if (x.numel() == 0) return {soft, hard};
  const SoftmaxLayout lay = softmax_layout(x.sizes().data(), x.dim(), dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_softmax_cuda", [&] {
    FwdParams<scalar_t> p{x.const_data_ptr<scalar_t>(), g.defined() ? g.const_data_ptr<scalar_t>() : nullptr,
                          seed ? seed->const_data_ptr<int64_t>() : nullptr,
                          want_soft ? soft.mutable_data_ptr<scalar_t>() : nullptr,
                          want_hard ? hard.mutable_data_ptr<scalar_t>() : nullptr, lay,
                          static_cast<acc_t<scalar_t>>(1.0 / tau), nan_fill};
    switch (noise) {
      case Noise::kSeed: launch_forward<scalar_t, Noise::kSeed>(p); break;
      case Noise::kGiven: launch_forward<scalar_t, Noise::kGiven>(p); break;
      case Noise::kNone: launch_forward<scalar_t, Noise::kNone>(p); break;
    }
  });
  return {soft, hard};
}

at::Tensor gumbel_softmax_cuda(const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& gumbels,
                               double tau, int64_t dim) {
  gumbel_softmax_check_inputs(logits, seed, gumbels, tau, dim);
  const at::Tensor* g = gumbels.has_value() ? &*gumbels : nullptr;
  const at::Tensor s = seed.reshape({1});
  return std::get<0>(forward(logits, g ? nullptr : &s, g, g ? Noise::kGiven : Noise::kSeed, tau, dim, true, false, true));
}

std::tuple<at::Tensor, at::Tensor> gumbel_softmax_hard_cuda(const at::Tensor& logits, const at::Tensor& seed,
                                                            const std::optional<at::Tensor>& gumbels, double tau,
                                                            int64_t dim, bool return_soft) {
  gumbel_softmax_check_inputs(logits, seed, gumbels, tau, dim);
  const at::Tensor* g = gumbels.has_value() ? &*gumbels : nullptr;
  const at::Tensor s = seed.reshape({1});
  auto [soft, hard] = forward(logits, g ? nullptr : &s, g, g ? Noise::kGiven : Noise::kSeed, tau, dim, return_soft,
                              true, true);
  return {hard, soft};
}

at::Tensor one_hot_argmax_cuda(const at::Tensor& logits, int64_t dim) {
  gumbel_softmax_check_logits(logits, dim, "one_hot_argmax");
  return std::get<1>(forward(logits, nullptr, nullptr, Noise::kNone, 1.0, dim, false, true, false));
}

at::Tensor gumbel_softmax_backward_cuda(const at::Tensor& grad, const at::Tensor& y, double tau, int64_t dim) {
  gumbel_softmax_check_backward(grad, y, tau, dim);
  const c10::cuda::CUDAGuard guard(y.device());
  dim = at::maybe_wrap_dim(dim, y.dim());
  const at::Tensor g = grad.contiguous(), yc = y.contiguous();
  at::Tensor dx = at::empty(yc.sizes(), yc.options());
  if (yc.numel() == 0) return dx;
  const SoftmaxLayout lay = softmax_layout(yc.sizes().data(), yc.dim(), dim);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(), "gumbel_softmax_backward_cuda", [&] {
    const auto inv_tau = static_cast<acc_t<scalar_t>>(1.0 / tau);
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *yp = yc.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    if (lay.inner == 1) {
      rows_backward_kernel<scalar_t><<<row_blocks(lay.outer), kRowThreads, 0, stream>>>(gp, yp, dp, lay, inv_tau);
    } else {
      const int64_t blocks = column_blocks(lay);
      const dim3 block(kWarp, column_splits(blocks, lay.C));
      columns_backward_kernel<scalar_t><<<blocks, block, 0, stream>>>(gp, yp, dp, lay, inv_tau);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return dx;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("gumbel_softmax", &dalle_fast::gumbel_softmax_cuda);
  m.impl("gumbel_softmax_hard", &dalle_fast::gumbel_softmax_hard_cuda);
  m.impl("one_hot_argmax", &dalle_fast::one_hot_argmax_cuda);
  m.impl("_gumbel_softmax_backward", &dalle_fast::gumbel_softmax_backward_cuda);
}
