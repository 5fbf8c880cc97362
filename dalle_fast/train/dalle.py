"""Training the transformer (stage 2) on image-caption data with image tokens from a frozen dVAE.

The paper's recipe: AdamW (0.9, 0.96), weight decay 4.5e-2 (on matrices only), linear warm-up then
cosine decay or halving on plateaus, gradient clipping at norm 4, EMA of the weights (every 25
updates, decay 0.99), autocast. Checkpoints (model, EMA, optimizer, RNG, data position) go through
dalle_fast.train.common and resume exactly - except that BPE dropout draws from the `tokenizers`
library's own unseedable RNG, so a resumed run with --bpe-dropout > 0 sees other token splits.

The run directory ends up holding an exported model that `dalle-fast generate --checkpoint RUN`
reads: RUN/export/{dalle/, dvae/, tokenizer.json}.
"""
import argparse
import json
import math
import os
import shutil
import time

import torch

from . import common

PRESETS = ("tiny", "shapes", "paper")


class TokenCache(torch.utils.data.Dataset):
    """A map-style image-caption set with its images encoded to dVAE tokens once, kept on disk
    (tokens.safetensors + captions.json) so later epochs and later runs skip the encoder."""

    def __init__(self, tokens, captions):
        self.tokens, self.captions = tokens, captions

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.tokens[int(i)], self.captions[int(i)]

    @classmethod
    def build(cls, dataset, vae, path, batch_size=32, device="cpu", progress=True):
        from ..checkpoint import atomic_save_safetensors, atomic_write_json, load_safetensors
        tok_path, cap_path = path + ".safetensors", path + ".json"
        if os.path.isfile(tok_path) and os.path.isfile(cap_path):
            with open(cap_path) as f:
                meta = json.load(f)
            if meta.get("length") == len(dataset):
                return cls(load_safetensors(tok_path)["tokens"], meta["captions"])
        chunks, captions = [], []
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, collate_fn=common.collate)
        bar = common.Progress(len(dataset), desc="encoding images to tokens") if progress else None
        for images, caps in loader:
            chunks.append(vae.encode(images.to(device)).cpu().to(torch.int16 if vae.vocab_size < 2 ** 15 else torch.int32))
            captions += caps
            if bar is not None:
                bar.update(len(caps))
        if bar is not None:
            bar.close()
        tokens = torch.cat(chunks)
        atomic_save_safetensors({"tokens": tokens}, tok_path)
        atomic_write_json({"length": len(captions), "captions": captions}, cap_path)
        return cls(tokens, captions)


def build_config(preset, tokenizer, vae, **overrides):
    from ..models.dalle import DALLEConfig
    if preset not in PRESETS:
        raise ValueError(f"preset must be one of {PRESETS}, got {preset!r}")
    base = getattr(DALLEConfig, preset)().to_dict()
    base.update(num_text_tokens=tokenizer.vocab_size, num_image_tokens=vae.vocab_size,
                image_size=vae.tokens_per_side)
    base.update({k: v for k, v in overrides.items() if v is not None})
    return DALLEConfig.from_dict(base)


def param_groups(model, weight_decay):
    """Weight decay on the matrices of the linear layers only (not gains, biases or embeddings)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        is_matrix = p.dim() == 2 and not isinstance(_owner(model, name), torch.nn.Embedding)
        (decay if is_matrix else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _owner(model, name):
    mod = model
    for part in name.split(".")[:-1]:
        mod = getattr(mod, part)
    return mod


class LRSchedule:
    """Linear warm-up to lr, then cosine to lr * final_ratio, or halving when the smoothed loss has not
    improved by 0.5% for `patience` steps (the paper's plateau rule). State is JSON-able for resume."""

    def __init__(self, lr, warmup, total, kind="cosine", final_ratio=0.01, patience=500):
        if kind not in ("cosine", "plateau"):
            raise ValueError(f"schedule must be cosine or plateau, got {kind!r}")
        self.lr, self.warmup, self.total, self.kind = lr, warmup, total, kind
        self.final_ratio, self.patience = final_ratio, patience
        self.state = {"scale": 1.0, "best": math.inf, "since": 0, "smooth": None}

    def __call__(self, step):
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        if self.kind == "cosine":
            return common.cosine(step - self.warmup, max(1, self.total - self.warmup), self.lr,
                                 self.lr * self.final_ratio)
        return self.lr * self.state["scale"]

    def observe(self, loss):
        s = self.state
        s["smooth"] = loss if s["smooth"] is None else 0.98 * s["smooth"] + 0.02 * loss
        if s["smooth"] < s["best"] * 0.995:
            s["best"], s["since"] = s["smooth"], 0
        else:
            s["since"] += 1
            if self.kind == "plateau" and s["since"] >= self.patience:
                s["scale"], s["since"], s["best"] = s["scale"] / 2, 0, s["smooth"]


def export(run_dir, model, ema, tokenizer_path, vae_dir, dtype=None):
    """RUN/export/{dalle (EMA weights), dvae, tokenizer.json}: what `generate --checkpoint` reads."""
    import copy
    out = os.path.join(run_dir, "export")
    averaged = ema.copy_to(copy.deepcopy(model)) if ema is not None else model
    averaged.save_pretrained(os.path.join(out, "dalle"), dtype=dtype)
    shutil.copyfile(tokenizer_path, os.path.join(out, "tokenizer.json"))
    if os.path.abspath(vae_dir) != os.path.abspath(os.path.join(out, "dvae")):
        shutil.copytree(vae_dir, os.path.join(out, "dvae"), dirs_exist_ok=True)
    return out


def train_dalle(args):
    """args: the namespace of `dalle-fast train-dalle` (see register). Returns the export directory.
    Under torchrun (WORLD_SIZE > 1) every process runs this: --batch-size is the global batch, each rank
    trains on its slice of it, and rank 0 writes logs, checkpoints, samples and the export."""
    from ..distributed import launch, sharding

    shard = getattr(args, "shard", "none")
    psgd_rank, replicate = getattr(args, "powersgd_rank", None), getattr(args, "replicate", None)
    rank, world, local = launch.env_world()
    sharding.check_world(shard, world, replicate, args.batch_size, psgd_rank, args.precision)
    device = common.choose_device(args.device)
    if device.type == "cuda" and world > 1:
        device = torch.device("cuda", local)
    launch.init_from_env(device.type, timeout_s=getattr(args, "dist_timeout", 300.0))
    try:
        return _train(args, rank, world, device, shard, psgd_rank, replicate)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(args, rank, world, device, shard, psgd_rank, replicate):
    from ..data import open_dataset
    from ..distributed import launch, sharding
    from ..models.dalle import DALLE
    from ..models.dvae import DiscreteVAE
    from ..tokenizer import BPETokenizer
    from ..viz import image_grid, plot_curves

    torch.manual_seed(args.seed)
    lead = rank == 0
    precision = common.choose_precision(device, args.precision, allow_cpu_fp16=True)
    vae = DiscreteVAE.from_pretrained(args.vae, device=device).eval().requires_grad_(False)
    tokenizer = BPETokenizer.from_file(args.tokenizer, dropout=args.bpe_dropout)
    cfg = build_config(args.preset, tokenizer, vae, dim=args.dim, depth=args.depth, heads=args.heads,
                       dim_head=args.dim_head, text_len=args.text_len, backend=args.backend,
                       conv_kernel=args.conv_kernel, dropout=getattr(args, "dropout", None))
    model = DALLE(cfg, vae=vae).to(device)
    os.makedirs(args.run, exist_ok=True)
    dataset = open_dataset(args.data, image_size=vae.image_size, seed=args.seed, length=args.length,
                           split=args.split)
    if args.cache_tokens and not isinstance(dataset, torch.utils.data.IterableDataset):
        if world > 1:  # rank 0 builds the cache, the others read it
            if lead:
                TokenCache.build(dataset, vae, os.path.join(args.run, "token_cache"), device=device,
                                 progress=not args.quiet)
            with launch.guard_collectives("waiting for rank 0's token cache"):
                torch.distributed.barrier()
        dataset = TokenCache.build(dataset, vae, os.path.join(args.run, "token_cache"), device=device,
                                   progress=lead and not args.quiet)
        encode = lambda x: x.long().to(device)  # noqa: E731
    else:
        encode = lambda x: vae.encode(x.to(device))  # noqa: E731
    batches = common.ResumableBatches(dataset, args.batch_size, seed=args.seed)
    # fp16: per-resblock scales (dalle_fast.amp), attached to the branches before any wrapping
    scaler = common.grad_scaler(device, precision, model, world_size=world)
    par = sharding.Parallel(model, shard, device, precision, psgd_rank, replicate, seed=args.seed)
    opt = torch.optim.AdamW(param_groups(model, args.weight_decay), lr=args.lr, betas=(0.9, 0.96), eps=1e-8)
    sched = LRSchedule(args.lr, args.warmup, args.steps, args.schedule, patience=args.patience)
    ema = common.EMA(model, decay=args.ema_decay) if args.ema_decay > 0 else None
    step = 0
    latest = common.ckpt.latest_checkpoint(args.run) if args.resume else None
    if latest:
        meta = common.load_training_state(latest, model, ema, opt, device, scaler=scaler,
                                          load=lambda m, o: par.load_full_state(opt, m, o))
        if par.powersgd is not None and "powersgd" in meta["_groups"]:
            prefix = f"rank{rank}."
            par.powersgd.load_state_dict({k[len(prefix):]: v.to(device) for k, v in meta["_groups"]["powersgd"].items()
                                          if k.startswith(prefix)})
        step, sched.state = meta["step"], meta["schedule"]
        args.steps = sched.total = meta.get("total_steps", args.steps)
        batches.load_state(meta["data"])
    log = common.MetricLog(args.run, ["step", "loss", "text_loss", "image_loss", "lr", "grad_norm", "skipped"],
                           resume_step=step if latest else None) if lead else None
    bar = common.Progress(args.steps, initial=step, enabled=lead and not args.quiet, desc="train-dalle")
    skipped = 0
    sample_caps = args.sample_captions or [c for _, c in (dataset[i] for i in range(min(4, len(dataset))))] \
        if not isinstance(dataset, torch.utils.data.IterableDataset) else args.sample_captions
    local_batch = args.batch_size // world
    model.train()
    t_start, step_start = time.perf_counter(), step
    try:
        while step < args.steps:
            images, captions = next(batches)
            lo, hi = rank * local_batch, (rank + 1) * local_batch
            image_tokens = encode(images[lo:hi])
            text = tokenizer.tokenize(captions[lo:hi], cfg.text_len, training=True).to(device)
            lr = sched(step)
            for g in opt.param_groups:
                g["lr"] = lr
            with launch.guard_collectives(f"training step {step + 1}"):
                with common.autocast(device, precision):
                    loss, text_loss, image_loss = par.model(text, image_tokens, return_loss=True)
                opt.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                compression_skipped = par.after_backward()
                # per-block flags (ResblockGradScaler: a block non-finite on any rank or shard skips it
                # everywhere) or None (GradScaler)
                nonfinite = scaler.unscale_(opt, torch.distributed.group.WORLD) if world > 1 and \
                    not isinstance(scaler, torch.amp.GradScaler) else scaler.unscale_(opt)
                norm, finite = common.clip_gradients(model.parameters(), args.clip)
                metrics = torch.stack([loss.detach().float(), text_loss.float(), image_loss.float()])
                if world > 1:  # the logged loss is the global batch's
                    torch.distributed.all_reduce(metrics)
                    metrics /= world
            loss_v, text_v, image_v = metrics.tolist()
            if finite and not compression_skipped and \
                    (scaler.step(opt, nonfinite) if nonfinite is not None else scaler.step(opt)) is not True:
                sched.observe(loss_v)  # a ResblockGradScaler's step returns True when it skipped
            else:
                skipped += 1
            scaler.update(nonfinite) if nonfinite is not None else scaler.update()
            step += 1
            if args.max_minutes and step - step_start == 5:
                # a time-boxed run: shrink the run (and its LR schedule) to what fits in the budget
                fit = torch.tensor(common.time_box_steps(step, 5, time.perf_counter() - t_start,
                                                         args.max_minutes, args.steps))
                if world > 1:  # every rank must stop at the same step
                    torch.distributed.all_reduce(fit, op=torch.distributed.ReduceOp.MIN)
                args.steps = sched.total = int(fit)
                bar.bar.total = args.steps
            if ema is not None and step % args.ema_every == 0:
                ema.update(model, step)
            bar.update(1, loss=loss_v, img=image_v, lr=lr)
            if lead and (step % args.log_every == 0 or step == args.steps):
                log.log({"step": step, "loss": loss_v, "text_loss": text_v, "image_loss": image_v, "lr": lr,
                         "grad_norm": norm, "skipped": skipped})
            if args.ckpt_every and (step % args.ckpt_every == 0 or step == args.steps):
                _save(args, step, par, model, ema, opt, scaler, {"config": cfg.to_dict(), "schedule": sched.state,
                                                         "data": batches.state(), "total_steps": args.steps},
                      lead, world)
            if args.sample_every and sample_caps and lead and shard != "fsdp" and \
                    (step % args.sample_every == 0 or step == args.steps):
                _sample_grid(model, vae, tokenizer, sample_caps, os.path.join(args.run, "samples",
                                                                              f"step-{step:08d}.png"), image_grid)
                model.train()
    finally:
        bar.close()
    model_sd, _ = par.full_state(opt) if shard == "fsdp" else (None, None)
    ema_sd = {k: sharding.full_tensor(v) for k, v in ema.state_dict().items()} if ema is not None and \
        shard == "fsdp" else None
    if not lead:
        return os.path.join(args.run, "export")
    log.write_json({"steps": step, "final_loss": log.rows[-1]["loss"] if log.rows else None, "skipped": skipped,
                    "world_size": world, "shard": shard,
                    "powersgd_compression_rate": par.powersgd.compression_rate() if par.powersgd else None})
    if log.rows:
        plot_curves(log.rows, ["loss", "text_loss", "image_loss", "lr"], os.path.join(args.run, "curves.png"))
    if shard == "fsdp":  # an unsharded copy for the export
        plain = DALLE(cfg, vae=vae)
        plain.load_state_dict(model_sd)
        if ema_sd is not None:
            plain.load_state_dict({k: ema_sd.get(k, v) for k, v in plain.state_dict().items()})
        model, ema = plain, None
    return export(args.run, model, ema, args.tokenizer, args.vae,
                  dtype=torch.float16 if args.export_fp16 else None)


def _save(args, step, par, model, ema, opt, scaler, meta, lead, world):
    """A checkpoint of the full (gathered) state: every rank takes part in the gathering, rank 0 writes."""
    from ..distributed import launch, sharding
    with launch.guard_collectives(f"gathering the checkpoint of step {step}"):
        model_sd, optim_sd = par.full_state(opt)
        ema_sd = {k: sharding.full_tensor(v) for k, v in ema.state_dict().items()} if ema is not None else None
    # PowerSGD's error buffers differ per rank: gathered to rank 0, saved as rank<r>.<name> (resume under N exactly)
    extra = {}
    if par.powersgd is not None:
        mine = {k: v.cpu() for k, v in par.powersgd.state_dict().items()}
        gathered = [mine]
        if world > 1:
            gathered = [None] * world
            with launch.guard_collectives(f"gathering PowerSGD's error buffers of step {step}"):
                torch.distributed.all_gather_object(gathered, mine)
        extra = {"powersgd": {f"rank{r}.{k}": v for r, d in enumerate(gathered) for k, v in d.items()}}
    if lead:
        common.save_training_state(args.run, step, model, ema, opt, meta, keep=args.keep_checkpoints, scaler=scaler,
                                   model_state=model_sd, optim_state=optim_sd, ema_state=ema_sd, extra_groups=extra)
    if world > 1:
        with launch.guard_collectives(f"waiting for rank 0 to write the checkpoint of step {step}"):
            torch.distributed.barrier()


@torch.no_grad()
def _sample_grid(model, vae, tokenizer, captions, path, image_grid, per_caption=4):
    from ..generate import generate
    out = generate(model, vae, list(captions), num_images=per_caption, seed=0, tokenizer=tokenizer)
    image_grid(out.images.flatten(0, 1), nrow=per_caption, scale=2,
               captions=[c for c in out.captions for _ in range(per_caption)], path=path)


def register(subparsers):
    p = subparsers.add_parser("train-dalle", help="train the transformer on image tokens of a frozen dVAE",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="shapes", help="'shapes', an image-caption folder, or WebDataset shards")
    p.add_argument("--split", default="train", help="Shapes split (train holds out the held-out combinations)")
    p.add_argument("--length", type=int, default=20000, help="Shapes items")
    p.add_argument("--vae", required=True, help="dVAE directory (save_pretrained / train-vae export)")
    p.add_argument("--tokenizer", required=True, help="tokenizer JSON (train-tokenizer)")
    p.add_argument("--out", "--run", dest="run", required=True,
                   help="run directory (checkpoints, logs, samples, export/)")
    p.add_argument("--preset", default="shapes", choices=PRESETS)
    for name in ("dim", "depth", "heads", "dim-head", "text-len", "conv-kernel"):
        p.add_argument(f"--{name}", type=int, default=None, help="override the preset")
    p.add_argument("--backend", default=None, choices=("fused", "flex", "dense"), help="attention backend")
    p.add_argument("--dropout", type=float, default=None,
                   help="override the preset: dropout of the residual branches' outputs while training")
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time box: after 5 steps, shorten the run (and its schedule) to fit this many minutes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=4.5e-4)
    p.add_argument("--warmup", type=int, default=200)
    p.add_argument("--schedule", default="cosine", choices=("cosine", "plateau"))
    p.add_argument("--patience", type=int, default=500, help="plateau: steps without improvement before halving")
    p.add_argument("--weight-decay", type=float, default=4.5e-2)
    p.add_argument("--clip", type=float, default=4.0, help="gradient norm clipping")
    p.add_argument("--ema-decay", type=float, default=0.99)
    p.add_argument("--ema-every", type=int, default=25)
    p.add_argument("--bpe-dropout", type=float, default=0.1)
    p.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16", "fp16"))
    p.add_argument("--device", default="auto")
    p.add_argument("--cache-tokens", action="store_true", help="encode the images once and keep the tokens on disk")
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--sample-every", type=int, default=0, help="write a sample grid every N steps (0: never)")
    p.add_argument("--sample-captions", nargs="*", default=None)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--export-fp16", action="store_true", help="export the weights in fp16 (half the size)")
    p.add_argument("--shard", default="none", choices=("none", "ddp", "fsdp"),
                   help="data parallelism under torchrun: DDP, FSDP2 (fully_shard per residual branch), or none")
    p.add_argument("--powersgd-rank", type=int, default=None,
                   help="PowerSGD gradient compression at this rank (DDP; FSDP with --replicate)")
    p.add_argument("--replicate", type=int, default=None,
                   help="FSDP on a (replicate, world / replicate) mesh: shard within a group, replicate across")
    p.add_argument("--dist-timeout", type=float, default=300.0,
                   help="seconds a collective waits for the other processes before failing")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd)


def _cmd(args):
    out = train_dalle(args)
    print(f"exported the model to {out}")
    return 0
