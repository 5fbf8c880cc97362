"""`dalle-fast train-clip`: a small open_clip model trained with open_clip's contrastive loss on the
same image-caption data as the transformer, so that CLIP reranking works end to end where no
pretrained CLIP is at hand (nothing is downloaded). Writes an open_clip local-dir that
dalle_fast.clip.CLIPReranker.from_pretrained reads.
"""
import argparse
import time

import numpy as np
import torch

from . import common
from ..data.shapes import SHAPES, SIZES, Shapes, _SIZE_FRAC, caption_of


class HardNegativeShapes(torch.utils.data.Dataset):
    """Shapes items in pairs: the scene and a twin that differs in one thing a weak CLIP overlooks, so
    that the contrastive loss must tell them apart: one object's shape (same box), a single object's
    size, or (two objects of two colours) their colours swapped. Item: (images (2, 3, S, S), (caption, twin caption))."""

    def __init__(self, shapes: Shapes):
        self.shapes = shapes

    def __len__(self):
        return len(self.shapes)

    def twin(self, scene, rng):
        objs = [dict(o) for o in scene["objects"]]
        kinds = ["shape", "shape"] + (["size"] if len(objs) == 1 else
                                      ["swap"] if objs[0]["colour"] != objs[1]["colour"] else [])
        kind = kinds[rng.integers(len(kinds))]
        S = self.shapes.image_size
        if kind == "shape":
            o = objs[rng.integers(len(objs))]
            o["shape"] = [s for s in SHAPES if s != o["shape"]][rng.integers(len(SHAPES) - 1)]
        elif kind == "size":
            o = objs[0]
            o["size"] = [s for s in SIZES if s != o["size"]][0]
            x, y, d = o["box"]
            side = max(3, round(_SIZE_FRAC[o["size"]] * S))
            cx, cy = x + d / 2, y + d / 2
            o["box"] = (int(np.clip(round(cx - side / 2), 0, S - side)), int(np.clip(round(cy - side / 2), 0, S - side)),
                        side)
        else:
            objs[0]["colour"], objs[1]["colour"] = objs[1]["colour"], objs[0]["colour"]
        return {"objects": objs, "relation": scene["relation"], "caption": caption_of(objs, scene["relation"])}

    def __getitem__(self, index):
        scene = self.shapes.describe(int(index))
        twin = self.twin(scene, np.random.default_rng([self.shapes.seed, 7, int(index)]))
        return torch.stack([self.shapes.render(scene), self.shapes.render(twin)]), (scene["caption"], twin["caption"])


def _load_vae(directory, image_size, device):
    from ..models.dvae import DiscreteVAE
    vae = DiscreteVAE.from_pretrained(directory, device=device).eval()
    if vae.image_size != image_size:
        raise ValueError(f"--through-vae: the dVAE in {directory} takes {vae.image_size}-pixel images, "
                         f"but --image-size is {image_size}")
    return vae


@torch.no_grad()
def through_vae(vae, images, fraction=1.0, generator=None):
    """Images with a share of them replaced by their dVAE reconstruction decode(encode(x)): what the
    transformer's tokens look like once decoded (train-clip --through-vae).

    Args:
        vae: a DiscreteVAE of the images' size.
        images: (B, 3, S, S) in [0, 1].
        fraction: the chance that each image is replaced, in [0, 1].
        generator: torch.Generator for that choice (None: the global one).
    Returns:
        (B, 3, S, S) in [0, 1], a new tensor where any image was replaced.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction!r}")
    pick = torch.rand(len(images), generator=generator) < fraction
    if not pick.any():
        return images
    out = images.clone()
    idx = pick.nonzero().flatten().to(images.device)
    out[idx] = vae.reconstruct(images[idx]).to(images.dtype).clamp_(0, 1)
    return out


def train_clip(args):
    from open_clip.loss import ClipLoss
    from ..clip import SHAPES_PREPROCESS, build_clip, save_clip, shapes_clip_config
    from ..data import open_dataset
    from ..tokenizer import BPETokenizer

    torch.manual_seed(args.seed)
    device = common.choose_device(args.device)
    tokenizer = BPETokenizer.from_file(args.tokenizer)
    cfg = shapes_clip_config(tokenizer.vocab_size, args.text_len, image_size=args.image_size,
                             embed_dim=args.embed_dim, width=args.width, layers=args.layers,
                             patch_size=args.patch_size)
    model = build_clip(cfg, output_dict=True).to(device).train()
    dataset = open_dataset(args.data, image_size=args.image_size, seed=args.seed + 1, length=args.length,
                           split=args.split)
    if args.hard_negatives:
        if not isinstance(dataset, Shapes):
            raise ValueError("--hard-negatives needs --data shapes (twins are drawn from the scene description)")
        dataset = HardNegativeShapes(dataset)
    batches = common.ResumableBatches(dataset, args.batch_size, seed=args.seed)
    vae = _load_vae(args.through_vae, args.image_size, device) if args.through_vae else None
    vae_gen = torch.Generator().manual_seed(args.seed + 2)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embedding" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embedding" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": rest, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    loss_fn = ClipLoss()
    mean = torch.tensor(SHAPES_PREPROCESS["mean"], device=device).view(1, 3, 1, 1)
    std = torch.tensor(SHAPES_PREPROCESS["std"], device=device).view(1, 3, 1, 1)
    bar = common.Progress(args.steps, enabled=not args.quiet, desc="train-clip")
    log = common.MetricLog(args.out, ["step", "loss", "accuracy", "lr"])
    start = time.perf_counter()
    try:
        for step in range(args.steps):
            images, captions = next(batches)
            if args.hard_negatives:  # (B, 2, 3, S, S) and B caption pairs -> 2B items, each twin beside its scene
                images, captions = images.flatten(0, 1), [c for pair in captions for c in pair]
            images = images.to(device)
            if vae is not None:  # the generator's image distribution: decode(encode(x)), scene and twin alike
                images = through_vae(vae, images, args.vae_fraction, vae_gen)
            images = (images - mean) / std
            text = tokenizer.tokenize(captions, args.text_len).to(device)
            lr = args.lr * min(1.0, (step + 1) / args.warmup) if step < args.warmup else \
                common.cosine(step - args.warmup, args.steps - args.warmup, args.lr, args.lr * 0.01)
            for g in opt.param_groups:
                g["lr"] = lr
            out = model(images, text)
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            with torch.no_grad():  # open_clip clamps the learned temperature at 100
                model.logit_scale.clamp_(0, 4.6052)
                # identical captions in a batch are not negatives of each other; accuracy counts any match
                sim = out["image_features"] @ out["text_features"].T
                same = torch.tensor([[a == b for b in captions] for a in captions], device=device)
                acc = same[torch.arange(len(captions)), sim.argmax(1)].float().mean().item()
            bar.update(1, loss=loss.item(), acc=acc)
            if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
                log.log({"step": step + 1, "loss": loss.item(), "accuracy": acc, "lr": lr})
    finally:
        bar.close()
    model.eval()
    save_clip(model, args.out, cfg, preprocess_cfg={**SHAPES_PREPROCESS, "size": args.image_size},
              tokenizer_file=args.tokenizer)
    log.write_json({"steps": args.steps, "final_loss": log.rows[-1]["loss"] if log.rows else None,
                    "seconds": round(time.perf_counter() - start, 1)})
    return args.out


def register(subparsers):
    p = subparsers.add_parser("train-clip", help="train a small open_clip CLIP for reranking (contrastive loss)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="shapes")
    p.add_argument("--split", default="train")
    p.add_argument("--length", type=int, default=20000)
    p.add_argument("--tokenizer", required=True, help="the BPE tokenizer JSON (train-tokenizer)")
    p.add_argument("--out", required=True, help="output directory (open_clip local-dir format)")
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--text-len", type=int, default=24)
    p.add_argument("--embed-dim", type=int, default=64)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--hard-negatives", action="store_true",
                   help="Shapes only: each batch item comes with a twin differing in one object's shape or size, "
                        "or with two objects' colours swapped (batch holds 2x --batch-size images)")
    p.add_argument("--through-vae", default=None, metavar="DIR",
                   help="a dVAE directory (e.g. the bundle's dvae/): train on decode(encode(x)) of the images (scene "
                        "and hard-negative twin alike), the image distribution the transformer's samples come in")
    p.add_argument("--vae-fraction", type=float, default=1.0,
                   help="with --through-vae: the share of images (chosen at random) passed through the dVAE")
    p.add_argument("--patch-size", type=int, default=8, help="ViT patch side in pixels")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd)


def _cmd(args):
    out = train_clip(args)
    print(f"wrote the CLIP model to {out}")
    return 0
