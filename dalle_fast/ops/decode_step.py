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


# ---------------------------------------------------------------- selftest
@torch.no_grad()
def selftest(device):
    """Rows (op, case, dtype, max_err, tol): ten fused steps of a small model with every mask kind
    against the float64 module path, the bar being twice the module path's own error in that dtype."""
    from ..models.dalle import DALLE, DALLEConfig
    from ..testing import low_precision_tolerance, max_abs_err
    cfg = DALLEConfig.tiny(depth=4, attention_kinds=["row", "column", "conv", "full"], text_len=5, image_size=4,
                           dim=64, heads=2, dim_head=32)
    torch.manual_seed(0)
    base = DALLE(cfg).eval()
    g = torch.Generator().manual_seed(1)
    text = torch.randint(1, cfg.num_text_tokens, (2, cfg.text_len), generator=g).to(device)
    image = torch.randint(0, cfg.num_image_tokens, (2, 10), generator=g).to(device)

    def steps(dtype, fused):
        m = DALLE(cfg)
        m.load_state_dict(base.state_dict())
        m = m.to(device=device, dtype=dtype).eval()
        caches = m.new_kv_caches(2)
        out = [m.prefill(text, caches)]
        out += [m.decode_step(image[:, j], j, caches, fused=fused) for j in range(image.shape[1])]
        return torch.stack(out, 1)

    ref64 = steps(torch.float64, False)
    rows = []
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        rows.append(("transformer_decode_step", "row,column,conv,full x10 B=2", dtype,
                     max_abs_err(steps(dtype, True), ref64), low_precision_tolerance(ref64, steps(dtype, False))))
    return rows
