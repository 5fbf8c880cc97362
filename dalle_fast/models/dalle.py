"""The DALL-E transformer (stage 2): a decoder-only model over text_len BPE tokens then the dVAE's
image tokens in raster order, with the paper's sparse attention schedule.

Sequence: text_0 .. text_{T-1}, image_0 .. image_{M-1} (N = T + M, M = image_size**2). The logits at
position i predict token i + 1: positions 0..T-2 predict text tokens (the text head), positions
T-1..N-2 predict image tokens (the image head); text_0 has no prediction (there is no BOS token).
Padding is a token: [PAD] (id 0) at text position i becomes the learned token num_text_tokens + i.

Each residual branch (AttentionBranch, MLPBranch) is its own module computing f(norm(x)) only; the
identity path lives in TransformerLayer, so a later issue can wrap branches for per-resblock gradient
scaling and shard them with FSDP2 without touching this file's math.
"""
import dataclasses
import json
import math
import os
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_ids
from ..ops.sparse_attention import KINDS
from ..tokenizer import PAD_ID


@dataclasses.dataclass
class DALLEConfig:
    """Sizes and options of the transformer; the defaults are the paper's 12B model.

    Args:
        num_text_tokens: BPE vocabulary (the per-position padding tokens come on top).
        text_len: text tokens per caption.
        num_image_tokens: the dVAE's codebook size.
        image_size: image tokens per side.
        dim, depth, heads, dim_head, mlp_mult: width, layers, attention heads, features per head, MLP expansion.
        conv_kernel: odd kernel size of the last layer's conv mask.
        backend: attention backend: 'fused' (dalle_fast's kernels), 'flex' or 'dense'.
        attention_kinds: None for the paper's schedule, or one mask kind per layer.
        dropout: of the residual branches' outputs.
        text_loss_weight: the text loss's share of the loss (the image's is 1 - this; the paper: 1/8).
    """
    num_text_tokens: int = 16384       # BPE vocabulary (the per-position padding tokens come on top)
    text_len: int = 256
    num_image_tokens: int = 8192       # dVAE codebook
    image_size: int = 32               # image tokens per side
    dim: int = 3968
    depth: int = 64
    heads: int = 62
    dim_head: int = 64
    mlp_mult: int = 4
    conv_kernel: int = 11
    backend: str = "fused"             # attention backend: fused | flex | dense (DALLE_FAST_ATTENTION_BACKEND
                                       # replaces fused, see nn.attention.resolve_backend)
    attention_kinds: Optional[list] = None  # None: the paper's schedule; or one kind per layer
    dropout: float = 0.0
    text_loss_weight: float = 1.0 / 8  # the image loss gets 1 - this (the paper: 1/8 and 7/8)

    def __post_init__(self):
        for name in ("num_text_tokens", "text_len", "num_image_tokens", "image_size", "dim", "depth",
                     "heads", "dim_head", "mlp_mult"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"DALLEConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.conv_kernel < 1 or self.conv_kernel % 2 == 0:
            raise ValueError(f"DALLEConfig.conv_kernel must be odd and >= 1, got {self.conv_kernel}")
        if self.backend not in ("fused", "flex", "dense"):
            raise ValueError(f"DALLEConfig.backend must be fused, flex or dense, got {self.backend!r}")
        if self.attention_kinds is not None:
            self.attention_kinds = list(self.attention_kinds)
            if len(self.attention_kinds) != self.depth or any(k not in KINDS for k in self.attention_kinds):
                raise ValueError(f"DALLEConfig.attention_kinds must list {self.depth} kinds from {KINDS}, "
                                 f"got {self.attention_kinds}")
        if not 0.0 <= self.text_loss_weight <= 1.0:
            raise ValueError(f"DALLEConfig.text_loss_weight must be in [0, 1], got {self.text_loss_weight}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"DALLEConfig.dropout must be in [0, 1), got {self.dropout}")

    @property
    def image_len(self):
        return self.image_size ** 2

    @property
    def seq_len(self):
        return self.text_len + self.image_len

    def kinds(self):
        """The attention mask of every layer.

        Returns:
            A list of depth kinds: attention_kinds, or the paper's schedule (dalle_fast.attention_schedule).
        """
        if self.attention_kinds is not None:
            return list(self.attention_kinds)
        from ..ops.sparse_attention import attention_schedule
        return list(attention_schedule(self.depth))

    @classmethod
    def paper(cls, **kw):
        """The 12B model of the paper: 64 layers, 62 heads of 64, d_model 3968, 256 + 32x32 tokens.

        Args:
            **kw: fields to override.
        Returns:
            A DALLEConfig.
        """
        return cls(**kw)

    @classmethod
    def tiny(cls, **kw):
        """For tests: a few thousand parameters per layer.

        Args:
            **kw: fields to override.
        Returns:
            A DALLEConfig.
        """
        base = dict(num_text_tokens=64, text_len=8, num_image_tokens=32, image_size=4, dim=32, depth=2,
                    heads=2, dim_head=16, conv_kernel=3)
        return cls(**{**base, **kw})

    @classmethod
    def shapes(cls, **kw):
        """The bundled model: Shapes captions (about 20 BPE tokens) and a 64x64 -> 8x8 token dVAE.

        Args:
            **kw: fields to override.
        Returns:
            A DALLEConfig.
        """
        base = dict(num_text_tokens=128, text_len=24, num_image_tokens=256, image_size=8, dim=192, depth=4,
                    heads=4, dim_head=48, conv_kernel=5)
        return cls(**{**base, **kw})

    def to_dict(self):
        """The config as a JSON-able dict.

        Returns:
            {field: value}.
        """
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d):
        """The inverse of to_dict.

        Args:
            d: {field: value}; unknown fields raise ValueError.
        Returns:
            A DALLEConfig.
        """
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - fields
        if unknown:
            raise ValueError(f"unknown DALLEConfig fields: {sorted(unknown)}")
        return cls(**d)


def _attention_module(cfg, kind):
    from ..nn import SparseSelfAttention
    return SparseSelfAttention(cfg.dim, cfg.heads, kind, cfg.text_len, cfg.image_size, dim_head=cfg.dim_head,
                               conv_kernel=cfg.conv_kernel, backend=cfg.backend, dropout=cfg.dropout)


class AttentionBranch(nn.Module):
    """attn(norm(x)): one residual branch (no identity path).

    Args:
        cfg: the DALLEConfig.
        kind: this layer's attention mask kind.
    """

    def __init__(self, cfg, kind):
        super().__init__()
        self.kind = kind
        self.norm = nn.LayerNorm(cfg.dim)
        self.attn = _attention_module(cfg, kind)

    def forward(self, x, kv_cache=None, position=None):
        """The branch's output, to be added to the residual stream.

        Args:
            x, kv_cache, position: as for dalle_fast.nn.SparseSelfAttention.forward.
        Returns:
            (B, n, dim).
        """
        return self.attn(self.norm(x), kv_cache=kv_cache, position=position)


class MLPBranch(nn.Module):
    """fc2(gelu(fc1(norm(x)))): one residual branch (no identity path).

    Args:
        cfg: the DALLEConfig.
    """

    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim)
        self.fc1 = nn.Linear(cfg.dim, cfg.mlp_mult * cfg.dim)
        self.fc2 = nn.Linear(cfg.mlp_mult * cfg.dim, cfg.dim)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x):
        """The branch's output, to be added to the residual stream.

        Args:
            x: (B, n, dim) residual stream.
        Returns:
            (B, n, dim).
        """
        h = self.norm(x)
        return self.dropout(self.fc2(F.gelu(self.fc1(h.to(self.fc1.weight.dtype)))))


class TransformerLayer(nn.Module):
    """One pre-norm layer: x + attention branch, then + MLP branch.

    Args:
        cfg: the DALLEConfig.
        kind: this layer's attention mask kind.
    """
    def __init__(self, cfg, kind):
        super().__init__()
        self.attn = AttentionBranch(cfg, kind)
        self.mlp = MLPBranch(cfg)

    def forward(self, x, kv_cache=None, position=None):
        """Args:
            x, kv_cache, position: as for dalle_fast.nn.SparseSelfAttention.forward.
        Returns:
            The residual stream after the layer, x's shape.
        """
        x = x + self.attn(x, kv_cache=kv_cache, position=position)
        return x + self.mlp(x)


class DALLE(nn.Module):
    """DALL-E's transformer over text_len text tokens then image_size^2 image tokens, with per-position
    padding tokens, row/column embeddings of the image grid, the paper's attention schedule, fp32 heads,
    cached sampling (prefill, decode_step) and safetensors files.

    Args:
        config: a DALLEConfig (or its dict).
        vae: optional DiscreteVAE whose codebook and token grid must match (kept, not a submodule).
    """
    def __init__(self, config, vae=None):
        super().__init__()
        if isinstance(config, dict):
            config = DALLEConfig.from_dict(config)
        cfg = self.config = config
        if vae is not None:
            self._check_vae(vae)
        self.vae = vae  # not a submodule: the dVAE is frozen and saved on its own
        self.text_emb = nn.Embedding(cfg.num_text_tokens + cfg.text_len, cfg.dim)
        self.text_pos = nn.Embedding(cfg.text_len, cfg.dim)
        self.image_emb = nn.Embedding(cfg.num_image_tokens, cfg.dim)
        self.image_row = nn.Embedding(cfg.image_size, cfg.dim)
        self.image_col = nn.Embedding(cfg.image_size, cfg.dim)
        self.layers = nn.ModuleList(TransformerLayer(cfg, kind) for kind in cfg.kinds())
        self.final_norm = nn.LayerNorm(cfg.dim)
        self.to_text_logits = nn.Linear(cfg.dim, cfg.num_text_tokens + cfg.text_len)
        self.to_image_logits = nn.Linear(cfg.dim, cfg.num_image_tokens)
        self.reset_parameters()

    # the dVAE is held outside the module tree so state_dict() is the transformer alone
    def __setattr__(self, name, value):
        if name == "vae":
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def _check_vae(self, vae):
        cfg = self.config
        if getattr(vae, "vocab_size", cfg.num_image_tokens) != cfg.num_image_tokens or \
                getattr(vae, "tokens_per_side", cfg.image_size) != cfg.image_size:
            raise ValueError(f"dVAE (vocab {vae.vocab_size}, {vae.tokens_per_side}x{vae.tokens_per_side} tokens) "
                             f"does not match the transformer (vocab {cfg.num_image_tokens}, "
                             f"{cfg.image_size}x{cfg.image_size} tokens)")

    @torch.no_grad()
    def reset_parameters(self):
        """GPT-2 style initialisation: N(0, 0.02), and the output projection of every branch scaled down by
        sqrt(2 * depth) so that the residual stream's variance does not grow with depth.
        """
        if next(self.parameters()).device.type == "meta":
            return
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        for layer in self.layers:
            for name, p in list(layer.attn.attn.named_parameters()) + [("fc2.weight", layer.mlp.fc2.weight)]:
                if name.endswith("weight") and ("out" in name or "proj" in name or name == "fc2.weight") \
                        and "qkv" not in name:
                    p.mul_(1.0 / math.sqrt(2 * self.config.depth))

    def cast_resblocks_(self, dtype):
        """The paper's mixed precision (Appendix D) for sampling: the matrices of every residual branch
        (qkv, output projection, MLP) and their biases in `dtype` (16-bit), the KV caches too; gains,
        embeddings, unembeddings and the residual stream stay fp32, the logits fp32.

        Args:
            dtype: torch.bfloat16 or torch.float16.
        Returns:
            self.
        """
        for layer in self.layers:
            for lin in (layer.attn.attn.to_qkv, layer.attn.attn.to_out, layer.mlp.fc1, layer.mlp.fc2):
                lin.to(dtype)
        return self

    def resblocks(self):
        """The residual branches in order (2 per layer: attention then MLP).

        Yields:
            AttentionBranch and MLPBranch modules.
        """
        for layer in self.layers:
            yield layer.attn
            yield layer.mlp

    def enable_resblock_scaling(self, scaler):
        """The paper's per-resblock gradient scaling (dalle_fast.amp): every attention and MLP branch
        becomes a scaled branch of `scaler`. Forward hooks: parameters and state_dict keys are unchanged.

        Args:
            scaler: a ResblockGradScaler with num_blocks = 2 * depth (blocks in resblocks() order).
        Returns:
            The hooks (.remove() undoes it).
        """
        from ..amp import scale_branches
        return scale_branches(self.resblocks(), scaler)

    # ---- inputs ----
    def text_ids(self, text):
        """[PAD] (0) at position i -> the learned padding token num_text_tokens + i.

        Args:
            text: (B, text_len) integer ids in [0, num_text_tokens).
        Returns:
            (B, text_len) long ids into the text embedding.
        """
        cfg = self.config
        if text.dim() != 2 or text.shape[1] != cfg.text_len:
            raise ValueError(f"text must be (batch, text_len={cfg.text_len}) token ids, got {tuple(text.shape)}")
        if text.dtype not in (torch.long, torch.int32):
            raise TypeError(f"text must hold integer token ids, got {text.dtype}")
        check_ids(text, cfg.num_text_tokens, "text ids")
        pos = torch.arange(cfg.text_len, device=text.device) + cfg.num_text_tokens
        return torch.where(text == PAD_ID, pos.expand_as(text), text.long())

    def _check_image(self, image, batch):
        cfg = self.config
        if image.dim() == 3:
            image = image.flatten(1)
        if image.dim() != 2 or image.shape[0] != batch or image.shape[1] > cfg.image_len:
            raise ValueError(f"image tokens must be (batch={batch}, n <= {cfg.image_len}) or (batch, "
                             f"{cfg.image_size}, {cfg.image_size}), got {tuple(image.shape)}")
        if image.dtype not in (torch.long, torch.int32):
            raise TypeError(f"image tokens must be integers, got {image.dtype}")
        check_ids(image, cfg.num_image_tokens, "image tokens")
        return image.long()

    def embed_text(self, text):
        """Args:
            text: (B, text_len) ids.
        Returns:
            (B, text_len, dim): token plus position embeddings.
        """
        return self.text_emb(self.text_ids(text)) + self.text_pos.weight

    def embed_image(self, image, start=0):
        """Embeddings of image tokens at raster positions start .. start + n - 1.

        Args:
            image: (B, n) image token ids.
            start: raster position of the first token.
        Returns:
            (B, n, dim): token plus row and column embeddings.
        """
        W = self.config.image_size
        p = torch.arange(start, start + image.shape[1], device=image.device)
        return self.image_emb(image) + self.image_row(p // W) + self.image_col(p % W)

    # ---- outputs (fp32 logits, as the paper keeps its unembeddings in fp32) ----
    def _logits(self, head, h):
        dt = torch.promote_types(h.dtype, torch.float32)  # fp32, or fp64 for a float64 model
        n = self.final_norm
        with torch.autocast(device_type=h.device.type, enabled=False):
            x = F.layer_norm(h.to(dt), n.normalized_shape, n.weight.to(dt), n.bias.to(dt), n.eps)
            return F.linear(x, head.weight.to(dt), head.bias.to(dt))

    def text_logits(self, h):
        """Args:
            h: (..., dim) residual stream.
        Returns:
            fp32 logits (..., num_text_tokens + text_len) after the final norm.
        """
        return self._logits(self.to_text_logits, h)

    def image_logits(self, h):
        """Args:
            h: (..., dim) residual stream.
        Returns:
            fp32 logits (..., num_image_tokens) after the final norm.
        """
        return self._logits(self.to_image_logits, h)

    # ---- forward ----
    def hidden(self, text, image=None, kv_caches=None):
        """Final residual stream of the prefix text + image (n = T + n_img).

        Args:
            text: (B, text_len) ids.
            image: None or (B, n_img) image tokens.
            kv_caches: None, or new_kv_caches(B): every layer's keys/values are written into it.
        Returns:
            (B, n, dim).
        """
        x = self.embed_text(text)
        if image is not None and image.shape[1] > 0:
            x = torch.cat([x, self.embed_image(image)], dim=1)
        for i, layer in enumerate(self.layers):
            x = layer(x, kv_cache=None if kv_caches is None else kv_caches[i])
        return x

    def forward(self, text, image=None, return_loss=False):
        """Logits of the next token at every position, or the paper's loss.

        Args:
            text: (B, text_len) ids.
            image: (B, n) or (B, h, w) image tokens, n <= image_len (the full image for return_loss).
            return_loss: return the losses instead of the logits.
        Returns:
            return_loss=False: (text_logits (B, T-1, text vocab + pads), image_logits (B, n_img, image vocab)),
            image_logits[:, j] being the prediction of image token j. return_loss=True: (loss, text_loss,
            image_loss), loss = text_loss_weight * text_loss + (1 - text_loss_weight) * image_loss.
        """
        cfg = self.config
        B = text.shape[0] if text.dim() else 0
        image = self._check_image(image, B) if image is not None else text.new_zeros(B, 0, dtype=torch.long)
        if return_loss and image.shape[1] != cfg.image_len:
            raise ValueError(f"the loss needs all {cfg.image_len} image tokens, got {image.shape[1]}")
        text_ids = self.text_ids(text)
        h = self.hidden(text, image)
        T, n_img = cfg.text_len, image.shape[1]
        text_logits = self.text_logits(h[:, :T - 1])
        # position T-1+j predicts image token j; with n_img image tokens in, n_img predictions are scored
        image_logits = self.image_logits(h[:, T - 1:T - 1 + n_img])
        if not return_loss:
            return text_logits, image_logits
        text_loss = (F.cross_entropy(text_logits.reshape(-1, text_logits.shape[-1]), text_ids[:, 1:].reshape(-1))
                     if T > 1 else h.new_zeros((), dtype=torch.float32))
        image_loss = F.cross_entropy(image_logits.reshape(-1, image_logits.shape[-1]), image.reshape(-1))
        w = cfg.text_loss_weight
        return w * text_loss + (1 - w) * image_loss, text_loss.detach(), image_loss.detach()

    # ---- cached decoding (used by dalle_fast.generate) ----
    def new_kv_caches(self, batch, dtype=None, device=None):
        """One preallocated KVCache per layer, as a DecodeCaches list (it also holds what the fused step needs).

        Args:
            batch: sequences sampled at once.
            dtype: the caches' dtype (default: the model's).
            device: default: the model's.
        Returns:
            A DecodeCaches.
        """
        from ..nn import KVCache
        p = self.layers[0].attn.attn.to_qkv.weight  # the attention's dtype (see cast_resblocks_)
        cfg = self.config
        return DecodeCaches(KVCache(batch, cfg.heads, cfg.seq_len, cfg.dim_head, dtype or p.dtype, device or p.device)
                            for _ in self.layers)

    def prefill(self, text, kv_caches):
        """One parallel pass over the prompt: fills the caches at positions 0..T-1.

        Args:
            text: (B, text_len) ids.
            kv_caches: new_kv_caches(B).
        Returns:
            fp32 logits (B, image vocab) of image token 0.
        """
        h = self.hidden(text, None, kv_caches)
        return self.image_logits(h[:, -1])

    def decode_params(self):
        """The tensors of one cached step, filled by name in the op's order.

        Returns:
            A list ordered as dalle_fast.ops.decode_step.param_names (this model's state_dict keys).
        """
        from ..ops.decode_step import param_names
        return [self.get_parameter(name) for name in param_names(len(self.layers))]

    def attention_backend(self):
        """The backend the attention modules run.

        Returns:
            config.backend, unless DALLE_FAST_ATTENTION_BACKEND replaced the fused one when the model was
            built (nn.attention.resolve_backend).
        """
        return self.layers[0].attn.attn.backend

    def _can_fuse_step(self):
        """The fused step computes exactly the module path for the fused backend in eval (no dropout,
        no hooks, nothing that needs gradients)."""
        if self.attention_backend() != "fused" or (self.training and self.config.dropout > 0):
            return False
        if torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()):
            return False
        return not any(m._forward_hooks or m._forward_pre_hooks for m in self.modules())

    def decode_step(self, image_token, index, kv_caches, fused=None):
        """One cached sampling step: writes the k/v of image token `index` into the caches.

        Args:
            image_token: (B,) ids of image token `index` (sequence position T + index).
            index: its index in the image.
            kv_caches: the DecodeCaches filled by prefill and the earlier steps.
            fused: None = the one-op step (dalle_fast.ops.decode_step) whenever it computes the same thing
              (fused backend, eval, no grad, no hooks), True = require it, False = the module path.
        Returns:
            fp32 logits (B, image vocab) of image token index + 1.
        """
        cfg = self.config
        if not 0 <= index < cfg.image_len:
            raise ValueError(f"decode_step: index must be in [0, {cfg.image_len}), got {index}")
        if fused is None:
            fused = isinstance(kv_caches, DecodeCaches) and kv_caches.fusable(self)
        if fused:
            from ..ops.decode_step import transformer_decode_step
            state = kv_caches.fused_state(self) if isinstance(kv_caches, DecodeCaches) else \
                DecodeCaches(kv_caches).fused_state(self)
            return transformer_decode_step(image_token, index, state.params, state.k, state.v, state.kinds,
                                           cfg.text_len, cfg.image_size, cfg.conv_kernel, cfg.heads,
                                           self.final_norm.eps, cfg.dim_head ** -0.5)
        position = cfg.text_len + index
        x = self.embed_image(image_token[:, None], start=index)
        for layer, cache in zip(self.layers, kv_caches):
            x = layer(x, kv_cache=cache, position=position)
        return self.image_logits(x[:, -1])

    # ---- files ----
    def save_pretrained(self, directory, dtype=None):
        """directory/model.safetensors and directory/config.json, each written atomically.

        Args:
            directory: created if missing.
            dtype: optional dtype of the saved floating-point tensors.
        """
        from ..checkpoint import atomic_save_safetensors, atomic_write_json
        os.makedirs(directory, exist_ok=True)
        sd = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v)
              for k, v in self.state_dict().items()}
        atomic_save_safetensors(sd, os.path.join(directory, "model.safetensors"))
        atomic_write_json({"model": "DALLE", "config": self.config.to_dict()}, os.path.join(directory, "config.json"))

    @classmethod
    def from_pretrained(cls, directory, vae=None, device="cpu", dtype=torch.float32, resblock_dtype=None,
                        **overrides):
        """A model saved by save_pretrained, in eval mode.

        Args:
            directory: holds config.json and model.safetensors.
            vae: optional DiscreteVAE to attach.
            device: where the model goes.
            dtype: the whole model's dtype.
            resblock_dtype: the residual branches' matrices only (cast_resblocks_, the paper's scheme).
            **overrides: config fields to replace (e.g. backend="dense").
        Returns:
            A DALLE.
        """
        from ..checkpoint import load_safetensors
        path = os.path.join(directory, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no DALLE config.json in {directory}")
        with open(path) as f:
            meta = json.load(f)
        cfg = DALLEConfig.from_dict({**meta["config"], **overrides})
        model = cls(cfg, vae=vae)
        sd = load_safetensors(os.path.join(directory, "model.safetensors"))
        model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()})
        model = model.to(device=device, dtype=dtype)
        if resblock_dtype is not None:
            model.cast_resblocks_(resblock_dtype)
        return model.eval()

    def num_parameters(self):
        """Returns:
            The number of parameters.
        """
        return sum(p.numel() for p in self.parameters())


class DecodeCaches(list):
    """The KVCache of every layer (a list), plus what the fused step reads every step, gathered once
    per generation: the parameter list and the cache tensors (the same tensors, so in-place weight
    updates are seen; replacing a parameter object mid-generation is not)."""

    @dataclasses.dataclass
    class _Fused:
        model_id: int
        params: list
        k: list
        v: list
        kinds: list

    _state = None
    _fusable = None

    def fusable(self, model):
        """Whether decode_step can use the one-op fused step for this model now (cached per mode).

        Args:
            model: the DALLE.
        Returns:
            bool.
        """
        if self._fusable is None or self._fusable[0] != (id(model), model.training, torch.is_grad_enabled()):
            self._fusable = ((id(model), model.training, torch.is_grad_enabled()), model._can_fuse_step())
        return self._fusable[1]

    def fused_state(self, model):
        """What the fused step reads every step, gathered on first use for this model.

        Args:
            model: the DALLE.
        Returns:
            The parameter list, the cache tensors and the layer kinds.
        """
        if self._state is None or self._state.model_id != id(model):
            self._state = self._Fused(id(model), model.decode_params(), [c.k for c in self], [c.v for c in self],
                                      model.config.kinds())
        return self._state
