// CUDA kernels of dynamic_threshold and guided_step. The math (schedule coefficients, percentile
// rank and lerp, Philox normal noise, clamp) is include/dalle_fast/diffusion.h, the code the CPU
// kernels run, so the CPU tests vouch for it; this file lays the work out.
//
// The percentile is a radix select on the order-preserving bits of |x0| (31 bits for float, 63 for
// double), 11 bits per level, per sample, with no sort:
//   init (one thread per sample) -> per level: histogram (grid = chunks x samples, shared-memory
//   bins flushed to global with atomics) -> scan (one block per sample: the bin holding the rank,
//   the bins zeroed for the next level) -> [hi: min key above the lower order statistic, when the
//   upper rank is not a copy of it] -> [pivots] -> finalize (one thread per sample: s in float64)
//   -> one elementwise output pass.
// guided_step with dynamic thresholding writes x0 to a scratch (acc type) in its first histogram
// pass; the output pass reads it with x_t and draws the noise. Static / no thresholding is one pass.
// The output pass gives each thread one Philox call: the 4 elements e, e+16, e+32, e+48 of a noise
// block that share it (diffusion.h). The seed is read on the device (no host sync).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cub/block/block_scan.cuh>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>

#include "dalle_fast/diffusion.h"
#include "dalle_fast/diffusion_checks.h"

namespace dalle_fast {
namespace diffusion {
namespace {

constexpr int kDigitBits = 11;
constexpr int kBins = 1 << kDigitBits;
constexpr int kThreads = 256;
constexpr int kScanThreads = 256;
constexpr int kBinsPerScanThread = kBins / kScanThreads;
constexpr int kItemsPerThread = 8;

template <typename acc> struct KeyOf;
template <> struct KeyOf<float> {
  using K = uint32_t;
  static constexpr int kBits = 31;
  static __device__ __forceinline__ K key(float v) { return __float_as_uint(v) & 0x7fffffffu; }
  static __device__ __forceinline__ double value(K k) { return static_cast<double>(__uint_as_float(k)); }
};
template <> struct KeyOf<double> {
  using K = unsigned long long;
  static constexpr int kBits = 63;
  static __device__ __forceinline__ K key(double v) {
    return static_cast<K>(__double_as_longlong(v)) & 0x7fffffffffffffffull;
  }
  static __device__ __forceinline__ double value(K k) { return __longlong_as_double(static_cast<long long>(k)); }
};

template <typename acc>
constexpr int num_levels() { return (KeyOf<acc>::kBits + kDigitBits - 1) / kDigitBits; }
__host__ __device__ constexpr int level_shift(int bits, int level) {
  return bits - kDigitBits * (level + 1) > 0 ? bits - kDigitBits * (level + 1) : 0;
}

// Per-sample selection state, in one device workspace.
template <typename acc>
struct Select {
  using K = typename KeyOf<acc>::K;
  unsigned long long* hist;  // (B, kBins)
  K* prefix;                 // bits of the lower order statistic found so far
  long long* k;              // its rank among the elements that share the prefix
  long long* eq_after;       // elements equal to it after it (last level), to tell whether hi is a copy
  K* min_gt;                 // smallest key above it
  unsigned long long* pivot; // (B, 2) first index of the lower / upper order statistic
  int* nan;
  Rank rank;
  int64_t n;
};

// guided_step's per-sample coefficients and inputs (null cond: dynamic_threshold).
template <typename T>
struct StepIn {
  const T *cond, *uncond, *xt;
  const double *ab_t, *ab_p;
  acc_t<T>* coefs;  // (B, 6): guidance, x0_xt, x0_pred, mean_x0, mean_xt, sigma
  acc_t<T>* x0;     // scratch (B, n) for dynamic thresholding, else null
  double guidance, eta;
  int param, sampler;
};

enum Coef { kW = 0, kX0Xt, kX0Pred, kMeanX0, kMeanXt, kSigma, kNumCoefs };

template <typename T>
__device__ __forceinline__ acc_t<T> x0_of(const StepIn<T>& s, const acc_t<T>* c, int64_t e) {
  using acc = acc_t<T>;
  acc pred = static_cast<acc>(s.cond[e]);
  if (s.uncond) {
    const acc u = static_cast<acc>(s.uncond[e]);
    pred = u + c[kW] * (pred - u);
  }
  return c[kX0Xt] * static_cast<acc>(s.xt[e]) + c[kX0Pred] * pred;
}

template <typename T>
__global__ void init_kernel(Select<acc_t<T>> sel, StepIn<T> step, int64_t B) {
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  if (sel.prefix) {  // null: no selection (static / no thresholding)
    sel.prefix[b] = 0;
    sel.k[b] = sel.rank.lo;
    sel.eq_after[b] = 0;
    sel.min_gt[b] = ~typename KeyOf<acc_t<T>>::K(0);
    sel.pivot[2 * b] = sel.pivot[2 * b + 1] = ~0ull;
    sel.nan[b] = 0;
  }
  if (step.coefs) {
    using acc = acc_t<T>;
    const StepCoefs c = step_coefs(step.ab_t[b], step.ab_p[b], step.param, step.sampler, step.eta);
    acc* o = step.coefs + kNumCoefs * b;
    o[kW] = static_cast<acc>(step.guidance), o[kX0Xt] = static_cast<acc>(c.x0_xt);
    o[kX0Pred] = static_cast<acc>(c.x0_pred), o[kMeanX0] = static_cast<acc>(c.mean_x0);
    o[kMeanXt] = static_cast<acc>(c.mean_xt), o[kSigma] = static_cast<acc>(c.sigma);
  }
}

// One level of the radix select. Values: x (dynamic_threshold), x0 computed from the step inputs
// and stored (guided_step, level 0) or the stored x0 (guided_step, later levels).
template <typename T, int kLevel, bool kStepX0>
__global__ void __launch_bounds__(kThreads) hist_kernel(Select<acc_t<T>> sel, StepIn<T> step, const T* x) {
  using acc = acc_t<T>;
  using KO = KeyOf<acc>;
  using K = typename KO::K;
  constexpr int shift = level_shift(KO::kBits, kLevel);
  constexpr int above = kLevel == 0 ? KO::kBits : level_shift(KO::kBits, kLevel - 1);
  __shared__ unsigned int bins[kBins];
  __shared__ acc coefs[kNumCoefs];
  for (int i = threadIdx.x; i < kBins; i += kThreads) bins[i] = 0;
  const int64_t b = blockIdx.y, n = sel.n;
  if (kStepX0 && threadIdx.x < kNumCoefs) coefs[threadIdx.x] = step.coefs[kNumCoefs * b + threadIdx.x];
  __syncthreads();
  const K want = kLevel == 0 ? K(0) : (sel.prefix[b] >> above);
  bool nan = false;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const int64_t e = b * n + i;
    acc v;
    if constexpr (kStepX0) {
      v = x0_of(step, coefs, e);
      step.x0[e] = v;
    } else if (step.x0) {
      v = step.x0[e];
    } else {
      v = static_cast<acc>(x[e]);
    }
    nan |= v != v;
    const K key = KO::key(v);
    if (kLevel == 0 || (key >> above) == want)
      atomicAdd(&bins[static_cast<int>((key >> shift) & K(kBins - 1))], 1u);
  }
  if (kLevel == 0 && nan) sel.nan[b] = 1;
  __syncthreads();
  unsigned long long* h = sel.hist + b * kBins;
  for (int i = threadIdx.x; i < kBins; i += kThreads)
    if (bins[i]) atomicAdd(&h[i], static_cast<unsigned long long>(bins[i]));
}

// The digit of this level holding rank k; zeroes the histogram for the next level.
template <typename acc, int kLevel>
__global__ void __launch_bounds__(kScanThreads) scan_kernel(Select<acc> sel) {
  using KO = KeyOf<acc>;
  using K = typename KO::K;
  using Scan = cub::BlockScan<unsigned long long, kScanThreads>;
  __shared__ typename Scan::TempStorage tmp;
  constexpr int shift = level_shift(KO::kBits, kLevel);
  const int64_t b = blockIdx.x;
  unsigned long long* h = sel.hist + b * kBins;
  unsigned long long c[kBinsPerScanThread], sum = 0;
  for (int j = 0; j < kBinsPerScanThread; ++j) sum += (c[j] = h[threadIdx.x * kBinsPerScanThread + j]);
  unsigned long long before;
  Scan(tmp).ExclusiveSum(sum, before);
  const unsigned long long k = static_cast<unsigned long long>(sel.k[b]);
  if (k >= before && k < before + sum) {
    for (int j = 0; j < kBinsPerScanThread; ++j) {
      if (k < before + c[j]) {
        const K digit = static_cast<K>(threadIdx.x * kBinsPerScanThread + j);
        sel.prefix[b] |= digit << shift;
        sel.k[b] = static_cast<long long>(k - before);
        if (kLevel == num_levels<acc>() - 1) sel.eq_after[b] = static_cast<long long>(before + c[j] - k - 1);
        break;
      }
      before += c[j];
    }
  }
  for (int j = 0; j < kBinsPerScanThread; ++j) h[threadIdx.x * kBinsPerScanThread + j] = 0;
}

template <typename acc>
__device__ __forceinline__ bool hi_is_copy(const Select<acc>& sel, int64_t b) {
  return sel.rank.hi == sel.rank.lo || sel.eq_after[b] > 0;
}

template <typename T>
__device__ __forceinline__ acc_t<T> value_at(const StepIn<T>& step, const T* x, int64_t e) {
  return step.x0 ? step.x0[e] : static_cast<acc_t<T>>(x[e]);
}

// Smallest key above the lower order statistic (the upper one, when it is not a copy).
template <typename T>
__global__ void __launch_bounds__(kThreads) hi_kernel(Select<acc_t<T>> sel, StepIn<T> step, const T* x) {
  using KO = KeyOf<acc_t<T>>;
  using K = typename KO::K;
  const int64_t b = blockIdx.y, n = sel.n;
  if (hi_is_copy(sel, b)) return;
  const K lo = sel.prefix[b];
  K best = ~K(0);
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const K key = KO::key(value_at(step, x, b * n + i));
    if (key > lo && key < best) best = key;
  }
  if (best != ~K(0)) atomicMin(&sel.min_gt[b], best);
}

// First index of each order statistic (for the backward).
template <typename T>
__global__ void __launch_bounds__(kThreads) pivot_kernel(Select<acc_t<T>> sel, StepIn<T> step, const T* x) {
  using KO = KeyOf<acc_t<T>>;
  using K = typename KO::K;
  const int64_t b = blockIdx.y, n = sel.n;
  const K lo = sel.prefix[b], hi = hi_is_copy(sel, b) ? lo : sel.min_gt[b];
  unsigned long long first_lo = ~0ull, first_hi = ~0ull;
  for (int64_t i = blockIdx.x * int64_t(kThreads) + threadIdx.x; i < n; i += int64_t(gridDim.x) * kThreads) {
    const K key = KO::key(value_at(step, x, b * n + i));
    if (key == lo && first_lo == ~0ull) first_lo = static_cast<unsigned long long>(i);
    if (key == hi && first_hi == ~0ull) first_hi = static_cast<unsigned long long>(i);
  }
  if (first_lo != ~0ull) atomicMin(&sel.pivot[2 * b], first_lo);
  if (first_hi != ~0ull) atomicMin(&sel.pivot[2 * b + 1], first_hi);
}

template <typename acc>
__global__ void finalize_kernel(Select<acc> sel, double* scale, int64_t* pivots, int64_t B) {
  using KO = KeyOf<acc>;
  const int64_t b = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (b >= B) return;
  const double v_lo = KO::value(sel.prefix[b]);
  const double v_hi = hi_is_copy(sel, b) ? v_lo : KO::value(sel.min_gt[b]);
  const bool nan = sel.nan[b] != 0;
  scale[b] = nan ? __longlong_as_double(0x7ff8000000000000ll) : threshold_scale(v_lo, v_hi, sel.rank.w);
  if (pivots) {
    const bool depends = !nan && scale_is_percentile(v_lo, v_hi, sel.rank.w);
    pivots[2 * b] = depends ? static_cast<int64_t>(sel.pivot[2 * b]) : -1;
    pivots[2 * b + 1] = depends ? static_cast<int64_t>(sel.pivot[2 * b + 1]) : -1;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) clamp_kernel(const T* x, const double* scale, T* out, int64_t n,
                                                         int64_t total) {
  using acc = acc_t<T>;
  for (int64_t e = blockIdx.x * int64_t(kThreads) + threadIdx.x; e < total; e += int64_t(gridDim.x) * kThreads)
    out[e] = static_cast<T>(clamp_scale(static_cast<acc>(x[e]), static_cast<acc>(scale[e / n])));
}

// One thread per (noise block, lane): elements blk*64 + lane + 16 w, w = 0..3, one Philox call.
template <typename T>
__global__ void __launch_bounds__(kThreads) step_output_kernel(StepIn<T> step, const double* scale,
                                                               const int64_t* seed, uint32_t offset, int kind,
                                                               T* out, T* x0_out, int64_t n, int64_t total) {
  using acc = acc_t<T>;
  const int64_t t = blockIdx.x * int64_t(kThreads) + threadIdx.x;
  const int64_t e0 = (t >> 4) * kNoiseBlock + (t & 15);
  if (e0 >= total) return;
  const PhiloxKey key = philox_key_from_seed(static_cast<uint64_t>(*seed));
  bool noisy = false;
  for (int w = 0; w < 4; ++w) {
    const int64_t e = e0 + 16 * w;
    if (e < total) noisy |= step.coefs[kNumCoefs * (e / n) + kSigma] != acc(0);
  }
  Philox4 r{0, 0, 0, 0};
  if (noisy) r = normal_philox(key, offset, static_cast<uint64_t>(e0));
  acc z[4] = {0, 0, 0, 0};
  if (noisy) {
    if constexpr (sizeof(acc) == sizeof(double)) {
      z[0] = box_muller_f64(r.x0, r.x1, false), z[1] = box_muller_f64(r.x0, r.x1, true);
      z[2] = box_muller_f64(r.x2, r.x3, false), z[3] = box_muller_f64(r.x2, r.x3, true);
    } else {
      float c0, s0, c1, s1;
      sincos_2pi(uniform_open(r.x1), &c0, &s0);
      sincos_2pi(uniform_open(r.x3), &c1, &s1);
      const float r0 = sqrtf(-2.0f * noise_log(uniform_open(r.x0)));
      const float r1 = sqrtf(-2.0f * noise_log(uniform_open(r.x2)));
      z[0] = r0 * c0, z[1] = r0 * s0, z[2] = r1 * c1, z[3] = r1 * s1;
    }
  }
#pragma unroll
  for (int w = 0; w < 4; ++w) {
    const int64_t e = e0 + 16 * w;
    if (e >= total) break;
    const int64_t b = e / n;
    const acc* c = step.coefs + kNumCoefs * b;
    acc v = step.x0 ? step.x0[e] : x0_of(step, c, e);
    if (kind == kDynamic) v = clamp_scale(v, static_cast<acc>(scale[b]));
    else if (kind == kStatic) v = v < acc(-1) ? acc(-1) : (v > acc(1) ? acc(1) : v);
    const acc y = c[kMeanX0] * v + c[kMeanXt] * static_cast<acc>(step.xt[e]) + c[kSigma] * z[w];
    out[e] = static_cast<T>(y);
    if (x0_out) x0_out[e] = static_cast<T>(v);
  }
}

int64_t blocks_for(int64_t items, int64_t cap) {
  return std::max<int64_t>(1, std::min<int64_t>(cap, (items + kThreads * kItemsPerThread - 1) / (kThreads * kItemsPerThread)));
}

template <typename acc, int kLevel>
struct Levels {
  template <typename T, bool kStep>
  static void run(Select<acc>& sel, StepIn<T>& step, const T* x, dim3 grid, int64_t B, cudaStream_t stream) {
    if constexpr (kLevel < num_levels<acc>()) {
      if constexpr (kStep && kLevel == 0) hist_kernel<T, kLevel, true><<<grid, kThreads, 0, stream>>>(sel, step, x);
      else hist_kernel<T, kLevel, false><<<grid, kThreads, 0, stream>>>(sel, step, x);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      scan_kernel<acc, kLevel><<<B, kScanThreads, 0, stream>>>(sel);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      Levels<acc, kLevel + 1>::template run<T, kStep>(sel, step, x, grid, B, stream);
    }
  }
};

// The per-sample scale (float64, into `scale`) of x (dynamic_threshold) or of the step's x0.
template <typename T, bool kStep>
void select_scale(StepIn<T>& step, const T* x, int64_t B, int64_t n, double percentile, at::Tensor& scale,
                  int64_t* pivots, const at::TensorOptions& opts, cudaStream_t stream) {
  using acc = acc_t<T>;
  using K = typename KeyOf<acc>::K;
  static_assert(sizeof(K) <= sizeof(int64_t));
  // workspace: hist (B * kBins), prefix, k, eq_after, min_gt, pivot (2B), nan: all 8-byte words
  at::Tensor ws = at::zeros({B * (kBins + 7)}, opts.dtype(at::kLong));
  auto* base = reinterpret_cast<unsigned long long*>(ws.mutable_data_ptr<int64_t>());
  Select<acc> sel;
  sel.hist = base;
  sel.prefix = reinterpret_cast<K*>(base + B * kBins);
  sel.k = reinterpret_cast<long long*>(base + B * (kBins + 1));
  sel.eq_after = reinterpret_cast<long long*>(base + B * (kBins + 2));
  sel.min_gt = reinterpret_cast<K*>(base + B * (kBins + 3));
  sel.pivot = base + B * (kBins + 4);
  sel.nan = reinterpret_cast<int*>(base + B * (kBins + 6));
  sel.rank = quantile_rank(percentile, n);
  sel.n = n;
  const int64_t small = (B + 127) / 128;
  init_kernel<T><<<small, 128, 0, stream>>>(sel, step, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const dim3 grid(static_cast<unsigned>(blocks_for(n, 65535)), static_cast<unsigned>(B));
  Levels<acc, 0>::template run<T, kStep>(sel, step, x, grid, B, stream);
  hi_kernel<T><<<grid, kThreads, 0, stream>>>(sel, step, x);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (pivots) {
    pivot_kernel<T><<<grid, kThreads, 0, stream>>>(sel, step, x);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  finalize_kernel<acc><<<small, 128, 0, stream>>>(sel, scale.mutable_data_ptr<double>(), pivots, B);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void check_grid(int64_t B, const char* op) {
  TORCH_CHECK_VALUE(B <= 65535, op, ": the CUDA kernels take at most 65535 samples per call, got ", B);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dynamic_threshold_cuda(const at::Tensor& x_in, double percentile,
                                                                      bool return_pivots) {
  check_dynamic_threshold(x_in, percentile);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous();
  const int64_t B = x.size(0), n = B ? x.numel() / B : 0;
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor scale = at::empty({B}, x.options().dtype(at::kDouble));
  at::Tensor pivots = at::empty(return_pivots ? at::IntArrayRef{B, 2} : at::IntArrayRef{0},
                                x.options().dtype(at::kLong));
  if (B == 0) return {out, scale, pivots};
  check_grid(B, "dynamic_threshold");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "dynamic_threshold_cuda", [&] {
    StepIn<scalar_t> none{};
    const scalar_t* xp = x.const_data_ptr<scalar_t>();
    select_scale<scalar_t, false>(none, xp, B, n, percentile, scale,
                                  return_pivots ? pivots.mutable_data_ptr<int64_t>() : nullptr, x.options(), stream);
    clamp_kernel<scalar_t><<<blocks_for(x.numel(), 1 << 20), kThreads, 0, stream>>>(
        xp, scale.const_data_ptr<double>(), out.mutable_data_ptr<scalar_t>(), n, x.numel());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, scale, pivots};
}

std::tuple<at::Tensor, at::Tensor> guided_step_cuda(const at::Tensor& cond_in, const std::optional<at::Tensor>& uncond_in,
                                                    const at::Tensor& xt_in, const at::Tensor& alpha_bar_t,
                                                    const at::Tensor& alpha_bar_prev, double guidance,
                                                    const std::string& parameterization, const std::string& sampler,
                                                    double eta, const std::string& threshold, double percentile,
                                                    const at::Tensor& seed, int64_t offset, bool return_x0) {
  check_guided_step(cond_in, uncond_in, xt_in, alpha_bar_t, alpha_bar_prev, guidance, eta, threshold, percentile,
                    seed, offset);
  const int param = parse_parameterization(parameterization), samp = parse_sampler(sampler);
  const int kind = parse_threshold(threshold);
  const c10::cuda::CUDAGuard guard(xt_in.device());
  const at::Tensor xt = xt_in.contiguous(), cond = cond_in.contiguous();
  const at::Tensor uncond = uncond_in.has_value() ? uncond_in->contiguous() : at::Tensor();
  const at::Tensor ab_t = alpha_bar_t.contiguous(), ab_p = alpha_bar_prev.contiguous();
  const int64_t B = xt.size(0), n = B ? xt.numel() / B : 0, total = xt.numel();
  at::Tensor out = at::empty(xt.sizes(), xt.options());
  at::Tensor x0_out = at::empty(return_x0 ? xt.sizes() : at::IntArrayRef{0}, xt.options());
  if (B == 0) return {out, x0_out};
  check_grid(B, "guided_step");
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, xt.scalar_type(), "guided_step_cuda", [&] {
    using acc = acc_t<scalar_t>;
    const auto acc_type = std::is_same_v<acc, double> ? at::kDouble : at::kFloat;
    at::Tensor coefs = at::empty({B * kNumCoefs}, xt.options().dtype(acc_type));
    at::Tensor x0 = kind == kDynamic ? at::empty({total}, xt.options().dtype(acc_type)) : at::Tensor();
    at::Tensor scale = at::empty({B}, xt.options().dtype(at::kDouble));
    StepIn<scalar_t> step{cond.const_data_ptr<scalar_t>(), uncond.defined() ? uncond.const_data_ptr<scalar_t>() : nullptr,
                          xt.const_data_ptr<scalar_t>(), ab_t.const_data_ptr<double>(), ab_p.const_data_ptr<double>(),
                          coefs.mutable_data_ptr<acc>(), x0.defined() ? x0.mutable_data_ptr<acc>() : nullptr,
                          guidance, eta, param, samp};
    if (kind == kDynamic) {  // level 0 of the select computes x0 from the inputs and stores it
      select_scale<scalar_t, true>(step, nullptr, B, n, percentile, scale, nullptr, xt.options(), stream);
    } else {  // the coefficients only
      init_kernel<scalar_t><<<(B + 127) / 128, 128, 0, stream>>>(Select<acc>{}, step, B);
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    }
    const int64_t threads = ((total + kNoiseBlock - 1) / kNoiseBlock) * 16;
    step_output_kernel<scalar_t><<<(threads + kThreads - 1) / kThreads, kThreads, 0, stream>>>(
        step, scale.const_data_ptr<double>(), seed.const_data_ptr<int64_t>(), static_cast<uint32_t>(offset), kind,
        out.mutable_data_ptr<scalar_t>(), return_x0 ? x0_out.mutable_data_ptr<scalar_t>() : nullptr, n, total);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {out, x0_out};
}

}  // namespace
}  // namespace diffusion
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CUDA, m) {
  m.impl("dynamic_threshold", &dalle_fast::diffusion::dynamic_threshold_cuda);
  m.impl("_dynamic_threshold_backward", &dalle_fast::diffusion::dynamic_threshold_backward);
  m.impl("guided_step", &dalle_fast::diffusion::guided_step_cuda);
}
