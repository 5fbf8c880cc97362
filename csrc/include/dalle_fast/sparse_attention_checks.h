// The boundary of sparse_attention, _sparse_attention_backward and sparse_attention_decode: every
// argument check, written once and called by the CPU kernels (cpu/sparse_attention_cpu.cpp), the
// CUDA kernels (cuda/sparse_attention_cuda.cu) and the _check_sparse_attention* ops, which run it
// for a device type named by a string so that a CPU test can ask what the CUDA kernels accept.
// ValueError (TORCH_CHECK_VALUE) for shapes, ranges and the mask arguments; TypeError
// (TORCH_CHECK_TYPE) for dtypes. Host only (ATen, no CUDA); checks read sizes, never data.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string_view>

#include "dalle_fast/attention_mask.h"
#include "dalle_fast/sparse_attention_layout.h"

namespace dalle_fast {

// What the kernels of one device accept: data, so that tests and docs read the same numbers.
struct SparseAttentionLimits {
  int64_t max_head_dim;  // head dims 1..max_head_dim
  // Largest N = text_len + image_size^2 (exclusive). The CUDA kernels index rows with int32 and
  // the tile lists with N / 64 tiles; the CPU shares the bound so that one model runs on both.
  int64_t max_seq_len;
};

inline SparseAttentionLimits sparse_attention_limits(c10::DeviceType device) {
  constexpr int64_t kMaxSeqLen = int64_t{1} << 24;
  if (device == c10::DeviceType::CUDA) return {kSparseAttentionMaxCudaHeadDim, kMaxSeqLen};
  return {512, kMaxSeqLen};  // the CPU kernels: any head dim up to 512
}

// "cpu" | "cuda" (the _check ops' device_type argument).
inline c10::DeviceType parse_device_type(std::string_view device_type) {
  if (device_type == "cpu") return c10::DeviceType::CPU;
  if (device_type == "cuda") return c10::DeviceType::CUDA;
  TORCH_CHECK_VALUE(false, "device_type must be 'cpu' or 'cuda', got '", device_type, "'");
}

inline MaskKind parse_mask_kind(const char* op, std::string_view kind) {
  if (kind == "full") return MaskKind::Full;
  if (kind == "row") return MaskKind::Row;
  if (kind == "column") return MaskKind::Column;
  if (kind == "conv") return MaskKind::Conv;
  TORCH_CHECK_VALUE(false, op, ": kind must be one of 'full', 'row', 'column', 'conv', got '", kind, "'");
}

// The mask arguments (every kind checks conv_kernel, so that a layer's arguments are valid
// whatever its kind) and the sequence length they imply.
inline MaskSpec check_mask_spec(const char* op, std::string_view kind, int64_t text_len, int64_t image_size,
                                int64_t conv_kernel, const SparseAttentionLimits& lim) {
  const MaskKind mk = parse_mask_kind(op, kind);
  TORCH_CHECK_VALUE(text_len >= 0, op, ": text_len must be >= 0, got ", text_len);
  TORCH_CHECK_VALUE(image_size >= 1, op, ": image_size must be >= 1, got ", image_size);
  TORCH_CHECK_VALUE(conv_kernel >= 1 && conv_kernel % 2 == 1, op, ": conv_kernel must be odd and positive, got ",
                    conv_kernel);
  // image_size is bounded first so that image_size^2 cannot overflow.
  TORCH_CHECK_VALUE(text_len < lim.max_seq_len && image_size < lim.max_seq_len &&
                        text_len + image_size * image_size < lim.max_seq_len,
                    op, ": text_len + image_size^2 must be below ", lim.max_seq_len, ", got text_len ", text_len,
                    " and image_size ", image_size);
  return MaskSpec{mk, static_cast<int>(text_len), static_cast<int>(image_size), static_cast<int>(conv_kernel)};
}

inline bool sparse_attention_dtype_ok(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_same_device(const char* op, const at::Tensor& ref, const char* ref_name, const at::Tensor& t,
                              const char* name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on ", ref_name, "'s device (",
                    ref.device(), "), got ", t.device());
}

inline void check_scale(const char* op, double scale) {
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

inline void check_head_dim(const char* op, int64_t D, c10::DeviceType device, const SparseAttentionLimits& lim) {
  TORCH_CHECK_VALUE(D >= 1 && D <= lim.max_head_dim, op, ": head dim D (the last dimension) must be in [1, ",
                    lim.max_head_dim, "] on ", c10::DeviceTypeName(device, /*lower_case=*/true), ", got ", D);
}

// q, k, v (B, heads, N, D) of one dtype and device, N = text_len + image_size^2.
inline MaskSpec check_sparse_attention(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                       std::string_view kind, int64_t text_len, int64_t image_size,
                                       int64_t conv_kernel, double scale, c10::DeviceType device) {
  const SparseAttentionLimits lim = sparse_attention_limits(device);
  const MaskSpec spec = check_mask_spec(op, kind, text_len, image_size, conv_kernel, lim);
  TORCH_CHECK_VALUE(q.dim() == 4, op, ": q must be 4-D (B, heads, N, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k.sizes() == q.sizes(), op, ": k must have q's shape ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK_VALUE(v.sizes() == q.sizes(), op, ": v must have q's shape ", q.sizes(), ", got ", v.sizes());
  TORCH_CHECK_TYPE(sparse_attention_dtype_ok(q.scalar_type()), op,
                   ": q must be a floating tensor (float32, float64, float16 or bfloat16), got ", q.scalar_type());
  TORCH_CHECK_TYPE(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
                   ": q, k and v must have one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                   v.scalar_type());
  check_same_device(op, q, "q", k, "k");
  check_same_device(op, q, "q", v, "v");
  TORCH_CHECK_VALUE(q.size(2) == spec.seq_len(), op, ": q.shape[2] must equal text_len + image_size^2 = ",
                    spec.seq_len(), ", got ", q.size(2));
  check_head_dim(op, q.size(3), device, lim);
  check_scale(op, scale);
  return spec;
}

// The forward's arguments plus grad_out and out (q's shape and dtype) and lse (B, heads, N), floating.
inline MaskSpec check_sparse_attention_backward(const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
                                                const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
                                                std::string_view kind, int64_t text_len, int64_t image_size,
                                                int64_t conv_kernel, double scale, c10::DeviceType device) {
  constexpr const char* op = "_sparse_attention_backward";
  const MaskSpec spec = check_sparse_attention(op, q, k, v, kind, text_len, image_size, conv_kernel, scale, device);
  TORCH_CHECK_VALUE(grad_out.sizes() == q.sizes(), op, ": grad_out must have q's shape ", q.sizes(), ", got ",
                    grad_out.sizes());
  TORCH_CHECK_VALUE(out.sizes() == q.sizes(), op, ": out must have q's shape ", q.sizes(), ", got ", out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
                   ": grad_out and out must have q's dtype (", q.scalar_type(), "), got ", grad_out.scalar_type(),
                   " and ", out.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
                    op, ": lse must have shape (B, heads, N) = (", q.size(0), ", ", q.size(1), ", ", q.size(2),
                    "), got ", lse.sizes());
  TORCH_CHECK_TYPE(sparse_attention_dtype_ok(lse.scalar_type()), op, ": lse must be a floating tensor, got ",
                   lse.scalar_type());
  check_same_device(op, q, "q", grad_out, "grad_out");
  check_same_device(op, q, "q", out, "out");
  check_same_device(op, q, "q", lse, "lse");
  return spec;
}

// q (B, heads, 1, D); caches (B, heads, L, D) of q's dtype and device with L > position; position < N.
inline MaskSpec check_sparse_attention_decode(const at::Tensor& q, const at::Tensor& k_cache,
                                              const at::Tensor& v_cache, int64_t position, std::string_view kind,
                                              int64_t text_len, int64_t image_size, int64_t conv_kernel, double scale,
                                              c10::DeviceType device) {
  constexpr const char* op = "sparse_attention_decode";
  const SparseAttentionLimits lim = sparse_attention_limits(device);
  const MaskSpec spec = check_mask_spec(op, kind, text_len, image_size, conv_kernel, lim);
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(2) == 1, op, ": q must be (B, heads, 1, D), got shape ", q.sizes());
  TORCH_CHECK_VALUE(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
                    ": k_cache and v_cache must be 4-D caches (B, heads, L, D) of one shape, got ", k_cache.sizes(),
                    " and ", v_cache.sizes());
  TORCH_CHECK_VALUE(k_cache.size(0) == q.size(0) && k_cache.size(1) == q.size(1) && k_cache.size(3) == q.size(3), op,
                    ": the caches ", k_cache.sizes(), " must have q's batch, heads and head dim, q is ", q.sizes());
  TORCH_CHECK_TYPE(sparse_attention_dtype_ok(q.scalar_type()), op,
                   ": q must be a floating tensor (float32, float64, float16 or bfloat16), got ", q.scalar_type());
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type() && v_cache.scalar_type() == q.scalar_type(), op,
                   ": q, k_cache and v_cache must have one dtype, got ", q.scalar_type(), ", ", k_cache.scalar_type(),
                   ", ", v_cache.scalar_type());
  check_same_device(op, q, "q", k_cache, "k_cache");
  check_same_device(op, q, "q", v_cache, "v_cache");
  TORCH_CHECK_VALUE(position >= 0 && position < spec.seq_len(), op, ": position must be in [0, ", spec.seq_len(),
                    "), got ", position);
  TORCH_CHECK_VALUE(k_cache.size(2) > position, op, ": the caches hold ", k_cache.size(2), " positions, position ",
                    position, " is past their end");
  check_head_dim(op, q.size(3), device, lim);
  check_scale(op, scale);
  return spec;
}

}  // namespace dalle_fast
