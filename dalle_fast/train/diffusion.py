"""`dalle-fast train-diffusion`, `train-upsampler`, `train-prior`: the diffusion families' stages.

- train-diffusion --model imagen: the 32x32 text-conditional base model over a frozen text encoder
  (--text-encoder minilm | clip | a BERT-style directory), with classifier-free-guidance dropout;
- train-diffusion --model unclip: unCLIP's 32x32 decoder conditioned on the bundled CLIP's image
  embedding of each training image;
- train-upsampler: 32 -> 64 super-resolution with noise-conditioning augmentation (shared by both);
- train-prior: unCLIP's diffusion prior, CLIP text embedding -> CLIP image embedding.
One loop for all (run_training) on train/common.py: AdamW, warm-up + cosine LR, gradient clipping
with non-finite skip, EMA, safetensors checkpoints with exact resume, tqdm, metrics.csv, curves.png.
The run directory ends with export/ (the EMA weights, save_pretrained), which is what a bundle holds.
"""
import argparse
import copy
import os
import time

import torch

from . import common

DECODER_SIZE, UPSAMPLER_SIZE = 32, 64


def base_unet_config(cond_dim, embed_tokens=0, base=16):
    from ..diffusion import UNetConfig
    # a 2x2 space-to-depth stem: the U-Net runs at 16, 8, 4 (2.7x cheaper per step than at 32, 16, 8 on
    # this CPU, which flat-coloured Shapes images afford); more residual blocks at the lowest level
    return UNetConfig(image_size=DECODER_SIZE, base=base, mults=(1, 2, 4), res_blocks=(1, 1, 2), attn_levels=(1, 2),
                      heads=4, cond_dim=cond_dim, embed_tokens=embed_tokens, patch=2)


def upsampler_unet_config(base=16):
    from ..diffusion import UNetConfig
    return UNetConfig(image_size=UPSAMPLER_SIZE, base=base, mults=(1, 2, 2), res_blocks=(1, 1, 2), attn_levels=(),
                      low_res_channels=3, patch=2)


def build_stage(args):
    """(model, batch_loss(images, captions, loss=None, part=None) -> loss) of the stage args.stage names:
    `loss` is what computes the model's loss (model.loss, or its DDP wrapper's call), `part` the rows of
    the global batch that images / captions are (models.batch_part)."""
    from ..diffusion import DiffusionPrior, NoiseSchedule, PixelDiffusion
    from ..diffusion.pipelines import embedding_condition, to_model_space
    schedule = NoiseSchedule(args.schedule, args.timesteps)
    stage = args.stage
    if stage in ("unclip", "prior"):
        from ..clip import CLIPReranker
        clip = CLIPReranker.from_pretrained(args.clip)
        dim = clip.embed_texts(["a"]).shape[-1]
    if stage == "imagen":
        from ..diffusion.text_encoder import load_text_encoder
        enc = load_text_encoder(args.text_encoder)
        model = PixelDiffusion(base_unet_config(enc.dim, base=args.width), schedule, args.param, args.p_uncond,
                               text_encoder=args.text_encoder, snr_gamma=args.snr_gamma)

        def batch_loss(images, captions, loss=None, part=None):
            tokens, mask = enc.encode(captions)
            return (loss or model.loss)(to_model_space(images, DECODER_SIZE), tokens, mask, part=part)
    elif stage == "unclip":
        model = PixelDiffusion(base_unet_config(dim, embed_tokens=4, base=args.width), schedule, args.param,
                               args.p_uncond, snr_gamma=args.snr_gamma)

        def batch_loss(images, captions, loss=None, part=None):
            return (loss or model.loss)(to_model_space(images, DECODER_SIZE),
                                        embedding_condition(clip.embed_images(images)), part=part)
    elif stage == "upsampler":
        model = PixelDiffusion(upsampler_unet_config(base=args.width), schedule, args.param, 0.0, args.aug_level,
                               snr_gamma=args.snr_gamma, residual=args.residual)

        def batch_loss(images, captions, loss=None, part=None):
            return (loss or model.loss)(to_model_space(images, UPSAMPLER_SIZE),
                                        low_res=to_model_space(images, DECODER_SIZE), part=part)
    elif stage == "prior":
        model = DiffusionPrior(dim, width=args.width, layers=args.layers, timesteps=args.timesteps,
                               p_uncond=args.p_uncond)

        def batch_loss(images, captions, loss=None, part=None):
            return (loss or model.loss)(clip.embed_images(images), clip.embed_texts(captions), part=part)
    else:
        raise ValueError(f"unknown stage {stage!r}")
    return model, batch_loss


class _Loss(torch.nn.Module):
    """model.loss as a module's forward, so that DDP (which wraps forward) syncs its gradients; the
    checkpoints hold the model itself."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, *args, **kw):
        return self.model.loss(*args, **kw)


def run_training(args):
    """Trains the stage of `args` (see register); returns the export directory. Under torchrun
    (WORLD_SIZE > 1, --shard ddp) every process runs this, as train-dalle's do: --batch-size is the
    global batch, each rank computes the loss of its slice with the randomness of the whole batch (so N
    processes take the steps one would), and rank 0 writes logs, checkpoints and the export."""
    from ..distributed import launch, sharding

    rank, world, _ = launch.env_world()
    sharding.check_world(args.shard, world, batch_size=args.batch_size)
    device = common.choose_device(args.device)
    if device.type != "cpu":
        raise ValueError("the diffusion trainers run on the CPU for now (their frozen encoders are CPU-side)")
    launch.init_from_env(device.type, timeout_s=args.dist_timeout)
    try:
        return _train(args, rank, world, device)
    finally:
        if world > 1 and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def _train(args, rank, world, device):
    from ..data import open_dataset
    from ..distributed import launch, sharding
    from ..viz import plot_curves

    torch.manual_seed(args.seed)
    lead = rank == 0
    model, batch_loss = build_stage(args)
    if args.init:  # continue from an exported model's weights (a fresh optimizer and schedule)
        from ..diffusion.models import load_config_and_weights
        model.load_state_dict(load_config_and_weights(args.init)[1])
    os.makedirs(args.run, exist_ok=True)
    dataset = open_dataset(args.data, image_size=UPSAMPLER_SIZE, seed=args.seed, length=args.length,
                           split=args.split)
    batches = common.ResumableBatches(dataset, args.batch_size, seed=args.seed)
    # fused: one kernel over all parameters (about 20% of a small U-Net's step on this CPU, unfused)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=True)
    ema = common.EMA(model, decay=args.ema_decay) if args.ema_decay > 0 else None
    step = 0
    latest = common.ckpt.latest_checkpoint(args.run) if args.resume else None
    if latest:
        meta = common.load_training_state(latest, model, ema, opt, device)
        step, args.steps = meta["step"], meta.get("total_steps", args.steps)
        batches.load_state(meta["data"])
    log = common.MetricLog(args.run, ["step", "loss", "lr", "grad_norm", "skipped"],
                           resume_step=step if latest else None) if lead else None
    bar = common.Progress(args.steps, initial=step, enabled=lead and not args.quiet, desc=f"train-{args.stage}")
    skipped, t_start, step_start, upper_steps = 0, time.perf_counter(), step, args.steps
    par = sharding.Parallel(_Loss(model), args.shard, device) if world > 1 else None
    local = args.batch_size // world
    model.train()
    try:
        while step < (min(args.steps, args.stop_at) if args.stop_at else args.steps):
            images, captions = next(batches)
            lr = args.lr * (step + 1) / args.warmup if step < args.warmup else \
                common.cosine(step - args.warmup, max(1, args.steps - args.warmup), args.lr, args.lr * 0.1)
            for g in opt.param_groups:
                g["lr"] = lr
            with launch.guard_collectives(f"training step {step + 1}"):
                if par is None:
                    loss = batch_loss(images, captions)
                else:  # this rank's slice of the global batch; DDP averages the gradients
                    lo, hi = rank * local, (rank + 1) * local
                    loss = batch_loss(images[lo:hi], captions[lo:hi], loss=par.model,
                                      part=(lo, hi, args.batch_size))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                loss_v = loss.detach().clone()
                if par is not None:  # the logged loss is the global batch's
                    torch.distributed.all_reduce(loss_v)
                    loss_v /= world
            loss_v = loss_v.item()
            norm, finite = common.clip_gradients(model.parameters(), args.clip_grad)
            if finite:
                opt.step()
            else:
                skipped += 1
            step += 1
            done = step - step_start
            if args.max_minutes and (done == 5 or (done > 5 and done % 20 == 0)):
                # re-fitted every 20 steps: on a shared machine the pace changes as others' jobs come and go
                fit = torch.tensor(common.time_box_steps(step, done, time.perf_counter() - t_start,
                                                         args.max_minutes, upper_steps))
                if par is not None:  # every rank stops at the same step
                    torch.distributed.all_reduce(fit, op=torch.distributed.ReduceOp.MIN)
                args.steps = int(fit)
                bar.bar.total = args.steps
            if ema is not None:
                ema.update(model, step)
            bar.update(1, loss=loss_v, lr=lr)
            if lead and (step % args.log_every == 0 or step == args.steps):
                log.log({"step": step, "loss": loss_v, "lr": lr, "grad_norm": norm, "skipped": skipped})
            if args.ckpt_every and (step % args.ckpt_every == 0 or step in (args.steps, args.stop_at)):
                if lead:
                    common.save_training_state(args.run, step, model, ema, opt,
                                               {"stage": args.stage, "data": batches.state(),
                                                "total_steps": args.steps}, keep=args.keep_checkpoints)
                if par is not None:  # no rank runs ahead of (or resumes before) the checkpoint
                    with launch.guard_collectives(f"waiting for rank 0 to write the checkpoint of step {step}"):
                        torch.distributed.barrier()
    finally:
        bar.close()
    if not lead:
        return None
    log.write_json({"steps": step, "final_loss": log.rows[-1]["loss"] if log.rows else None, "skipped": skipped,
                    "seconds": time.perf_counter() - t_start})
    if log.rows:
        plot_curves(log.rows, ["loss", "lr"], os.path.join(args.run, "curves.png"))
    averaged = ema.copy_to(copy.deepcopy(model)) if ema is not None else model
    return averaged.eval().save_pretrained(os.path.join(args.run, "export"))


def _common_args(p, width, lr, steps):
    p.add_argument("--data", default="shapes", help="'shapes', an image-caption folder, or WebDataset shards")
    p.add_argument("--split", default="train", help="Shapes split (train holds out the held-out combinations)")
    p.add_argument("--length", type=int, default=20000, help="Shapes items")
    p.add_argument("--out", "--run", dest="run", required=True, help="run directory (checkpoints, logs, export/)")
    p.add_argument("--width", type=int, default=width, help="U-Net base channels / prior transformer width")
    p.add_argument("--schedule", default="cosine", choices=("cosine", "linear"))
    p.add_argument("--timesteps", type=int, default=1000)
    p.add_argument("--snr-gamma", type=float, default=None,
                   help="U-Net stages: Min-SNR-gamma loss weighting (e.g. 5); default plain MSE")
    p.add_argument("--steps", type=int, default=steps)
    p.add_argument("--max-minutes", type=float, default=None,
                   help="time box: from 5 steps on, fit the run (and its LR schedule) into this many minutes")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=lr)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip-grad", type=float, default=1.0)
    p.add_argument("--ema-decay", type=float, default=0.995)
    p.add_argument("--ckpt-every", type=int, default=500)
    p.add_argument("--keep-checkpoints", type=int, default=2)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.add_argument("--init", default=None, help="start from the weights of an exported model of the same stage")
    p.add_argument("--stop-at", type=int, default=None,
                   help="stop (with a checkpoint) after this many steps of the --steps schedule; --resume continues")
    p.add_argument("--device", default="cpu")
    p.add_argument("--shard", default="none", choices=("none", "ddp"),
                   help="data parallelism under torchrun (gloo): ddp, or none for one process")
    p.add_argument("--dist-timeout", type=float, default=300.0, help="seconds before a collective gives up")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_cmd)


def _default_clip():
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "clip")


def register(subparsers):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("train-diffusion", formatter_class=fmt,
                              help="train a 32x32 diffusion model: Imagen's text-conditional base or unCLIP's decoder")
    p.add_argument("--model", dest="stage", default="imagen", choices=("imagen", "unclip"))
    p.add_argument("--text-encoder", default="minilm", help="imagen: minilm, clip, or a BERT-style directory")
    p.add_argument("--clip", default=_default_clip(), help="unclip: the CLIP directory")
    p.add_argument("--param", default="v", choices=("eps", "v", "x0"))
    p.add_argument("--p-uncond", type=float, default=0.1, help="classifier-free guidance: condition drop rate")
    _common_args(p, 16, 1e-3, 2000)
    p = subparsers.add_parser("train-upsampler", formatter_class=fmt,
                              help="train the 32->64 super-resolution diffusion model "
                                   "(noise-conditioning augmentation)")
    # x0 + residual: an untrained model (zero output layer) returns the bilinear upsampling, and what it
    # learns adds edges; v or eps on the image itself made short runs add noise (README)
    p.add_argument("--param", default="x0", choices=("eps", "v", "x0"))
    p.add_argument("--aug-level", type=float, default=0.2,
                   help="largest noise level (fraction of the schedule) applied to the low-res input in training")
    p.add_argument("--residual", action=argparse.BooleanOptionalAction, default=True,
                   help="diffuse the residual over the bilinear upsampling of the low-res input")
    p.set_defaults(stage="upsampler", p_uncond=0.0)
    _common_args(p, 16, 1e-3, 2000)
    p = subparsers.add_parser("train-prior", formatter_class=fmt,
                              help="train unCLIP's diffusion prior (CLIP text embedding -> CLIP image embedding)")
    p.add_argument("--clip", default=_default_clip(), help="the CLIP directory")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--p-uncond", type=float, default=0.1)
    p.set_defaults(stage="prior")
    _common_args(p, 128, 3e-4, 2000)


def _cmd(args):
    out = run_training(args)
    if out is not None:
        print(f"exported the {args.stage} model to {out}")
    return 0
