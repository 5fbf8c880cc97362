"""Text to image: sample image tokens from the transformer, decode them with the dVAE, rerank with CLIP.

Sampling holds a preallocated KV cache for every layer, processes the prompt in one parallel pass,
then draws one image token per step for the whole batch; each layer's cached step goes through
dalle_fast.sparse_attention_decode (via SparseSelfAttention(position=p)), so a row layer reads only
its T + W + 1 allowed keys. use_cache=False recomputes the whole prefix every step (the check and
the baseline): with the same seed it draws the same tokens.
"""
import argparse
import dataclasses
import os
from typing import Optional

import torch

from .checks import check_values

@dataclasses.dataclass
class Generation:
    """What generate returns.

    Args:
        images: (num_captions, k, 3, H, W) in [0, 1], best first when reranked.
        tokens: (num_captions, k, h, w) image tokens.
        scores: (num_captions, k) CLIP scores, or None without a reranker.
        captions: the captions, in order.
    """
    images: torch.Tensor            # (num_captions, k, 3, H, W) in [0, 1], best first when reranked
    tokens: torch.Tensor            # (num_captions, k, h, w) image tokens
    scores: Optional[torch.Tensor]  # (num_captions, k) CLIP scores, or None without a reranker
    captions: list


def _filter_logits(logits, top_k=None, top_p=None):
    """Sets to -inf every logit outside the top_k and outside the smallest set of mass top_p."""
    if top_k is not None:
        k = min(int(top_k), logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, idx = torch.sort(logits, dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, idx, sorted_logits)
    return logits


def sample_logits(logits, temperature=1.0, top_k=None, top_p=None, generator=None):
    """One token per row of logits, drawn from softmax(logits / temperature) by inverting its CDF
    with one uniform per row (on the CPU a seventh of torch.multinomial's cost at V = 8192, which
    matters when a sampling step is a millisecond). Tokens of probability 0 are never drawn.

    Args:
        logits: (B, V).
        temperature: > 0.
        top_k: keep only the k most likely tokens (None: all).
        top_p: keep the smallest set of tokens of total probability top_p (None: all).
        generator: torch.Generator of the uniforms.
    Returns:
        LongTensor (B,) of token ids.
    """
    logits = _filter_logits(logits.float() / temperature, top_k, top_p)
    cdf = logits.softmax(-1).double().cumsum_(-1)  # fp64 running sum: exact zeros stay flat
    total = cdf[:, -1:]
    # NaN logits (or none finite) leave no mass to sample from
    check_values((total > 0).all(), "sample_logits: the logits hold NaN or no finite value; cannot sample")
    u = torch.rand(cdf.shape[0], 1, generator=generator, dtype=cdf.dtype, device=cdf.device).mul_(total)
    u = torch.minimum(u, torch.nextafter(total, torch.zeros_like(total)))  # u < total even after rounding
    # the first index whose running sum exceeds u: a zero-probability token never does before its predecessor
    return torch.searchsorted(cdf, u, right=True)[:, 0]


def _check_args(captions, num_images, temperature, top_k, top_p, keep):
    if isinstance(captions, str):
        captions = [captions]
    if not isinstance(captions, (list, tuple)) or not captions:
        raise ValueError("captions must be a non-empty list of strings")
    if not isinstance(num_images, int) or num_images < 1:
        raise ValueError(f"num_images must be a positive int, got {num_images!r}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and int(top_k) < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if keep is not None and not 1 <= keep <= num_images:
        raise ValueError(f"keep must be in [1, num_images={num_images}], got {keep}")
    return list(captions)


@torch.no_grad()
def sample_tokens(model, text, temperature=1.0, top_k=None, top_p=None, generator=None, use_cache=True,
                  progress=None):
    """Image tokens for text ids, one token at a time.

    Args:
        model: a DALLE.
        text: (B, text_len) ids.
        temperature, top_k, top_p, generator: as for sample_logits.
        use_cache: sample through the KV caches (prefill + decode_step); False recomputes the prefix.
        progress: a callable(n) called after each token, or None.
    Returns:
        LongTensor (B, image_len).
    """
    cfg = model.config
    B, M = text.shape[0], cfg.image_len
    out = text.new_empty(B, M, dtype=torch.long)
    if use_cache:
        caches = model.new_kv_caches(B)
        logits = model.prefill(text, caches)
    else:
        logits = model.image_logits(model.hidden(text)[:, -1])
    for j in range(M):
        out[:, j] = sample_logits(logits, temperature, top_k, top_p, generator)
        if progress is not None:
            progress(1)
        if j + 1 == M:
            break
        if use_cache:
            logits = model.decode_step(out[:, j], j, caches)
        else:
            logits = model.image_logits(model.hidden(text, out[:, :j + 1])[:, -1])
    return out


@torch.no_grad()
def generate(model, vae, captions, num_images=1, temperature=1.0, top_k=None, top_p=None, seed=None,
             clip=None, keep=None, tokenizer=None, use_cache=True, batch_size=None, progress=False):
    """Text to image: samples, decodes with the dVAE and, with a CLIP reranker, keeps the best.

    Args:
        model: a DALLE.
        vae: its DiscreteVAE.
        captions: a caption or a list of them.
        num_images: samples per caption.
        temperature, top_k, top_p: as for sample_logits.
        seed: seeds the sampling generator (None: torch's default generator).
        clip: a dalle_fast.clip.CLIPReranker, or None.
        keep: with clip, the best `keep` per caption are returned, best first.
        tokenizer: a dalle_fast.tokenizer.BPETokenizer (default: model.tokenizer).
        use_cache: as for sample_tokens.
        batch_size: sequences sampled at once (default: all).
        progress: show a tqdm bar.
    Returns:
        A Generation.
    """
    captions = _check_args(captions, num_images, temperature, top_k, top_p, keep)
    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError("generate needs a tokenizer (pass tokenizer=, or set model.tokenizer)")
    if vae is None:
        vae = model.vae
    if vae is None:
        raise ValueError("generate needs a dVAE to decode the image tokens (pass vae=)")
    if keep is not None and clip is None and keep != num_images:
        raise ValueError("keep < num_images needs a CLIP reranker (clip=)")
    cfg = model.config
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    text = tokenizer.tokenize(captions, cfg.text_len).to(device).repeat_interleave(num_images, 0)
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    total = text.shape[0]
    batch_size = batch_size or total
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total * cfg.image_len, unit="tok", desc="sampling image tokens")
    try:
        chunks = []
        for s in range(0, total, batch_size):
            chunks.append(sample_tokens(model, text[s:s + batch_size], temperature, top_k, top_p, generator,
                                        use_cache, (lambda n, b=min(batch_size, total - s): bar.update(n * b))
                                        if bar is not None else None))
        tokens = torch.cat(chunks).view(total, cfg.image_size, cfg.image_size)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    images = torch.cat([vae.decode(tokens[s:s + batch_size]) for s in range(0, total, batch_size)]).float()
    n = len(captions)
    images = images.view(n, num_images, *images.shape[1:])
    tokens = tokens.view(n, num_images, *tokens.shape[1:])
    scores = None
    if clip is not None:
        scores = clip.score(images.flatten(0, 1), [c for c in captions for _ in range(num_images)])
        scores = scores.view(n, num_images)
        order = scores.argsort(dim=1, descending=True)[:, :keep or num_images]
        images = torch.stack([images[i, order[i]] for i in range(n)])
        tokens = torch.stack([tokens[i, order[i]] for i in range(n)])
        scores = torch.gather(scores, 1, order)
    return Generation(images=images, tokens=tokens, scores=scores, captions=captions)


# ---- models on disk ----
def bundled_model_dir():
    """dalle_fast/assets: the small Shapes model shipped in the package.

    Returns:
        Its path (str).
    """
    from importlib.resources import files
    return str(files("dalle_fast") / "assets")


def load_bundle(checkpoint=None, device="cpu", backend=None, dtype=torch.float32):
    """The parts of a model directory holding dalle/, dvae/, tokenizer.json and optionally clip/ (the
    bundled assets, or a train-dalle run's export/).

    Args:
        checkpoint: the directory (default: the bundled model).
        device: where the models go.
        backend: attention backend override ('fused', 'flex', 'dense'), or None.
        dtype: that of the transformer's residual branches (DALLE.cast_resblocks_, the paper's mixed
          precision: embeddings, gains, heads and logits stay fp32); the dVAE and CLIP load in fp32.
    Returns:
        (model, vae, tokenizer, clip or None).
    """
    from .clip import CLIPReranker
    from .models.dalle import DALLE
    from .models.dvae import DiscreteVAE
    from .tokenizer import BPETokenizer
    root = checkpoint or bundled_model_dir()
    if os.path.isdir(os.path.join(root, "export")) and not os.path.isdir(os.path.join(root, "dalle")):
        root = os.path.join(root, "export")
    for need in ("dalle", "dvae", "tokenizer.json"):
        if not os.path.exists(os.path.join(root, need)):
            raise FileNotFoundError(f"{root} is not a model directory: it lacks {need} "
                                    "(expected dalle/, dvae/, tokenizer.json and optionally clip/)")
    vae = DiscreteVAE.from_pretrained(os.path.join(root, "dvae"), device=device).eval()
    overrides = {"backend": backend} if backend else {}
    model = DALLE.from_pretrained(os.path.join(root, "dalle"), vae=vae, device=device,
                                  resblock_dtype=None if dtype == torch.float32 else dtype, **overrides)
    tokenizer = BPETokenizer.from_file(os.path.join(root, "tokenizer.json"))
    model.tokenizer = tokenizer
    clip_dir = os.path.join(root, "clip")
    clip = CLIPReranker.from_pretrained(clip_dir, device=device) if os.path.isdir(clip_dir) else None
    return model, vae, tokenizer, clip


def save_images(images, directory, captions, scores=None):
    """Every image of a batch as its own PNG.

    Args:
        images: (num_captions, k, 3, H, W) in [0, 1].
        directory: created if missing.
        captions: one per row of images (used in the file names).
        scores: optional (num_captions, k) CLIP scores (in the file names).
    Returns:
        The list of paths written.
    """
    from PIL import Image
    os.makedirs(directory, exist_ok=True)
    paths = []
    for i, cap in enumerate(captions):
        slug = "".join(ch if ch.isalnum() else "_" for ch in cap.lower())[:60].strip("_") or "caption"
        for j in range(images.shape[1]):
            arr = (images[i, j].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
            suffix = f"_clip{scores[i, j]:.3f}" if scores is not None else ""
            path = os.path.join(directory, f"{i:02d}_{slug}_{j:02d}{suffix}.png")
            Image.fromarray(arr).save(path)
            paths.append(path)
    return paths


# ---- command line ----
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _cmd_generate(args):
    from .viz import image_grid
    if args.model != "dalle":
        from .diffusion.cli import generate_diffusion
        return generate_diffusion(args)
    model, vae, tokenizer, clip = load_bundle(args.checkpoint, device=args.device, backend=args.backend,
                                              dtype=DTYPES[args.dtype])
    if args.no_clip:
        clip = None
    keep = args.keep
    if keep is not None and clip is None:
        raise ValueError("--keep needs a CLIP model (the checkpoint has none, or --no-clip was given)")
    result = generate(model, vae, args.captions, num_images=args.num_images, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, clip=clip, keep=keep,
                      tokenizer=tokenizer, batch_size=args.batch_size, progress=True)
    k = result.images.shape[1]
    labels = [c if j == 0 else "" for c in result.captions for j in range(k)]
    if result.scores is not None:
        labels = [f"{lab} ({float(s):.2f})".strip() for lab, s in zip(labels, result.scores.flatten())]
    image_grid(result.images.flatten(0, 1), nrow=k, captions=labels, scale=args.scale, path=args.out)
    paths = save_images(result.images, os.path.splitext(args.out)[0], result.captions, result.scores)
    print(f"wrote {args.out} and {len(paths)} images in {os.path.splitext(args.out)[0]}/")
    return 0


def register(subparsers):
    """Adds the `generate` command to the dalle-fast command line.

    Args:
        subparsers: the argparse subparsers of dalle_fast.cli.
    """
    p = subparsers.add_parser("generate", help="text to image: sample, decode, rerank with CLIP, write a PNG grid",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("captions", nargs="+", help="one or more captions")
    p.add_argument("--checkpoint", default=None,
                   help="a model directory (dalle/, dvae/, tokenizer.json, optional clip/) or a train-dalle run; "
                        "default: the small Shapes model bundled in the package")
    p.add_argument("-n", "--num-images", type=int, default=16, help="samples per caption")
    p.add_argument("--keep", type=int, default=None, help="keep the best K per caption by CLIP score")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=None, help="sequences sampled at once (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default=None, help="attention backend override: fused, flex or dense")
    p.add_argument("--dtype", default="float32", choices=sorted(DTYPES),
                   help="dtype of the transformer's residual branches and KV caches while sampling; "
                        "embeddings, gains, heads and logits stay fp32 (the paper's mixed precision)")
    p.add_argument("--no-clip", action="store_true", help="do not rerank")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--scale", type=int, default=2, help="upscaling of the grid's tiles (nearest)")
    p.add_argument("--out", default="grid.png", help="PNG grid; the single images go in a folder beside it")
    from .diffusion.cli import add_generate_args
    add_generate_args(p)
    p.set_defaults(func=_cmd_generate)
