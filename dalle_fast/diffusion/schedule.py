"""Noise schedules and the three parameterisations of a diffusion model's output.

Discrete time t = 0 .. T-1 with alpha_bar(t) the fraction of signal variance left at step t:
x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps. Writing alpha = sqrt(alpha_bar) and
sigma = sqrt(1 - alpha_bar) (alpha^2 + sigma^2 = 1):
- eps-prediction (DDPM): x0 = (x_t - sigma eps) / alpha;
- v-prediction (Salimans & Ho 2022): v = alpha eps - sigma x0, so x0 = alpha x_t - sigma v and
  eps = sigma x_t + alpha v;
- x0-prediction (unCLIP's prior): the model's output is x0 itself.
Schedules (all computed in float64):
- cosine (Nichol & Dhariwal 2021): alpha_bar(t) = f(t + 1) / f(0), f(u) = cos(((u / T) + s) / (1 + s) pi / 2)^2,
  each beta = 1 - alpha_bar(t) / alpha_bar(t - 1) clipped at 0.999;
- linear (Ho et al. 2020): betas evenly spaced from beta_start to beta_end, alpha_bar = cumprod(1 - beta).
"""
import math

import torch

KINDS = ("cosine", "linear")
PARAMETERISATIONS = ("eps", "v", "x0")


def check_parameterisation(param):
    if param not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation must be one of {PARAMETERISATIONS}, got {param!r}")
    return param


class NoiseSchedule:
    def __init__(self, kind="cosine", timesteps=1000, beta_start=1e-4, beta_end=0.02, cosine_s=0.008):
        if kind not in KINDS:
            raise ValueError(f"schedule kind must be one of {KINDS}, got {kind!r}")
        if not isinstance(timesteps, int) or timesteps < 2:
            raise ValueError(f"timesteps must be an int >= 2, got {timesteps!r}")
        if kind == "linear" and not 0 < beta_start <= beta_end < 1:
            raise ValueError(f"linear schedule needs 0 < beta_start <= beta_end < 1, got {beta_start}, {beta_end}")
        self.kind, self.timesteps = kind, timesteps
        self.beta_start, self.beta_end, self.cosine_s = beta_start, beta_end, cosine_s
        if kind == "cosine":
            u = torch.arange(timesteps + 1, dtype=torch.float64)
            f = torch.cos((u / timesteps + cosine_s) / (1 + cosine_s) * math.pi / 2) ** 2
            betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        else:
            betas = torch.linspace(beta_start, beta_end, timesteps, dtype=torch.float64)
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1 - betas, 0)

    def to_dict(self):
        return {"kind": self.kind, "timesteps": self.timesteps, "beta_start": self.beta_start,
                "beta_end": self.beta_end, "cosine_s": self.cosine_s}

    @classmethod
    def from_dict(cls, d):
        return cls(**d)

    # ---- per-step coefficients ---------------------------------------------------------------------
    def alpha_bar(self, t):
        """alpha_bar at integer steps t (a tensor); t = -1 means 'before any noise' (alpha_bar = 1)."""
        t = torch.as_tensor(t)
        acp = self.alphas_cumprod.to(t.device)
        return torch.where(t >= 0, acp[t.clamp(min=0)], torch.ones((), dtype=acp.dtype, device=t.device))

    def _coeffs(self, t, like):
        """alpha, sigma at steps t (B,), shaped to broadcast against `like` (B, ...), in like's dtype."""
        ab = self.alpha_bar(t.to(like.device))
        shape = (-1,) + (1,) * (like.dim() - 1)
        return ab.sqrt().to(like.dtype).view(shape), (1 - ab).sqrt().to(like.dtype).view(shape)

    def check_t(self, t, batch):
        if not torch.is_tensor(t) or t.dtype not in (torch.int32, torch.int64) or t.shape != (batch,):
            raise ValueError(f"t must be an integer tensor of shape ({batch},), got "
                             f"{getattr(t, 'dtype', type(t).__name__)} {tuple(getattr(t, 'shape', ()))}")
        if t.numel() and (int(t.min()) < 0 or int(t.max()) >= self.timesteps):
            raise ValueError(f"t must lie in [0, {self.timesteps - 1}], got [{int(t.min())}, {int(t.max())}]")

    def q_sample(self, x0, t, noise):
        """x_t = alpha x0 + sigma noise."""
        if noise.shape != x0.shape:
            raise ValueError(f"noise shape {tuple(noise.shape)} does not match x0 shape {tuple(x0.shape)}")
        self.check_t(t, x0.shape[0])
        a, s = self._coeffs(t, x0)
        return a * x0 + s * noise

    def target(self, x0, noise, t, param):
        """What a model of parameterisation `param` is trained to output."""
        check_parameterisation(param)
        if param == "eps":
            return noise
        if param == "x0":
            return x0
        a, s = self._coeffs(t, x0)
        return a * noise - s * x0

    def snr(self, t):
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) at integer steps t (float64)."""
        ab = self.alpha_bar(t)
        return ab / (1 - ab)

    def min_snr_weight(self, t, param, gamma):
        """Per-sample weights (B,) of the MSE against `param`'s target that make the loss
        min(SNR, gamma) * ||x0 - x0_hat||^2 (Min-SNR-gamma, Hang et al. 2023): the nearly clean steps,
        where the x0 error is cheap to shrink, stop dominating the gradient. eps's MSE is SNR times x0's,
        v's is (SNR + 1) times x0's, x0's is x0's."""
        check_parameterisation(param)
        if not gamma > 0:
            raise ValueError(f"min-SNR gamma must be > 0, got {gamma!r}")
        snr = self.snr(t)
        w = snr.clamp(max=gamma)
        w = w / snr if param == "eps" else (w / (snr + 1) if param == "v" else w)
        return w.float()

    def predict_x0_eps(self, pred, x_t, t, param):
        """(x0, eps) implied by a model output `pred` at x_t, step t."""
        check_parameterisation(param)
        if pred.shape != x_t.shape:
            raise ValueError(f"prediction shape {tuple(pred.shape)} does not match x_t shape {tuple(x_t.shape)}")
        a, s = self._coeffs(t, x_t)
        if param == "eps":
            return (x_t - s * pred) / a, pred
        if param == "v":
            return a * x_t - s * pred, s * x_t + a * pred
        return pred, (x_t - a * pred) / s

    def sampling_steps(self, steps):
        """`steps` integer timesteps, evenly spaced from T-1 down to 0 (respacing for fast samplers)."""
        if not isinstance(steps, int) or not 1 <= steps <= self.timesteps:
            raise ValueError(f"steps must be an int in [1, {self.timesteps}], got {steps!r}")
        ts = torch.linspace(self.timesteps - 1, 0, steps, dtype=torch.float64).round().long()
        return torch.unique_consecutive(ts)
