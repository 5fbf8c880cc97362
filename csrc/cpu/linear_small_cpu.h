// Small-batch linear layers on the CPU (csrc/cpu/linear_small_cpu.cpp), for cached sampling.
#pragma once
#include <ATen/ATen.h>

#include <optional>

namespace dalle_fast {

// Whether linear_small has an AVX-512 kernel for dtype (fp32, or bf16 with avx512_bf16) on this CPU
// (checked once at run time).
bool linear_small_available(at::ScalarType dtype);

// x (B, K) @ W (N, K)^T + bias (N) on the CPU for fp32 or bf16 x and W of one dtype, as at::linear:
// fp32 accumulation (of exact bf16 products for bf16), the bias added in fp32, the result in x's
// dtype. Made for a sampling step's few rows: W streams through once, each row of it reused for every
// row of x, where the BLAS/oneDNN GEMV paths cost up to twice as much (bf16 more). Callers check
// linear_small_available first.
at::Tensor linear_small(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& bias);

}  // namespace dalle_fast
