"""Dense masked softmax attention over DALL-E's row / column / conv / full masks: the truth.

Written for clarity: the (N, N) mask and scores are materialized, and everything runs in the
dtype of the inputs (tests run it in float64; run in fp16/bf16 it is "PyTorch's own error").
"""
import math

import torch

KINDS = ("full", "row", "column", "conv")


def attention_mask(kind, text_len, image_size, conv_kernel=11, device=None):
    """bool (N, N), N = text_len + image_size**2, True = query i may attend key j (see the issue)."""
    T, W = int(text_len), int(image_size)
    N = T + W * W
    i = torch.arange(N, device=device).view(N, 1)
    j = torch.arange(N, device=device).view(1, N)
    causal = j <= i
    p, q = (i - T).clamp(min=0), (j - T).clamp(min=0)
    if kind == "full":
        image = torch.ones_like(causal)
    elif kind == "row":
        image = q >= p - W
    elif kind == "column":
        image = (q % W) == (p % W)
    elif kind == "conv":
        h = (int(conv_kernel) - 1) // 2
        image = ((q // W) >= (p // W) - h) & ((q % W - p % W).abs() <= h)
    else:
        raise ValueError(f"attention_mask: kind must be one of {KINDS}, got {kind!r}")
    text = (i < T) | (j < T)  # text->text is plain causal; every image query sees every text key
    return causal & (text | image)


def sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel=11, scale=None, return_lse=False):
    """softmax(q k^T * scale + mask) v for q, k, v (B, heads, N, D), computed densely in q's dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    mask = attention_mask(kind, text_len, image_size, conv_kernel, device=q.device)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ v
    if return_lse:
        return out, torch.logsumexp(scores.float() if scores.dtype != torch.float64 else scores, dim=-1)
    return out


def sparse_attention_decode(q, k_cache, v_cache, position, kind, text_len, image_size, conv_kernel=11,
                            scale=None):
    """Row `position` of sparse_attention, from caches holding positions 0..position (and maybe more)."""
    N = text_len + image_size * image_size
    mask = attention_mask(kind, text_len, image_size, conv_kernel, device=q.device)[position]
    L = k_cache.shape[2]
    row = torch.zeros(L, dtype=torch.bool, device=q.device)
    row[:min(L, N)] = mask[:min(L, N)]
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k_cache.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~row, float("-inf"))
    return torch.softmax(scores, dim=-1) @ v_cache
