// CPU kernels of per-resblock gradient scaling (schemas in csrc/ops.cpp, per-element math in
// include/dalle_fast/resblock_scaling.h, checks in resblock_scaling_checks.h, Python side in
// dalle_fast/ops/resblock_scaling.py and dalle_fast/amp).
//  - resblock_grad_scale: one activation gradient at a branch boundary, scaled (entering the
//    branch) or unscaled (leaving it), filtered and rounded to `dtype` in one pass.
//  - resblock_unscale_grads_: every parameter gradient of every block divided in place by its
//    block's scale in one call, with one non-finite flag per block.
// Threads keep their own "seen a non-finite value" bit and the flag is written once after the
// parallel region (no data race on the flag tensor). The element loops run through with_cpu_isa
// (cpu_isa.h): compiled for AVX2 / AVX-512 and picked at run time, as ATen's own kernels are.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <atomic>
#include <vector>

#include "cpu_isa.h"
#include "dalle_fast/resblock_scaling.h"
#include "dalle_fast/resblock_scaling_checks.h"

namespace dalle_fast {
namespace resblock {
namespace {

constexpr int64_t kGrain = 1 << 15;

at::Tensor grad_scale_cpu(const at::Tensor& grad, const at::Tensor& scales, at::Tensor& nonfinite, int64_t block,
                          bool unscale, at::ScalarType dtype) {
  check_grad_scale(grad, scales, nonfinite, block, dtype);
  const at::Tensor g = grad.contiguous();
  at::Tensor out = at::empty(g.sizes(), g.options().dtype(dtype));
  const int64_t n = g.numel();
  if (n == 0) return out;
  const float s = scales.const_data_ptr<float>()[block];
  std::atomic<bool> any_bad{false};
  DF_RESBLOCK_TYPES(g.scalar_type(), "resblock_grad_scale_cpu", [&] {
    using in_t = scalar_t;
    DF_RESBLOCK_TYPES(dtype, "resblock_grad_scale_cpu_out", [&] {
      using out_t = scalar_t;
      using acc = pair_acc_t<in_t, out_t>;
      const in_t* gp = g.const_data_ptr<in_t>();
      out_t* op = out.mutable_data_ptr<out_t>();
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        unsigned bad = 0;
        with_cpu_isa([&] {
          for (int64_t i = b; i < e; ++i)
            op[i] = scale_filter<out_t, acc>(static_cast<acc>(gp[i]), static_cast<acc>(s), unscale, bad);
        });
        if (bad) any_bad.store(true, std::memory_order_relaxed);
      });
    });
  });
  if (any_bad.load()) nonfinite.mutable_data_ptr<bool>()[block] = true;
  return out;
}

void unscale_grads_cpu(at::TensorList grads, at::IntArrayRef blocks, const at::Tensor& scales, at::Tensor& nonfinite) {
  check_unscale_grads(grads, blocks, scales, nonfinite);
  const float* sp = scales.const_data_ptr<float>();
  std::vector<uint8_t> bad_blocks(scales.numel(), 0);
  for (size_t t = 0; t < grads.size(); ++t) {
    const at::Tensor& g = grads[t];
    const int64_t n = g.numel();
    if (n == 0) continue;
    std::atomic<bool> any_bad{false};
    DF_RESBLOCK_TYPES(g.scalar_type(), "resblock_unscale_grads_cpu", [&] {
      using acc = acc_t<scalar_t>;
      scalar_t* p = const_cast<at::Tensor&>(g).mutable_data_ptr<scalar_t>();
      const acc s = static_cast<acc>(sp[blocks[t]]);
      at::parallel_for(0, n, kGrain, [&](int64_t b, int64_t e) {
        unsigned bad = 0;
        with_cpu_isa([&] {
          for (int64_t i = b; i < e; ++i) p[i] = unscale_in_place<scalar_t, acc>(p[i], s, bad);
        });
        if (bad) any_bad.store(true, std::memory_order_relaxed);
      });
    });
    if (any_bad.load()) bad_blocks[blocks[t]] = 1;
  }
  bool* fp = nonfinite.mutable_data_ptr<bool>();
  for (size_t b = 0; b < bad_blocks.size(); ++b)
    if (bad_blocks[b]) fp[b] = true;
}

}  // namespace
}  // namespace resblock
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("resblock_grad_scale", &dalle_fast::resblock::grad_scale_cpu);
  m.impl("resblock_unscale_grads_", &dalle_fast::resblock::unscale_grads_cpu);
}
