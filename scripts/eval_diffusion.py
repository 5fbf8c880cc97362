#!/usr/bin/env python
"""The Shapes judge (dalle_fast.eval) on the three families, and on Imagen against the guidance weight w
with and without dynamic thresholding. One JSON line per setting is appended to --out
(default benchmarks/results/diffusion_quality.jsonl): family, w, threshold, steps, the judge's
accuracies (every sample, no reranking; seen / held-out / all), seconds per image and the share of
saturated pixel values (exactly 0 or 1 in some channel), which high w without thresholding drives up,
and the background (pixels the judge reads as Shapes' black, every channel < 0.5): its mean value
(bg_level; 0 in the data) and its speckle (bg_speckle: mean |x - its 3x3 neighbourhood's mean|).

  scripts/eval_diffusion.py --family imagen --guidance 1 3 8 --threshold dynamic none -n 2 --prompts single
  scripts/eval_diffusion.py --family unclip -n 2
  scripts/eval_diffusion.py --family dalle -n 2
"""
import argparse
import datetime
import itertools
import json
import os
import sys
import time

import torch


def background_stats(images):
    """(bg_level, bg_speckle) of (..., 3, S, S) images in [0, 1] over the pixels whose channels are all
    < 0.5: their mean value, and their mean absolute difference from the 3x3 box mean of the image
    (high-frequency noise; edge pixels next to an object add a little even in clean data)."""
    x = images.reshape(-1, *images.shape[-3:]).float().clamp(0, 1)
    bg = (x < 0.5).all(1, keepdim=True).expand_as(x)
    local = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    n = bg.sum().clamp(min=1)
    return float(x[bg].sum() / n), float((x - local).abs()[bg].sum() / n)


def sampler_for(family, directory, w, threshold, steps, upsample, seed, sampler="ddim"):
    if family == "dalle":
        from dalle_fast.eval.quality import dalle_sampler
        from dalle_fast.generate import load_bundle
        model, vae, tokenizer, _ = load_bundle(directory)
        return dalle_sampler(model, vae, tokenizer, seed=seed)
    from dalle_fast.diffusion import load_pipeline
    pipe = load_pipeline(family, directory)

    def sample(captions, n):
        return pipe.generate(captions, n=n, guidance=w, threshold=threshold, steps=steps, upsample=upsample,
                             seed=seed, sampler=sampler)
    return sample


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", required=True, choices=("dalle", "imagen", "unclip"))
    p.add_argument("--dir", default=None, help="model directory (default: the bundled models)")
    p.add_argument("--guidance", "-w", type=float, nargs="+", default=[3.0])
    p.add_argument("--threshold", nargs="+", default=["dynamic"], choices=("dynamic", "static", "none"))
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--upsample", action="store_true", help="judge the 64x64 output of the cascade")
    p.add_argument("-n", type=int, default=2, help="samples per prompt")
    p.add_argument("--prompts", default="all", choices=("all", "single", "pair"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "..", "benchmarks", "results",
                                                 "diffusion_quality.jsonl"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    from dalle_fast.eval.quality import default_prompts, evaluate
    prompts = [q for q in default_prompts() if args.prompts == "all" or q.kind == args.prompts]
    settings = [(None, None)] if args.family == "dalle" else itertools.product(args.guidance, args.threshold)
    for w, th in settings:
        sample = sampler_for(args.family, args.dir, w, th, args.steps, args.upsample, args.seed,
                             args.sampler)
        t0 = time.perf_counter()
        images = sample([q.caption for q in prompts], args.n)
        seconds = time.perf_counter() - t0
        rep = evaluate(lambda caps, n: images, prompts, n=args.n, keep=args.n)
        sat = float(((images <= 0) | (images >= 1)).float().mean())
        bg_level, bg_speckle = background_stats(images)
        row = {"family": args.family, "w": w, "threshold": th, "steps": None if args.family == "dalle" else args.steps,
               "sampler": None if args.family == "dalle" else args.sampler,
               "n": args.n, "prompts": args.prompts, "size": images.shape[-1],
               "s_per_image": round(seconds / images[:, :, 0, 0, 0].numel(), 3), "saturated": round(sat, 4),
               "bg_level": round(bg_level, 4), "bg_speckle": round(bg_speckle, 4),
               **{f"{g}_{m}": (None if v is None else round(v, 4)) for g in ("seen", "heldout", "all")
                  for m, v in rep.summary["unreranked"][g].items() if m != "images"},
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        print(json.dumps(row), flush=True)
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
