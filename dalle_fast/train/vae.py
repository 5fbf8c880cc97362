"""Training the dVAE: the library entry train_vae(...) and the `dalle-fast train-vae` subcommand.

Recipe (paper, appendix A.2), scaled to the run's length: AdamW (0.9, 0.999, eps 1e-8, weight decay
1e-4); cosine schedules for the KL weight beta (0 -> 6.6), the Gumbel temperature tau (1 -> 1/16)
and the step size (lr -> lr / 80, i.e. 1e-4 -> 1.25e-6 in the paper); EMA of the weights (0.999).
The paper's schedule lengths are 5,000 / 150,000 / 1,200,000 of 3M updates; a short run keeps
the same shapes over the fractions beta_frac / tau_frac / lr_frac of its steps (defaults chosen
for runs of a few thousand steps, see the docstring of TrainVAEConfig).

Run directory: checkpoints/ (exact resume), samples/step-*.png (originals above EMA
reconstructions from argmax tokens), metrics.csv, metrics.json, curves.png, reconstructions.png,
model/ (the EMA weights as DiscreteVAE.save_pretrained).
"""
import copy
import dataclasses
import os
import time

import torch

from dalle_fast import checkpoint as ckpt
from dalle_fast.data import BadDataCounter, Shapes, open_dataset
from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig, codebook_perplexity, psnr
from dalle_fast.train import common
from dalle_fast.viz import plot_curves, reconstruction_grid

FIELDS = ["step", "loss", "recon", "kl", "beta", "tau", "lr", "mse_weight", "psnr", "perplexity", "grad_norm",
          "images_per_s", "skipped_steps", "bad_data", "eval_psnr", "eval_perplexity"]


@dataclasses.dataclass
class TrainVAEConfig:
    """Every knob of a dVAE run. Paper fractions of the run: beta 0.17%, tau 5%, lr 40%; short runs
    warm beta up over 5% and anneal tau over 50% of the steps (a temperature of 1/16 reached within
    a few hundred updates stalls the codebook), lr over the whole run."""
    data: str = "shapes"
    steps: int = 2000
    batch_size: int = 32
    config: str = "small"            # DVAEConfig preset name (paper, small, tiny)
    lr: float = 1e-3                 # paper 1e-4 at batch 512 over 3M steps; short runs need more
    lr_end_ratio: float = 1.25e-6 / 1e-4
    lr_frac: float = 1.0
    beta: float = 6.6
    beta_frac: float = 0.05
    tau_start: float = 1.0
    tau_end: float = 1.0 / 16
    tau_frac: float = 0.5
    mse_weight: float = 0.0          # auxiliary squared error (not in the paper), cosine-decayed to 0
    mse_frac: float = 0.5            # ... over this fraction of the run (see DiscreteVAE.forward)
    weight_decay: float = 1e-4
    ema_decay: float = 0.999
    clip_grad: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    backend: str = "fused"
    seed: int = 0
    shapes_length: int = 100_000
    log_every: int = 10
    sample_every: int = 500
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    eval_images: int = 64
    num_workers: int = 0

    def schedules(self, step):
        n = self.steps
        return {"lr": common.cosine(step, max(1, round(self.lr_frac * n)), self.lr, self.lr * self.lr_end_ratio),
                "beta": common.cosine(step, max(1, round(self.beta_frac * n)), 0.0, self.beta),
                "tau": common.cosine(step, max(1, round(self.tau_frac * n)), self.tau_start, self.tau_end),
                "mse_weight": common.cosine(step, max(1, round(self.mse_frac * n)), self.mse_weight, 0.0)}


def _model_config(spec):
    if isinstance(spec, DVAEConfig):
        return spec
    if isinstance(spec, dict):
        return DVAEConfig.from_dict(spec)
    return DVAEConfig.named(spec)


def _eval_batch(dataset, n, seed, image_size):
    """A fixed batch for reconstructions, disjoint from the training stream where that is cheap."""
    if isinstance(dataset, Shapes):
        ds = Shapes(n, seed=seed + 7919, image_size=image_size, split=dataset.split,
                    holdout=[] if not dataset.holdout else dataset.holdout)
        items = [ds[i] for i in range(n)]
    elif isinstance(dataset, torch.utils.data.IterableDataset):
        ds = copy.copy(dataset)
        ds.bad, ds.skip, ds.repeat = BadDataCounter(max_warnings=0), 0, False
        items = [it for _, it in zip(range(n), ds)]
    else:
        items = [dataset[i] for i in range(min(n, len(dataset)))]
    if not items:
        raise ValueError("the data set yields no readable item")
    return torch.stack([im for im, _ in items]), [c for _, c in items]


@torch.no_grad()
def _evaluate(model, images):
    model.eval()
    tokens = model.encode(images)
    recon = model.decode(tokens)
    model.train()
    return recon, psnr(recon, images), codebook_perplexity(tokens, model.vocab_size)


def train_vae(out, cfg: TrainVAEConfig = None, model_config=None, dataset=None, resume=False,
              stop_after=None, time_budget_s=None, progress=True, on_step=None, **overrides):
    """Trains a dVAE into run directory `out`; returns a summary dict.

    cfg / overrides: TrainVAEConfig fields. model_config: a DVAEConfig or preset name (default
    cfg.config). dataset: any Dataset of (image, caption) (default: open_dataset(cfg.data)).
    resume: continue from the newest checkpoint in `out` (exact: same weights as an uninterrupted
    run). stop_after: stop after this many steps without a final checkpoint (simulates a kill).
    time_budget_s: shrink cfg.steps after a few timed steps so the run ends within the budget.
    on_step: diagnostics hook, called as on_step(step, model, outputs, images, schedules) after each
    forward and before its backward (it may take gradients with retain_graph=True; it must not step)."""
    cfg = dataclasses.replace(cfg or TrainVAEConfig(), **overrides)
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps}, {cfg.batch_size}")
    device = common.choose_device(cfg.device)
    precision = common.choose_precision(device, cfg.precision)
    latest = ckpt.latest_checkpoint(out) if os.path.isdir(out) else None
    if latest and not resume:
        raise ValueError(f"{out} already holds checkpoints; pass resume=True (--resume) or another directory")
    meta = None
    if latest:
        import json
        with open(os.path.join(latest, "meta.json")) as f:
            meta = json.load(f)
        mcfg = DVAEConfig.from_dict(meta["model_config"])
        # the run goes on with its own recipe (schedules depend on it); only where it runs may change
        cfg = dataclasses.replace(TrainVAEConfig(**meta["train_config"]), device=cfg.device,
                                  num_workers=cfg.num_workers)
    else:
        mcfg = _model_config(model_config if model_config is not None else cfg.config)

    torch.manual_seed(cfg.seed)
    model = DiscreteVAE(mcfg, backend=cfg.backend).to(device, memory_format=common.memory_format(device))
    ema = common.EMA(model, cfg.ema_decay)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if name.endswith("bias") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8)
    scaler = common.grad_scaler(device, precision)
    bad = BadDataCounter()
    dataset = dataset if dataset is not None else open_dataset(
        cfg.data, image_size=mcfg.image_size, bad=bad, seed=cfg.seed, length=cfg.shapes_length)
    bad = getattr(dataset, "bad", bad)
    batches = common.ResumableBatches(dataset, cfg.batch_size, seed=cfg.seed, num_workers=cfg.num_workers)
    eval_images, eval_captions = _eval_batch(dataset, cfg.eval_images, cfg.seed, mcfg.image_size)
    eval_images = eval_images.to(device)

    start, skipped, bad_before = 0, 0, 0
    if latest:
        meta = common.load_training_state(latest, model, ema, opt, device)
        start, skipped = meta["step"], meta["skipped_steps"]
        batches.load_state(meta["data"])
        bad_before = meta.get("bad_data", 0)
    log = common.MetricLog(out, FIELDS, resume_step=start if latest else None)
    ema_model = copy.deepcopy(model).eval()

    def run_meta(step):
        return {"model_config": mcfg.to_dict(), "train_config": dataclasses.asdict(cfg), "data": batches.state(),
                "skipped_steps": skipped, "bad_data": bad_before + bad.total, "precision": precision,
                "threads": torch.get_num_threads()}

    def snapshot(step, tag):
        common.EMA.copy_to(ema, ema_model)
        recon, e_psnr, e_ppl = _evaluate(ema_model, eval_images)
        n = min(16, len(eval_images))
        reconstruction_grid(eval_images[:n].cpu(), recon[:n].cpu(), os.path.join(out, "samples", f"{tag}.png"))
        return e_psnr, e_ppl

    bar = common.Progress(cfg.steps, initial=start, enabled=progress, desc="train-vae")
    window = {"loss": 0.0, "recon": 0.0, "kl": 0.0, "psnr": 0.0, "perplexity": 0.0, "grad_norm": 0.0, "n": 0}
    t_window, img_window, t_run, steps_run = time.perf_counter(), 0, time.perf_counter(), 0
    step = start
    model.train()
    while step < cfg.steps:
        if stop_after is not None and step >= stop_after:
            break
        images, _ = next(batches)
        images = images.to(device, non_blocking=True).contiguous(memory_format=common.memory_format(device))
        s = cfg.schedules(step)
        for g in opt.param_groups:
            g["lr"] = s["lr"]
        with common.autocast(device, precision):
            outd = model(images, tau=s["tau"], beta=s["beta"], mse_weight=s["mse_weight"])
        if on_step is not None:
            on_step(step, model, outd, images, s)
        loss = outd["loss"]
        ok = bool(torch.isfinite(loss))
        if ok:
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            gnorm, ok = common.clip_gradients(model.parameters(), cfg.clip_grad)
        if ok:
            scaler.step(opt)
            scaler.update()
            ema.update(model, step)
        else:  # a non-finite loss or gradient: no update, the weights stay as they were
            skipped += 1
            if precision == "fp16":
                scaler.update()
        opt.zero_grad(set_to_none=True)
        step += 1
        steps_run += 1
        img_window += images.shape[0]
        if ok:
            with torch.no_grad():
                c = mcfg.input_channels
                rec = model._unmap(torch.sigmoid(outd["stats"][:, :c].detach()))
                for k, v in (("loss", loss.item()), ("recon", outd["recon"].item()), ("kl", outd["kl"].item()),
                             ("psnr", psnr(rec, images)), ("grad_norm", gnorm),
                             ("perplexity", codebook_perplexity(outd["tokens"], mcfg.vocab_size))):
                    window[k] += v
                window["n"] += 1
        if time_budget_s and steps_run == 3:
            t_warm = time.perf_counter()  # the first steps include one-time kernel set-up: not timed
        if time_budget_s and steps_run == 10:
            now = time.perf_counter()
            per_step = (now - t_warm) / 7
            left = int((time_budget_s - (now - t_run)) / per_step)
            cfg = dataclasses.replace(cfg, steps=max(step + 1, min(cfg.steps, step + left)))
            bar.bar.total = cfg.steps
        last = step == cfg.steps
        row = None
        if step % cfg.log_every == 0 or last:
            n = max(1, window["n"])
            now = time.perf_counter()
            row = {"step": step, **{k: window[k] / n for k in ("loss", "recon", "kl", "psnr", "perplexity", "grad_norm")},
                   **s, "images_per_s": img_window / max(now - t_window, 1e-9), "skipped_steps": skipped,
                   "bad_data": bad_before + bad.total}
            bar.update(0, loss=row["loss"], psnr=row["psnr"], ppl=row["perplexity"])
            window = dict.fromkeys(window, 0.0)
            window["n"] = 0
            t_window, img_window = now, 0
        if step % cfg.sample_every == 0 or last:
            e_psnr, e_ppl = snapshot(step, f"step-{step:08d}")
            if row is None:
                row = {"step": step, **s, "skipped_steps": skipped, "bad_data": bad_before + bad.total}
            row.update(eval_psnr=e_psnr, eval_perplexity=e_ppl)
        if row is not None:
            log.log(row)
        if step % cfg.checkpoint_every == 0 or last:
            common.save_training_state(out, step, model, ema, opt, run_meta(step), keep=cfg.keep_checkpoints)
        bar.update(1)
    bar.close()

    summary = {"steps": step, "finished": step >= cfg.steps, "skipped_steps": skipped,
               "bad_data": bad_before + bad.total, "bad_data_by_reason": bad.as_dict(), "precision": precision,
               "device": str(device), "backend": cfg.backend, "model_config": mcfg.to_dict(),
               "images_per_s": steps_run * cfg.batch_size / max(time.perf_counter() - t_run, 1e-9)}
    if step >= cfg.steps:
        common.EMA.copy_to(ema, ema_model)
        recon, summary["eval_psnr"], summary["eval_perplexity"] = _evaluate(ema_model, eval_images)
        n = min(32, len(eval_images))
        reconstruction_grid(eval_images[:n].cpu(), recon[:n].cpu(), os.path.join(out, "reconstructions.png"))
        ema_model.save_pretrained(os.path.join(out, "model"))
        summary["model_dir"] = os.path.join(out, "model")
        if len(log.rows) > 1:
            plot_curves(log.rows, ["loss", "recon", "kl", "psnr", "eval_psnr", "perplexity", "tau", "beta", "lr"],
                        os.path.join(out, "curves.png"), title="dVAE training")
    log.write_json(summary)
    summary["model"], summary["ema_model"] = model, ema_model
    return summary


def register(subparsers):
    p = subparsers.add_parser("train-vae", help="train the discrete VAE (stage 1) on Shapes, a folder or shards")
    d = TrainVAEConfig()
    p.add_argument("--data", default="shapes", help="'shapes', an image-caption folder, or WebDataset shards")
    p.add_argument("--out", required=True, help="run directory (checkpoints, samples, metrics, model/)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--config", default=d.config, choices=["small", "small16", "paper", "tiny"], help="dVAE size preset")
    p.add_argument("--lr", type=float, default=d.lr, help="peak step size (the paper: 1e-4 at batch 512)")
    p.add_argument("--beta", type=float, default=d.beta, help="target KL weight")
    p.add_argument("--mse-weight", type=float, default=d.mse_weight,
                   help="auxiliary squared-error weight, decayed to 0 over the first half (not in the paper; "
                        "helps noiseless synthetic data such as Shapes)")
    p.add_argument("--tau-frac", type=float, default=d.tau_frac, help="fraction of the run annealing tau 1 -> 1/16")
    p.add_argument("--beta-frac", type=float, default=d.beta_frac, help="fraction of the run warming beta up")
    p.add_argument("--precision", default=d.precision, choices=["auto", "fp32", "bf16", "fp16"])
    p.add_argument("--device", default=d.device)
    p.add_argument("--backend", default=d.backend, choices=["fused", "torch"],
                   help="fused dalle_fast kernels or torch's gumbel_softmax + eager loss")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--sample-every", type=int, default=d.sample_every)
    p.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every)
    p.add_argument("--num-workers", type=int, default=d.num_workers)
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); 1 is often fastest for small models on a busy machine")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args):
    cfg = TrainVAEConfig(data=args.data, steps=args.steps, batch_size=args.batch_size, config=args.config,
                         lr=args.lr, beta=args.beta, mse_weight=args.mse_weight, tau_frac=args.tau_frac, beta_frac=args.beta_frac,
                         precision=args.precision, device=args.device, backend=args.backend, seed=args.seed,
                         sample_every=args.sample_every, checkpoint_every=args.checkpoint_every,
                         num_workers=args.num_workers)
    s = train_vae(args.out, cfg, resume=args.resume, progress=not args.no_progress)
    print(f"steps {s['steps']}  eval PSNR {s.get('eval_psnr', float('nan')):.2f} dB  codebook perplexity "
          f"{s.get('eval_perplexity', float('nan')):.1f} / {s['model_config']['vocab_size']}  "
          f"{s['images_per_s']:.1f} images/s  skipped steps {s['skipped_steps']}  bad data {s['bad_data']}")
    print(f"run directory: {args.out}  (model/, reconstructions.png, curves.png, metrics.csv)")
    return 0
