// CPU kernels of the fused Gumbel-softmax (schemas in csrc/ops.cpp, per-element math in
// include/dalle_fast/gumbel_softmax.h, Python side in dalle_fast/ops/gumbel_softmax.py).
//
// The tensor is read in place as (outer, C, inner) around the softmax dim, with no transposed copy:
//  - inner > 1 (the dVAE's (B, 8192, 32, 32) with dim=1): a work item is one outer index and
//    kLanes consecutive inner positions, i.e. kLanes independent softmaxes whose elements are
//    contiguous across lanes. Loops over the lanes vectorise; the loop over C walks rows.
//  - inner == 1 (dim=-1): a work item is one row, vectorised along C.
// Forward keeps z = (x + g) / tau of a work item in a per-thread fp32 scratch (2 MiB at the dVAE
// shape), so logits are read once and outputs written once: pass 1 makes z and the max (argmax),
// pass 2 exp and sum in the scratch, pass 3 scales and stores. Where the scratch would be too big,
// z is recomputed instead (noise included: it is a pure function of seed and index).
//
// Why not at::vec::Vectorized: in an extension built with the default flags CPU_CAPABILITY is not
// defined, so Vectorized<float> is the generic fallback (std::exp / std::log per lane), and the
// noise needs vector logs and the Philox multiply. Instead the hot functions are compiled three
// times through with_cpu_isa (cpu_isa.h: x86-64-v4 = AVX-512, v3 = AVX2+FMA, baseline), picked from
// the running CPU (never assumed at compile time); the shared math is branch-free so the compiler
// vectorises it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/WrapDimUtils.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "cpu_isa.h"
#include "dalle_fast/gumbel_softmax.h"
#include "dalle_fast/gumbel_softmax_checks.h"

// The hot loops below are DF_INLINE and reached through with_cpu_isa (cpu_isa.h), which
// compiles them for AVX-512, AVX2 and the baseline and picks one at run time.

namespace dalle_fast {
namespace {

constexpr int kLanes = 64;     // forward, inner > 1: inner positions per work item (one noise block)
constexpr int kBwdLanes = 64;  // backward, inner > 1: 256 B per row (16 lanes measured 1.5x slower)
constexpr int kRowLanes = 16;  // inner == 1: independent partial reductions along C
constexpr int kFewLanes = 8;   // up to this many elements, draw noise per element, not per block
constexpr int64_t kMaxScratchBytes = int64_t(16) << 20;  // beyond this, recompute z instead

enum class Noise { kSeed, kGiven, kNone };

template <typename T>
struct FwdArgs {
  const T* x;
  const T* gumbels;  // kGiven only
  T* soft;           // null: soft output not wanted
  T* hard;           // null: not hard
  PhiloxKey key;
  SoftmaxLayout lay;
  acc_t<T> inv_tau;
  bool nan_fill;     // hard output of a slice whose softmax is NaN is all NaN (like torch)
};

// The 64 Gumbel samples of noise block `block`, in element order. Round-major, so every step is
// one vector operation over the block's 16 independent Philox calls.
template <typename acc>
DF_INLINE void noise_block(PhiloxKey key, uint64_t block, acc* out) {
  uint32_t x0[16], x1[16], x2[16], x3[16];
  for (uint32_t j = 0; j < 16; ++j) {
    x0[j] = static_cast<uint32_t>(block);
    x1[j] = static_cast<uint32_t>(block >> 32);
    x2[j] = j;
    x3[j] = 0;
  }
  for (uint32_t r = 0; r < 10; ++r) {
    const PhiloxKey k{key.k0 + r * kPhiloxW0, key.k1 + r * kPhiloxW1};  // = bumped r times
    for (int j = 0; j < 16; ++j) {
      const Philox4 o = philox_round({x0[j], x1[j], x2[j], x3[j]}, k);
      x0[j] = o.x0, x1[j] = o.x1, x2[j] = o.x2, x3[j] = o.x3;
    }
  }
  for (int j = 0; j < 16; ++j) {
    out[j] = gumbel_from_bits<acc>(x0[j]);
    out[16 + j] = gumbel_from_bits<acc>(x1[j]);
    out[32 + j] = gumbel_from_bits<acc>(x2[j]);
    out[48 + j] = gumbel_from_bits<acc>(x3[j]);
  }
}

// z = (x + g) * inv_tau for n <= kLanes contiguous elements starting at flat index e0; lanes
// [n, kLanes) are set to 0 so whole-vector passes never read garbage.
template <typename T, Noise kNoise>
DF_INLINE void make_z(const FwdArgs<T>& a, int64_t e0, int64_t n, acc_t<T>* z, acc_t<T>* noise) {
  using acc = acc_t<T>;
  const acc* g = noise;
  if (kNoise == Noise::kSeed && n <= kFewLanes) {  // narrow rows (small inner): no whole blocks
    for (int64_t l = 0; l < n; ++l) noise[l] = gumbel_noise<acc>(a.key, static_cast<uint64_t>(e0 + l));
  } else if constexpr (kNoise == Noise::kSeed) {
    const int off = static_cast<int>(e0 & (kNoiseBlock - 1));
    noise_block(a.key, static_cast<uint64_t>(e0) >> 6, noise);
    if (off + n > kNoiseBlock) noise_block(a.key, (static_cast<uint64_t>(e0) >> 6) + 1, noise + kNoiseBlock);
    g = noise + off;
  }
  for (int64_t l = 0; l < n; ++l) {
    acc v = static_cast<acc>(a.x[e0 + l]);
    if constexpr (kNoise == Noise::kSeed) v += g[l];
    if constexpr (kNoise == Noise::kGiven) v += static_cast<acc>(a.gumbels[e0 + l]);
    z[l] = v * a.inv_tau;
  }
  for (int64_t l = n; l < kLanes; ++l) z[l] = 0;
}

template <typename T>
DF_INLINE T hard_value(bool nan_slice, bool hot) {
  return nan_slice ? T(std::numeric_limits<float>::quiet_NaN()) : T(hot ? 1.0f : 0.0f);
}

template <typename T, Noise kNoise, bool kHard>
DF_INLINE void columns_forward(const FwdArgs<T>& a, int64_t begin, int64_t end, acc_t<T>* scratch) {
  using acc = acc_t<T>;
  const int64_t C = a.lay.C, inner = a.lay.inner, chunks = (inner + kLanes - 1) / kLanes;
  alignas(64) acc noise[2 * kNoiseBlock];
  alignas(64) acc zrow[kLanes], m[kLanes], s[kLanes];
  int32_t idx[kLanes];
  for (int64_t item = begin; item < end; ++item) {
    const int64_t o = item / chunks, i0 = (item % chunks) * kLanes;
    const int64_t w = std::min<int64_t>(kLanes, inner - i0);
    auto base = [&](int64_t c) { return (o * C + c) * inner + i0; };
    for (int l = 0; l < kLanes; ++l) m[l] = -INFINITY, s[l] = 0, idx[l] = -1;
    for (int64_t c = 0; c < C; ++c) {  // pass 1: z and max (argmax)
      acc* z = scratch ? scratch + c * kLanes : zrow;
      make_z<T, kNoise>(a, base(c), w, z, noise);
      if constexpr (kHard) {
        for (int l = 0; l < kLanes; ++l) {  // rows come in increasing c: a tie keeps the first
          const bool take = idx[l] < 0 || (m[l] == m[l] && (z[l] > m[l] || z[l] != z[l]));
          m[l] = take ? z[l] : m[l];
          idx[l] = take ? static_cast<int32_t>(c) : idx[l];
        }
      } else {
        for (int l = 0; l < kLanes; ++l) m[l] = nan_max(m[l], z[l]);
      }
    }
    if (a.soft) {
      for (int64_t c = 0; c < C; ++c) {  // pass 2: exp and sum
        acc* z = scratch ? scratch + c * kLanes : zrow;
        if (!scratch) make_z<T, kNoise>(a, base(c), w, z, noise);
        for (int l = 0; l < kLanes; ++l) {
          const acc e = softmax_exp(z[l] - m[l]);
          z[l] = e;
          s[l] += e;
        }
      }
      for (int l = 0; l < kLanes; ++l) s[l] = acc(1) / s[l];
    }
    for (int64_t c = 0; c < C; ++c) {  // pass 3: store
      const int64_t b = base(c);
      if (a.soft) {
        const acc* e = scratch ? scratch + c * kLanes : zrow;
        if (!scratch) {
          make_z<T, kNoise>(a, b, w, zrow, noise);
          for (int l = 0; l < kLanes; ++l) zrow[l] = softmax_exp(zrow[l] - m[l]);
          e = zrow;
        }
        for (int64_t l = 0; l < w; ++l) a.soft[b + l] = static_cast<T>(e[l] * s[l]);
      }
      if constexpr (kHard) {
        for (int64_t l = 0; l < w; ++l)
          a.hard[b + l] = hard_value<T>(a.nan_fill && softmax_slice_is_nan(m[l]), idx[l] == c);
      }
    }
  }
}

template <typename T, Noise kNoise, bool kHard>
DF_INLINE void rows_forward(const FwdArgs<T>& a, int64_t begin, int64_t end, acc_t<T>* z) {
  using acc = acc_t<T>;
  const int64_t C = a.lay.C;
  alignas(64) acc noise[2 * kNoiseBlock], zblk[kLanes];
  for (int64_t o = begin; o < end; ++o) {
    const int64_t row = o * C;
    // pass 1: z, segments aligned to the noise blocks so each block is drawn once per row
    for (int64_t c0 = 0; c0 < C;) {
      const int64_t n = std::min<int64_t>(kNoiseBlock - ((row + c0) & (kNoiseBlock - 1)), C - c0);
      make_z<T, kNoise>(a, row + c0, n, zblk, noise);
      std::memcpy(z + c0, zblk, n * sizeof(acc));
      c0 += n;
    }
    // max (argmax) in kRowLanes interleaved lanes, merged with torch.argmax's tie/NaN rules
    acc ml[kRowLanes];
    int64_t il[kRowLanes];
    for (int l = 0; l < kRowLanes; ++l) ml[l] = -INFINITY, il[l] = -1;
    int64_t c = 0;
    for (; c + kRowLanes <= C; c += kRowLanes) {
      for (int l = 0; l < kRowLanes; ++l) {
        if constexpr (kHard) {
          const bool take = il[l] < 0 || (ml[l] == ml[l] && (z[c + l] > ml[l] || z[c + l] != z[c + l]));
          ml[l] = take ? z[c + l] : ml[l];
          il[l] = take ? c + l : il[l];
        } else {
          ml[l] = nan_max(ml[l], z[c + l]);
        }
      }
    }
    acc m = ml[0];
    int64_t best = il[0];
    for (int l = 1; l < kRowLanes; ++l) {
      if constexpr (kHard) {
        if (il[l] >= 0 && argmax_prefers(ml[l], il[l], m, best)) m = ml[l], best = il[l];
      } else {
        m = nan_max(m, ml[l]);
      }
    }
    for (; c < C; ++c) {
      if constexpr (kHard) {
        if (argmax_prefers(z[c], c, m, best)) m = z[c], best = c;
      } else {
        m = nan_max(m, z[c]);
      }
    }
    if (a.soft) {  // pass 2: exp, sum, scale and store
      acc sl[kRowLanes] = {};
      for (c = 0; c + kRowLanes <= C; c += kRowLanes) {
        for (int l = 0; l < kRowLanes; ++l) {
          const acc e = softmax_exp(z[c + l] - m);
          z[c + l] = e;
          sl[l] += e;
        }
      }
      for (; c < C; ++c) {
        z[c] = softmax_exp(z[c] - m);
        sl[0] += z[c];
      }
      acc sum = 0;
      for (int l = 0; l < kRowLanes; ++l) sum += sl[l];
      const acc inv = acc(1) / sum;
      for (c = 0; c < C; ++c) a.soft[row + c] = static_cast<T>(z[c] * inv);
    }
    if constexpr (kHard) {
      const bool nan_slice = a.nan_fill && softmax_slice_is_nan(m);
      for (c = 0; c < C; ++c) a.hard[row + c] = hard_value<T>(nan_slice, c == best);
    }
  }
}

// A per-thread buffer reused across calls (no page faults per call).
template <typename acc>
acc* thread_scratch(int64_t n) {
  thread_local std::vector<acc> buf;
  if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
  return buf.data();
}

// Work items big enough that a tiny tensor stays on the calling thread.
int64_t grain(int64_t items, int64_t elems_per_item) {
  return std::max<int64_t>(1, std::min<int64_t>(items, 32768 / std::max<int64_t>(1, elems_per_item)));
}

template <typename T, Noise kNoise, bool kHard>
void run_forward(const FwdArgs<T>& a) {
  using acc = acc_t<T>;
  const SoftmaxLayout& l = a.lay;
  if (l.inner == 1) {
    at::parallel_for(0, l.outer, grain(l.outer, l.C), [&](int64_t b, int64_t e) {
      acc* z = thread_scratch<acc>(l.C);
      with_cpu_isa([&] { rows_forward<T, kNoise, kHard>(a, b, e, z); });
    });
    return;
  }
  const int64_t items = l.outer * ((l.inner + kLanes - 1) / kLanes);
  const bool use_scratch = a.soft && l.C * kLanes * int64_t(sizeof(acc)) <= kMaxScratchBytes;
  at::parallel_for(0, items, grain(items, l.C * std::min<int64_t>(l.inner, kLanes)), [&](int64_t b, int64_t e) {
    acc* scratch = use_scratch ? thread_scratch<acc>(l.C * kLanes) : nullptr;
    with_cpu_isa([&] { columns_forward<T, kNoise, kHard>(a, b, e, scratch); });
  });
}

template <typename T, Noise kNoise>
void run_forward(const FwdArgs<T>& a) {
  if (a.hard) run_forward<T, kNoise, true>(a);
  else run_forward<T, kNoise, false>(a);
}

// soft and/or hard outputs, contiguous, in logits' dtype.
std::tuple<at::Tensor, at::Tensor> forward(const at::Tensor& logits, uint64_t seed, const at::Tensor* gumbels,
                                           Noise noise, double tau, int64_t dim, bool want_soft, bool want_hard,
                                           bool nan_fill) {
  dim = at::maybe_wrap_dim(dim, logits.dim());
  const at::Tensor x = logits.contiguous();
  const at::Tensor g = gumbels ? gumbels->contiguous() : at::Tensor();
  at::Tensor soft = at::empty(want_soft ? x.sizes() : at::IntArrayRef{0}, x.options());
  at::Tensor hard = at::empty(want_hard ? x.sizes() : at::IntArrayRef{0}, x.options());
  if (x.numel() == 0) return {soft, hard};
  const SoftmaxLayout lay = softmax_layout(x.sizes().data(), x.dim(), dim);
  TORCH_CHECK(lay.C <= std::numeric_limits<int32_t>::max(), "gumbel_softmax: size of dim ", dim,
              " must be < 2^31, got ", lay.C);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "gumbel_softmax_cpu", [&] {
    FwdArgs<scalar_t> a{x.const_data_ptr<scalar_t>(), g.defined() ? g.const_data_ptr<scalar_t>() : nullptr,
                        want_soft ? soft.mutable_data_ptr<scalar_t>() : nullptr,
                        want_hard ? hard.mutable_data_ptr<scalar_t>() : nullptr,
                        philox_key_from_seed(seed), lay, static_cast<acc_t<scalar_t>>(1.0 / tau), nan_fill};
    switch (noise) {
      case Noise::kSeed: run_forward<scalar_t, Noise::kSeed>(a); break;
      case Noise::kGiven: run_forward<scalar_t, Noise::kGiven>(a); break;
      case Noise::kNone: run_forward<scalar_t, Noise::kNone>(a); break;
    }
  });
  return {soft, hard};
}

template <typename T>
DF_INLINE void columns_backward(const T* g, const T* y, T* dx, SoftmaxLayout lay, acc_t<T> inv_tau,
                                    int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  const int64_t C = lay.C, inner = lay.inner, chunks = (inner + kBwdLanes - 1) / kBwdLanes;
  for (int64_t item = begin; item < end; ++item) {
    const int64_t o = item / chunks, i0 = (item % chunks) * kBwdLanes;
    const int64_t w = std::min<int64_t>(kBwdLanes, inner - i0);
    acc dot[kBwdLanes] = {};
    for (int64_t c = 0; c < C; ++c) {
      const int64_t b = (o * C + c) * inner + i0;
      for (int64_t l = 0; l < w; ++l) dot[l] += static_cast<acc>(g[b + l]) * static_cast<acc>(y[b + l]);
    }
    for (int64_t c = 0; c < C; ++c) {
      const int64_t b = (o * C + c) * inner + i0;
      for (int64_t l = 0; l < w; ++l) {
        const acc yv = static_cast<acc>(y[b + l]);
        dx[b + l] = static_cast<T>(yv * (static_cast<acc>(g[b + l]) - dot[l]) * inv_tau);
      }
    }
  }
}

template <typename T>
DF_INLINE void rows_backward(const T* g, const T* y, T* dx, int64_t C, acc_t<T> inv_tau,
                                 int64_t begin, int64_t end) {
  using acc = acc_t<T>;
  for (int64_t o = begin; o < end; ++o) {
    const T *gr = g + o * C, *yr = y + o * C;
    T* dr = dx + o * C;
    acc dl[kRowLanes] = {};
    int64_t c = 0;
    for (; c + kRowLanes <= C; c += kRowLanes)
      for (int l = 0; l < kRowLanes; ++l) dl[l] += static_cast<acc>(gr[c + l]) * static_cast<acc>(yr[c + l]);
    for (; c < C; ++c) dl[0] += static_cast<acc>(gr[c]) * static_cast<acc>(yr[c]);
    acc dot = 0;
    for (int l = 0; l < kRowLanes; ++l) dot += dl[l];
    for (c = 0; c < C; ++c) {
      const acc yv = static_cast<acc>(yr[c]);
      dr[c] = static_cast<T>(yv * (static_cast<acc>(gr[c]) - dot) * inv_tau);
    }
  }
}

// ---- the ops ----

uint64_t read_seed(const at::Tensor& seed) { return static_cast<uint64_t>(seed.item<int64_t>()); }

at::Tensor gumbel_softmax_cpu(const at::Tensor& logits, const at::Tensor& seed, const std::optional<at::Tensor>& gumbels,
                              double tau, int64_t dim) {
  gumbel_softmax_check_inputs(logits, seed, gumbels, tau, dim);
  const at::Tensor* g = gumbels.has_value() ? &*gumbels : nullptr;
  return std::get<0>(forward(logits, g ? 0 : read_seed(seed), g, g ? Noise::kGiven : Noise::kSeed, tau, dim,
                             /*want_soft=*/true, /*want_hard=*/false, /*nan_fill=*/true));
}

std::tuple<at::Tensor, at::Tensor> gumbel_softmax_hard_cpu(const at::Tensor& logits, const at::Tensor& seed,
                                                           const std::optional<at::Tensor>& gumbels, double tau,
                                                           int64_t dim, bool return_soft) {
  gumbel_softmax_check_inputs(logits, seed, gumbels, tau, dim);
  const at::Tensor* g = gumbels.has_value() ? &*gumbels : nullptr;
  auto [soft, hard] = forward(logits, g ? 0 : read_seed(seed), g, g ? Noise::kGiven : Noise::kSeed, tau, dim,
                              return_soft, /*want_hard=*/true, /*nan_fill=*/true);
  return {hard, soft};
}

at::Tensor one_hot_argmax_cpu(const at::Tensor& logits, int64_t dim) {
  gumbel_softmax_check_logits(logits, dim, "one_hot_argmax");
  return std::get<1>(forward(logits, 0, nullptr, Noise::kNone, 1.0, dim, false, true, /*nan_fill=*/false));
}

at::Tensor gumbel_softmax_backward_cpu(const at::Tensor& grad, const at::Tensor& y, double tau, int64_t dim) {
  gumbel_softmax_check_backward(grad, y, tau, dim);
  dim = at::maybe_wrap_dim(dim, y.dim());
  const at::Tensor g = grad.contiguous(), yc = y.contiguous();
  at::Tensor dx = at::empty(yc.sizes(), yc.options());
  if (yc.numel() == 0) return dx;
  const SoftmaxLayout lay = softmax_layout(yc.sizes().data(), yc.dim(), dim);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, yc.scalar_type(), "gumbel_softmax_backward_cpu", [&] {
    const scalar_t *gp = g.const_data_ptr<scalar_t>(), *yp = yc.const_data_ptr<scalar_t>();
    scalar_t* dp = dx.mutable_data_ptr<scalar_t>();
    const auto inv_tau = static_cast<acc_t<scalar_t>>(1.0 / tau);
    if (lay.inner == 1) {
      at::parallel_for(0, lay.outer, grain(lay.outer, lay.C), [&](int64_t b, int64_t e) {
        with_cpu_isa([&] { rows_backward<scalar_t>(gp, yp, dp, lay.C, inv_tau, b, e); });
      });
    } else {
      const int64_t items = lay.outer * ((lay.inner + kBwdLanes - 1) / kBwdLanes);
      at::parallel_for(0, items, grain(items, lay.C * std::min<int64_t>(lay.inner, kBwdLanes)),
                       [&](int64_t b, int64_t e) {
                         with_cpu_isa([&] { columns_backward<scalar_t>(gp, yp, dp, lay, inv_tau, b, e); });
                       });
    }
  });
  return dx;
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("gumbel_softmax", &dalle_fast::gumbel_softmax_cpu);
  m.impl("gumbel_softmax_hard", &dalle_fast::gumbel_softmax_hard_cpu);
  m.impl("one_hot_argmax", &dalle_fast::one_hot_argmax_cpu);
  m.impl("_gumbel_softmax_backward", &dalle_fast::gumbel_softmax_backward_cpu);
}
