// The parameters of transformer_decode_step (csrc/decode_step.cpp): the single statement of their order.
//
// The op receives them as one Tensor[] (a schema cannot take a struct); decode_step.cpp unpacks that
// list into DecodeStepParams in one function, field by field in the order below, and the op
// _build_decode_step_param_names(depth) returns the same order as names, from which Python
// (dalle_fast.ops.decode_step.param_names, DALLE.decode_params) builds the list. Each name is the
// parameter's key in DALLE's state_dict, so the model fills the list by name and an error can say
// which tensor is wrong. No ATen here: the struct is a template over the tensor handle.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

// X(field, state_dict key): the image token's embedding (read at the token, its row and its column)
#define DALLE_FAST_DECODE_EMBED_PARAMS(X) \
  X(image_emb, "image_emb.weight")        \
  X(image_row, "image_row.weight")        \
  X(image_col, "image_col.weight")

// per layer l, under "layers.<l>.": the pre-norm attention branch, then the pre-norm MLP branch
#define DALLE_FAST_DECODE_LAYER_PARAMS(X)     \
  X(attn_norm_weight, "attn.norm.weight")     \
  X(attn_norm_bias, "attn.norm.bias")         \
  X(qkv_weight, "attn.attn.to_qkv.weight")    \
  X(out_weight, "attn.attn.to_out.weight")    \
  X(out_bias, "attn.attn.to_out.bias")        \
  X(mlp_norm_weight, "mlp.norm.weight")       \
  X(mlp_norm_bias, "mlp.norm.bias")           \
  X(fc1_weight, "mlp.fc1.weight")             \
  X(fc1_bias, "mlp.fc1.bias")                 \
  X(fc2_weight, "mlp.fc2.weight")             \
  X(fc2_bias, "mlp.fc2.bias")

// the final norm and the image head
#define DALLE_FAST_DECODE_HEAD_PARAMS(X)        \
  X(final_norm_weight, "final_norm.weight")     \
  X(final_norm_bias, "final_norm.bias")         \
  X(head_weight, "to_image_logits.weight")      \
  X(head_bias, "to_image_logits.bias")

namespace dalle_fast {

#define DALLE_FAST_DECODE_FIELD(field, name) Tensor field;
#define DALLE_FAST_DECODE_COUNT(field, name) +1

template <class Tensor>
struct DecodeLayerParams {
  DALLE_FAST_DECODE_LAYER_PARAMS(DALLE_FAST_DECODE_FIELD)
};

// Everything one step reads besides the token ids and the caches, with the sizes the checks derived.
template <class Tensor>
struct DecodeStepParams {
  DALLE_FAST_DECODE_EMBED_PARAMS(DALLE_FAST_DECODE_FIELD)
  std::vector<DecodeLayerParams<Tensor>> layers;
  DALLE_FAST_DECODE_HEAD_PARAMS(DALLE_FAST_DECODE_FIELD)
  std::vector<std::string> kinds;  // one mask kind per layer
  int64_t index = 0;               // image token index; its sequence position is text_len + index
  int64_t text_len = 0, image_size = 0, conv_kernel = 0, heads = 0;
  double eps = 0, scale = 0;
  int64_t batch = 0, dim = 0, dim_head = 0;  // derived: tokens (B,), image_emb (V, dim), caches' last size

  int64_t position() const { return text_len + index; }
};

inline constexpr int64_t kDecodeEmbedParams = 0 DALLE_FAST_DECODE_EMBED_PARAMS(DALLE_FAST_DECODE_COUNT);
inline constexpr int64_t kDecodeLayerParams = 0 DALLE_FAST_DECODE_LAYER_PARAMS(DALLE_FAST_DECODE_COUNT);
inline constexpr int64_t kDecodeHeadParams = 0 DALLE_FAST_DECODE_HEAD_PARAMS(DALLE_FAST_DECODE_COUNT);

inline int64_t decode_param_count(int64_t depth) {
  return kDecodeEmbedParams + kDecodeLayerParams * depth + kDecodeHeadParams;
}

// The names of the params list for a model of `depth` layers, in order.
inline std::vector<std::string> decode_param_names(int64_t depth) {
  std::vector<std::string> names;
  names.reserve(decode_param_count(depth));
#define DALLE_FAST_DECODE_NAME(field, name) names.emplace_back(name);
  DALLE_FAST_DECODE_EMBED_PARAMS(DALLE_FAST_DECODE_NAME)
  for (int64_t l = 0; l < depth; ++l) {
    const std::string prefix = "layers." + std::to_string(l) + ".";
#define DALLE_FAST_DECODE_LAYER_NAME(field, name) names.emplace_back(prefix + name);
    DALLE_FAST_DECODE_LAYER_PARAMS(DALLE_FAST_DECODE_LAYER_NAME)
#undef DALLE_FAST_DECODE_LAYER_NAME
  }
  DALLE_FAST_DECODE_HEAD_PARAMS(DALLE_FAST_DECODE_NAME)
#undef DALLE_FAST_DECODE_NAME
  return names;
}

#undef DALLE_FAST_DECODE_FIELD
#undef DALLE_FAST_DECODE_COUNT

}  // namespace dalle_fast
