"""Pure-PyTorch reference of the logit-Laplace loss of the dVAE (any float dtype; tests run it in float64).

Written as the eager composition of the formula of the paper, it is also the 'eager' baseline of
benchmarks/bench_logit_laplace.py.
"""
import math

import torch


def map_pixels(x, eps=0.1):
    """(1 - 2 eps) x + eps: squeezes [0, 1] into [eps, 1 - eps], where logit is finite.

    Args:
        x: tensor of pixel values in [0, 1].
        eps: the squeeze (the paper: 0.1).
    Returns:
        A tensor like x with values in [eps, 1 - eps].
    """
    return (1 - 2 * eps) * x + eps


def unmap_pixels(x, eps=0.1):
    """Inverse of map_pixels, clamped to [0, 1].

    Args:
        x: tensor of squeezed pixel values.
        eps: the squeeze map_pixels used.
    Returns:
        A tensor like x with values in [0, 1].
    """
    return ((x - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_nll(x, stats, eps=0.1):
    """Per-element loss ln(2 b) + ln(x' (1 - x')) + |logit(x') - mu| / b, shape (B, C, H, W).

    stats = (mu, ln b) along the channel dim: (B, 2C, H, W)."""
    c = x.shape[1]
    mu, ln_b = stats[:, :c], stats[:, c:]
    xp = map_pixels(x, eps)
    return (math.log(2.0) + ln_b + torch.log(xp) + torch.log1p(-xp)
            + (torch.logit(xp) - mu).abs() * torch.exp(-ln_b))


def logit_laplace_loss(x, stats, eps=0.1, reduction="mean"):
    nll = logit_laplace_nll(x, stats, eps)
    if reduction == "none":
        return nll
    if reduction == "sum":
        return nll.sum()
    if reduction == "mean":
        return nll.mean()
    raise ValueError(f"reduction must be 'none', 'sum' or 'mean', got {reduction!r}")
