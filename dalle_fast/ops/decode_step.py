"""transformer_decode_step: one cached sampling step of the whole DALL-E transformer in one op call
(csrc/decode_step.cpp). DALLE.decode_step uses it for the fused backend; its module path is the
reference. Inference only. The parameters go in as one list whose order the op states itself
(param_names), so the model fills it by name."""
import functools

import torch


@functools.lru_cache(maxsize=None)
def param_names(depth):
    """The names of the op's params for `depth` layers, in order: DALLE state_dict keys, from the op
    (the order is stated once, in csrc/include/dalle_fast/decode_step_params.h)."""
    return tuple(torch.ops.dalle_fast._build_decode_step_param_names(depth))


def transformer_decode_step(tokens, index, params, k_caches, v_caches, kinds, text_len, image_size, conv_kernel,
                            heads, eps=1e-5, scale=None):
    """One cached sampling step of the whole transformer. The op checks every argument before it writes
    (ValueError/TypeError).

    Args:
        tokens: (B,) image token `index`.
        index: its position among the image tokens.
        params: tensors in the order of param_names(len(kinds)).
        k_caches, v_caches: one (B, heads, L, dim_head) cache per layer, written at text_len + index.
        kinds: each layer's mask kind.
        text_len, image_size, conv_kernel, heads, eps, scale: the model's geometry, LayerNorm eps and the
            attention scale (default 1/sqrt(dim_head)).
    Returns:
        The fp32 logits (B, image vocab) of image token index + 1.
    """
    if scale is None:
        scale = k_caches[0].shape[-1] ** -0.5
    return torch.ops.dalle_fast.transformer_decode_step(tokens, index, params, k_caches, v_caches, kinds, text_len,
                                                        image_size, conv_kernel, heads, eps, scale)


@torch.library.register_fake("dalle_fast::transformer_decode_step")
def _(tokens, index, params, k_caches, v_caches, kinds, text_len, image_size, conv_kernel, heads, eps, scale):
    torch._check(len(params) == len(param_names(max(len(kinds), 1))) and len(kinds) >= 1,
                 lambda: f"transformer_decode_step: expected {len(param_names(max(len(kinds), 1)))} parameters for "
                         f"{len(kinds)} layers, got {len(params)}")
    torch._check(tokens.dim() == 1, lambda: f"transformer_decode_step: tokens must be (B,), got {tuple(tokens.shape)}")
    # a tensor on another device can route the whole call here (a meta parameter dispatches to Meta)
    names = param_names(len(kinds))
    for i, t in enumerate(list(params) + list(k_caches) + list(v_caches)):
        if t.device != tokens.device:
            what = f"params[{i}] ({names[i]})" if i < len(params) else "a cache"
            raise ValueError(f"transformer_decode_step: {what} is on {t.device}, tokens on {tokens.device}")
    head_w = params[-2]
    dt = torch.promote_types(params[0].dtype, torch.float32)
    return head_w.new_empty((tokens.shape[0], head_w.shape[0]), dtype=dt)
