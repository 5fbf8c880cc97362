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
//
// The parameter list is unpacked into a DecodeStepParams (include/dalle_fast/decode_step_params.h,
// the one statement of its order) and every argument is checked before the first cache write: a
// bad call raises and leaves the caches as they were.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <cmath>
#include <string>
#include <vector>

#include "cpu/linear_small_cpu.h"
#include "dalle_fast/decode_step_params.h"
#include "dalle_fast/sparse_attention_checks.h"

namespace dalle_fast {
namespace {

using Params = DecodeStepParams<at::Tensor>;

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

// The one place the Tensor[] becomes named fields, in the order of decode_step_params.h.
Params unpack_params(at::TensorList params, int64_t depth) {
  TORCH_CHECK_VALUE((int64_t)params.size() == decode_param_count(depth), "transformer_decode_step: expected ",
                    decode_param_count(depth), " parameters for ", depth, " layers (",
                    "_build_decode_step_param_names(", depth, ")), got ", params.size());
  Params s;
  size_t i = 0;
#define DALLE_FAST_TAKE(field, name) s.field = params[i++];
  DALLE_FAST_DECODE_EMBED_PARAMS(DALLE_FAST_TAKE)
  s.layers.resize(depth);
  for (auto& layer : s.layers) {
#define DALLE_FAST_TAKE_LAYER(field, name) layer.field = params[i++];
    DALLE_FAST_DECODE_LAYER_PARAMS(DALLE_FAST_TAKE_LAYER)
#undef DALLE_FAST_TAKE_LAYER
  }
  DALLE_FAST_DECODE_HEAD_PARAMS(DALLE_FAST_TAKE)
#undef DALLE_FAST_TAKE
  return s;
}

// Every check of the op, before anything is written. Sizes the step needs are stored into s.
void check_args(Params& s, const at::Tensor& tokens, at::TensorList params, at::TensorList k_caches,
                at::TensorList v_caches) {
  // "params[14] (layers.0.mlp.fc1.weight)": found by identity, built only for an error message
  const auto which = [&](const at::Tensor& t) {
    const auto names = decode_param_names((int64_t)s.layers.size());
    for (size_t n = 0; n < params.size(); ++n)
      if (params[n].is_same(t)) return "params[" + std::to_string(n) + "] (" + names[n] + ")";
    return std::string("a parameter");
  };
  const int64_t L = (int64_t)s.layers.size();
  TORCH_CHECK_VALUE((int64_t)k_caches.size() == L && (int64_t)v_caches.size() == L,
                    "transformer_decode_step: need one k and one v cache per layer (", L, "), got ",
                    k_caches.size(), " and ", v_caches.size());
  TORCH_CHECK_VALUE(tokens.dim() == 1, "transformer_decode_step: tokens must be (B,), got ", tokens.sizes());
  TORCH_CHECK_TYPE(tokens.scalar_type() == at::kLong || tokens.scalar_type() == at::kInt,
                   "transformer_decode_step: tokens must be integer ids, got ", tokens.scalar_type());
  TORCH_CHECK_VALUE(s.heads >= 1, "transformer_decode_step: heads must be >= 1, got ", s.heads);
  TORCH_CHECK_VALUE(s.text_len >= 0, "transformer_decode_step: text_len must be >= 0, got ", s.text_len);
  TORCH_CHECK_VALUE(s.image_size >= 1 && s.image_size <= (1 << 15),
                    "transformer_decode_step: image_size must be in [1, 32768], got ", s.image_size);
  const int64_t M = s.image_size * s.image_size;
  TORCH_CHECK_VALUE(s.index >= 0 && s.index < M, "transformer_decode_step: index must be in [0, ", M, "), got ",
                    s.index);
  TORCH_CHECK_VALUE(std::isfinite(s.eps) && s.eps >= 0, "transformer_decode_step: eps must be finite and >= 0, got ",
                    s.eps);
  s.batch = tokens.size(0);

  // every parameter: defined, floating, on the tokens' device, not requiring grad, of its shape
  const bool grad = at::GradMode::is_enabled();
  auto check = [&](const at::Tensor& t, std::initializer_list<int64_t> shape, const at::Tensor* same_dtype) {
    TORCH_CHECK_VALUE(t.defined(), "transformer_decode_step: ", which(t), " is undefined");
    TORCH_CHECK_TYPE(at::isFloatingType(t.scalar_type()), "transformer_decode_step: ", which(t),
                     " must be floating, got ", t.scalar_type());
    TORCH_CHECK_VALUE(t.device() == tokens.device(), "transformer_decode_step: ", which(t),
                      " is on ", t.device(), ", tokens on ", tokens.device());
    TORCH_CHECK(!(grad && t.requires_grad()), "transformer_decode_step is inference only: call it under "
                "torch.no_grad() (or torch.inference_mode()); ", which(t), " requires grad");
    TORCH_CHECK_VALUE(t.sizes() == at::IntArrayRef(shape), "transformer_decode_step: ", which(t),
                      " must have shape ", at::IntArrayRef(shape), ", got ", t.sizes());
    TORCH_CHECK_TYPE(!same_dtype || t.scalar_type() == same_dtype->scalar_type(), "transformer_decode_step: ",
                     which(t), " must be ", same_dtype->scalar_type(), " like the tensor it meets, got ",
                     t.scalar_type());
  };
  TORCH_CHECK_VALUE(s.image_emb.defined() && s.image_emb.dim() == 2,
                    "transformer_decode_step: ", which(s.image_emb), " must be 2-D (image vocab, dim)");
  const int64_t V = s.image_emb.size(0), dim = s.dim = s.image_emb.size(1);
  // the residual stream has the embedding's dtype; its norms must match it, each branch is one dtype
  const at::Tensor& res = s.image_emb;
  check(s.image_emb, {V, dim}, nullptr);
  check(s.image_row, {s.image_size, dim}, &res);
  check(s.image_col, {s.image_size, dim}, &res);
  for (int64_t l = 0; l < L; ++l) {
    auto& p = s.layers[l];
    const at::Tensor &kc = k_caches[l], &vc = v_caches[l];
    TORCH_CHECK_VALUE(kc.defined() && vc.defined() && kc.dim() == 4 && kc.sizes() == vc.sizes() &&
                          kc.size(0) == s.batch && kc.size(1) == s.heads && kc.size(2) > s.position() &&
                          kc.size(3) >= 1,
                      "transformer_decode_step: layer ", l, "'s caches must be (B=", s.batch, ", heads=", s.heads,
                      ", L > ", s.position(), ", dim_head), got ", kc.defined() ? kc.sizes() : at::IntArrayRef{},
                      " and ", vc.defined() ? vc.sizes() : at::IntArrayRef{});
    TORCH_CHECK_TYPE(at::isFloatingType(kc.scalar_type()) && vc.scalar_type() == kc.scalar_type(),
                     "transformer_decode_step: layer ", l, "'s caches must share one floating dtype, got ",
                     kc.scalar_type(), " and ", vc.scalar_type());
    TORCH_CHECK_VALUE(kc.device() == tokens.device() && vc.device() == tokens.device(), "transformer_decode_step: "
                      "layer ", l, "'s caches are on ", kc.device(), " and ", vc.device(), ", tokens on ",
                      tokens.device());
    const int64_t Dh = kc.size(3), inner = s.heads * Dh;
    if (l == 0) s.dim_head = Dh;
    TORCH_CHECK_VALUE(Dh == s.dim_head, "transformer_decode_step: layer ", l, "'s caches have dim_head ", Dh,
                      ", layer 0's ", s.dim_head);
    // the layer's sparse_attention_decode call through that op's own boundary for this device (kind,
    // conv_kernel, scale, head dim limits), with the query the step will build: q (B, heads, 1, Dh)
    check_sparse_attention_decode(at::empty({1}, kc.options()).expand({s.batch, s.heads, 1, Dh}), kc, vc,
                                  s.position(), s.kinds[l], s.text_len, s.image_size, s.conv_kernel, s.scale,
                                  kc.device().type());
    check(p.attn_norm_weight, {dim}, &res);
    check(p.attn_norm_bias, {dim}, &res);
    check(p.qkv_weight, {3 * inner, dim}, nullptr);
    check(p.out_weight, {dim, inner}, nullptr);
    check(p.out_bias, {dim}, &p.out_weight);
    check(p.mlp_norm_weight, {dim}, &res);
    check(p.mlp_norm_bias, {dim}, &res);
    TORCH_CHECK_VALUE(p.fc1_weight.defined() && p.fc1_weight.dim() == 2, "transformer_decode_step: ",
                      which(p.fc1_weight), " must be 2-D (hidden, dim)");
    const int64_t hidden = p.fc1_weight.size(0);
    check(p.fc1_weight, {hidden, dim}, nullptr);
    check(p.fc1_bias, {hidden}, &p.fc1_weight);
    check(p.fc2_weight, {dim, hidden}, &p.fc1_weight);  // fc2 reads gelu(fc1(.)) in fc1's dtype
    check(p.fc2_bias, {dim}, &p.fc1_weight);
  }
  check(s.final_norm_weight, {dim}, nullptr);
  check(s.final_norm_bias, {dim}, nullptr);
  TORCH_CHECK_VALUE(s.head_weight.defined() && s.head_weight.dim() == 2, "transformer_decode_step: ",
                    which(s.head_weight), " must be 2-D (image vocab, dim)");
  check(s.head_weight, {s.head_weight.size(0), dim}, nullptr);
  check(s.head_bias, {s.head_weight.size(0)}, nullptr);

  // token ids in [0, V): read directly on the CPU; on a GPU an asynchronous assert (no host sync)
  if (tokens.numel() == 0) return;
  if (tokens.device().is_cpu()) {
    const auto t = tokens.to(at::kLong).contiguous();
    const int64_t* d = t.const_data_ptr<int64_t>();
    for (int64_t b = 0; b < t.numel(); ++b)
      TORCH_CHECK_VALUE(d[b] >= 0 && d[b] < V, "transformer_decode_step: tokens must be in [0, ", V,
                        ") (the image vocabulary), got ", d[b], " at ", b);
  } else {
    at::_assert_async(at::logical_and(tokens.ge(0), tokens.lt(V)).all(),
                      "transformer_decode_step: tokens must be in [0, image vocabulary)");
  }
}

at::Tensor decode_step(const Params& s, const at::Tensor& tokens, at::TensorList k_caches, at::TensorList v_caches) {
  const int64_t B = s.batch, dim = s.dim, Dh = s.dim_head, W = s.image_size, position = s.position();
  // x = image_emb[token] + image_row[index / W] + image_col[index % W]: (B, dim)
  at::Tensor x = s.image_emb.index_select(0, tokens);
  x.add_(s.image_row.select(0, s.index / W)).add_(s.image_col.select(0, s.index % W));

  for (size_t l = 0; l < s.layers.size(); ++l) {
    const auto& p = s.layers[l];
    const at::Tensor &kc = k_caches[l], &vc = v_caches[l];
    // attention branch: x += to_out(attend(q, caches)), q/k/v from to_qkv(norm(x)); the branch runs in
    // its matrices' dtype (16-bit under DALLE.cast_resblocks_), the residual stream x in its own
    auto h = at::layer_norm(x, {dim}, p.attn_norm_weight, p.attn_norm_bias, s.eps).to(p.qkv_weight.scalar_type());
    auto qkv = step_linear(h, p.qkv_weight).view({B, 3, s.heads, Dh});
    kc.select(2, position).copy_(qkv.select(1, 1));
    vc.select(2, position).copy_(qkv.select(1, 2));
    auto q = qkv.select(1, 0).unsqueeze(2).to(kc.scalar_type());  // (B, heads, 1, Dh)
    auto att = sparse_attention_decode(q, kc, vc, position, s.kinds[l], s.text_len, s.image_size, s.conv_kernel,
                                       s.scale);
    x.add_(step_linear(att.view({B, s.heads * Dh}).to(p.out_weight.scalar_type()), p.out_weight, p.out_bias));
    // MLP branch: x += fc2(gelu(fc1(norm(x))))
    h = step_linear(at::layer_norm(x, {dim}, p.mlp_norm_weight, p.mlp_norm_bias, s.eps).to(p.fc1_weight.scalar_type()),
                    p.fc1_weight, p.fc1_bias);
    at::gelu_(h);
    x.add_(step_linear(h, p.fc2_weight, p.fc2_bias));
  }

  // final norm and image head in fp32 (fp64 for a float64 model), as DALLE._logits
  const auto dt = at::promote_types(x.scalar_type(), at::kFloat);
  auto xf = at::layer_norm(x.to(dt), {dim}, s.final_norm_weight.to(dt), s.final_norm_bias.to(dt), s.eps);
  return step_linear(xf, s.head_weight.to(dt), s.head_bias.to(dt));
}

at::Tensor transformer_decode_step(const at::Tensor& tokens, int64_t index, at::TensorList params,
                                   at::TensorList k_caches, at::TensorList v_caches,
                                   const std::vector<std::string>& kinds, int64_t text_len, int64_t image_size,
                                   int64_t conv_kernel, int64_t heads, double eps, double scale) {
  const int64_t L = (int64_t)kinds.size();
  TORCH_CHECK_VALUE(L >= 1, "transformer_decode_step: kinds must name at least one layer");
  Params s = unpack_params(params, L);
  s.kinds = kinds;
  s.index = index;
  s.text_len = text_len;
  s.image_size = image_size;
  s.conv_kernel = conv_kernel;
  s.heads = heads;
  s.eps = eps;
  s.scale = scale;
  check_args(s, tokens, params, k_caches, v_caches);
  return decode_step(s, tokens, k_caches, v_caches);
}

std::vector<std::string> param_names(int64_t depth) {
  TORCH_CHECK_VALUE(depth >= 1, "_build_decode_step_param_names: depth must be >= 1, got ", depth);
  return decode_param_names(depth);
}

}  // namespace
}  // namespace dalle_fast

TORCH_LIBRARY_IMPL(dalle_fast, CompositeExplicitAutograd, m) {
  m.impl("transformer_decode_step", &dalle_fast::transformer_decode_step);
}

TORCH_LIBRARY_IMPL(dalle_fast, CompositeImplicitAutograd, m) {
  m.impl("_build_decode_step_param_names", &dalle_fast::param_names);
}
