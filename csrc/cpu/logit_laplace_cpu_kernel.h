// The vectorised CPU kernels of logit_laplace_loss. Included by exactly one translation unit per
// instruction set, which first defines DALLE_FAST_LL_NS (the namespace of its entry points) and, for
// AVX2/AVX-512, CPU_CAPABILITY and the matching target pragma (see logit_laplace_cpu_avx512.cpp).
// The per-element math is dalle_fast/logit_laplace.h, shared with the CUDA kernels.
#ifndef DALLE_FAST_LL_NS
#error "define DALLE_FAST_LL_NS before including logit_laplace_cpu_kernel.h"
#endif

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <tuple>

#include "dalle_fast/logit_laplace.h"
#include "logit_laplace_common.h"

namespace dalle_fast {
namespace logit_laplace {
namespace DALLE_FAST_LL_NS {
namespace {

using at::vec::Vectorized;

// The math policy of dalle_fast/logit_laplace.h for Vectorized<acc>.
template <typename acc> struct VecMath {
  using V = Vectorized<acc>;
  static V cst(double v) { return V(static_cast<acc>(v)); }
  static V log(V v) { return v.log(); }
  static V exp(V v) { return v.exp(); }
  static V abs(V v) { return v.abs(); }
  static V sign(V d) {  // torch.sign: 0 at 0 and for NaN (comparisons give all-ones masks; & 1 keeps 1.0)
    const V zero(0), one(1);
    return ((d > zero) & one) - ((d < zero) & one);
  }
};

// Loads and stores of two accumulation vectors (kStep elements) from/to scalar_t memory.
template <typename scalar_t> struct Io {  // float, double: the accumulation type itself
  using V = Vectorized<scalar_t>;
  static constexpr int64_t kStep = 2 * V::size();
  static void load(const scalar_t* p, V& a, V& b) { a = V::loadu(p); b = V::loadu(p + V::size()); }
  static void store(scalar_t* p, const V& a, const V& b) { a.store(p); b.store(p + V::size()); }
};

template <typename reduced_t> struct IoReduced {  // Half, BFloat16: one reduced vector = two float vectors
  using V = Vectorized<float>;
  static constexpr int64_t kStep = Vectorized<reduced_t>::size();
  static_assert(kStep == 2 * V::size(), "a reduced vector holds two float vectors");
  static void load(const reduced_t* p, V& a, V& b) {
    std::tie(a, b) = at::vec::convert_to_float<reduced_t>(Vectorized<reduced_t>::loadu(p));
  }
  static void store(reduced_t* p, const V& a, const V& b) {
    at::vec::convert_from_float<reduced_t>(a, b).store(p);
  }
};
template <> struct Io<c10::Half> : IoReduced<c10::Half> {};
template <> struct Io<c10::BFloat16> : IoReduced<c10::BFloat16> {};

template <typename scalar_t>
void forward_typed(const CpuArgs& A) {
  using acc = acc_t<scalar_t>;
  using V = Vectorized<acc>;
  using VM = VecMath<acc>;
  using SM = ScalarMath<acc>;
  constexpr int64_t kStep = Io<scalar_t>::kStep;
  const int64_t M = A.M, cpr = chunks_per_row(M);
  const acc a = static_cast<acc>(1.0 - 2.0 * A.eps), eps = static_cast<acc>(A.eps);
  const auto* x = static_cast<const scalar_t*>(A.x);
  const auto* stats = static_cast<const scalar_t*>(A.stats);
  auto* out = static_cast<scalar_t*>(A.out);

  at::parallel_for(0, A.B * cpr, 1, [&](int64_t c0, int64_t c1) {
    const V va(a), veps(eps);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / cpr, i0 = (c % cpr) * kChunk, i1 = std::min(M, i0 + kChunk);
      const scalar_t* xr = x + b * A.x_stride;
      const scalar_t* mur = stats + b * A.s_stride;
      const scalar_t* lnbr = mur + M;
      scalar_t* outr = A.store_loss ? out + b * M : nullptr;
      // lo/hi track the range of x; at::vec::minimum/maximum propagate NaN, which then fails the check.
      V s0(0), s1(0), lo(0), hi(1);
      int64_t i = i0;
      for (; i + kStep <= i1; i += kStep) {
        V x0, x1, m0, m1, l0, l1;
        Io<scalar_t>::load(xr + i, x0, x1);
        Io<scalar_t>::load(mur + i, m0, m1);
        Io<scalar_t>::load(lnbr + i, l0, l1);
        lo = at::vec::minimum(lo, at::vec::minimum(x0, x1));
        hi = at::vec::maximum(hi, at::vec::maximum(x0, x1));
        const V y0 = nll<V, VM>(x0, m0, l0, va, veps);
        const V y1 = nll<V, VM>(x1, m1, l1, va, veps);
        if (outr) {
          Io<scalar_t>::store(outr + i, y0, y1);
        } else {
          s0 = s0 + y0;
          s1 = s1 + y1;
        }
      }
      // Lanes summed in a fixed order; the scalar tail after them.
      double partial = 0.0;
      bool bad = false;
      {
        __at_align__ acc buf_s[V::size()], buf_lo[V::size()], buf_hi[V::size()];
        (s0 + s1).store(buf_s);
        lo.store(buf_lo);
        hi.store(buf_hi);
        for (int64_t k = 0; k < V::size(); ++k) {
          partial += static_cast<double>(buf_s[k]);
          bad |= !(buf_lo[k] >= acc(0) && buf_hi[k] <= acc(1));
        }
      }
      for (; i < i1; ++i) {
        const acc xi = static_cast<acc>(xr[i]);
        bad |= !(xi >= acc(0) && xi <= acc(1));
        const acc y = nll<acc, SM>(xi, static_cast<acc>(mur[i]), static_cast<acc>(lnbr[i]), a, eps);
        if (outr) {
          outr[i] = static_cast<scalar_t>(y);
        } else {
          partial += static_cast<double>(y);
        }
      }
      if (!A.store_loss) A.partials[c] = partial;
      A.bad[c] = bad;
    }
  });
}

template <typename scalar_t, bool want_x, bool per_element_grad>
void backward_typed(const CpuArgs& A) {
  using acc = acc_t<scalar_t>;
  using V = Vectorized<acc>;
  using VM = VecMath<acc>;
  using SM = ScalarMath<acc>;
  constexpr int64_t kStep = Io<scalar_t>::kStep;
  const int64_t M = A.M, cpr = chunks_per_row(M);
  const acc a = static_cast<acc>(1.0 - 2.0 * A.eps), eps = static_cast<acc>(A.eps);
  const acc gs = static_cast<acc>(A.gscale);
  const auto* x = static_cast<const scalar_t*>(A.x);
  const auto* stats = static_cast<const scalar_t*>(A.stats);
  const auto* grad = static_cast<const scalar_t*>(A.grad);
  auto* gstats = static_cast<scalar_t*>(A.grad_stats);
  auto* gx = static_cast<scalar_t*>(A.grad_x);

  at::parallel_for(0, A.B * cpr, 1, [&](int64_t c0, int64_t c1) {
    const V va(a), veps(eps), vgs(gs);
    for (int64_t c = c0; c < c1; ++c) {
      const int64_t b = c / cpr, i0 = (c % cpr) * kChunk, i1 = std::min(M, i0 + kChunk);
      const scalar_t* xr = x + b * A.x_stride;
      const scalar_t* mur = stats + b * A.s_stride;
      const scalar_t* lnbr = mur + M;
      const scalar_t* gr = per_element_grad ? grad + b * M : nullptr;
      scalar_t* gmur = gstats + b * 2 * M;
      scalar_t* glnbr = gmur + M;
      scalar_t* gxr = want_x ? gx + b * M : nullptr;
      int64_t i = i0;
      for (; i + kStep <= i1; i += kStep) {
        V x0, x1, m0, m1, l0, l1, g0 = vgs, g1 = vgs;
        Io<scalar_t>::load(xr + i, x0, x1);
        Io<scalar_t>::load(mur + i, m0, m1);
        Io<scalar_t>::load(lnbr + i, l0, l1);
        if constexpr (per_element_grad) Io<scalar_t>::load(gr + i, g0, g1);
        V dm0, dm1, dl0, dl1, dx0, dx1;
        nll_grad<V, VM, want_x>(x0, m0, l0, g0, va, veps, dm0, dl0, dx0);
        nll_grad<V, VM, want_x>(x1, m1, l1, g1, va, veps, dm1, dl1, dx1);
        Io<scalar_t>::store(gmur + i, dm0, dm1);
        Io<scalar_t>::store(glnbr + i, dl0, dl1);
        if constexpr (want_x) Io<scalar_t>::store(gxr + i, dx0, dx1);
      }
      for (; i < i1; ++i) {
        const acc g = per_element_grad ? static_cast<acc>(gr[i]) : gs;
        acc dm, dl, dx = acc(0);
        nll_grad<acc, SM, want_x>(static_cast<acc>(xr[i]), static_cast<acc>(mur[i]), static_cast<acc>(lnbr[i]), g,
                                  a, eps, dm, dl, dx);
        gmur[i] = static_cast<scalar_t>(dm);
        glnbr[i] = static_cast<scalar_t>(dl);
        if constexpr (want_x) gxr[i] = static_cast<scalar_t>(dx);
      }
    }
  });
}

template <typename scalar_t>
void backward_dispatch(const CpuArgs& A) {
  const bool want_x = A.grad_x != nullptr, per_elem = A.grad != nullptr;
  if (want_x && per_elem) backward_typed<scalar_t, true, true>(A);
  else if (want_x) backward_typed<scalar_t, true, false>(A);
  else if (per_elem) backward_typed<scalar_t, false, true>(A);
  else backward_typed<scalar_t, false, false>(A);
}

}  // namespace

void forward(const CpuArgs& A) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.dtype, "logit_laplace_loss_cpu",
                                  [&] { forward_typed<scalar_t>(A); });
}

void backward(const CpuArgs& A) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.dtype, "logit_laplace_loss_backward_cpu",
                                  [&] { backward_dispatch<scalar_t>(A); });
}

}  // namespace DALLE_FAST_LL_NS
}  // namespace logit_laplace
}  // namespace dalle_fast
