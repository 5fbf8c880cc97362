#!/usr/bin/env python
"""Fused Gumbel-softmax against torch.nn.functional.gumbel_softmax (eager and torch.compile) at the
dVAE's logits shape (B, 8192, 32, 32), softmax over dim=1 (NCHW channels), plus one_hot_argmax
against one_hot(argmax). Checks correctness first, then times fwd / bwd / fwd+bwd.

    .venv/bin/python benchmarks/bench_gumbel_softmax.py            # (2, 8192, 32, 32)
    .venv/bin/python benchmarks/bench_gumbel_softmax.py --quick    # (2, 1024, 16, 16)

Bytes are the fused kernels' minimum traffic: fwd reads logits and writes y (2 tensors), bwd
reads grad and y and writes dlogits (3), fwd+bwd 5. GB/s is that over the median time, against
the measured copy ceiling. ratio = eager median / provider median (> 1: faster than eager).
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dalle_fast  # noqa: E402
from benchmarks.common import Recorder, copy_peak_gbps, measure, wants_csv  # noqa: E402
from dalle_fast import testing  # noqa: E402
from dalle_fast.reference import gumbel_softmax as ref  # noqa: E402

TAU = 1.0


def check_correctness(device, dtype, shape):
    """The fused op against the float64 reference with the same noise, and against torch's
    formula with given noise at the benchmark shape; hard is an exact one-hot."""
    small = (2, 96, 5, 7)
    x = torch.randn(small, dtype=torch.float64, device=device)
    seed = torch.tensor([1234], device=device)
    got = torch.ops.dalle_fast.gumbel_softmax(x.to(dtype), seed, None, TAU, 1)
    want = ref.gumbel_softmax(x, TAU, dim=1, seed=1234)
    same_math = ref.gumbel_softmax(x.to(dtype), TAU, dim=1, seed=1234)
    testing.assert_within_pytorch_error(got, want, same_math, what="seeded forward")
    x = torch.randn(shape, device=device, dtype=dtype)
    g = -torch.empty_like(x).exponential_().log()
    got = dalle_fast.gumbel_softmax(x, TAU, dim=1, gumbels=g)
    want = torch.softmax((x.double() + g.double()) / TAU, 1)
    testing.assert_within_pytorch_error(got, want, torch.softmax((x + g) / TAU, 1), what="given-noise forward")
    hard = dalle_fast.gumbel_softmax(x, TAU, hard=True, dim=1)
    assert torch.all(hard.sum(1) == 1), "hard sample is not one-hot"
    print(f"correctness ok ({device}, {dtype}, {tuple(shape)})")


def modes(fn, x, grad):
    """The timed callables of one provider: fwd (no autograd), bwd (backward of a graph kept from the
    first call), fwd+bwd."""
    xg = x.detach().requires_grad_(True)
    kept = []

    def fwd():
        with torch.no_grad():
            fn(x)

    def bwd():
        if not kept:
            kept.append(fn(xg))
        torch.autograd.grad(kept[0], xg, grad, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda: torch.autograd.grad(fn(xg), xg, grad)}


def providers(with_compile=True):
    out = [("torch eager", lambda v: F.gumbel_softmax(v, TAU, dim=1))]
    if with_compile:
        out.append(("torch.compile", torch.compile(lambda v: F.gumbel_softmax(v, TAU, dim=1))))
    out.append(("dalle_fast", lambda v: dalle_fast.gumbel_softmax(v, TAU, dim=1)))
    return out


def case(provider, mode, quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py)."""
    x = torch.randn((2, 1024, 16, 16) if quick else (2, 8192, 32, 32))
    fn = dict(providers(with_compile=provider == "torch.compile"))[provider]
    return modes(fn, x, torch.randn_like(x))[mode]


CASES = [(p, "fwd+bwd") for p in ("torch eager", "dalle_fast")]


def time_provider(rec, name, fn, x, grad, device, nbytes_elem, baseline, reps):
    """fwd (no autograd), bwd (backward of a kept graph), fwd+bwd for one provider."""
    n = x.numel()
    results = {}
    fns = modes(fn, x, grad)
    for mode, tensors in (("fwd", 2), ("bwd", 3), ("fwd+bwd", 5)):
        f = fns[mode]
        try:
            t = measure(f, device, warmup=2, reps=reps)
        except RuntimeError as e:  # e.g. a compiled backward that cannot be replayed
            print(f"{name} {mode}: not timed ({str(e).splitlines()[0]})")
            continue
        results[mode] = t["median_ms"]
        nbytes = tensors * n * nbytes_elem
        base = baseline.get(mode) if baseline is not None else t["median_ms"]
        rec.add(op="gumbel_softmax", provider=name, mode=mode, shape=str(tuple(x.shape)), dtype=str(x.dtype),
                device=device, bytes=nbytes, gbps=nbytes / (t["median_ms"] * 1e-3) / 1e9,
                ratio=(base / t["median_ms"]) if base else "", extra=f"dim=1 tau={TAU}", **t)
    return results


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shape, few repetitions")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile provider")
    p.add_argument("--no-csv", action="store_true", help="print only, do not append to benchmarks/results")
    args = p.parse_args(argv)
    torch.set_num_threads(2)
    device, dtype = args.device, getattr(torch, args.dtype)
    shape = (2, 1024, 16, 16) if args.quick else (2, 8192, 32, 32)
    reps = 20 if args.quick else 7
    check_correctness(device, dtype, shape)

    peak = copy_peak_gbps(device)
    print(f"copy ceiling: {peak:.1f} GB/s ({device}, {torch.get_num_threads()} threads)")
    x = torch.randn(shape, device=device, dtype=dtype)
    grad = torch.randn_like(x)
    elem = x.element_size()
    rec = Recorder("gumbel_softmax")

    baseline = None
    for name, fn in providers(with_compile=not args.no_compile):
        res = time_provider(rec, name, fn, x, grad, device, elem, baseline, reps)
        baseline = baseline or res

    # one_hot_argmax (dVAE token encoding): read logits, write the one-hot.
    n = x.numel()
    eager_oh = lambda: F.one_hot(x.argmax(1), shape[1]).permute(0, 3, 1, 2).to(dtype)  # noqa: E731
    assert torch.equal(eager_oh(), dalle_fast.one_hot_argmax(x, 1))
    base = None
    for name, f in (("torch eager", eager_oh), ("dalle_fast", lambda: dalle_fast.one_hot_argmax(x, 1))):
        t = measure(f, device, warmup=2, reps=reps)
        base = base or t["median_ms"]
        rec.add(op="one_hot_argmax", provider=name, mode="fwd", shape=str(shape), dtype=str(dtype), device=device,
                bytes=2 * n * elem, gbps=2 * n * elem / (t["median_ms"] * 1e-3) / 1e9, ratio=base / t["median_ms"],
                extra="dim=1", **t)

    for r in rec.rows:
        r["extra"] = f"{r['extra']} ceiling={peak:.1f}GB/s"
    rec.print_table()
    if wants_csv(args.quick) and not args.no_csv:
        print("appended to", rec.write())


if __name__ == "__main__":
    main()
