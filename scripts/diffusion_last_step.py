#!/usr/bin/env python
"""Where the grey, speckled backgrounds of the diffusion samples come from (README, Imagen and unCLIP):
scripts/eval_diffusion.py at the defaults (w = 3, 50 DDIM steps, dynamic thresholding, the 36
single-object prompts, 2 samples each, seed 0) under variants of the sampler's end:

  default   the sampler as shipped: the last step (t = 0 -> -1) returns that step's x0 prediction
  skip0     no model call at t = 0: the step from t ~ 20 returns the x0 predicted there
  ddpm      DDPM instead of DDIM
  none      no thresholding; static: clamp to [-1, 1]

  scripts/diffusion_last_step.py --dir DIR --family imagen --variants default skip0 ddpm none static

Rows (with "variant" and "dir" added) are appended to --out (benchmarks/results/diffusion_last_step.jsonl).
"""
import argparse
import importlib.util
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=None, help="model directory (default: the bundled models)")
    p.add_argument("--family", default="imagen", choices=("imagen", "unclip"))
    p.add_argument("--variants", nargs="+", default=["default", "skip0"],
                   choices=("default", "skip0", "ddpm", "none", "static"))
    p.add_argument("--out", default=os.path.join(HERE, "..", "benchmarks", "results", "diffusion_last_step.jsonl"))
    args = p.parse_args(argv)
    spec = importlib.util.spec_from_file_location("eval_diffusion", os.path.join(HERE, "eval_diffusion.py"))
    ev = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ev)
    from dalle_fast.diffusion.schedule import NoiseSchedule
    steps_of = NoiseSchedule.sampling_steps
    tmp = args.out + ".part"
    try:
        for v in args.variants:
            base = ["--family", args.family, "--guidance", "3", "--steps", "50", "-n", "2", "--prompts", "single",
                    "--out", tmp] + (["--dir", args.dir] if args.dir else [])
            extra = {"ddpm": ["--sampler", "ddpm"], "none": ["--threshold", "none"],
                     "static": ["--threshold", "static"]}.get(v, [])
            if v == "skip0":
                NoiseSchedule.sampling_steps = lambda self, steps: steps_of(self, steps)[:-1]
            try:
                ev.main(base + extra)
            finally:
                NoiseSchedule.sampling_steps = steps_of
            with open(tmp) as f:
                row = json.loads(f.read().splitlines()[-1])
            os.remove(tmp)
            row.update(variant=v, dir=args.dir or "bundled")
            with open(args.out, "a") as f:
                f.write(json.dumps(row) + "\n")
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return 0


if __name__ == "__main__":
    sys.exit(main())
