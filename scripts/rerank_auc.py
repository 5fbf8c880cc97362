#!/usr/bin/env python
"""How well a CLIP ranks the generator's own samples, without the full `dalle-fast eval` each time.

  scripts/rerank_auc.py save SAMPLES.safetensors [--checkpoint DIR] [--seed 0] [-n 16]
      samples `dalle-fast eval`'s 60 prompts n times each (same sampler and seed as the eval, so the same
      images), judges every image once and stores images (uint8) and verdicts.
  scripts/rerank_auc.py score SAMPLES.safetensors CLIP_DIR [CLIP_DIR ...] [--keep 4]
      for each CLIP: the within-prompt shape AUC (per prompt, over every pair (right-shaped, wrong-shaped)
      of its samples by the judge, the share that the CLIP scores the right one higher, ties half; averaged
      over the prompts that have both kinds), the same for "all right", and the eval's reranked figures
      (best --keep of n by CLIP score), which equal `dalle-fast eval --clip CLIP_DIR` on the same samples.
"""
import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dalle_fast.checkpoint import atomic_save_safetensors, load_safetensors  # noqa: E402
from dalle_fast.eval.quality import METRICS, default_prompts, evaluate, summarise  # noqa: E402

FIELDS = METRICS   # the judge's per-image fields, stored in this order


def save_samples(report, path, seed=0, checkpoint=None):
    """An unreranked quality.evaluate() report as path: images (P, n, 3, H, W) uint8, verdicts (P, n, fields)
    (NaN where the judge has none, e.g. no small object) and the prompts in its metadata."""
    P, n = report.images.shape[:2]
    verdicts = torch.tensor([[float("nan") if r[f] is None else float(r[f]) for f in FIELDS] for r in report.rows])
    meta = {"prompts": [[p.caption, p.group, p.kind] for p in report.prompts], "n": n, "seed": seed,
            "fields": list(FIELDS), "checkpoint": checkpoint or "bundled"}
    atomic_save_safetensors({"images": (report.images * 255).round().to(torch.uint8).contiguous(),
                             "verdicts": verdicts.view(P, n, len(FIELDS)).contiguous()},
                            path, metadata={"meta": json.dumps(meta)})


def save(args):
    from dalle_fast.eval.quality import dalle_sampler
    from dalle_fast.generate import load_bundle
    model, vae, tokenizer, _ = load_bundle(args.checkpoint)
    report = evaluate(dalle_sampler(model, vae, tokenizer, seed=args.seed), default_prompts(), n=args.num_images,
                      keep=min(4, args.num_images))
    save_samples(report, args.samples, args.seed, args.checkpoint)
    print(f"saved {report.images.shape[0]} x {args.num_images} samples and their verdicts to {args.samples} "
          f"({report.seconds:.0f} s)")


def load_samples(path):
    from safetensors import safe_open
    with safe_open(path, "pt") as f:
        meta = json.loads(f.metadata()["meta"])
    t = load_safetensors(path)
    return t["images"].float() / 255, t["verdicts"], meta


def pair_auc(scores, right):
    """Share of (right, wrong) pairs whose right member scores higher (ties count half); None if a class is empty."""
    pos, neg = scores[right], scores[~right]
    if len(pos) == 0 or len(neg) == 0:
        return None
    diff = pos[:, None] - neg[None, :]
    return ((diff > 0).float() + 0.5 * (diff == 0).float()).mean().item()


def ranking_report(scores, verdicts, meta, keep):
    """scores (P, n) -> {'shape_auc', 'ok_auc', 'prompts_mixed', 'summary'} for one reranker."""
    fields = meta["fields"]
    out = {}
    for name in ("shape", "ok"):
        right = verdicts[..., fields.index(name)] > 0.5
        aucs = [pair_auc(scores[i], right[i]) for i in range(len(scores))]
        aucs = [a for a in aucs if a is not None]
        out[f"{name}_auc"] = sum(aucs) / len(aucs) if aucs else None
        out[f"{name}_prompts"] = len(aucs)
    rows = []
    for i, (cap, group, kind) in enumerate(meta["prompts"]):
        order = scores[i].argsort(descending=True, stable=True)
        for rank, j in enumerate(order.tolist()):
            v = verdicts[i, j]
            row = {"group": group, "reranked": rank < keep}
            for k, f in enumerate(fields):
                row[f] = None if torch.isnan(v[k]) else v[k].item()
            rows.append(row)
    out["summary"] = summarise(rows)
    return out


def score(args):
    from dalle_fast.clip import CLIPReranker
    images, verdicts, meta = load_samples(args.samples)
    P, n = images.shape[:2]
    caps = [p[0] for p in meta["prompts"] for _ in range(n)]
    results = {}
    for d in args.clips:
        clip = CLIPReranker.from_pretrained(d)
        s = clip.score(images.flatten(0, 1), caps).view(P, n)
        results[d] = r = ranking_report(s, verdicts, meta, args.keep)
        rr, un = r["summary"]["reranked"], r["summary"]["unreranked"]
        print(f"{d}: shape AUC {r['shape_auc']:.3f} ({r['shape_prompts']} prompts), all-right AUC "
              f"{r['ok_auc']:.3f} | best {args.keep} of {n}: shape {100 * rr['all']['shape']:.1f} "
              f"(unreranked {100 * un['all']['shape']:.1f}), small {100 * rr['all']['shape_small']:.1f}, "
              f"seen {100 * rr['seen']['shape']:.1f}, held-out {100 * rr['heldout']['shape']:.1f}, "
              f"all right {100 * rr['all']['ok']:.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("save")
    s.add_argument("samples")
    s.add_argument("--checkpoint", default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("-n", "--num-images", type=int, default=16)
    s.set_defaults(func=save)
    c = sub.add_parser("score")
    c.add_argument("samples")
    c.add_argument("clips", nargs="+")
    c.add_argument("--keep", type=int, default=4)
    c.add_argument("--json", default=None, help="also write every figure here")
    c.set_defaults(func=score)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.func(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
