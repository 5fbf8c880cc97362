// sparse_attention, _sparse_attention_backward and sparse_attention_decode on the CPU: the shared
// boundary (dalle_fast/sparse_attention_checks.h), the choice of tiles, and the registration. The
// kernels are in sparse_attention_cpu_{layout,tiles,bf16,decode}.cpp (see sparse_attention_cpu.h).
#include <torch/library.h>

#include <string_view>
#include <tuple>
#include <vector>

#include "dalle_fast/sparse_attention_checks.h"
#include "sparse_attention_cpu.h"

namespace dalle_fast {
namespace {
using namespace sparse_cpu;

at::ScalarType compute_type(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

std::tuple<at::Tensor, at::Tensor> sparse_attention_cpu(const at::Tensor& q_, const at::Tensor& k_,
                                                        const at::Tensor& v_, std::string_view kind, int64_t text_len,
                                                        int64_t image_size, int64_t conv_kernel, double scale) {
  const MaskSpec ms = check_sparse_attention("sparse_attention", q_, k_, v_, kind, text_len, image_size, conv_kernel,
                                             scale, c10::DeviceType::CPU);
  if (use_bf16_tiles(q_)) return forward_bf16(ms, q_, k_, v_, scale);
  // fp16 (and bf16 without bf16 GEMM units) runs in fp32 (upcast once): the tile GEMMs then take the
  // fp32 BLAS path.
  const auto ct = compute_type(q_.scalar_type());
  auto q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  auto out = at::empty_like(q);
  auto lse = at::empty({B, H, N}, q.options());  // fp32, or fp64 for fp64 inputs
  if (B * H > 0) forward_tiles(*get_layout(ms), q, k, v, out, lse, scale);
  return {out.to(q_.scalar_type()), lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> sparse_attention_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_,
    const at::Tensor& out_, const at::Tensor& lse_, std::string_view kind, int64_t text_len, int64_t image_size,
    int64_t conv_kernel, double scale) {
  const MaskSpec ms = check_sparse_attention_backward(grad_out, q_, k_, v_, out_, lse_, kind, text_len, image_size,
                                                      conv_kernel, scale, c10::DeviceType::CPU);
  if (use_bf16_tiles(q_)) return backward_bf16(ms, grad_out, q_, k_, v_, out_, lse_, scale);
  const auto ct = compute_type(q_.scalar_type());
  auto q = q_.to(ct).contiguous(), k = k_.to(ct).contiguous(), v = v_.to(ct).contiguous();
  auto o = out_.to(ct).contiguous(), dout = grad_out.to(ct).contiguous();
  auto lse = lse_.to(ct).contiguous();
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3), BH = B * H;
  auto dq = at::empty_like(q);
  if (BH == 0) return {dq.to(q_.scalar_type()), at::zeros_like(k_), at::zeros_like(v_)};
  auto L = get_layout(ms);
  const int64_t G = key_groups(BH, (int64_t)L->blocks.size());
  auto dk = at::zeros(G == 1 ? q.sizes().vec() : std::vector<int64_t>{BH * G, N, D}, q.options());
  auto dv = at::zeros_like(dk);
  backward_tiles(*L, dout, q, k, v, o, lse, dq, dk, dv, G, scale);
  if (G > 1) {
    dk = dk.view({B, H, G, N, D}).sum(2);
    dv = dv.view({B, H, G, N, D}).sum(2);
  }
  const auto st = q_.scalar_type();
  return {dq.to(st), dk.to(st), dv.to(st)};
}

// One query per (batch, head) at `position`: gathers exactly MaskSpec::allowed_count keys through
// allowed_key, reading the caches in place (any batch/head/sequence strides, unit stride in D). The
// op checks everything itself: the Python wrapper of a sampling step stays thin.
at::Tensor sparse_attention_decode_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                       int64_t position, std::string_view kind, int64_t text_len, int64_t image_size,
                                       int64_t conv_kernel, double scale) {
  const MaskSpec ms = check_sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size,
                                                    conv_kernel, scale, c10::DeviceType::CPU);
  return decode(ms, q, k_cache, v_cache, position, scale);
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CPU, m) {
  m.impl("sparse_attention", &dalle_fast::sparse_attention_cpu);
  m.impl("_sparse_attention_backward", &dalle_fast::sparse_attention_backward_cpu);
  m.impl("sparse_attention_decode", &dalle_fast::sparse_attention_decode_cpu);
}
