"""Benchmark of the fused logit-Laplace loss against the eager composition and torch.compile.

    .venv/bin/python benchmarks/bench_logit_laplace.py            # dVAE shape: x (8, 3, 256, 256), fp32 and bf16
    .venv/bin/python benchmarks/bench_logit_laplace.py --quick    # (2, 3, 64, 64), fp32, few reps, no CSV

Providers: eager (the formula as PyTorch ops, dalle_fast.reference.logit_laplace), compile (the same under
torch.compile), dalle_fast. Modes: fwd, bwd (the gradient to stats of an existing forward), fwd+bwd;
reduction 'mean' as in dVAE training. Bytes moved: fwd reads x and stats (3N elements), bwd reads them and
writes grad_stats (5N), fwd+bwd 8N; GB/s is reported against the machine's measured copy ceiling.
Goal (issue 2): dalle_fast at least 2x faster than eager and faster than torch.compile, fwd+bwd.
"""
import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dalle_fast  # noqa: E402
from benchmarks.common import Recorder, copy_peak_gbps, measure, wants_csv  # noqa: E402
from dalle_fast.ops.logit_laplace import sample_inputs  # noqa: E402
from dalle_fast.reference import logit_laplace as ref  # noqa: E402


def check_correctness(x, stats):
    """The fused loss and its gradient against the float64 reference on the benchmark's own inputs."""
    s = stats.detach().clone().requires_grad_(True)
    s64 = stats.detach().double().requires_grad_(True)
    out = dalle_fast.logit_laplace_loss(x, s)
    want = ref.logit_laplace_loss(x.double(), s64)
    (g,) = torch.autograd.grad(out, s)
    (g64,) = torch.autograd.grad(want, s64)
    same = ref.logit_laplace_loss(x, stats.detach())  # PyTorch in the same dtype
    err_fwd = abs(out.double().item() - want.item())
    err_torch = abs(same.double().item() - want.item())
    err_grad = (g.double() - g64).abs().max().item() / g64.abs().max().item()
    tol_grad = 8 * torch.finfo(x.dtype).eps
    ok = err_fwd <= 2 * err_torch + 8 * torch.finfo(x.dtype).eps * abs(want.item()) and err_grad <= tol_grad
    print(f"correctness {x.dtype}: |loss - ref| {err_fwd:.2e} (PyTorch in {x.dtype}: {err_torch:.2e}), "
          f"grad max rel err {err_grad:.2e} (bar {tol_grad:.1e}): {'ok' if ok else 'FAILED'}")
    return ok


def modes(fn, x, stats):
    """The timed callables of one provider: fwd (no autograd), bwd (the gradient of a forward kept from the
    first call, again and again), fwd+bwd."""
    kept = []

    def fwd():
        with torch.no_grad():
            return fn(x, stats)

    def bwd():
        if not kept:
            kept.append(fn(x, stats))
        return torch.autograd.grad(kept[0], stats, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda: torch.autograd.grad(fn(x, stats), stats)}


def case(provider, mode, quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py)."""
    x, stats = sample_inputs((2, 3, 64, 64) if quick else (8, 3, 256, 256), dtype=torch.float32,
                             requires_grad=True, seed=0)
    fn = {"eager": ref.logit_laplace_loss, "dalle_fast": dalle_fast.logit_laplace_loss}[provider]
    return modes(fn, x, stats)[mode]


CASES = [(p, "fwd+bwd") for p in ("eager", "dalle_fast")]


def run(shape, dtypes, reps, write_csv):
    torch.set_num_threads(2)
    peak = copy_peak_gbps()
    print(f"machine copy ceiling: {peak:.1f} GB/s; threads: {torch.get_num_threads()}; "
          f"cpu capability: {torch.backends.cpu.get_cpu_capability()}")
    rec = Recorder("logit_laplace")
    compiled = torch.compile(ref.logit_laplace_loss, dynamic=False)
    providers = {"eager": ref.logit_laplace_loss, "compile": compiled, "dalle_fast": dalle_fast.logit_laplace_loss}
    all_ok = True
    for dtype in dtypes:
        x, stats = sample_inputs(shape, dtype=dtype, requires_grad=True, seed=0)
        all_ok &= check_correctness(x, stats)
        n = x.numel()
        item = x.element_size()
        nbytes = {"fwd": 3 * n * item, "bwd": 5 * n * item, "fwd+bwd": 8 * n * item}
        base = {}
        for name, fn in providers.items():
            for mode, f in modes(fn, x, stats).items():
                t = measure(f, warmup=3, reps=reps)
                if name == "eager":
                    base[mode] = t["median_ms"]
                gbps = nbytes[mode] / (t["median_ms"] * 1e-3) / 1e9
                rec.add(op="logit_laplace_loss", provider=name, mode=mode, shape=f"{tuple(shape)}",
                        dtype=str(dtype).replace("torch.", ""), device="cpu", bytes=nbytes[mode],
                        ratio=base[mode] / t["median_ms"], gbps=gbps,
                        extra=f"{100 * gbps / peak:.0f}% of copy ceiling {peak:.1f} GB/s", **t)
    rec.print_table()
    if write_csv:
        print("appended to", rec.write())
    for dtype in dtypes:
        d = str(dtype).replace("torch.", "")
        rows = {r["provider"]: r for r in rec.rows if r["mode"] == "fwd+bwd" and r["dtype"] == d}
        ours, comp = rows["dalle_fast"], rows["compile"]
        print(f"fwd+bwd {d}: dalle_fast {ours['ratio']:.2f}x eager (goal >= 2), "
              f"{comp['median_ms'] / ours['median_ms']:.2f}x torch.compile (goal > 1)")
    return all_ok


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small shape, few reps, fp32 only, no CSV")
    p.add_argument("--reps", type=int, default=None)
    args = p.parse_args()
    if args.quick:
        ok = run((2, 3, 64, 64), [torch.float32], args.reps or 5, write_csv=wants_csv(True))
    else:
        ok = run((8, 3, 256, 256), [torch.float32, torch.bfloat16], args.reps or 15, write_csv=True)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
