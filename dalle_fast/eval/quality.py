"""The quality report: sample a fixed list of Shapes prompts, judge every image, and tabulate how often
the asked colour, shape, size and relation come out, CLIP-reranked (best `keep` of `n`) and not.

Any model family can be judged: evaluate() takes a `sample(captions, n) -> images` callable returning
(len(captions), n, 3, H, W) in [0, 1], and an optional `score(images, captions) -> (N,)` reranker.
dalle_sampler() and clip_scorer() build those for the transformer and CLIP of a model directory.
`dalle-fast eval` (and scripts/eval_quality.py) runs it on the bundled model or a checkpoint and
writes per-image rows (CSV), the summary (JSON) and a PNG grid of every prompt's samples.
"""
import argparse
import csv
import dataclasses
import json
import os
import time

import torch

from ..data.shapes import DEFAULT_HOLDOUT, SHAPES, SIZES, COLOURS, _matches, _parse_holdout
from .judge import judge, parse_caption

# Two-object prompts: per relation four seen pairs (one of them a single colour, where telling the
# objects apart needs their shape or size) and two with a held-out object, first or second.
SEEN_PAIRS = (
    "a small red circle to the left of a large blue square",
    "a large yellow square to the left of a small magenta triangle",
    "a small cyan triangle to the left of a small cyan circle",
    "a large blue triangle to the left of a large red circle",
    "a large magenta circle to the right of a small yellow square",
    "a small green square to the right of a large cyan triangle",
    "a large red triangle to the right of a large red square",
    "a small blue circle to the right of a small green circle",
    "a small magenta circle above a large cyan square",
    "a large red square above a small yellow triangle",
    "a small blue square above a small blue triangle",
    "a large cyan circle above a large magenta triangle",
    "a small yellow triangle below a large green circle",
    "a large cyan square below a small red circle",
    "a small magenta triangle below a large magenta circle",
    "a large green square below a small blue triangle",
)
HELD_OUT_PAIRS = (
    "a large green triangle to the left of a small red circle",
    "a small blue square to the left of a small green triangle",
    "a small green triangle to the right of a large yellow square",
    "a large magenta circle to the right of a large green triangle",
    "a small green triangle above a large cyan circle",
    "a large red square above a large green triangle",
    "a large green triangle below a small magenta square",
    "a small green circle below a small green triangle",
)
METRICS = ("colour", "shape", "shape_small", "size", "relation", "count", "ok")


@dataclasses.dataclass
class Prompt:
    caption: str
    group: str      # 'seen' or 'heldout' (names an object combination held out of training)
    kind: str       # 'single' or 'pair'


def default_prompts(holdout=DEFAULT_HOLDOUT):
    """Every size x colour x shape as a single object (36), then the 24 two-object prompts above."""
    held = _parse_holdout(holdout) if holdout else []
    caps = [f"a {s} {c} {sh}" for s in SIZES for c in COLOURS for sh in SHAPES] + list(SEEN_PAIRS + HELD_OUT_PAIRS)
    out = []
    for cap in caps:
        spec = parse_caption(cap)
        heldout = any(_matches(dataclasses.asdict(o), held) for o in spec.objects)
        out.append(Prompt(cap, "heldout" if heldout else "seen", "pair" if spec.relation else "single"))
    return out


def dalle_sampler(model, vae, tokenizer, seed=0, batch_size=None, **generate_kwargs):
    """sample(captions, n) -> (len(captions), n, 3, H, W) images from a DALLE transformer and its dVAE."""
    from ..generate import generate

    def sample(captions, n):
        return generate(model, vae, list(captions), num_images=n, seed=seed, tokenizer=tokenizer,
                        batch_size=batch_size, **generate_kwargs).images
    return sample


def clip_scorer(clip):
    """score(images (N, 3, H, W), captions (N,)) -> (N,) with a dalle_fast.clip.CLIPReranker."""
    def score(images, captions):
        return clip.score(images, list(captions))
    return score


@dataclasses.dataclass
class Report:
    prompts: list
    images: torch.Tensor        # (P, n, 3, H, W), each prompt's samples best first when scored
    scores: torch.Tensor        # (P, n) reranker scores (None without a reranker)
    rows: list                  # one dict per image (see _row)
    summary: dict               # setting -> group -> metric -> accuracy
    keep: int
    seconds: float
    per_seed: list = None       # pool_reports: [(seed, summary)] of each run pooled into this one


def _row(prompt, index, rank, score, verdict, keep):
    objs = "; ".join(f"{o.size} {o.colour} {o.shape} @({o.centre[0]:.0f},{o.centre[1]:.0f}) fill {o.fill:.2f}"
                     for o in verdict.objects)
    return {"caption": prompt.caption, "group": prompt.group, "kind": prompt.kind, "sample": index,
            "rank": rank, "reranked": rank < keep, "clip_score": None if score is None else round(float(score), 4),
            "colour": verdict.colour, "shape": verdict.shape, "size": verdict.size,
            "shape_small": _small_shape(verdict), "relation": verdict.relation, "count": verdict.count,
            "ok": verdict.ok, "found": objs}


def _small_shape(verdict):
    small = [p["shape"] for p in verdict.per_object if p["size"] == "small"]
    return sum(small) / len(small) if small else None


def summarise(rows):
    """{'unreranked' | 'reranked': {'seen' | 'heldout' | 'all': {metric: accuracy or None, 'images': N}}}:
    unreranked over every sample, reranked over each prompt's best `keep` by the reranker's score."""
    out = {}
    for setting in ("unreranked", "reranked"):
        chosen = [r for r in rows if setting == "unreranked" or r["reranked"]]
        out[setting] = {}
        for group in ("seen", "heldout", "all"):
            sel = [r for r in chosen if group == "all" or r["group"] == group]
            acc = {"images": len(sel)}
            for m in METRICS:
                vals = [float(r[m]) for r in sel if r[m] is not None]
                acc[m] = sum(vals) / len(vals) if vals else None
            out[setting][group] = acc
    return out


def evaluate(sample, prompts=None, n=16, keep=4, score=None, progress=None):
    """Samples n images per prompt, judges each, and summarises.

    Args:
        sample: callable(captions, n) -> (len(captions), n, 3, H, W) images in [0, 1] (or uint8).
        prompts: list of Prompt (default: default_prompts()).
        n: samples per prompt; keep: how many the reranker keeps per prompt.
        score: optional callable(images (N, 3, H, W), captions) -> (N,); higher is better. Without it,
            'reranked' is the first `keep` samples (no reranking).
    Returns:
        a Report.
    """
    prompts = default_prompts() if prompts is None else list(prompts)
    if not prompts:
        raise ValueError("prompts must not be empty")
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if not isinstance(keep, int) or not 1 <= keep <= n:
        raise ValueError(f"keep must be an int in [1, n={n}], got {keep!r}")
    start = time.perf_counter()
    caps = [p.caption for p in prompts]
    images = sample(caps, n)
    if not isinstance(images, torch.Tensor) or images.dim() != 5 or tuple(images.shape[:3]) != (len(caps), n, 3):
        raise ValueError(f"sample(captions, n) must return ({len(caps)}, {n}, 3, H, W), got "
                         f"{getattr(images, 'shape', type(images).__name__)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255
    images = images.detach().float().cpu()
    flat_caps = [c for c in caps for _ in range(n)]
    scores = None
    if score is not None:
        scores = torch.as_tensor(score(images.flatten(0, 1), flat_caps)).float().cpu().view(len(caps), n)
        order = scores.argsort(dim=1, descending=True, stable=True)
        images = torch.stack([images[i, order[i]] for i in range(len(caps))])
        scores = torch.gather(scores, 1, order)
    verdicts = judge(images.flatten(0, 1), flat_caps)
    rows = []
    for i, p in enumerate(prompts):
        for j in range(n):
            rows.append(_row(p, j, j, None if scores is None else scores[i, j], verdicts[i * n + j], keep))
    if progress:
        progress(len(rows))
    return Report(prompts, images, scores, rows, summarise(rows), keep, time.perf_counter() - start)


def pool_reports(reports, seeds):
    """One Report of several evaluate() runs of the same prompts (different sampling seeds): rows gain a
    'seed' column, the summary pools every row (so a figure's sample is len(reports) times larger),
    images are the first run's, and per_seed keeps each run's own summary for the spread.

    Args:
        reports: Reports of evaluate() over the same prompts, n and keep.
        seeds: the sampling seed of each.
    Returns:
        a Report.
    """
    if not reports or len(reports) != len(seeds):
        raise ValueError(f"need one seed per report, got {len(reports)} reports and {len(seeds)} seeds")
    rows = [{"seed": s, **r} for rep, s in zip(reports, seeds) for r in rep.rows]
    first = reports[0]
    return Report(first.prompts, first.images, first.scores, rows, summarise(rows), first.keep,
                  sum(r.seconds for r in reports), [(s, r.summary) for r, s in zip(reports, seeds)])


def format_spread(report):
    """One line per headline figure with its value in each pooled run (empty for a single run)."""
    if not report.per_seed or len(report.per_seed) < 2:
        return ""
    lines = []
    for setting, group, metric in (("reranked", "all", "shape"), ("reranked", "all", "shape_small"),
                                   ("reranked", "seen", "shape"), ("reranked", "heldout", "shape"),
                                   ("unreranked", "all", "shape")):
        vals = [summ[setting][group][metric] for _, summ in report.per_seed]
        lines.append(f"{setting} {group} {metric} per seed ({', '.join(str(s) for s, _ in report.per_seed)}): "
                     + ", ".join(_pct(v) for v in vals))
    return "\n".join(lines)


def _pct(v):
    return "-" if v is None else f"{100 * v:.1f}"


def format_table(summary, n=None, keep=None):
    """The summary as a Markdown table: a row per setting and group, a column per metric (percent)."""
    head = ["setting", "group", "images", "colour", "shape", "shape (small)", "size", "relation", "count", "all right"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    names = {"unreranked": f"all {n} samples" if n else "unreranked",
             "reranked": f"CLIP best {keep} of {n}" if n else "reranked"}
    for setting in ("reranked", "unreranked"):
        for group in ("seen", "heldout", "all"):
            a = summary[setting][group]
            lines.append("| " + " | ".join([names[setting], group, str(a["images"])] +
                                           [_pct(a[m]) for m in METRICS]) + " |")
    return "\n".join(lines)


def write_report(report, out_dir, scale=1):
    """Writes out_dir/samples.csv (a row per image), summary.json, table.md and grid.png (a row per prompt,
    its samples best first, each tile marked ok / x by the judge). Returns the paths."""
    from ..viz import image_grid
    os.makedirs(out_dir, exist_ok=True)
    paths = {k: os.path.join(out_dir, f) for k, f in
             (("csv", "samples.csv"), ("json", "summary.json"), ("table", "table.md"), ("grid", "grid.png"))}
    with open(paths["csv"], "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(report.rows[0]))
        w.writeheader()
        w.writerows(report.rows)
    n = report.images.shape[1]
    with open(paths["json"], "w") as f:
        json.dump({"n": n, "keep": report.keep, "seconds": round(report.seconds, 1),
                   "prompts": [dataclasses.asdict(p) for p in report.prompts], "summary": report.summary,
                   "per_seed": [{"seed": s, "summary": summ} for s, summ in report.per_seed or []]}, f, indent=1)
    with open(paths["table"], "w") as f:
        f.write(format_table(report.summary, n, report.keep) + "\n")
    first = report.rows[:len(report.prompts) * n]   # the grid shows the first run's images
    labels = [(r["caption"] + " " if r["sample"] == 0 else "") + ("ok" if r["ok"] else "x") for r in first]
    image_grid(report.images.flatten(0, 1), nrow=n, captions=labels, scale=scale, path=paths["grid"],
               caption_width=12 * scale)
    return paths


# ---- command line ----
def _cmd_eval(args):
    from ..generate import DTYPES, load_bundle
    model, vae, tokenizer, clip = load_bundle(args.checkpoint, device=args.device, dtype=DTYPES[args.dtype])
    if args.clip:
        from ..clip import CLIPReranker
        clip = CLIPReranker.from_pretrained(args.clip, device=args.device)
    if args.vae:
        from ..models.dvae import DiscreteVAE
        vae = DiscreteVAE.from_pretrained(args.vae, device=args.device).eval()
        try:
            model._check_vae(vae)
        except ValueError as e:
            raise ValueError(f"--vae {args.vae}: {e}") from None
    prompts = default_prompts()
    if args.limit:
        prompts = prompts[::max(1, len(prompts) // args.limit)][:args.limit]
    if args.repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {args.repeats}")
    score = clip_scorer(clip) if clip is not None and not args.no_clip else None
    seeds = [args.seed + r for r in range(args.repeats)]
    reports = []
    for seed in seeds:
        sample = dalle_sampler(model, vae, tokenizer, seed=seed, batch_size=args.batch_size,
                               temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
        reports.append(evaluate(sample, prompts, n=args.num_images, keep=args.keep, score=score))
    report = pool_reports(reports, seeds) if len(reports) > 1 else reports[0]
    paths = write_report(report, args.out_dir)
    print(format_table(report.summary, args.num_images, args.keep))
    if len(reports) > 1:
        print(f"pooled over seeds {seeds[0]}..{seeds[-1]}\n" + format_spread(report))
    print(f"{len(report.rows)} images judged in {report.seconds:.0f} s; wrote {', '.join(paths.values())}")
    return 0


def add_arguments(p):
    p.add_argument("--checkpoint", default=None, help="model directory or train-dalle run (default: the bundled model)")
    p.add_argument("-n", "--num-images", type=int, default=16, help="samples per prompt")
    p.add_argument("--keep", type=int, default=4, help="the best K per prompt by CLIP score form the reranked figures")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=1,
                   help="run the eval with seeds seed, seed+1, ... and pool the figures (one seed's held-out "
                        "figures rest on 40 reranked images; seeds move them by several points)")
    p.add_argument("--limit", type=int, default=None, help="judge only this many prompts, spread over the list")
    p.add_argument("--batch-size", type=int, default=None, help="sequences sampled at once (default: all)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--clip", default=None, help="rerank with this CLIP directory instead of the model's own")
    p.add_argument("--no-clip", action="store_true", help="no reranker: 'reranked' figures are the first K samples")
    p.add_argument("--vae", default=None,
                   help="decode with this dVAE directory instead of the model's own (same tokens: e.g. a tuned decoder)")
    p.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (the paper's: 1)")
    p.add_argument("--top-k", type=int, default=None, help="sample only from the k most likely image tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out-dir", default="eval", help="where samples.csv, summary.json, table.md and grid.png go")
    p.set_defaults(func=_cmd_eval)
    return p


def register(subparsers):
    add_arguments(subparsers.add_parser(
        "eval", help="judge generated Shapes images: colour, shape, size, relation (reranked and not)",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
