// logit_laplace_loss on the CPU: boundary checks, output allocation, the deterministic reduction of
// the per-chunk partial sums, and the run-time choice of the kernel's instruction set (AVX-512 /
// AVX2 / the portable build of the same source; ATEN_CPU_CAPABILITY overrides it as for ATen).
#include <ATen/ATen.h>
#include <ATen/Version.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <string>
#include <tuple>

#include "cpu_isa.h"
#include "logit_laplace_common.h"

// The portable build of the kernels: at::vec at the baseline ISA of this translation unit.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wunknown-pragmas"  // ATen's vector headers carry `#pragma unroll`
#define DALLE_FAST_LL_NS cpu_default
#include "logit_laplace_cpu_kernel.h"
#undef DALLE_FAST_LL_NS
#pragma GCC diagnostic pop

namespace dalle_fast {
namespace logit_laplace {
namespace {

void run_forward(const CpuArgs& args) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return cpu_avx512::forward(args);
    case CpuIsa::kAvx2: return cpu_avx2::forward(args);
    default: return cpu_default::forward(args);
  }
}

void run_backward(const CpuArgs& args) {
  switch (cpu_isa()) {
    case CpuIsa::kAvx512: return cpu_avx512::backward(args);
    case CpuIsa::kAvx2: return cpu_avx2::backward(args);
    default: return cpu_default::backward(args);
  }
}

CpuArgs make_args(const at::Tensor& x, const at::Tensor& stats, double eps) {
  CpuArgs a;
  a.dtype = x.scalar_type();
  a.x = x.data_ptr();
  a.stats = stats.data_ptr();
  a.B = x.size(0);
  a.M = x.size(1) * x.size(2) * x.size(3);
  a.x_stride = row_stride(x);
  a.s_stride = row_stride(stats);
  a.eps = eps;
  return a;
}

at::Tensor forward_cpu(const at::Tensor& x_in, const at::Tensor& stats_in, double eps, std::string reduction) {
  check_inputs(x_in, stats_in, eps);
  const Reduction red = parse_reduction(reduction);
  const at::Tensor x = rows_contiguous(x_in), stats = rows_contiguous(stats_in);
  const int64_t n = x.numel();
  if (red == kNone) {
    at::Tensor out = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
    if (n == 0) return out;
    CpuArgs a = make_args(x, stats, eps);
    const int64_t chunks = a.B * chunks_per_row(a.M);
    at::Tensor bad = at::zeros({chunks}, x.options().dtype(at::kByte));
    a.out = out.data_ptr();
    a.store_loss = true;
    a.bad = bad.data_ptr<uint8_t>();
    run_forward(a);
    check_x_values(bad.any().item<bool>());
    return out;
  }
  // Empty: 'sum' is 0 and 'mean' is NaN (0 / 0), as torch's sum and mean give.
  if (n == 0) {
    return at::full({}, red == kSum ? 0.0 : std::numeric_limits<double>::quiet_NaN(), x.options());
  }
  CpuArgs a = make_args(x, stats, eps);
  const int64_t chunks = a.B * chunks_per_row(a.M);
  at::Tensor partials = at::empty({chunks}, x.options().dtype(at::kDouble));
  at::Tensor bad = at::zeros({chunks}, x.options().dtype(at::kByte));
  a.partials = partials.data_ptr<double>();
  a.bad = bad.data_ptr<uint8_t>();
  run_forward(a);
  const uint8_t* bad_p = a.bad;
  double total = 0.0;  // fixed order: the result does not depend on the number of threads
  bool any_bad = false;
  for (int64_t c = 0; c < chunks; ++c) {
    total += a.partials[c];
    any_bad |= bad_p[c] != 0;
  }
  check_x_values(any_bad);
  if (red == kMean) total /= static_cast<double>(n);
  return at::full({}, total, x.options());
}

std::tuple<at::Tensor, at::Tensor> backward_cpu(const at::Tensor& grad, const at::Tensor& x_in,
                                                const at::Tensor& stats_in, double eps, std::string reduction,
                                                bool compute_grad_x) {
  check_inputs(x_in, stats_in, eps);
  const Reduction red = parse_reduction(reduction);
  check_backward_grad(grad, x_in, red, reduction);
  const at::Tensor x = rows_contiguous(x_in), stats = rows_contiguous(stats_in);
  at::Tensor grad_stats = at::empty(stats.sizes(), stats.options().memory_format(at::MemoryFormat::Contiguous));
  at::Tensor grad_x = compute_grad_x
                          ? at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous))
                          : at::empty({0}, x.options());
  const int64_t n = x.numel();
  if (n == 0) return {grad_stats, grad_x};
  CpuArgs a = make_args(x, stats, eps);
  at::Tensor g;
  if (red == kNone) {
    g = grad.to(x.scalar_type()).contiguous();
    a.grad = g.data_ptr();
  } else {
    const double g0 = grad.item<double>();
    a.gscale = red == kMean ? g0 / static_cast<double>(n) : g0;
  }
  a.grad_stats = grad_stats.data_ptr();
  a.grad_x = compute_grad_x ? grad_x.data_ptr() : nullptr;
  run_backward(a);
  return {grad_stats, grad_x};
}

}  // namespace
}  // namespace logit_laplace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("logit_laplace_loss", &dalle_fast::logit_laplace::forward_cpu);
  m.impl("_logit_laplace_loss_backward", &dalle_fast::logit_laplace::backward_cpu);
}
