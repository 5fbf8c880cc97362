"""A small, efficient U-Net for pixel-space diffusion (Imagen's Efficient U-Net, scaled down).

- more residual blocks at low resolution than at high (res_blocks per level, e.g. (1, 2, 3)): the
  cheap levels get the capacity;
- the long skip connections scaled by 1/sqrt(2) before concatenation;
- timestep embedding (sinusoidal + MLP), plus the pooled condition added to it (FiLM scale/shift
  in every residual block);
- cross-attention to the condition tokens at the levels in attn_levels (and the middle): text
  tokens of a frozen encoder (Imagen) or an image embedding projected into `embed_tokens` tokens
  (unCLIP); the tokens are layer-normalised first (Imagen found this helped);
- classifier-free guidance: `drop` (B,) bool selects a learned null condition (one null token and a
  null pooled vector) per sample, so a batch of 2B can hold the conditional and unconditional
  halves of a guided step;
- super-resolution: `low_res_channels` > 0 concatenates the (bilinearly upsampled) low-resolution
  image to the input, and its noise-augmentation level (an integer step of the schedule) is
  embedded like the timestep and added to the conditioning.
"""
import dataclasses
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclasses.dataclass
class UNetConfig:
    image_size: int = 32
    in_channels: int = 3
    out_channels: int = 3
    base: int = 32
    mults: tuple = (1, 2, 2)
    res_blocks: tuple = (1, 2, 3)
    attn_levels: tuple = (1, 2)
    heads: int = 4
    cond_dim: int = 0          # 0: unconditional
    embed_tokens: int = 0      # > 0: the condition is one vector (B, cond_dim) made into this many tokens
    low_res_channels: int = 0  # > 0: a super-resolution model
    dropout: float = 0.0
    patch: int = 1             # > 1: a space-to-depth stem (pixel_unshuffle), the U-Net runs at image_size / patch

    def __post_init__(self):
        self.mults, self.res_blocks = tuple(self.mults), tuple(self.res_blocks)
        self.attn_levels = tuple(self.attn_levels)
        if len(self.mults) != len(self.res_blocks):
            raise ValueError(f"mults {self.mults} and res_blocks {self.res_blocks} need one entry per level")
        if self.patch < 1 or self.image_size % (self.patch * 2 ** (len(self.mults) - 1)):
            raise ValueError(f"image_size {self.image_size} must be divisible by patch * 2^{len(self.mults) - 1}")
        if any(c * self.base % 8 for c in self.mults):
            raise ValueError("every level's channel count must be a multiple of 8 (GroupNorm)")

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, d):
        return cls(**d)


def timestep_embedding(t, dim):
    """Sinusoidal embedding of integer steps (B,) -> (B, dim)."""
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _norm(c):
    return nn.GroupNorm(8, c)


class ResBlock(nn.Module):
    def __init__(self, cin, cout, emb_dim, dropout=0.0):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.dropout = nn.Dropout(dropout)
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x, emb):
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = F.silu(self.norm2(h) * (1 + scale) + shift)
        return self.skip(x) + self.conv2(self.dropout(h))


class CrossAttention(nn.Module):
    """x (B, C, H, W) attends to context tokens (B, L, D) with a key mask (B, L)."""

    def __init__(self, channels, ctx_dim, heads):
        super().__init__()
        self.heads = heads
        self.norm = _norm(channels)
        self.q = nn.Linear(channels, channels)
        self.kv = nn.Linear(ctx_dim, 2 * channels)
        self.out = nn.Linear(channels, channels)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def forward(self, x, ctx, mask):
        B, C, H, W = x.shape
        q = self.q(self.norm(x).flatten(2).transpose(1, 2)).view(B, H * W, self.heads, -1).transpose(1, 2)
        k, v = self.kv(ctx).view(B, ctx.shape[1], 2, self.heads, -1).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, None, :])
        return x + self.out(a.transpose(1, 2).reshape(B, H * W, C)).transpose(1, 2).view(B, C, H, W)


class UNet(nn.Module):
    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        base, emb = cfg.base, 4 * cfg.base
        self.time_mlp = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.ctx_dim = ctx = emb
        if cfg.cond_dim:
            if cfg.embed_tokens:
                self.cond_tokens = nn.Linear(cfg.cond_dim, cfg.embed_tokens * ctx)
            else:
                self.cond_tokens = nn.Sequential(nn.LayerNorm(cfg.cond_dim), nn.Linear(cfg.cond_dim, ctx))
            self.ctx_norm = nn.LayerNorm(ctx)
            self.cond_pool = nn.Sequential(nn.LayerNorm(ctx), nn.Linear(ctx, emb))
            self.null_token = nn.Parameter(torch.randn(ctx) * 0.02)
            self.null_pooled = nn.Parameter(torch.zeros(emb))
        if cfg.low_res_channels:
            self.aug_mlp = nn.Sequential(nn.Linear(base, emb), nn.SiLU(), nn.Linear(emb, emb))
        p2 = cfg.patch ** 2
        self.conv_in = nn.Conv2d((cfg.in_channels + cfg.low_res_channels) * p2, base, 3, padding=1)
        use_attn = bool(cfg.cond_dim)
        self.down, chans, c = nn.ModuleList(), [base], base
        for i, (m, n) in enumerate(zip(cfg.mults, cfg.res_blocks)):
            for _ in range(n):
                blk = nn.ModuleList([ResBlock(c, base * m, emb, cfg.dropout)])
                c = base * m
                if use_attn and i in cfg.attn_levels:
                    blk.append(CrossAttention(c, ctx, cfg.heads))
                self.down.append(blk)
                chans.append(c)
            if i + 1 < len(cfg.mults):
                self.down.append(nn.ModuleList([nn.Conv2d(c, c, 3, stride=2, padding=1)]))
                chans.append(c)
        self.mid = nn.ModuleList([ResBlock(c, c, emb)] + ([CrossAttention(c, ctx, cfg.heads)] if use_attn else [])
                                 + [ResBlock(c, c, emb)])
        self.up = nn.ModuleList()
        for i in reversed(range(len(cfg.mults))):
            m = cfg.mults[i]
            for _ in range(cfg.res_blocks[i] + 1):
                blk = nn.ModuleList([ResBlock(c + chans.pop(), base * m, emb, cfg.dropout)])
                c = base * m
                if use_attn and i in cfg.attn_levels:
                    blk.append(CrossAttention(c, ctx, cfg.heads))
                self.up.append(blk)
            if i > 0:
                self.up.append(nn.ModuleList([nn.Upsample(scale_factor=2, mode="nearest"),
                                              nn.Conv2d(c, c, 3, padding=1)]))
        self.out = nn.Sequential(_norm(c), nn.SiLU(), nn.Conv2d(c, cfg.out_channels * p2, 3, padding=1))
        nn.init.zeros_(self.out[-1].weight)
        nn.init.zeros_(self.out[-1].bias)

    def encode_condition(self, cond, cond_mask, drop, batch):
        """(tokens (B, L, D), mask (B, L), pooled (B, E)) with the null condition where drop is set."""
        cfg = self.config
        if cond is None:
            raise ValueError("this U-Net is conditional: pass cond")
        if cond.shape[0] != batch:
            raise ValueError(f"cond has batch {cond.shape[0]}, x has {batch}")
        if cfg.embed_tokens:
            if cond.dim() != 2 or cond.shape[1] != cfg.cond_dim:
                raise ValueError(f"cond must be an embedding (B, {cfg.cond_dim}), got {tuple(cond.shape)}")
            tokens = self.cond_tokens(cond).view(batch, cfg.embed_tokens, self.ctx_dim)
            mask = torch.ones(tokens.shape[:2], dtype=torch.bool, device=cond.device)
        else:
            if cond.dim() != 3 or cond.shape[2] != cfg.cond_dim:
                raise ValueError(f"cond must be tokens (B, L, {cfg.cond_dim}), got {tuple(cond.shape)}")
            mask = torch.ones(cond.shape[:2], dtype=torch.bool, device=cond.device) if cond_mask is None \
                else cond_mask.to(torch.bool)
            if mask.shape != cond.shape[:2]:
                raise ValueError(f"cond_mask shape {tuple(mask.shape)} does not match cond {tuple(cond.shape[:2])}")
            tokens = self.cond_tokens(cond)
        tokens = self.ctx_norm(tokens)
        m = mask.unsqueeze(-1).to(tokens.dtype)
        pooled = self.cond_pool((tokens * m).sum(1) / m.sum(1).clamp(min=1))
        if drop is not None:
            if drop.shape != (batch,):
                raise ValueError(f"drop must be a (B,) bool mask, got {tuple(drop.shape)}")
            d = drop.to(torch.bool)
            first = torch.zeros_like(mask)
            first[:, 0] = True
            null = torch.zeros_like(tokens)
            null[:, 0] = self.null_token.to(tokens.dtype)
            tokens = torch.where(d[:, None, None], null, tokens)
            mask = torch.where(d[:, None], first, mask)
            pooled = torch.where(d[:, None], self.null_pooled.to(pooled.dtype), pooled)
        return tokens, mask, pooled

    def forward(self, x, t, cond=None, cond_mask=None, drop=None, low_res=None, aug_t=None):
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x must be (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        div = cfg.patch * 2 ** (len(cfg.mults) - 1)
        if x.shape[-1] % div or x.shape[-2] % div:
            raise ValueError(f"x's size {tuple(x.shape[-2:])} must be divisible by {div}")
        B = x.shape[0]
        if t.shape != (B,):
            raise ValueError(f"t must have shape ({B},), got {tuple(t.shape)}")
        emb = self.time_mlp(timestep_embedding(t, cfg.base))
        tokens = mask = None
        if cfg.cond_dim:
            tokens, mask, pooled = self.encode_condition(cond, cond_mask, drop, B)
            emb = emb + pooled
        if cfg.low_res_channels:
            if low_res is None or aug_t is None:
                raise ValueError("a super-resolution U-Net needs low_res and aug_t")
            if low_res.shape[:2] != (B, cfg.low_res_channels):
                raise ValueError(f"low_res must be (B, {cfg.low_res_channels}, h, w), got {tuple(low_res.shape)}")
            if low_res.shape[-2:] != x.shape[-2:]:
                low_res = F.interpolate(low_res, size=x.shape[-2:], mode="bilinear", align_corners=False)
            x = torch.cat([x, low_res.to(x.dtype)], dim=1)
            emb = emb + self.aug_mlp(timestep_embedding(aug_t, cfg.base))
        if cfg.patch > 1:
            x = F.pixel_unshuffle(x, cfg.patch)
        h = self.conv_in(x)
        hs = [h]
        for blk in self.down:
            h = self._run(blk, h, emb, tokens, mask)
            hs.append(h)
        for layer in self.mid:
            h = self._run([layer], h, emb, tokens, mask)
        skip_scale = 2 ** -0.5
        for blk in self.up:
            if isinstance(blk[0], ResBlock):
                h = torch.cat([h, hs.pop() * skip_scale], dim=1)
            h = self._run(blk, h, emb, tokens, mask)
        h = self.out(h)
        return F.pixel_shuffle(h, cfg.patch) if cfg.patch > 1 else h

    @staticmethod
    def _run(blk, h, emb, tokens, mask):
        for layer in blk:
            if isinstance(layer, ResBlock):
                h = layer(h, emb)
            elif isinstance(layer, CrossAttention):
                h = layer(h, tokens, mask)
            else:
                h = layer(h)
        return h
