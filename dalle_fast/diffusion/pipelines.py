"""Text to image with the two diffusion families, each a cascade ending in the same upsampler.

- `Imagen`: captions -> frozen text encoder (tokens, cached per caption) -> 32x32 text-conditional
  base model (classifier-free guidance, dynamic thresholding) -> 64x64 super-resolution model
  (noise-conditioning augmentation).
- `UnCLIP`: captions -> CLIP text embedding -> diffusion prior (best of 2 by CLIP similarity) ->
  CLIP image embedding -> 32x32 decoder conditioned on it -> the same upsampler. Images live in CLIP
  space, so `vary` (encode an image, decode it again with new noise) and `interpolate` (slerp
  between two images' embeddings) come for free.
A bundle directory holds imagen/, unclip_decoder/, prior/ and upsampler/ (each from
save_pretrained); `load_pipeline(name, directory)` builds either family from it.
"""
import os

import torch
import torch.nn.functional as F

from .models import PixelDiffusion
from .prior import DiffusionPrior

FAMILIES = ("imagen", "unclip")


def bundled_diffusion_dir():
    return os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "diffusion")


def to_model_space(images, size=None):
    """[0, 1] images -> [-1, 1], area-downsampled to `size` if given."""
    x = images.float()
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="area")
    return x * 2 - 1


def to_images(x):
    return ((x.float() + 1) / 2).clamp(0, 1)


def embedding_condition(z):
    """Unit CLIP embeddings (B, D) -> the decoder's condition, scaled to unit variance per coordinate."""
    return z * z.shape[-1] ** 0.5


def slerp(a, b, t):
    """Spherical interpolation between unit vectors a and b (D,) at fractions t (K,) -> (K, D)."""
    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    omega = torch.arccos((a * b).sum().clamp(-1 + 1e-7, 1 - 1e-7))
    t = torch.as_tensor(t, dtype=a.dtype)[:, None]
    if omega < 1e-4:
        return F.normalize((1 - t) * a + t * b, dim=-1)
    return (torch.sin((1 - t) * omega) * a + torch.sin(t * omega) * b) / torch.sin(omega)


def _seeded(seed):
    return torch.Generator().manual_seed(seed) if seed is not None else None


def _upsample(upsampler, low, steps, generator, progress):
    if upsampler is None:
        return low
    return upsampler.sample(low.shape[0], low_res=low, steps=steps, generator=generator, progress=progress,
                            threshold="static")


class Imagen:
    def __init__(self, base: PixelDiffusion, upsampler: PixelDiffusion = None, text_encoder=None):
        if base.is_upsampler or not base.config.cond_dim:
            raise ValueError("Imagen's base model must be a text-conditional, non-super-resolution model")
        if text_encoder is None:
            from .text_encoder import load_text_encoder
            text_encoder = load_text_encoder(base.text_encoder or "minilm")
        if text_encoder.dim != base.config.cond_dim:
            raise ValueError(f"text encoder width {text_encoder.dim} != the base model's cond_dim "
                             f"{base.config.cond_dim}")
        self.base, self.upsampler, self.text_encoder = base, upsampler, text_encoder

    @classmethod
    def load(cls, directory=None, text_encoder=None):
        directory = directory or bundled_diffusion_dir()
        base = PixelDiffusion.from_pretrained(os.path.join(directory, "imagen"))
        up_dir = os.path.join(directory, "upsampler")
        up = PixelDiffusion.from_pretrained(up_dir) if os.path.isdir(up_dir) else None
        return cls(base, up, text_encoder)

    @torch.no_grad()
    def generate(self, captions, n=1, guidance=3.0, steps=50, sampler="ddim", threshold="dynamic",
                 percentile=0.995, upsample=True, up_steps=25, seed=0, cfg_batch="pair", progress=False):
        """Images in [0, 1], (len(captions), n, 3, S, S)."""
        captions = [captions] if isinstance(captions, str) else list(captions)
        g = _seeded(seed)
        tokens, mask = self.text_encoder.encode([c for c in captions for _ in range(n)])
        x = self.base.sample(tokens.shape[0], cond=tokens, cond_mask=mask, guidance=guidance, steps=steps,
                             sampler=sampler, threshold=threshold, percentile=percentile, cfg_batch=cfg_batch,
                             generator=g, progress=progress)
        if upsample:
            x = _upsample(self.upsampler, x, up_steps, g, progress)
        return to_images(x).view(len(captions), n, *x.shape[1:])


class UnCLIP:
    def __init__(self, clip, prior: DiffusionPrior, decoder: PixelDiffusion, upsampler: PixelDiffusion = None):
        if decoder.config.embed_tokens == 0 or decoder.config.cond_dim != prior.dim:
            raise ValueError("the unCLIP decoder must be conditioned on an image embedding of the prior's width")
        self.clip, self.prior, self.decoder, self.upsampler = clip, prior, decoder, upsampler

    @classmethod
    def load(cls, directory=None, clip=None):
        from ..clip import CLIPReranker
        directory = directory or bundled_diffusion_dir()
        for sub in ("prior", "unclip_decoder"):
            if not os.path.isdir(os.path.join(directory, sub)):
                raise FileNotFoundError(f"unCLIP needs {sub}/ in {directory}")
        clip = clip or CLIPReranker.from_pretrained(os.path.join(os.path.dirname(bundled_diffusion_dir()), "clip"))
        up_dir = os.path.join(directory, "upsampler")
        return cls(clip, DiffusionPrior.from_pretrained(os.path.join(directory, "prior")),
                   PixelDiffusion.from_pretrained(os.path.join(directory, "unclip_decoder")),
                   PixelDiffusion.from_pretrained(up_dir) if os.path.isdir(up_dir) else None)

    @torch.no_grad()
    def decode(self, z, guidance=3.0, steps=50, sampler="ddim", threshold="dynamic", upsample=True, up_steps=25,
               generator=None, cfg_batch="pair", progress=False):
        """Unit image embeddings (B, D) -> images in [0, 1] (B, 3, S, S)."""
        x = self.decoder.sample(z.shape[0], cond=embedding_condition(z), guidance=guidance, steps=steps,
                                sampler=sampler, threshold=threshold, cfg_batch=cfg_batch, generator=generator,
                                progress=progress)
        if upsample:
            x = _upsample(self.upsampler, x, up_steps, generator, progress)
        return to_images(x)

    @torch.no_grad()
    def generate(self, captions, n=1, guidance=3.0, prior_guidance=1.0, candidates=2, steps=50,
                 prior_steps=32, seed=0, **kw):
        captions = [captions] if isinstance(captions, str) else list(captions)
        g = _seeded(seed)
        text = self.clip.embed_texts([c for c in captions for _ in range(n)])
        z = self.prior.sample(text, candidates=candidates, guidance=prior_guidance, steps=prior_steps, generator=g)
        x = self.decode(z, guidance=guidance, steps=steps, generator=g, **kw)
        return x.view(len(captions), n, *x.shape[1:])

    @torch.no_grad()
    def vary(self, image, n=4, seed=0, **kw):
        """n variations of one image (3, H, W) in [0, 1]: its CLIP embedding decoded with fresh noise."""
        if image.dim() != 3 or image.shape[0] != 3:
            raise ValueError(f"image must be (3, H, W), got {tuple(image.shape)}")
        z = self.clip.embed_images(image[None]).repeat(n, 1)
        return self.decode(z, generator=_seeded(seed), **kw)

    @torch.no_grad()
    def interpolate(self, image_a, image_b, frames=5, seed=0, **kw):
        """`frames` images along the slerp from image_a's CLIP embedding to image_b's (same noise for all)."""
        if not isinstance(frames, int) or frames < 2:
            raise ValueError(f"frames must be an int >= 2, got {frames!r}")
        za, zb = self.clip.embed_images(torch.stack([image_a, image_b]))
        z = slerp(za, zb, torch.linspace(0, 1, frames))
        # the same starting noise for every frame, so only the embedding changes along the row
        return torch.cat([self.decode(z[i:i + 1], generator=_seeded(seed), **kw) for i in range(frames)])


def load_pipeline(family, directory=None, **kw):
    if family not in FAMILIES:
        raise ValueError(f"model family must be one of {FAMILIES}, got {family!r}")
    return Imagen.load(directory, **kw) if family == "imagen" else UnCLIP.load(directory, **kw)
