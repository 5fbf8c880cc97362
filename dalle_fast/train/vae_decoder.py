"""Tuning a trained dVAE's decoder with its encoder frozen: the library entry tune_decoder(...) and the
`dalle-fast tune-vae-decoder` subcommand.

The encoder and its codebook logits stay exactly as they were, so every image keeps its tokens and a
transformer trained on them stays valid; only how the decoder draws a token grid improves. The
joint dVAE run ends with a decoder that is still far from what its tokens allow (on Shapes, small
objects come out as blobs: scripts/dvae_ceiling.py); a few minutes of plain pixel regression
(squared error of unmap(sigmoid(mu)) against the image, the dVAE's auxiliary term on its own) on
the frozen argmax tokens sharpen them. The decoder's ln b channels are not trained (decode() uses mu).
"""
import dataclasses
import os
import time

import torch
import torch.nn.functional as F

from dalle_fast.data import open_dataset
from dalle_fast.models.dvae import DiscreteVAE, psnr
from dalle_fast.train import common


@dataclasses.dataclass
class TuneDecoderConfig:
    """Knobs of a decoder-tuning run.

    Args:
        data: 'shapes', an image-caption folder or WebDataset shards.
        split: Shapes split (train holds out the held-out combinations, as the transformer's data).
        steps: most updates; minutes: wall-clock limit (None: none); the cosine step-size schedule
            follows whichever of the two is nearer its end.
        batch_size, lr, lr_end_ratio: batch, peak step size, final / peak step size.
        seed: data order; shapes_length: Shapes items; eval_images: fixed images for the PSNR.
    """
    data: str = "shapes"
    split: str = "train"
    steps: int = 2000
    minutes: float = None
    batch_size: int = 16
    lr: float = 5e-4
    lr_end_ratio: float = 0.05
    seed: int = 0
    shapes_length: int = 100_000
    eval_images: int = 64

    def __post_init__(self):
        for name in ("steps", "batch_size", "eval_images"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr!r}")
        if self.minutes is not None and not self.minutes > 0:
            raise ValueError(f"minutes must be > 0 or None, got {self.minutes!r}")


def _decoded(vae, tokens):
    """unmap(sigmoid(mu)) of tokens, with gradients to the decoder."""
    stats = vae.decode_stats(tokens)
    return vae._unmap(torch.sigmoid(stats[:, : vae.config.input_channels]))


def tune_decoder(vae, out, cfg: TuneDecoderConfig = None, dataset=None, progress=False, **overrides):
    """Trains vae's decoder on its own frozen argmax tokens and saves the dVAE to `out`.

    Args:
        vae: a DiscreteVAE or a save_pretrained directory.
        out: directory for the tuned dVAE (save_pretrained: config.json + model.safetensors, atomic).
        cfg / overrides: TuneDecoderConfig fields.
        dataset: any Dataset of (image, caption) (default: open_dataset(cfg.data, split=cfg.split)).
        progress: print a line every 100 steps.
    Returns:
        dict(steps, seconds, psnr_before, psnr_after, directory); the eval PSNR is of argmax-token
        reconstructions of cfg.eval_images fixed images disjoint from the training stream.
    """
    cfg = dataclasses.replace(cfg or TuneDecoderConfig(), **overrides)
    if not isinstance(vae, DiscreteVAE):
        vae = DiscreteVAE.from_pretrained(str(vae))
    size = vae.image_size
    if dataset is None:
        dataset = open_dataset(cfg.data, image_size=size, seed=cfg.seed, length=cfg.shapes_length, split=cfg.split)
    held = open_dataset(cfg.data, image_size=size, seed=cfg.seed + 7919, length=cfg.eval_images, split=cfg.split) \
        if cfg.data == "shapes" else dataset
    eval_x = torch.stack([held[i][0] for i in range(min(cfg.eval_images, len(held)))])

    vae.eval()
    for p in vae.encoder.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        eval_tokens = vae.encode(eval_x)
        before = psnr(vae.decode(eval_tokens), eval_x)
    params = list(vae.decoder.parameters())
    opt = torch.optim.Adam(params, lr=cfg.lr)
    gen = torch.Generator().manual_seed(cfg.seed)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.batch_size, shuffle=True, generator=gen,
                                         drop_last=True, collate_fn=common.collate)
    start, step = time.perf_counter(), 0
    vae.decoder.train()
    while step < cfg.steps:
        for images, _ in loader:
            elapsed = time.perf_counter() - start
            frac = max(step / cfg.steps, elapsed / (60 * cfg.minutes) if cfg.minutes else 0.0)
            if frac >= 1:
                break
            lr = common.cosine(frac, 1.0, cfg.lr, cfg.lr * cfg.lr_end_ratio)
            for g in opt.param_groups:
                g["lr"] = lr
            with torch.no_grad():
                tokens = vae.encode(images)
            loss = F.mse_loss(_decoded(vae, tokens), images)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            step += 1
            if progress and step % 100 == 0:
                print(f"step {step}  loss {loss.item():.5f}  lr {lr:.2e}  {elapsed:.0f} s", flush=True)
        else:
            continue
        break
    vae.eval()
    for p in vae.encoder.parameters():
        p.requires_grad_(True)
    with torch.no_grad():
        after = psnr(vae.decode(eval_tokens), eval_x)
    vae.save_pretrained(out)
    return {"steps": step, "seconds": time.perf_counter() - start, "psnr_before": before, "psnr_after": after,
            "directory": os.fspath(out)}


def register(subparsers):
    p = subparsers.add_parser("tune-vae-decoder",
                              help="sharpen a trained dVAE's decoder on its frozen tokens (tokens unchanged)")
    d = TuneDecoderConfig()
    p.add_argument("--vae", required=True, help="dVAE directory (save_pretrained / train-vae model/)")
    p.add_argument("--out", required=True, help="directory for the tuned dVAE")
    p.add_argument("--data", default=d.data, help="'shapes', an image-caption folder, or WebDataset shards")
    p.add_argument("--split", default=d.split, help="Shapes split (train holds out the held-out combinations)")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock limit (the step size still anneals)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's; set by the CLI)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=_main)


def _main(args):
    cfg = TuneDecoderConfig(data=args.data, split=args.split, steps=args.steps, minutes=args.minutes,
                            batch_size=args.batch_size, lr=args.lr, seed=args.seed)
    s = tune_decoder(args.vae, args.out, cfg, progress=not args.quiet)
    print(f"steps {s['steps']} in {s['seconds']:.0f} s  eval PSNR {s['psnr_before']:.2f} -> {s['psnr_after']:.2f} dB"
          f"  tuned dVAE: {s['directory']}")
    return 0
