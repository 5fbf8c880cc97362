"""CLIP reranking with open_clip (the paper draws many samples per caption and keeps the ones CLIP
scores best). Nothing is downloaded: the model comes from local files only.

Two ways to point at a model:
- a directory in open_clip's `local-dir:` format (open_clip_config.json with model_cfg and
  preprocess_cfg, plus open_clip_model.safetensors): what `dalle-fast train-clip` writes. When the
  config names a "dalle_fast_tokenizer" file (our BPE tokenizer, beside it), captions are tokenized
  with it; otherwise with open_clip's tokenizer for the config;
- a checkpoint file of any built-in open_clip architecture (arch="ViT-B-32", path="/x/model.pt"), as
  open_clip.create_model(arch, pretrained=path) loads it, with open_clip's tokenizer for that
  architecture.

The small Shapes CLIP (shapes_clip_config) reads our BPE ids: its text tower appends a learned CLS
token at the end (open_clip's embed_cls) and pools it, so no EOT token or open_clip vocabulary of
49408 is needed and the whole model stays around a megabyte.
"""
import json
import os

import torch
import torch.nn.functional as F

CONFIG_NAME = "open_clip_config.json"
WEIGHTS_NAME = "open_clip_model.safetensors"


def shapes_clip_config(vocab_size, text_len, image_size=64, embed_dim=64, width=128, layers=2, patch_size=None):
    """model_cfg of a small open_clip CLIP for Shapes: a ViT over patches and a small text tower.

    Args:
        vocab_size: the BPE vocabulary.
        text_len: text context length.
        image_size: pixels per side.
        embed_dim: the joint embedding's width.
        width: both towers' width.
        layers: both towers' depth.
        patch_size: pixels per patch side (default: an 8x8 grid of patches).
    Returns:
        A dict for build_clip / open_clip.
    """
    return {
        "custom_text": True,  # open_clip's CustomTextCLIP: the text tower that supports embed_cls
        "embed_dim": embed_dim,
        "vision_cfg": {"image_size": image_size, "patch_size": patch_size or image_size // 8, "layers": layers, "width": width,
                       "head_width": 32, "mlp_ratio": 2.0},
        "text_cfg": {"context_length": text_len, "vocab_size": vocab_size, "width": width, "heads": width // 32,
                     "layers": layers, "mlp_ratio": 2.0, "embed_cls": True,
                     # pad_id -1 never occurs: [PAD] stays an ordinary token, as in the transformer
                     "pad_id": -1},
    }


# Shapes images are flat colours on black: a plain [0, 1] -> [-1, 1] normalisation.
SHAPES_PREPROCESS = {"size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "interpolation": "bilinear"}


class CLIPReranker:
    """Scores images against captions with an open_clip model: score(images in [0, 1] (B, 3, H, W),
    captions) -> cosine similarity (B,) of each image with its caption; rerank keeps the best.

    Args:
        model: an open_clip CLIP model.
        tokenize: callable(list of str) -> token ids for model.encode_text.
        preprocess_cfg: dict with size, mean, std (open_clip's preprocess config).
        device: where the model runs.
    """

    def __init__(self, model, tokenize, preprocess_cfg, device="cpu"):
        self.model = model.to(device).eval()
        self.tokenize = tokenize
        size = preprocess_cfg.get("size", 224)
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.mean = torch.tensor(preprocess_cfg.get("mean", (0.48145466, 0.4578275, 0.40821073))).view(1, 3, 1, 1)
        self.std = torch.tensor(preprocess_cfg.get("std", (0.26862954, 0.26130258, 0.27577711))).view(1, 3, 1, 1)
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(cls, path, arch=None, device="cpu"):
        """A reranker from an open_clip local directory (save_clip, optionally with our BPE tokenizer) or an
        open_clip checkpoint file with its architecture name.

        Args:
            path: a directory written by save_clip, or a checkpoint file.
            arch: the open_clip architecture of a checkpoint file (e.g. 'ViT-B-32').
            device: where the model runs.
        Returns:
            A CLIPReranker.
        """
        import open_clip
        if os.path.isdir(path):
            cfg_path = os.path.join(path, CONFIG_NAME)
            if not os.path.isfile(cfg_path):
                raise FileNotFoundError(f"no {CONFIG_NAME} in CLIP directory {path}")
            with open(cfg_path) as f:
                meta = json.load(f)
            model = open_clip.create_model("local-dir:" + os.path.abspath(path), device=device)
            if not any(fn.endswith((".safetensors", ".bin", ".pt", ".pth")) for fn in os.listdir(path)):
                raise FileNotFoundError(f"no CLIP weights in {path}")
            tok_name = meta.get("dalle_fast_tokenizer")
            if tok_name:
                from .tokenizer import BPETokenizer
                bpe = BPETokenizer.from_file(os.path.join(path, tok_name))
                ctx = meta["model_cfg"]["text_cfg"]["context_length"]
                tokenize = lambda caps: bpe.tokenize(caps, ctx)  # noqa: E731
            else:
                tokenize = open_clip.get_tokenizer("local-dir:" + os.path.abspath(path))
            preprocess = {**SHAPES_PREPROCESS, **meta.get("preprocess_cfg", {})}
            return cls(model, tokenize, preprocess, device)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP checkpoint not found: {path}")
        if arch is None:
            raise ValueError("a CLIP checkpoint file needs its open_clip architecture name (arch=, e.g. 'ViT-B-32')")
        if arch not in open_clip.list_models():
            raise ValueError(f"unknown open_clip architecture {arch!r}")
        model = open_clip.create_model(arch, pretrained=path, device=device)
        from open_clip.model import get_model_preprocess_cfg
        return cls(model, open_clip.get_tokenizer(arch), get_model_preprocess_cfg(model), device)

    def preprocess(self, images):
        """Args:
            images: (B, 3, H, W) in [0, 1].
        Returns:
            The model's input: resized to its size and normalised.
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [0, 1], got {tuple(images.shape)}")
        x = images.float().to(self.device)
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    @torch.no_grad()
    def embed_images(self, images):
        """Args:
            images: (B, 3, H, W) in [0, 1].
        Returns:
            (B, embed_dim) unit-norm fp32 embeddings.
        """
        return F.normalize(self.model.encode_image(self.preprocess(images)).float(), dim=-1)

    @torch.no_grad()
    def embed_texts(self, captions):
        """Args:
            captions: an iterable of str.
        Returns:
            (len(captions), embed_dim) unit-norm fp32 embeddings.
        """
        return F.normalize(self.model.encode_text(self.tokenize(list(captions)).to(self.device)).float(), dim=-1)

    @torch.no_grad()
    def score(self, images, captions, batch_size=256):
        """Cosine similarity of each image with its caption.

        Args:
            images: (B, 3, H, W) in [0, 1].
            captions: one caption for all, or a list of B.
            batch_size: images embedded at once.
        Returns:
            (B,) fp32 scores on the CPU.
        """
        if isinstance(captions, str):
            captions = [captions] * images.shape[0]
        if len(captions) != images.shape[0]:
            raise ValueError(f"{images.shape[0]} images but {len(captions)} captions")
        out = []
        for s in range(0, len(captions), batch_size):
            im = self.embed_images(images[s:s + batch_size])
            # embed each distinct caption once: reranking scores many images against one caption
            uniq = list(dict.fromkeys(captions[s:s + batch_size]))
            tx = self.embed_texts(uniq)
            idx = torch.tensor([uniq.index(c) for c in captions[s:s + batch_size]], device=tx.device)
            out.append((im * tx[idx]).sum(-1))
        return torch.cat(out).cpu() if out else torch.zeros(0)

    def rerank(self, images, caption, keep):
        """The best images of one caption.

        Args:
            images: (B, 3, H, W) in [0, 1].
            caption: str.
            keep: how many to keep.
        Returns:
            (the best `keep` images, best first, their scores).
        """
        scores = self.score(images, caption)
        order = scores.argsort(descending=True)[:keep]
        return images[order.to(images.device)], scores[order]


def build_clip(model_cfg, **kwargs):
    """A fresh open_clip model from a model_cfg, as open_clip.create_model builds it.

    Args:
        model_cfg: e.g. shapes_clip_config(...); 'custom_text' selects CustomTextCLIP.
        **kwargs: passed to the model's constructor.
    Returns:
        An open_clip CLIP or CustomTextCLIP.
    """
    import open_clip
    cfg = dict(model_cfg)
    custom = cfg.pop("custom_text", False)
    return (open_clip.CustomTextCLIP if custom else open_clip.CLIP)(**cfg, **kwargs)


def save_clip(model, directory, model_cfg, preprocess_cfg=None, tokenizer_file=None):
    """Writes an open_clip local-dir: open_clip_config.json + open_clip_model.safetensors (+ our tokenizer).

    Args:
        model: the open_clip model.
        directory: created if missing.
        model_cfg: its config (shapes_clip_config).
        preprocess_cfg: default: the Shapes preprocessing.
        tokenizer_file: our BPE tokenizer JSON, copied beside the weights.
    Returns:
        directory.
    """
    import shutil
    from .checkpoint import atomic_save_safetensors, atomic_write_json
    os.makedirs(directory, exist_ok=True)
    meta = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or SHAPES_PREPROCESS}
    if tokenizer_file is not None:
        dst = os.path.join(directory, "tokenizer.json")
        if os.path.abspath(tokenizer_file) != os.path.abspath(dst):
            shutil.copyfile(tokenizer_file, dst)
        meta["dalle_fast_tokenizer"] = "tokenizer.json"
    atomic_save_safetensors(model.state_dict(), os.path.join(directory, WEIGHTS_NAME))
    atomic_write_json(meta, os.path.join(directory, CONFIG_NAME))
    return directory
