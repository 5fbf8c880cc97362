#!/usr/bin/env python
"""Drop dalle_fast's block-sparse attention into a plain PyTorch decoder-only transformer.

The model below is ordinary PyTorch: pre-norm blocks, causal attention through
scaled_dot_product_attention, an MLP. `use_sparse_attention` swaps each block's attention for
dalle_fast.nn.SparseSelfAttention with DALL-E's masks (row, column, ..., conv over the image grid,
full causal attention over the text), keeping the projection weights. Nothing else changes.

    python examples/sparse_attention_transformer.py                     # dim 256, 64 text + 32x32 image tokens
    python examples/sparse_attention_transformer.py --dim 64 --depth 2 --text-len 16 --image-size 8 --steps 2

It checks that kind="full" reproduces the original causal attention exactly, then times a training
step (forward + backward + AdamW) of the original and the sparse model and prints the speedup.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

import dalle_fast
from dalle_fast.nn import SparseSelfAttention


class CausalSelfAttention(nn.Module):
    """What a decoder-only transformer usually has: one qkv projection, causal SDPA, an output projection."""

    def __init__(self, dim, heads, dim_head=64):
        super().__init__()
        self.heads, self.dim_head = heads, dim_head
        self.to_qkv = nn.Linear(dim, 3 * heads * dim_head, bias=False)
        self.to_out = nn.Linear(heads * dim_head, dim)

    def forward(self, x):
        B, n, _ = x.shape
        q, k, v = self.to_qkv(x).view(B, n, 3, self.heads, self.dim_head).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.to_out(out.transpose(1, 2).reshape(B, n, -1))


class Block(nn.Module):
    def __init__(self, dim, heads):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = CausalSelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class DecoderOnly(nn.Module):
    def __init__(self, vocab, seq_len, dim, depth, heads):
        super().__init__()
        self.emb, self.pos = nn.Embedding(vocab, dim), nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.ModuleList(Block(dim, heads) for _ in range(depth))
        self.head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, vocab))

    def forward(self, tokens):
        x = self.emb(tokens) + self.pos[:tokens.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(x)


def use_sparse_attention(model, text_len, image_size, kinds=None):
    """Replace every block's attention with SparseSelfAttention, copying the projections.
    kinds: one mask per block; default DALL-E's schedule (dalle_fast.attention_schedule)."""
    kinds = kinds or dalle_fast.attention_schedule(len(model.blocks))
    for block, kind in zip(model.blocks, kinds):
        old = block.attn
        new = SparseSelfAttention(old.to_qkv.in_features, old.heads, kind, text_len, image_size,
                                  dim_head=old.dim_head)
        new.load_state_dict(old.state_dict())  # same parameter names and shapes: to_qkv, to_out
        block.attn = new
    return model


def step_time(model, tokens, steps):
    """Seconds per training step (forward, backward, AdamW), the mean of `steps` runs after one warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        logits = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).timeit(steps).median


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--image-size", type=int, default=32, help="image tokens per side")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    seq_len, vocab = a.text_len + a.image_size ** 2, 1024
    heads = max(1, a.dim // 64)
    plain = DecoderOnly(vocab, seq_len, a.dim, a.depth, heads)
    tokens = torch.randint(0, vocab, (a.batch, seq_len + 1))

    # kind="full" is causal attention: the swapped model computes exactly what the original did
    full = use_sparse_attention(DecoderOnly(vocab, seq_len, a.dim, a.depth, heads), a.text_len, a.image_size,
                                kinds=["full"] * a.depth)
    full.load_state_dict(plain.state_dict())
    with torch.no_grad():
        err = (full(tokens[:, :-1]) - plain(tokens[:, :-1])).abs().max().item()
    print(f"kind='full' against the original causal attention: max |difference| {err:.2e}")
    assert err < 1e-4, err

    sparse = use_sparse_attention(DecoderOnly(vocab, seq_len, a.dim, a.depth, heads), a.text_len, a.image_size)
    sparse.load_state_dict(plain.state_dict())
    print("schedule:", [b.attn.kind for b in sparse.blocks])
    t_plain = step_time(plain, tokens, a.steps)
    t_sparse = step_time(sparse, tokens, a.steps)
    print(f"training step, {a.threads} thread(s), dim {a.dim}, depth {a.depth}, {seq_len} tokens: "
          f"causal SDPA {1e3 * t_plain:.1f} ms, dalle_fast sparse {1e3 * t_sparse:.1f} ms, "
          f"speedup {t_plain / t_sparse:.2f}x")
    return t_plain / t_sparse


if __name__ == "__main__":
    main()
