"""unCLIP's diffusion prior: CLIP text embedding -> CLIP image embedding.

A small transformer over four tokens (the text embedding, the timestep, the noisy image embedding,
a learned query) whose query output is the clean image embedding (x0-parameterisation, as in
DALL-E 2). Embeddings are unit vectors; the model works on them scaled by sqrt(dim) so each
coordinate has about unit variance, the scale the noise schedule assumes. Classifier-free guidance:
the text embedding is replaced by a learned null for a fraction p_uncond of training samples.
Sampling draws `candidates` embeddings per caption and keeps the one with the highest dot product
with the text embedding (DALL-E 2 used 2).
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

from .models import batch_part, load_config_and_weights, repeat_to, save_module
from .sampling import sample
from .schedule import NoiseSchedule
from .unet import timestep_embedding


class DiffusionPrior(nn.Module):
    def __init__(self, dim=64, width=128, layers=4, heads=4, timesteps=1000, p_uncond=0.1):
        super().__init__()
        if dim < 2 or width % heads:
            raise ValueError(f"need dim >= 2 and width divisible by heads, got dim={dim}, width={width}, heads={heads}")
        self.dim, self.width, self.layers, self.heads, self.p_uncond = dim, width, layers, heads, p_uncond
        self.schedule = NoiseSchedule("cosine", timesteps)
        self.text_in, self.z_in = nn.Linear(dim, width), nn.Linear(dim, width)
        self.time_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.query = nn.Parameter(torch.randn(width) * 0.02)
        self.null_text = nn.Parameter(torch.zeros(dim))
        self.pos = nn.Parameter(torch.randn(4, width) * 0.02)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm, self.out = nn.LayerNorm(width), nn.Linear(width, dim)

    def to_dict(self):
        return {"dim": self.dim, "width": self.width, "layers": self.layers, "heads": self.heads,
                "timesteps": self.schedule.timesteps, "p_uncond": self.p_uncond}

    def save_pretrained(self, directory):
        return save_module(self, directory, self.to_dict())

    @classmethod
    def from_pretrained(cls, directory, device="cpu"):
        cfg, weights = load_config_and_weights(directory)
        model = cls(**cfg)
        model.load_state_dict(weights)
        return model.to(device).eval()

    def _check(self, name, z):
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"{name} must be (B, {self.dim}), got {tuple(z.shape)}")

    def forward(self, z_t, t, text, drop=None):
        """The clean (scaled) image embedding predicted from noisy z_t (B, dim) at steps t, given
        unit text embeddings (B, dim)."""
        self._check("z_t", z_t)
        self._check("text", text)
        if text.shape[0] != z_t.shape[0]:
            raise ValueError(f"text has batch {text.shape[0]}, z_t has {z_t.shape[0]}")
        text = text * self.dim ** 0.5
        if drop is not None:
            text = torch.where(drop[:, None], self.null_text.to(text.dtype), text)
        tokens = torch.stack([self.text_in(text), self.time_mlp(timestep_embedding(t, self.width)),
                              self.z_in(z_t), self.query.expand(z_t.shape[0], -1)], dim=1) + self.pos
        return self.out(self.norm(self.transformer(tokens)[:, -1]))

    def loss(self, image_emb, text_emb, part=None):
        """MSE of the predicted clean embedding (x0-parameterisation) on unit embeddings (B, dim);
        part: the rows of a data-parallel global batch these are (models.batch_part)."""
        self._check("image_emb", image_emb)
        x0 = image_emb * self.dim ** 0.5
        lo, hi, B = batch_part(part, x0.shape[0])
        t = torch.randint(0, self.schedule.timesteps, (B,), device=x0.device)[lo:hi]
        z_t = self.schedule.q_sample(x0, t, torch.randn((B, self.dim), dtype=x0.dtype, device=x0.device)[lo:hi])
        drop = (torch.rand(B, device=x0.device) < self.p_uncond)[lo:hi]
        return F.mse_loss(self(z_t, t, text_emb, drop), x0)

    @torch.no_grad()
    def sample(self, text_emb, candidates=2, guidance=1.0, steps=32, generator=None):
        """Unit image embeddings (B, dim): `candidates` draws per text embedding, the one with the
        highest dot product with it kept."""
        self._check("text_emb", text_emb)
        if not isinstance(candidates, int) or candidates < 1:
            raise ValueError(f"candidates must be an int >= 1, got {candidates!r}")
        B = text_emb.shape[0]
        text = text_emb.repeat(candidates, 1)

        def model_fn(z, t, drop):
            return self(z, t, repeat_to(z.shape[0], text), drop)

        z = sample(model_fn, (B * candidates, self.dim), self.schedule, steps=steps, sampler="ddim",
                   guidance=guidance, param="x0", threshold="none", generator=generator,
                   device=text_emb.device)
        z = F.normalize(z, dim=-1).view(candidates, B, self.dim)
        best = (z * text_emb[None]).sum(-1).argmax(0)
        return z[best, torch.arange(B)]
