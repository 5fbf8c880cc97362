// The raw kernel arguments of logit_laplace_loss on the CPU, shared by the CPU entry
// (logit_laplace_cpu.cpp) and its per-ISA kernels (logit_laplace_cpu_{avx2,avx512}.cpp); the
// boundary checks, shared with CUDA, are in dalle_fast/logit_laplace_checks.h. ATen core only. The
// per-element math (dalle_fast/logit_laplace.h) is not included here: the per-ISA files must include
// it only after raising their target.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <string>

#include "dalle_fast/common.h"
#include "dalle_fast/logit_laplace_checks.h"

namespace dalle_fast {
namespace logit_laplace {

// Elements summed into one partial of a 'sum'/'mean' forward. Chunks never straddle a batch row
// and the partials are added in chunk order, so the result does not depend on the thread count.
constexpr int64_t kChunk = 16384;

// Everything one CPU kernel call needs, as raw pointers; outputs are contiguous.
struct CpuArgs {
  at::ScalarType dtype;
  const void* x = nullptr;      // row b at b * x_stride
  const void* stats = nullptr;  // row b at b * s_stride: mu [0, M), ln b [M, 2M)
  const void* grad = nullptr;   // backward, reduction 'none': (B, C, H, W) contiguous; else nullptr
  void* out = nullptr;          // forward 'none': (B, C, H, W) contiguous
  void* grad_stats = nullptr;   // backward: (B, 2C, H, W) contiguous
  void* grad_x = nullptr;       // backward: (B, C, H, W) contiguous, or nullptr when not wanted
  int64_t B = 0, M = 0, x_stride = 0, s_stride = 0;
  double eps = 0.1;
  double gscale = 1.0;          // backward 'sum'/'mean': the gradient of every element
  bool store_loss = false;      // forward: write `out` ('none') ...
  double* partials = nullptr;   // ... or one partial sum per chunk ('sum'/'mean')
  uint8_t* bad = nullptr;       // forward: per chunk, 1 if some x is outside [0, 1] or NaN
};

inline int64_t chunks_per_row(int64_t M) { return (M + kChunk - 1) / kChunk; }

// One implementation per instruction set, compiled in its own translation unit with
// at::vec::Vectorized of that ISA; logit_laplace_cpu.cpp picks one at run time.
#define DALLE_FAST_LL_DECLARE(NS)                \
  namespace NS {                                 \
  void forward(const CpuArgs& args);             \
  void backward(const CpuArgs& args);            \
  }
DALLE_FAST_LL_DECLARE(cpu_default)
DALLE_FAST_LL_DECLARE(cpu_avx2)
DALLE_FAST_LL_DECLARE(cpu_avx512)
#undef DALLE_FAST_LL_DECLARE

}  // namespace logit_laplace
}  // namespace dalle_fast
