// One cached sampling step of the whole DALL-E transformer in a single op call.
//
// At batch 1 a sampling step is a few dozen small GEMVs, layer norms and adds: driven from Python
// through nn.Modules, the interpreter and module dispatch cost more than the arithmetic. This op
// runs the same computation as DALLE.decode_step's module path (dalle_fast/models/dalle.py, which
// is its reference and is tested against it) from C++: the image token's embedding, every layer's
// pre-norm attention branch (qkv projection, k/v written into the caches at the position, the
// layer's sparse_attention_decode through the dispatcher, so each device runs its own kernel) and
// MLP branch, the final norm and the fp32 image head. Composed of ATen ops, our decode op and, for a
// few rows on an AVX-512 CPU, our small-batch GEMV (cpu/linear_small_cpu.cpp), it is registered once
// for every backend (CompositeExplicitAutograd); it is inference only and refuses inputs that
// require grad. The branches run in their matrices' dtype, the residual stream in its own, so the
// paper's mixed precision (DALLE.cast_resblocks_) works unchanged.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cpu/linear_small_cpu.h"

namespace dalle_fast {
namespace {

constexpr int64_t kEmbedParams = 3;  // image_emb, image_row, image_col
constexpr int64_t kLayerParams = 11;  // see the schema in ops.cpp
constexpr int64_t kHeadParams = 4;   // final_norm weight, bias, to_image_logits weight, bias

at::Tensor sparse_attention_decode(const at::Tensor& q, const at::Tensor& kc, const at::Tensor& vc, int64_t position,
                                   const std::string& kind, int64_t text_len, int64_t image_size,
                                   int64_t conv_kernel, double scale) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("dalle_fast::sparse_attention_decode", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                         c10::string_view, int64_t, int64_t, int64_t, double)>();
  return op.call(q, kc, vc, position, kind, text_len, image_size, conv_kernel, scale);
}

// at::linear, except for a few fp32 or bf16 rows on an AVX-512 CPU: there linear_small streams the
// weights once at the memory's rate, where the BLAS/oneDNN GEMV paths cost up to twice as much.
at::Tensor step_linear(const at::Tensor& x, const at::Tensor& W, const std::optional<at::Tensor>& b = std::nullopt) {
  if (x.device().is_cpu() && x.scalar_type() == W.scalar_type() && x.size(0) <= 64 &&
      linear_small_available(x.scalar_type()))
    return linear_small(x, W, b);
  return at::linear(x, W, b);
}

at::Tensor transformer_decode_step(const at::Tensor& tokens, int64_t index, at::TensorList params,
                                   at::TensorList k_caches, at::TensorList v_caches,
                                   const std::vector<std::string>& kinds, int64_t text_len, int64_t image_size,
                                   int64_t conv_kernel, int64_t heads, double eps, double scale) {
  const int64_t L = (int64_t)kinds.size();
  TORCH_CHECK_VALUE(L >= 1, "transformer_decode_step: kinds must name at least one layer");
  TORCH_CHECK_VALUE((int64_t)params.size() == kEmbedParams + kLayerParams * L + kHeadParams,
                    "transformer_decode_step: expected ", kEmbedParams + kLayerParams * L + kHeadParams,
                    " parameters for ", L, " layers, got ", params.size());
  TORCH_CHECK_VALUE((int64_t)k_caches.size() == L && (int64_t)v_caches.size() == L,
                    "transformer_decode_step: need one k and one v cache per layer (", L, "), got ",
                    k_caches.size(), " and ", v_caches.size());
  TORCH_CHECK_VALUE(tokens.dim() == 1, "transformer_decode_step: tokens must be (B,), got ", tokens.sizes());
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt,
                   "transformer_decode_step: tokens must be integer ids, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(heads >= 1, "transformer_decode_step: heads must be >= 1, got ", heads);
  const int64_t M = image_size * image_size;
  TORCH_CHECK_VALUE(image_size >= 1 && index >= 0 && index < M, "transformer_decode_step: index must be in [0, ", M,
                    "), got ", index);
  if (at::GradMode::is_enabled()) {
    for (const auto& p : params) {
      TORCH_CHECK(!p.requires_grad(), "transformer_decode_step is inference only: call it under torch.no_grad() "
                  "(or torch.inference_mode())");
    }
  }
  const int64_t B = tokens.size(0), position = text_len + index;
  const auto& emb = params[0];
  TORCH_CHECK_VALUE(emb.dim() == 2, "transformer_decode_step: params[0] (image embedding) must be 2-D");
  const int64_t dim = emb.size(1);
  const int64_t W = image_size;

  // x = image_emb[token] + image_row[index / W] + image_col[index % W]: (B, dim)
  at::Tensor x = emb.index_select(0, tokens);
  x.add_(params[1].select(0, index / W)).add_(params[2].select(0, index % W));

  for (int64_t l = 0; l < L; ++l) {
    const at::Tensor* p = params.data() + kEmbedParams + kLayerParams * l;
    const at::Tensor &kc = k_caches[l], &vc = v_caches[l];
    TORCH_CHECK_VALUE(kc.dim() == 4 && kc.size(0) == B && kc.size(1) == heads && kc.size(2) > position,
                      "transformer_decode_step: layer ", l, "'s cache must be (B=", B, ", heads=", heads,
                      ", L > ", position, ", dim_head), got ", kc.sizes());
    const int64_t Dh = kc.size(3);
    // attention branch: x += to_out(attend(q, caches)), q/k/v from to_qkv(norm(x)); the branch runs in
    // its matrices' dtype (16-bit under DALLE.cast_resblocks_), the residual stream x in its own
    auto h = at::layer_norm(x, {dim}, p[0], p[1], eps).to(p[2].scalar_type());
    auto qkv = step_linear(h, p[2]).view({B, 3, heads, Dh});
    kc.select(2, position).copy_(qkv.select(1, 1));
    vc.select(2, position).copy_(qkv.select(1, 2));
    auto q = qkv.select(1, 0).unsqueeze(2).to(kc.scalar_type());  // (B, heads, 1, Dh)
    auto att = sparse_attention_decode(q, kc, vc, position, kinds[l], text_len, image_size, conv_kernel, scale);
    x.add_(step_linear(att.view({B, heads * Dh}).to(p[3].scalar_type()), p[3], p[4]));
    // MLP branch: x += fc2(gelu(fc1(norm(x))))
    h = step_linear(at::layer_norm(x, {dim}, p[5], p[6], eps).to(p[7].scalar_type()), p[7], p[8]);
    at::gelu_(h);
    x.add_(step_linear(h, p[9], p[10]));
  }

  // final norm and image head in fp32 (fp64 for a float64 model), as DALLE._logits
  const at::Tensor* p = params.data() + kEmbedParams + kLayerParams * L;
  const auto dt = at::promote_types(x.scalar_type(), at::kFloat);
  auto xf = at::layer_norm(x.to(dt), {dim}, p[0].to(dt), p[1].to(dt), eps);
  return step_linear(xf, p[2].to(dt), p[3].to(dt));
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CompositeExplicitAutograd, m) {
  m.impl("transformer_decode_step", &dalle_fast::transformer_decode_step);
}
