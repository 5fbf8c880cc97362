"""SparseSelfAttention: qkv projection, DALL-E's masked attention, output projection; KV cache for sampling.

Backends compute the same function:
  "fused" (default): dalle_fast.sparse_attention (block-sparse kernels) and sparse_attention_decode;
  "flex":  torch.nn.attention.flex_attention with the equivalent BlockMask (compiled on first use);
  "dense": scaled_dot_product_attention with the dense bool mask.
"flex" and "dense" are the baselines; both decode through SDPA over the cached prefix, and "flex"
trains through "dense" on the CPU, where FlexAttention has no backward.

DALLE_FAST_ATTENTION_BACKEND=flex|dense (read when a module is built) replaces the fused backend
wherever it is asked for, by default or by a saved config: the way around a fused kernel that fails
`python -m dalle_fast.selftest` on some GPU. "fused" or unset changes nothing.
"""
import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.sparse_attention import KINDS, attention_mask, sparse_attention, sparse_attention_decode

BACKENDS = ("fused", "flex", "dense")
BACKEND_ENV = "DALLE_FAST_ATTENTION_BACKEND"


def resolve_backend(backend="fused"):
    """The backend a module asking for `backend` gets.

    Args:
        backend: 'fused', 'flex' or 'dense'.
    Returns:
        The backend to run: 'fused' is replaced by the environment's DALLE_FAST_ATTENTION_BACKEND when
        that is set; flex and dense are kept.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    env = os.environ.get(BACKEND_ENV, "").strip()
    if not env:
        return backend
    if env not in BACKENDS:
        raise ValueError(f"{BACKEND_ENV} must be one of {', '.join(BACKENDS)} (or unset), got {env!r}")
    return env if backend == "fused" else backend


class KVCache:
    """Preallocated keys and values of one attention layer: .k, .v (batch, heads, max_len, dim_head).

    Args:
        batch, heads, max_len, dim_head: the cache's shape.
        dtype: the cached keys' and values' dtype.
        device: where the cache lives.
    """

    def __init__(self, batch, heads, max_len, dim_head, dtype=torch.float32, device=None):
        shape = (batch, heads, max_len, dim_head)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)

    @property
    def max_len(self):
        return self.k.shape[2]

    def write(self, start, k, v):
        """Stores k, v (batch, heads, n, dim_head) at positions start .. start + n - 1.

        Args:
            start: first position written.
            k, v: (batch, heads, n, dim_head) keys and values.
        """
        n = k.shape[2]
        if start < 0 or start + n > self.max_len:
            raise ValueError(f"KVCache: positions {start}..{start + n - 1} outside [0, {self.max_len})")
        self.k[:, :, start:start + n] = k
        self.v[:, :, start:start + n] = v


@functools.lru_cache(maxsize=32)
def _dense_mask(kind, text_len, image_size, conv_kernel, device):
    return attention_mask(kind, text_len, image_size, conv_kernel, device=device)


@functools.lru_cache(maxsize=32)
def _flex_block_mask(kind, text_len, image_size, conv_kernel, device):
    from torch.nn.attention.flex_attention import create_block_mask
    mask = _dense_mask(kind, text_len, image_size, conv_kernel, device)
    N = mask.shape[0]
    return create_block_mask(lambda b, h, q_idx, kv_idx: mask[q_idx, kv_idx], None, None, N, N, device=device)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention
    return torch.compile(flex_attention, dynamic=False)


def flex_sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel=11, scale=None):
    """FlexAttention with the BlockMask equivalent to attention_mask (the torch.compile'd kernel)."""
    bm = _flex_block_mask(kind, text_len, image_size, conv_kernel, str(q.device))
    return _compiled_flex()(q, k, v, block_mask=bm, scale=scale)


def dense_sparse_attention(q, k, v, kind, text_len, image_size, conv_kernel=11, scale=None):
    """scaled_dot_product_attention with the dense bool mask."""
    mask = _dense_mask(kind, text_len, image_size, conv_kernel, str(q.device))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


class SparseSelfAttention(nn.Module):
    """Multi-head self-attention over text_len text tokens then an image_size^2 grid, masked as `kind`.
    No residual and no norm: the caller owns both.

    Args:
        dim: model width (input and output features).
        heads: number of heads.
        kind: 'row', 'column', 'conv' or 'full' (dalle_fast.attention_mask).
        text_len: text tokens before the image.
        image_size: image tokens per side.
        dim_head: features per head.
        conv_kernel: odd kernel size of the 'conv' mask.
        backend: 'fused' (dalle_fast's kernels), 'flex' (FlexAttention) or 'dense' (SDPA with the dense mask);
            it goes through resolve_backend, so DALLE_FAST_ATTENTION_BACKEND overrides 'fused'.
        dropout: applied to the output projection (the fused kernels have no attention-probability dropout).
    """

    def __init__(self, dim, heads, kind, text_len, image_size, dim_head=64, conv_kernel=11, backend="fused",
                 dropout=0.0):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"SparseSelfAttention: kind must be one of {KINDS}, got {kind!r}")
        if backend not in BACKENDS:
            raise ValueError(f"SparseSelfAttention: backend must be one of {BACKENDS}, got {backend!r}")
        backend = resolve_backend(backend)
        self.dim, self.heads, self.dim_head = dim, heads, dim_head
        self.kind, self.text_len, self.image_size, self.conv_kernel = kind, text_len, image_size, conv_kernel
        self.backend = backend
        self.seq_len = text_len + image_size * image_size
        self.scale = dim_head ** -0.5
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)
        self.dropout = nn.Dropout(dropout)

    def extra_repr(self):
        """The module's settings, shown by print(module).

        Returns:
            A one-line string.
        """
        return (f"dim={self.dim}, heads={self.heads}, dim_head={self.dim_head}, kind={self.kind!r}, "
                f"text_len={self.text_len}, image_size={self.image_size}, backend={self.backend!r}")

    def _qkv(self, x):
        B, n, _ = x.shape
        qkv = self.to_qkv(x.to(self.to_qkv.weight.dtype))  # the branch's dtype (DALLE.cast_resblocks_)
        qkv = qkv.view(B, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        return qkv[0], qkv[1], qkv[2]  # (B, heads, n, dim_head) each, views of one buffer

    def _merge(self, out):
        B, H, n, Dh = out.shape
        return self.dropout(self.to_out(out.transpose(1, 2).reshape(B, n, H * Dh)))

    def _attend(self, q, k, v):
        args = (self.kind, self.text_len, self.image_size, self.conv_kernel, self.scale)
        if self.backend == "fused":
            return sparse_attention(q, k, v, *args)
        if self.backend == "flex":
            if q.device.type == "cpu" and torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
                _warn_once("SparseSelfAttention(backend='flex'): FlexAttention has no backward on the CPU; "
                           "using the dense backend for this differentiable call")
                return dense_sparse_attention(q, k, v, *args)
            return flex_sparse_attention(q, k, v, *args)
        return dense_sparse_attention(q, k, v, *args)

    def forward(self, x, kv_cache=None, position=None):
        """The prefix of length n, or one token through the KV cache.

        Args:
            x: (B, n, dim), n <= seq_len: the first n tokens; or (B, 1, dim), the token at `position`.
            kv_cache: a KVCache; the k/v of positions 0..n-1 (or of `position`) are written into it.
            position: None, or the index p of the single token in x; it attends through kv_cache.
        Returns:
            (B, n, dim): the first n rows of the full computation; or (B, 1, dim) at `position`.
        """
        if x.dim() != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"SparseSelfAttention: x must be (B, n, {self.dim}), got {tuple(x.shape)}")
        if position is not None:
            return self._decode(x, kv_cache, position)
        B, n, _ = x.shape
        if not 1 <= n <= self.seq_len:
            raise ValueError(f"SparseSelfAttention: sequence length {n} must be in [1, {self.seq_len}]")
        q, k, v = self._qkv(x)
        if kv_cache is not None:
            kv_cache.write(0, k, v)
        if n < self.seq_len:  # every mask is causal: padding past n leaves rows 0..n-1 unchanged
            pad = (0, 0, 0, self.seq_len - n)
            q, k, v = F.pad(q, pad), F.pad(k, pad), F.pad(v, pad)
        out = self._attend(q, k, v)[:, :, :n]
        return self._merge(out)

    def _decode(self, x, kv_cache, position):
        if kv_cache is None:
            raise ValueError("SparseSelfAttention: decoding at a position needs kv_cache")
        if x.shape[1] != 1:
            raise ValueError(f"SparseSelfAttention: decoding takes one token per sequence, got x {tuple(x.shape)}")
        if not 0 <= position < min(self.seq_len, kv_cache.max_len):
            raise ValueError(f"SparseSelfAttention: position {position} outside [0, {self.seq_len})")
        q, k, v = self._qkv(x)
        kv_cache.write(position, k, v)
        args = (self.kind, self.text_len, self.image_size, self.conv_kernel, self.scale)
        if self.backend == "fused":
            out = sparse_attention_decode(q, kv_cache.k, kv_cache.v, position, *args)
        else:
            row = _dense_mask(*args[:4], str(x.device))[position, :position + 1]
            out = F.scaled_dot_product_attention(q, kv_cache.k[:, :, :position + 1], kv_cache.v[:, :, :position + 1],
                                                 attn_mask=row.view(1, -1), scale=self.scale)
        return self._merge(out)


_warned = set()


def _warn_once(msg):
    if msg not in _warned:
        _warned.add(msg)
        warnings.warn(msg, stacklevel=3)
