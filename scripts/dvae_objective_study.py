#!/usr/bin/env python
"""Why the paper's dVAE objective alone stalls on Shapes: controlled runs of train_vae that differ in
one knob each (the same seed, data, model, steps, batch and lr), their curves in one PNG, and per run
  - per-step diagnostics (StepDiagnostics): encoder logit std and entropy, gradient norms reaching the
    encoder logits through the reconstruction and through beta * KL, decoder ln b on background and
    object pixels, batch codebook perplexity;
  - decoder diagnostics of the final EMA model: ln b and |mu - logit(x)| on background and object pixels;
  - what the final codes carry (code_mean_vs_median): PSNR of a per-code mean patch (squared-error
    optimum) against a per-code median patch (the L1 / logit-Laplace optimum).

Usage: scripts/dvae_objective_study.py OUT_DIR [--steps N] [--runs name,name] [--png docs/dvae_objective.png]
A finished run (OUT_DIR/<run>/study.json) is not retrained; --plot-only plots unfinished runs as they stand.
"""
import argparse
import json
import math
import os
import sys

import torch

from dalle_fast.data import Shapes
from dalle_fast.models.dvae import DVAEConfig, codebook_perplexity
from dalle_fast.train.vae import TrainVAEConfig, train_vae

BLACK = -2.1972  # logit(eps), rounded: mu of a black pixel with the small preset's eps 0.1
# name -> (train_vae overrides, DVAEConfig overrides); 'paper' is the paper's loss with the trainer's defaults
RUNS = {
    "paper": ({}, {}),
    "aux-mse": ({"mse_weight": 1000.0}, {}),
    "beta=0": ({"beta": 0.0}, {}),
    "beta-ramp-50%": ({"beta_frac": 0.5}, {}),
    "lr/4": ({"lr": 5e-4}, {}),
    "tau-100%": ({"tau_frac": 1.0}, {}),
    "eps=0.02": ({}, {"eps": 0.02}),
    "eps=0.25": ({}, {"eps": 0.25}),
    "ln-b-floor-0": ({}, {"min_log_b": 0.0}),
    "ln-b-floor--1": ({}, {"min_log_b": -1.0}),
    "codebook-std-1": ({}, {"codebook_init_std": 1.0}),
    "floor-0+codebook-std-1": ({}, {"min_log_b": 0.0, "codebook_init_std": 1.0}),
    "floor--1+codebook-std-1": ({}, {"min_log_b": -1.0, "codebook_init_std": 1.0}),
    "16x16-tokens": ({}, {"group_count": 3}),   # 4x4-pixel patches: an object covers most of its patches
    # the encoder's output conv scaled at init: a random encoder's argmax already hashes patches
    "enc-x10": ({}, {"encoder_output_init_gain": 10.0}),
    "enc-x30": ({}, {"encoder_output_init_gain": 30.0}),
    "enc-x10+codebook-std-1": ({}, {"encoder_output_init_gain": 10.0, "codebook_init_std": 1.0}),
    "enc-x30+codebook-std-1": ({}, {"encoder_output_init_gain": 30.0, "codebook_init_std": 1.0}),
    "enc-x3+codebook-std-1": ({}, {"encoder_output_init_gain": 3.0, "codebook_init_std": 1.0}),
    "enc-x10+codebook-std-1+lr-5e-4": ({"lr": 5e-4}, {"encoder_output_init_gain": 10.0, "codebook_init_std": 1.0}),
    # the decoder starts at black (mu bias logit(0.1)) instead of mid-grey: no common-mode push first
    "black-decoder": ({}, {"decoder_mu_init": BLACK}),
    "black-decoder+enc-x10+codebook-std-1": ({}, {"decoder_mu_init": BLACK, "encoder_output_init_gain": 10.0,
                                                  "codebook_init_std": 1.0}),
    "black-decoder+enc-x30+codebook-std-1": ({}, {"decoder_mu_init": BLACK, "encoder_output_init_gain": 30.0,
                                                  "codebook_init_std": 1.0}),
    "black-decoder+enc-x10+codebook-std-1+beta-ramp-0.17%": ({"beta_frac": 0.0017}, {
        "decoder_mu_init": BLACK, "encoder_output_init_gain": 10.0, "codebook_init_std": 1.0}),
    "black-decoder+enc-x10+codebook-std-1+beta-ramp-0.17%+tau-100%": ({"beta_frac": 0.0017, "tau_frac": 1.0}, {
        "decoder_mu_init": BLACK, "encoder_output_init_gain": 10.0, "codebook_init_std": 1.0}),
    "beta-ramp-0.17%": ({"beta_frac": 0.0017}, {}),
    "tau-start-0.5": ({"tau_start": 0.5}, {}),
    "tau-1/16": ({"tau_start": 1 / 16}, {}),
    "batch-32-lr-1e-3": ({"batch_size": 32, "lr": 1e-3}, {}),
}

DIAG_STEPS = set(range(0, 50, 5)) | set(range(50, 100_000, 50))


class StepDiagnostics:
    """on_step hook of train_vae: at DIAG_STEPS, the encoder's logit scale and entropy per position,
    the gradient norms reaching the encoder logits through the reconstruction (Gumbel-softmax path)
    and through beta * KL, the decoder's ln b on background and object pixels, and the batch's
    codebook perplexity (argmax tokens)."""

    def __init__(self, path=None):
        self.rows = []
        self.path = path  # each row is also appended there as a JSON line (watch a run as it goes)

    def __call__(self, step, model, out, images, sched):
        if step not in DIAG_STEPS:
            return
        logits = out["logits"]
        g_rec = torch.autograd.grad(out["recon"], logits, retain_graph=True)[0]
        beta_kl = sched["beta"] * out["kl"]
        g_kl = torch.autograd.grad(beta_kl, logits, retain_graph=True)[0] if beta_kl.requires_grad and sched["beta"] else \
            torch.zeros_like(logits)
        with torch.no_grad():
            lf = logits.float()
            logq = torch.log_softmax(lf, 1)
            c = model.config.input_channels
            ln_b = out["stats"][:, c:].float()
            obj = (images.amax(1, keepdim=True) > 0.5).expand_as(images)
            self.rows.append({
                "step": step, "tau": sched["tau"], "beta": sched["beta"],
                "logit_std": lf.std(1).mean().item(), "entropy": -(logq.exp() * logq).sum(1).mean().item(),
                "grad_recon": g_rec.norm().item(), "grad_kl": g_kl.norm().item(),
                "ln_b_background": ln_b[~obj].mean().item(),
                "ln_b_object": ln_b[obj].mean().item() if obj.any() else float("nan"),
                "perplexity": codebook_perplexity(out["tokens"], model.vocab_size),
                **_patch_codes(out["tokens"], images, model.config.downsample)})
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(self.rows[-1]) + "\n")


def _patch_codes(tokens, images, ds):
    """Distinct argmax codes among the token positions whose patch holds object pixels and among the
    all-background ones (batch perplexity is dominated by the background patches)."""
    obj = torch.nn.functional.max_pool2d((images.amax(1, keepdim=True) > 0.5).float(), ds)[:, 0] > 0
    return {"codes_object_patches": int(tokens[obj].unique().numel()),
            "codes_background_patches": int(tokens[~obj].unique().numel())}


@torch.no_grad()
def decoder_diagnostics(model, n=64, seed=123):
    """Mean ln b and mean |mu - logit(map(x))| over background (black) and object pixels of n images."""
    ds = Shapes(n, seed=seed, image_size=model.image_size)
    x = torch.stack([ds[i][0] for i in range(n)])
    stats = model.decode_stats(model.encode(x))
    c, eps = model.config.input_channels, model.config.eps
    mu, log_b = stats[:, :c], stats[:, c:]
    target = torch.logit((1 - 2 * eps) * x + eps)
    obj = (x.amax(1, keepdim=True) > 0.5).expand_as(x)
    out = {}
    for name, m in (("background", ~obj), ("object", obj)):
        out[f"ln_b_{name}"] = log_b[m].mean().item()
        out[f"abs_err_{name}"] = (mu - target).abs()[m].mean().item()
    return out


@torch.no_grad()
def code_mean_vs_median(model, n=512, seed=321):
    """What the codes carry, whatever the decoder: every 8x8 patch of n images replaced by the mean
    patch of its code (what a squared-error decoder that sees only the code converges to) or by the
    per-pixel median patch (what an L1 decoder such as the logit-Laplace's mu converges to). Returns
    the PSNR of each and the share of object pixels the median keeps (in-sample, no neighbouring codes)."""
    ds = Shapes(n, seed=seed, image_size=model.image_size)
    x = torch.stack([ds[i][0] for i in range(n)])
    tokens = model.encode(x).reshape(-1)
    ds_ = model.config.downsample
    patches = torch.nn.functional.unfold(x, ds_, stride=ds_).transpose(1, 2).reshape(-1, x.shape[1] * ds_ * ds_)
    mean, median = torch.empty_like(patches), torch.empty_like(patches)
    for k in tokens.unique():
        sel = tokens == k
        mean[sel] = patches[sel].mean(0)
        median[sel] = patches[sel].median(0).values
    obj = patches > 0.5
    out = {}
    for name, rec in (("mean", mean), ("median", median)):
        mse = (rec - patches).square().mean().item()
        out[f"code_{name}_psnr"] = 10 * math.log10(1 / max(mse, 1e-12))
    out["median_keeps_object_pixels"] = (median[obj] > 0.5).float().mean().item()
    out["codes_used"] = int(tokens.unique().numel())
    out["codes_used_by_object_patches"] = int(tokens[obj.any(1)].unique().numel())
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--runs", default="paper,aux-mse")
    p.add_argument("--png", default=None, help="eval PSNR curves of every run (default OUT/dvae_objective.png)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--plot-only", action="store_true",
                   help="train nothing: plot the runs' metrics.csv as they stand (unfinished runs too)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {}
    for name in args.runs.split(","):
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r}; known: {', '.join(RUNS)}")
        train_kw, model_kw = RUNS[name]
        run_dir = os.path.join(args.out, name.replace("/", "_").replace("%", "pc").replace("=", "_"))
        summary_path = os.path.join(run_dir, "study.json")
        if os.path.isfile(summary_path):
            with open(summary_path) as f:
                res = json.load(f)
            if "code_mean_psnr" not in res:  # a run finished before this diagnostic existed
                from dalle_fast.models.dvae import DiscreteVAE
                res.update(code_mean_vs_median(DiscreteVAE.from_pretrained(os.path.join(run_dir, "model")).eval()))
                with open(summary_path, "w") as f:
                    json.dump(res, f, indent=1)
            results[name] = {**res, "run_dir": run_dir}
            _print(name, res)
            continue
        if args.plot_only:
            if os.path.isfile(os.path.join(run_dir, "metrics.csv")):
                curve = [(r["step"], r["eval_psnr"]) for r in _rows(run_dir) if r.get("eval_psnr") is not None]
                diag_path = os.path.join(run_dir, "steps_diag.jsonl")
                diag_rows = [json.loads(line) for line in open(diag_path)] if os.path.isfile(diag_path) else []
                if curve:
                    results[f"{name}, stopped at {int(curve[-1][0])}"] = {
                        "eval_psnr": curve[-1][1], "curve": curve, "run_dir": run_dir, "steps_diag": diag_rows}
            continue
        cfg = TrainVAEConfig(**{"steps": args.steps, "batch_size": args.batch_size, "lr": args.lr, "sample_every": 50,
                                "checkpoint_every": args.steps, "log_every": 10, **train_kw})
        mcfg = DVAEConfig(**{**DVAEConfig.small().to_dict(), **model_kw})
        os.makedirs(run_dir, exist_ok=True)
        diag = StepDiagnostics(os.path.join(run_dir, "steps_diag.jsonl"))
        s = train_vae(run_dir, cfg, model_config=mcfg, progress=False, on_step=diag)
        ema_model = s.pop("ema_model")
        curve = [(r["step"], r["eval_psnr"]) for r in _rows(run_dir) if r.get("eval_psnr") not in (None, "")]
        res = {"eval_psnr": s["eval_psnr"], "perplexity": s["eval_perplexity"], "curve": curve,
               **decoder_diagnostics(ema_model), **code_mean_vs_median(ema_model), "steps_diag": diag.rows}
        with open(summary_path, "w") as f:
            json.dump(res, f, indent=1)
        results[name] = {**res, "run_dir": run_dir}
        _print(name, res)
    _plot(results, args.png or os.path.join(args.out, "dvae_objective.png"), args.steps)
    return 0


def _print(name, res):
    print(f"{name:24s} eval PSNR {res['eval_psnr']:.2f} dB  perplexity {res['perplexity']:.1f}  "
          f"ln b bg {res['ln_b_background']:.2f} obj {res['ln_b_object']:.2f}  "
          f"|err| bg {res['abs_err_background']:.2f} obj {res['abs_err_object']:.2f}  "
          f"codes used {res['codes_used']}: per-code mean {res['code_mean_psnr']:.2f} dB, median "
          f"{res['code_median_psnr']:.2f} dB (keeps {100 * res['median_keeps_object_pixels']:.0f}% of object pixels)",
          flush=True)


def _rows(run_dir):
    import csv
    with open(os.path.join(run_dir, "metrics.csv")) as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def _plot(results, path, steps):
    """Top row per run: training PSNR, codebook perplexity (every 10 steps), eval PSNR (EMA), and its
    first 400 steps against an all-black image's 12.11 dB (dotted). Bottom
    row, from the per-step diagnostics (finished runs, and stopped runs under --plot-only): decoder ln b
    on background (solid) and object (dashed) pixels, gradient norm reaching the encoder logits through
    the reconstruction (solid) and through beta * KL (dashed), the encoder logits' std over codes, and
    the number of codes the batch's object patches use."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(2, 4, figsize=(20, 8))
    for i, (name, r) in enumerate(results.items()):
        colour = f"C{i}"
        rows = [row for row in _rows(r["run_dir"]) if row.get("psnr") is not None]
        axes[0, 0].plot([row["step"] for row in rows], [row["psnr"] for row in rows], lw=1, color=colour, label=name)
        axes[0, 1].plot([row["step"] for row in rows], [row["perplexity"] for row in rows], lw=1, color=colour,
                        label=name)
        axes[0, 2].plot([c[0] for c in r["curve"]], [c[1] for c in r["curve"]], marker="o", ms=3, color=colour,
                        label=f"{name} ({r['eval_psnr']:.1f} dB)")
        early = [c for c in r["curve"] if c[0] <= 400]
        axes[0, 3].plot([c[0] for c in early], [c[1] for c in early], marker="o", ms=3, color=colour, label=name)
        d = r.get("steps_diag") or []
        if d:
            st = [row["step"] for row in d]
            axes[1, 0].plot(st, [row["ln_b_background"] for row in d], color=colour, label=f"{name} background")
            axes[1, 0].plot(st, [row["ln_b_object"] for row in d], color=colour, ls="--", label=f"{name} objects")
            axes[1, 1].semilogy(st, [max(row["grad_recon"], 1e-12) for row in d], color=colour,
                                label=f"{name} reconstruction")
            axes[1, 1].semilogy(st, [max(row["grad_kl"], 1e-12) for row in d], color=colour, ls="--",
                                label=f"{name} beta * KL")
            axes[1, 2].plot(st, [row["logit_std"] for row in d], color=colour, label=name)
            if "codes_object_patches" in d[0]:
                axes[1, 3].plot(st, [row["codes_object_patches"] for row in d], color=colour, label=name)
    titles = ("training PSNR (dB, Gumbel-relaxed)", "codebook perplexity (argmax tokens, batch)",
              "eval PSNR (dB, EMA weights, argmax tokens)", "decoder ln b: background (solid), objects (dashed)",
              "grad norm at encoder logits: recon (solid), beta*KL (dashed)", "encoder logit std over codes",
              "eval PSNR, first 400 steps", "codes used by the batch's object patches (argmax)")
    axes[0, 3].axhline(12.11, color="k", lw=0.8, ls=":")
    order = [axes[0, 0], axes[0, 1], axes[0, 2], axes[1, 0], axes[1, 1], axes[1, 2], axes[0, 3], axes[1, 3]]
    for ax, title in zip(order, titles):
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=6, loc="center right" if ax is axes[0, 2] else "best")
    fig.suptitle(f"Shapes dVAE (small config, 64x64 -> 8x8 x 512 codes), runs of {steps} steps: "
                 "the paper's objective and single changes")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
