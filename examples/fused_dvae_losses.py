#!/usr/bin/env python
"""Drop dalle_fast's fused Gumbel-softmax and logit-Laplace loss into a plain dVAE training loop.

The loop below is ordinary PyTorch: a small convolutional encoder to logits over a codebook, the
relaxed one-hot sample of torch.nn.functional.gumbel_softmax, a decoder to per-pixel (mu, ln b), and
the paper's logit-Laplace reconstruction loss written as PyTorch ops. The fused version changes two
lines:

    z = F.gumbel_softmax(logits, tau, dim=1)        ->  z = dalle_fast.gumbel_softmax(logits, tau, dim=1)
    loss = eager_logit_laplace(x, stats)            ->  loss = dalle_fast.logit_laplace_loss(x, stats)

    python examples/fused_dvae_losses.py                                  # 64x64 images, 2048 codes, batch 16
    python examples/fused_dvae_losses.py --image-size 16 --codes 64 --batch 2 --steps 2

It checks that both ops compute what the eager code computes (the same noise for the sample), then
times a training step of each loop and prints the speedup.
"""
import argparse

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.benchmark import Timer

import dalle_fast
from dalle_fast.reference.logit_laplace import logit_laplace_loss as eager_logit_laplace  # the formula in torch ops


def make_dvae(codes, hidden=64):
    encoder = nn.Sequential(nn.Conv2d(3, hidden, 4, 2, 1), nn.ReLU(), nn.Conv2d(hidden, hidden, 4, 2, 1), nn.ReLU(),
                            nn.Conv2d(hidden, codes, 1))
    decoder = nn.Sequential(nn.Conv2d(codes, hidden, 1), nn.ReLU(), nn.ConvTranspose2d(hidden, hidden, 4, 2, 1),
                            nn.ReLU(), nn.ConvTranspose2d(hidden, 6, 4, 2, 1))  # 6 = (mu, ln b) per channel
    return nn.ModuleDict({"encoder": encoder, "decoder": decoder})


def loss_eager(model, x, tau):
    logits = model["encoder"](x)
    z = F.gumbel_softmax(logits, tau, dim=1)
    return eager_logit_laplace(x, model["decoder"](z))


def loss_fused(model, x, tau):
    logits = model["encoder"](x)
    z = dalle_fast.gumbel_softmax(logits, tau, dim=1)
    return dalle_fast.logit_laplace_loss(x, model["decoder"](z))


def step_time(model, loss_fn, x, steps, tau=1.0):
    """Seconds per training step (loss, backward, AdamW), the mean of `steps` runs after one warm-up."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        loss_fn(model, x, tau).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    return Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads()).timeit(steps).median


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--codes", type=int, default=2048, help="codebook size (the paper: 8192)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    x = torch.rand(a.batch, 3, a.image_size, a.image_size)
    model = make_dvae(a.codes)

    # the same computation: fused sample with given noise against torch's formula, fused loss against eager
    logits = model["encoder"](x).detach()
    g = -torch.empty_like(logits).exponential_().log()
    fused_z = dalle_fast.gumbel_softmax(logits, 0.5, dim=1, gumbels=g)
    err_z = (fused_z - torch.softmax((logits + g) / 0.5, 1)).abs().max()
    stats = model["decoder"](torch.softmax(logits, 1)).detach()
    err_l = (dalle_fast.logit_laplace_loss(x, stats) - eager_logit_laplace(x, stats)).abs()
    print(f"fused Gumbel-softmax vs torch: max |difference| {err_z:.2e}; fused loss vs eager: {err_l:.2e}")
    assert err_z < 1e-5 and err_l < 1e-4 * max(1.0, eager_logit_laplace(x, stats).abs().item())

    fused = make_dvae(a.codes)
    fused.load_state_dict(model.state_dict())
    t_eager = step_time(model, loss_eager, x, a.steps)
    t_fused = step_time(fused, loss_fused, x, a.steps)
    print(f"dVAE training step, {a.threads} thread(s), batch {a.batch}, {a.image_size}x{a.image_size}, "
          f"{a.codes} codes: eager {1e3 * t_eager:.1f} ms, fused {1e3 * t_fused:.1f} ms, "
          f"speedup {t_eager / t_fused:.2f}x")
    return t_eager / t_fused


if __name__ == "__main__":
    main()
