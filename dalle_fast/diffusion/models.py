"""The diffusion models of the two families, as thin wrappers over UNet / DiffusionPrior + a schedule.

- `PixelDiffusion`: a U-Net denoiser with its schedule and parameterisation; one class for
  Imagen's text-conditional base model (cond = frozen-encoder tokens), unCLIP's decoder (cond = a
  CLIP image embedding made into tokens) and the super-resolution stage (low_res input with
  noise-conditioning augmentation; with residual=True it diffuses the residual over the bilinear
  upsampling of low_res). Images live in [-1, 1]. Training can weight the loss by Min-SNR-gamma.
- `DiffusionPrior` (prior.py): CLIP text embedding -> CLIP image embedding.

Each saves as a directory: config.json + model.safetensors (written atomically).
"""
import json
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from .sampling import sample
from .schedule import NoiseSchedule, check_parameterisation
from .unet import UNet, UNetConfig

CONFIG_NAME, WEIGHTS_NAME = "config.json", "model.safetensors"


def save_module(module, directory, config):
    from ..checkpoint import atomic_save_safetensors, atomic_write_json
    os.makedirs(directory, exist_ok=True)
    atomic_save_safetensors({k: v.detach().contiguous() for k, v in module.state_dict().items()},
                            os.path.join(directory, WEIGHTS_NAME))
    atomic_write_json(config, os.path.join(directory, CONFIG_NAME))
    return directory


def load_config_and_weights(directory):
    from ..checkpoint import load_safetensors
    cfg_path, w_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
    for p in (cfg_path, w_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"model directory {directory} has no {os.path.basename(p)}")
    with open(cfg_path) as f:
        return json.load(f), load_safetensors(w_path)


def batch_part(part, batch):
    """(lo, hi, total) of a data-parallel slice: this process computes rows lo:hi of a global batch of
    `total`, and the loss draws its randomness (t, noise, condition drop) for all `total` rows, so N
    processes together draw exactly what one process would. None: the whole batch."""
    if part is None:
        return 0, batch, batch
    lo, hi, total = (int(v) for v in part)
    if not 0 <= lo < hi <= total or hi - lo != batch:
        raise ValueError(f"part {tuple(part)} does not describe a slice of {batch} rows of a global batch")
    return lo, hi, total


def repeat_to(n, x):
    """x with batch B repeated to n (a multiple of B): the condition of a guided pair of 2B."""
    if x is None or x.shape[0] == n:
        return x
    if n % x.shape[0]:
        raise ValueError(f"cannot repeat a batch of {x.shape[0]} to {n}")
    return x.repeat((n // x.shape[0],) + (1,) * (x.dim() - 1))


class PixelDiffusion(nn.Module):
    def __init__(self, unet_config: UNetConfig, schedule: NoiseSchedule = None, param="v", p_uncond=0.1,
                 aug_level=0.2, text_encoder=None, snr_gamma=None, residual=False):
        super().__init__()
        check_parameterisation(param)
        if not 0 <= p_uncond < 1:
            raise ValueError(f"p_uncond must lie in [0, 1), got {p_uncond}")
        if not 0 <= aug_level <= 1:
            raise ValueError(f"aug_level must lie in [0, 1], got {aug_level}")
        self.unet = UNet(unet_config)
        self.schedule = schedule or NoiseSchedule("cosine", 1000)
        self.param, self.p_uncond, self.aug_level = param, p_uncond, aug_level
        self.text_encoder = text_encoder  # the frozen encoder's name (Imagen), not part of the weights
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"snr_gamma must be > 0 or None, got {snr_gamma!r}")
        self.snr_gamma = snr_gamma  # training only: Min-SNR-gamma loss weighting (None: plain MSE)
        if residual and not unet_config.low_res_channels:
            raise ValueError("residual=True is for super-resolution models (low_res_channels > 0)")
        # super-resolution: diffuse the residual x - bilinear(low_res) instead of x, so what the model
        # has not learned adds nothing on top of the bilinear upsampling (flat images: a small residual)
        self.residual = bool(residual)

    @property
    def config(self):
        return self.unet.config

    @property
    def is_upsampler(self):
        return bool(self.config.low_res_channels)

    def to_dict(self):
        return {"unet": self.config.to_dict(), "schedule": self.schedule.to_dict(), "param": self.param,
                "p_uncond": self.p_uncond, "aug_level": self.aug_level, "text_encoder": self.text_encoder,
                "snr_gamma": self.snr_gamma, "residual": self.residual}

    def save_pretrained(self, directory):
        return save_module(self, directory, self.to_dict())

    @classmethod
    def from_pretrained(cls, directory, device="cpu"):
        cfg, weights = load_config_and_weights(directory)
        model = cls(UNetConfig.from_dict(cfg["unet"]), NoiseSchedule.from_dict(cfg["schedule"]), cfg["param"],
                    cfg["p_uncond"], cfg["aug_level"], cfg.get("text_encoder"), cfg.get("snr_gamma"),
                    cfg.get("residual", False))
        model.load_state_dict(weights)
        return model.to(device).eval()

    def upsampled(self, low_res, size):
        """The bilinear upsampling of low_res to size x size that a residual model adds its output to."""
        return F.interpolate(low_res.float(), size=(size, size), mode="bilinear", align_corners=False)

    def max_aug_t(self):
        return int(round(self.aug_level * (self.schedule.timesteps - 1)))

    def loss(self, x0, cond=None, cond_mask=None, low_res=None, part=None):
        """The denoising loss (MSE against the parameterisation's target) of a batch x0 in [-1, 1];
        the condition is dropped for a fraction p_uncond of the samples (classifier-free guidance);
        a super-resolution model sees its low_res input noised to a random level in [0, aug_level].
        part: (lo, hi, total), the rows of a data-parallel global batch these are (see batch_part)."""
        lo, hi, B = batch_part(part, x0.shape[0])
        dev = x0.device
        if self.residual:
            if low_res is None:
                raise ValueError("a super-resolution model's loss needs low_res")
            x0 = x0 - self.upsampled(low_res, x0.shape[-1])
        t = torch.randint(0, self.schedule.timesteps, (B,), device=dev)[lo:hi]
        noise = torch.randn((B,) + x0.shape[1:], dtype=x0.dtype, device=dev)[lo:hi]
        x_t = self.schedule.q_sample(x0, t, noise)
        drop = (torch.rand(B, device=dev) < self.p_uncond)[lo:hi] if self.config.cond_dim else None
        aug_t = None
        if self.is_upsampler:
            if low_res is None:
                raise ValueError("a super-resolution model's loss needs low_res")
            aug_t = torch.randint(0, self.max_aug_t() + 1, (B,), device=dev)[lo:hi]
            low_res = self.schedule.q_sample(low_res, aug_t, torch.randn((B,) + low_res.shape[1:],
                                                                         dtype=low_res.dtype, device=dev)[lo:hi])
        pred = self.unet(x_t, t, cond, cond_mask, drop, low_res, aug_t)
        target = self.schedule.target(x0, noise, t, self.param).float()
        if self.snr_gamma is None:
            return F.mse_loss(pred.float(), target)
        per_sample = (pred.float() - target).pow(2).flatten(1).mean(1)
        return (per_sample * self.schedule.min_snr_weight(t, self.param, self.snr_gamma)).mean()

    @torch.no_grad()
    def sample(self, n, cond=None, cond_mask=None, low_res=None, aug_level=None, guidance=1.0, steps=50,
               sampler="ddim", threshold="dynamic", percentile=0.995, cfg_batch="pair", generator=None,
               progress=False):
        """n images (n, 3, S, S) in [-1, 1]. cond / low_res have batch n. A super-resolution model
        noises low_res to `aug_level` (a fraction of the schedule; default aug_level / 2) once and
        tells the model that level, as Imagen does at sampling time."""
        cfg = self.config
        dev = next(self.parameters()).device
        if cfg.cond_dim and cond is None:
            raise ValueError("this model is conditional: pass cond")
        aug_t = None
        if self.is_upsampler:
            if low_res is None or low_res.shape[0] != n:
                raise ValueError(f"a super-resolution model needs low_res with batch {n}")
            level = self.aug_level / 2 if aug_level is None else aug_level
            if not 0 <= level <= 1:
                raise ValueError(f"aug_level must lie in [0, 1], got {level}")
            base = self.upsampled(low_res.to(dev), cfg.image_size) if self.residual else None
            aug_t = torch.full((n,), int(round(level * (self.schedule.timesteps - 1))), device=dev)
            low_res = self.schedule.q_sample(low_res.to(dev).float(), aug_t,
                                             torch.randn(low_res.shape, generator=generator, device=dev))

        def model_fn(x, t, drop):
            N = x.shape[0]
            return self.unet(x, t, repeat_to(N, cond), repeat_to(N, cond_mask), drop if cfg.cond_dim else None,
                             repeat_to(N, low_res), repeat_to(N, aug_t))

        if not cfg.cond_dim:
            guidance = 1.0
        shape = (n, cfg.out_channels, cfg.image_size, cfg.image_size)
        x = sample(model_fn, shape, self.schedule, steps=steps, sampler=sampler, guidance=guidance,
                   param=self.param, threshold=threshold, percentile=percentile, cfg_batch=cfg_batch,
                   generator=generator, device=dev, progress=progress)
        return x + base if self.is_upsampler and self.residual else x
