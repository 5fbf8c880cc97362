#!/usr/bin/env python
"""What a finer token grid costs the bundled transformer: seconds of CPU time (process time, so other
jobs on the machine count less) per training step (forward, backward, AdamW) of DALLEConfig.shapes with
the bundle's tokenizer and codebook sizes, for an 8x8 and a 16x16 image-token grid.

Usage: scripts/bundle_step_cost.py [--batch 32] [--steps 5] [--dim 192]
"""
import argparse
import sys
import time

import torch

from dalle_fast.models.dalle import DALLE, DALLEConfig


def step_seconds(side, batch, steps, **kw):
    """Median CPU seconds per step after one warm-up step."""
    torch.manual_seed(0)
    cfg = DALLEConfig.shapes(num_text_tokens=122, text_len=16, num_image_tokens=512, image_size=side, **kw)
    model = DALLE(cfg)
    opt = torch.optim.AdamW(model.parameters(), 1e-3)
    text = torch.randint(1, 122, (batch, 16))
    image = torch.randint(0, 512, (batch, side, side))
    times = []
    for _ in range(steps + 1):
        t = time.process_time()
        loss = model(text, image, return_loss=True)[0]
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.process_time() - t)
    return sorted(times[1:])[steps // 2]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--dim", type=int, default=192)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    kw = {} if args.dim == 192 else dict(dim=args.dim, dim_head=args.dim // 4)
    base = None
    for side in (8, 16):
        s = step_seconds(side, args.batch, args.steps, **kw)
        base = base or s
        print(f"{side}x{side} image tokens (+16 text), dim {args.dim}, batch {args.batch}: "
              f"{s:.3f} CPU s/step ({s / base:.1f}x)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
