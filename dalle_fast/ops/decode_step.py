"""transformer_decode_step: one cached sampling step of the whole DALL-E transformer in one op call
(csrc/decode_step.cpp). DALLE.decode_step uses it for the fused backend; its module path is the
reference. Inference only."""
import torch


def transformer_decode_step(tokens, index, params, k_caches, v_caches, kinds, text_len, image_size, conv_kernel,
                            heads, eps=1e-5, scale=None):
    """tokens (B,) = image token `index`; params in the order of DALLE.decode_params(); one (B, heads, L,
    dim_head) k and v cache per layer, written at text_len + index. Returns the fp32 logits (B, image
    vocab) of image token index + 1. The op checks its arguments (ValueError/TypeError)."""
    if scale is None:
        scale = k_caches[0].shape[-1] ** -0.5
    return torch.ops.dalle_fast.transformer_decode_step(tokens, index, params, k_caches, v_caches, kinds, text_len,
                                                        image_size, conv_kernel, heads, eps, scale)


@torch.library.register_fake("dalle_fast::transformer_decode_step")
def _(tokens, index, params, k_caches, v_caches, kinds, text_len, image_size, conv_kernel, heads, eps, scale):
    head_w = params[-2]
    dt = torch.promote_types(params[0].dtype, torch.float32)
    return head_w.new_empty((tokens.shape[0], head_w.shape[0]), dtype=dt)
