// Boundary checks of the per-resblock gradient-scaling ops, written once for the CPU and CUDA
// kernels (ATen only, no CUDA). Every message names the argument and what was expected.
#pragma once
#include <ATen/ATen.h>

#include <cstdint>

namespace dalle_fast {
namespace resblock {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// scales: 1-D float32 on `device` (the scaler keeps its scales in fp32); nonfinite: bool of the same length on `device`.
inline void check_scales_flags(const at::Tensor& scales, const at::Tensor& nonfinite, const at::Device& device,
                               const char* op) {
  TORCH_CHECK_TYPE(scales.scalar_type() == at::kFloat, op, ": scales must be float32, got ", scales.scalar_type());
  TORCH_CHECK_VALUE(scales.dim() == 1 && scales.numel() >= 1, op, ": scales must be 1-D with one scale per block, got ",
                    "shape ", scales.sizes());
  TORCH_CHECK_TYPE(nonfinite.scalar_type() == at::kBool, op, ": nonfinite must be a bool tensor, got ",
                   nonfinite.scalar_type());
  TORCH_CHECK_VALUE(nonfinite.dim() == 1 && nonfinite.numel() == scales.numel(), op,
                    ": nonfinite must be 1-D with one flag per block (", scales.numel(), "), got shape ",
                    nonfinite.sizes());
  TORCH_CHECK_VALUE(scales.is_contiguous() && nonfinite.is_contiguous(), op, ": scales and nonfinite must be contiguous");
  TORCH_CHECK_VALUE(scales.device() == device && nonfinite.device() == device, op,
                    ": scales and nonfinite must be on the gradients' device ", device, ", got ", scales.device(),
                    " and ", nonfinite.device());
}

inline void check_block(int64_t block, int64_t num_blocks, const char* op) {
  TORCH_CHECK_VALUE(block >= 0 && block < num_blocks, op, ": block must be in [0, ", num_blocks, "), got ", block);
}

inline void check_grad_scale(const at::Tensor& grad, const at::Tensor& scales, const at::Tensor& nonfinite,
                             int64_t block, at::ScalarType dtype) {
  const char* op = "resblock_grad_scale";
  TORCH_CHECK_TYPE(is_float_type(grad.scalar_type()), op, ": grad must be float32, float64, float16 or bfloat16, got ",
                   grad.scalar_type());
  TORCH_CHECK_TYPE(is_float_type(dtype), op, ": dtype must be float32, float64, float16 or bfloat16, got ", dtype);
  check_scales_flags(scales, nonfinite, grad.device(), op);
  check_block(block, scales.numel(), op);
}

inline void check_unscale_grads(at::TensorList grads, at::IntArrayRef blocks, const at::Tensor& scales,
                                const at::Tensor& nonfinite) {
  const char* op = "resblock_unscale_grads_";
  TORCH_CHECK_VALUE(grads.size() == blocks.size(), op, ": blocks must give one block per gradient (",
                    grads.size(), " gradients), got ", blocks.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    const at::Tensor& g = grads[i];
    TORCH_CHECK_TYPE(is_float_type(g.scalar_type()), op, ": grads[", i,
                     "] must be float32, float64, float16 or bfloat16, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.is_contiguous(), op, ": grads[", i, "] must be contiguous");
    TORCH_CHECK_VALUE(g.device() == scales.device(), op, ": grads[", i, "] is on ", g.device(),
                      ", scales on ", scales.device(), " (all must share one device)");
    check_block(blocks[i], scales.numel(), op);
  }
  check_scales_flags(scales, nonfinite, scales.device(), op);
}

}  // namespace resblock
}  // namespace dalle_fast
