"""Classifier-free guidance: the conditional and unconditional passes as ONE U-Net call on a batch of
2B (the null condition selected by a mask) against two calls of B, per sampling step.

    python benchmarks/bench_cfg_pair.py            # the bundled Imagen base U-Net's shape, B = 1, 4, 16
    python benchmarks/bench_cfg_pair.py --quick    # B = 1, 4, few reps, no CSV

Correctness first: the pair's halves equal the two passes' outputs. ratio = two passes / pair (> 1: the
pair is faster).
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Recorder, measure  # noqa: E402
from dalle_fast.diffusion.models import repeat_to  # noqa: E402
from dalle_fast.diffusion.unet import UNet  # noqa: E402
from dalle_fast.train.diffusion import base_unet_config  # noqa: E402


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    net = UNet(base_unet_config(384)).eval()
    rec = Recorder("cfg_pair")
    for B in ((1, 4) if args.quick else (1, 4, 16)):
        x, t = torch.randn(B, 3, 32, 32), torch.randint(0, 1000, (B,))
        cond, mask = torch.randn(B, 12, 384), torch.ones(B, 12, dtype=torch.bool)
        keep, drop = torch.zeros(B, dtype=torch.bool), torch.ones(B, dtype=torch.bool)

        def pair():
            return net(torch.cat([x, x]), torch.cat([t, t]), repeat_to(2 * B, cond), repeat_to(2 * B, mask),
                       torch.cat([keep, drop]))

        def two():
            return net(x, t, cond, mask, keep), net(x, t, cond, mask, drop)

        with torch.no_grad():
            both, (c, u) = pair(), two()
            torch.testing.assert_close(both[:B], c, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(both[B:], u, atol=1e-4, rtol=1e-4)
            reps = 3 if args.quick else 10
            tp, tt = measure(pair, warmup=1, reps=reps), measure(two, warmup=1, reps=reps)
        shape = f"B={B} 3x32x32 text 12x384"
        rec.add(op="cfg_step", provider="two passes", mode="fwd", shape=shape, dtype="float32", device="cpu",
                ratio=1.0, **tt)
        rec.add(op="cfg_step", provider="pair (2B)", mode="fwd", shape=shape, dtype="float32", device="cpu",
                ratio=tt["median_ms"] / tp["median_ms"], **tp)
    rec.print_table()
    if not args.quick:
        print("wrote", rec.write())


if __name__ == "__main__":
    main()
