#!/usr/bin/env python
"""The ceiling a dVAE puts on a text-to-image model: the Shapes judge (dalle_fast.eval) on the dVAE's
reconstructions decode(encode(x)) of drawn Shapes scenes (seen and held-out, one and two objects).
No transformer can draw what its dVAE's tokens cannot represent, so shape accuracy here bounds the
bundle's.

Usage: scripts/dvae_ceiling.py DVAE_DIR [DVAE_DIR ...] [--count 400] [--seed 7]
(DVAE_DIR: a save_pretrained directory, e.g. dalle_fast/assets/dvae or a train-vae run's model/).
Prints one row per dVAE: PSNR and judged colour / shape / small-shape / size / relation accuracy (%),
with the ground truth's own row first (the judge on the originals).
"""
import argparse
import sys

import torch

from dalle_fast.data.shapes import Shapes
from dalle_fast.eval import judge, parse_caption
from dalle_fast.eval.quality import METRICS, Prompt, _row, summarise
from dalle_fast.models.dvae import DiscreteVAE, psnr


def scenes(count, seed, image_size=64):
    """count drawn scenes, a quarter of them with a held-out object: (images, prompts)."""
    held = count // 4
    sets = [(Shapes(length=count - held, seed=seed, image_size=image_size, split="all"), "seen"),
            (Shapes(length=held, seed=seed, image_size=image_size, split="heldout"), "heldout")]
    images, prompts = [], []
    for ds, group in sets:
        for i in range(len(ds)):
            img, cap = ds[i]
            images.append(img)
            prompts.append(Prompt(cap, group, "pair" if parse_caption(cap).relation else "single"))
    return torch.stack(images), prompts


def judged(images, prompts):
    """summarise() of the judge's verdicts: {'seen' | 'heldout' | 'all': {metric: accuracy}}, plus
    'triangles': shape accuracy of lone triangles of a seen colour and of the held-out green ones."""
    verdicts = judge(images, [p.caption for p in prompts])
    rows = [_row(p, 0, 0, None, v, keep=1) for p, v in zip(prompts, verdicts)]
    out = summarise(rows)["unreranked"]
    tri = {"seen": [], "heldout": []}
    for p, v in zip(prompts, verdicts):
        objs = parse_caption(p.caption).objects
        if len(objs) == 1 and objs[0].shape == "triangle":
            tri["heldout" if objs[0].colour == "green" else "seen"].append(v.shape)
    out["triangles"] = {k: sum(v) / len(v) if v else float("nan") for k, v in tri.items()}
    return out


@torch.no_grad()
def ceiling(vae, images, batch=64):
    """Reconstructions of images through vae's argmax tokens."""
    vae.eval()
    return torch.cat([vae.reconstruct(images[i:i + batch]) for i in range(0, len(images), batch)])


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("dirs", nargs="+", help="dVAE directories (save_pretrained)")
    p.add_argument("--count", type=int, default=400, help="drawn scenes (a quarter held out)")
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.count < 4:
        raise ValueError(f"--count must be >= 4, got {args.count}")
    torch.set_num_threads(args.threads)
    images, prompts = scenes(args.count, args.seed)
    cols = ["psnr"] + [m for m in ("colour", "shape", "shape_small", "size", "relation") if m in METRICS]
    extra = ["heldout shape", "triangle", "green triangle"]
    print(f"{'model':40s} " + " ".join(f"{c:>11s}" for c in cols) + " " + " ".join(f"{c:>14s}" for c in extra))

    def line(name, summary, db):
        vals = [f"{db:11.1f}"] + [f"{100 * summary['all'][c]:11.1f}" for c in cols[1:]]
        more = [summary["heldout"]["shape"], summary["triangles"]["seen"], summary["triangles"]["heldout"]]
        print(f"{name:40s} " + " ".join(vals) + " " + " ".join(f"{100 * v:14.1f}" for v in more), flush=True)

    line("ground truth", judged(images, prompts), float("inf"))
    for d in args.dirs:
        vae = DiscreteVAE.from_pretrained(d)
        recon = ceiling(vae, images)
        line(d[-40:], judged(recon, prompts), float(psnr(recon, images)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
