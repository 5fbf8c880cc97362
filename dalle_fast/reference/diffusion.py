"""Pure-PyTorch reference of the diffusion sampling ops: dynamic thresholding and the guided step.

Follows csrc/include/dalle_fast/diffusion.h (schedule coefficients, percentile, in-kernel normal
noise) step by step, so with the same seed the fused op reproduces it (in float64: to rounding).
Written for clarity; any device and float dtype (tests run it in float64). The eager baseline of
benchmarks/bench_diffusion_step.py is written separately, the way public samplers write it.
"""
import math

import torch

from .gumbel_softmax import philox4x32

NORMAL_STREAM = 256
PARAMETERIZATIONS = ("eps", "v", "x0")
SAMPLERS = ("ddpm", "ddim")
THRESHOLDS = ("dynamic", "static", "none")


def quantile(values, q):
    """torch.quantile(values, q, dim=1, interpolation='linear') of a (B, n) tensor without its
    2^24-element limit: a sort, then torch's rank, gather and lerp (a row holding NaN gives NaN)."""
    v = values.sort(dim=1).values
    n = v.shape[1]
    rank = torch.full((v.shape[0], 1), q * (n - 1), dtype=torch.float64, device=v.device)
    rank = torch.where(v.isnan().any(1, keepdim=True), torch.full_like(rank, n - 1), rank)
    lo = rank.to(torch.int64)
    hi = rank.ceil().to(torch.int64)
    w = (rank - lo).to(v.dtype)
    return torch.lerp(v.gather(1, lo), v.gather(1, hi), w).squeeze(1)


def threshold_scale(x0, percentile=0.995):
    """s = max(1, the percentile of |x0| over each sample's elements), shape (B,); NaN for a
    sample that holds a NaN."""
    s = quantile(x0.reshape(x0.shape[0], -1).abs(), percentile)
    return torch.where(s.isnan(), s, s.clamp(min=1.0))


def dynamic_threshold(x0, percentile=0.995, scale=None):
    """clamp(x0, -s, s) / s per sample (Imagen's dynamic thresholding); s differentiable."""
    s = threshold_scale(x0, percentile) if scale is None else scale
    s = s.to(x0.dtype).reshape((-1,) + (1,) * (x0.dim() - 1))
    return torch.maximum(torch.minimum(x0, s), -s) / s


def step_coefficients(alpha_bar_t, alpha_bar_prev, parameterization="eps", sampler="ddpm", eta=0.0):
    """Per-sample (x0_xt, x0_pred, mean_x0, mean_xt, sigma) in float64, see diffusion.h."""
    a = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    p = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    a, p = torch.broadcast_tensors(a, p)
    sa, s1a = a.sqrt(), (1 - a).sqrt()
    if parameterization == "eps":
        x0_xt, x0_pred = 1 / sa, -s1a / sa
    elif parameterization == "v":
        x0_xt, x0_pred = sa, -s1a
    else:
        x0_xt, x0_pred = torch.zeros_like(a), torch.ones_like(a)
    alpha = a / p
    beta = 1 - alpha
    if sampler == "ddpm":
        mean_x0 = p.sqrt() * beta / (1 - a)
        mean_xt = alpha.sqrt() * (1 - p) / (1 - a)
        sigma = (beta * (1 - p) / (1 - a)).clamp(min=0).sqrt()
    else:
        sigma = eta * ((1 - p) / (1 - a) * beta).clamp(min=0).sqrt()
        c = (1 - p - sigma ** 2).clamp(min=0).sqrt()
        mean_x0 = p.sqrt() - c * sa / s1a
        mean_xt = c / s1a
    return x0_xt, x0_pred, mean_x0, mean_xt, sigma


def normal_noise(shape, seed, offset=0, dtype=torch.float64, device="cpu"):
    """The standard normal noise the fused step draws for (seed, offset), computed in float64."""
    seed = int(seed) & 0xFFFFFFFFFFFFFFFF
    e = torch.arange(math.prod(shape), dtype=torch.int64, device=device)
    block = e >> 6
    r = torch.stack(philox4x32((block & 0xFFFFFFFF, block >> 32, NORMAL_STREAM + (e & 15),
                                torch.full_like(e, int(offset) & 0xFFFFFFFF)),
                               (seed & 0xFFFFFFFF, seed >> 32)))
    word = (e >> 4) & 3
    pair = word & 2  # 0: words (0, 1), 2: words (2, 3)
    bits_r = r.gather(0, pair.unsqueeze(0)).squeeze(0)
    bits_a = r.gather(0, (pair + 1).unsqueeze(0)).squeeze(0)
    u = ((bits_r >> 9).double() + 0.5) * 2.0 ** -23
    t = ((bits_a >> 9).double() + 0.5) * 2.0 ** -23
    rad = (-2 * u.log()).sqrt()
    z = torch.where((word & 1) == 1, rad * torch.sin(2 * math.pi * t), rad * torch.cos(2 * math.pi * t))
    return z.reshape(shape).to(dtype)


def guided_step(cond, uncond, x_t, alpha_bar_t, alpha_bar_prev, guidance=1.0, parameterization="eps",
                sampler="ddpm", eta=0.0, threshold="dynamic", percentile=0.995, seed=0, offset=0, noise=None):
    """One classifier-free-guided sampling step: (x_prev, x0) computed in x_t's dtype.

    alpha_bar_t, alpha_bar_prev: floats or (B,) tensors. noise: the standard normal z (default:
    the fused op's noise for (seed, offset))."""
    b = x_t.shape[0]
    view = (b,) + (1,) * (x_t.dim() - 1)
    coefs = step_coefficients(alpha_bar_t, alpha_bar_prev, parameterization, sampler, eta)
    x0_xt, x0_pred, mean_x0, mean_xt, sigma = (c.to(x_t.device).expand(b).to(x_t.dtype).reshape(view)
                                                for c in coefs)
    pred = cond if uncond is None else uncond + guidance * (cond - uncond)
    x0 = x0_xt * x_t + x0_pred * pred
    if threshold == "dynamic":
        x0 = dynamic_threshold(x0, percentile)
    elif threshold == "static":
        x0 = x0.clamp(-1, 1)
    if noise is None:
        noise = normal_noise(x_t.shape, seed, offset, x_t.dtype, x_t.device)
    return mean_x0 * x0 + mean_xt * x_t + sigma * noise, x0
