#!/usr/bin/env python
"""PowerSGD: our compressor (dalle_fast.distributed.powersgd_hook) against torch's powerSGD_hook at the same
rank on the DALL-E transformer's matrices of one layer (qkv d x 3d, output d x d, MLP d x 4d and 4d x d, plus
gains and biases) at a few widths, and our batched Householder QR against torch.linalg.qr.

Both hooks run inside a DDP backward of a one-process gloo group, so the collectives are trivial and the
difference is the compression compute: rows report the backward + hook time and the hook's overhead over
DDP's plain all-reduce (ratio = torch hook's overhead / ours: > 1 means ours computes less). The providers
are timed in interleaved rounds and the overhead is the median of per-round paired differences, so a
shared machine's load shifts cancel. Also reported:
the measured compression rate (elements sent / elements of the gradients) beside the paper's 1 - 5r/(8 d),
and the bytes passed to the collectives per step.

    .venv/bin/python benchmarks/bench_powersgd.py            # widths 256, 512, 1024
    .venv/bin/python benchmarks/bench_powersgd.py --quick    # widths 128, 256
"""
import argparse
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import dalle_fast  # noqa: E402
from benchmarks.common import Recorder, measure  # noqa: E402
from dalle_fast.distributed import PowerSGDState, paper_compression_rate, powersgd_hook  # noqa: E402
from dalle_fast.distributed.launch import init_file_group  # noqa: E402
from dalle_fast.reference import householder_qr as ref  # noqa: E402


class Layer(torch.nn.Module):
    """One DALL-E transformer layer's parameters with its matrix shapes (the math is a stand-in)."""

    def __init__(self, d):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(d), torch.nn.LayerNorm(d)
        self.qkv = torch.nn.Linear(d, 3 * d, bias=False)
        self.out = torch.nn.Linear(d, d)
        self.fc1, self.fc2 = torch.nn.Linear(d, 4 * d), torch.nn.Linear(4 * d, d)

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.out(self.qkv(h)[..., : x.shape[-1]])
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.norm2(x))))

    def matrices(self):
        return [self.qkv.weight, self.out.weight, self.fc1.weight, self.fc2.weight]


def ddp_step(d, hook, state):
    """One DDP backward step of a one-layer model with `hook` (None: DDP's plain all-reduce)."""
    from torch.nn.parallel import DistributedDataParallel as DDP
    torch.manual_seed(0)
    model = Layer(d)
    ddp = DDP(model, bucket_cap_mb=1024)
    if hook is not None:
        ddp.register_comm_hook(state(model), hook)
    x = torch.randn(8, d)

    def step():
        ddp.zero_grad(set_to_none=True)
        ddp(x).square().mean().backward()
    for _ in range(3):  # past torch's start_powerSGD_iter
        step()
    return step, model


def _quantiles(xs):
    xs = sorted(xs)
    q = lambda p: xs[min(len(xs) - 1, int(p * len(xs)))]  # noqa: E731
    return {"median_ms": statistics.median(xs), "p20_ms": q(0.2), "p80_ms": q(0.8)}


def interleaved(steps, reps):
    """Times every step once per round, in rotating order, for `reps` rounds; returns per provider the step
    time quantiles and the median over rounds of (its time - the plain step's time in the same round): paired
    differences, so the load of a shared machine cancels instead of landing on one provider."""
    names = list(steps)
    times = {n: [] for n in names}
    for rep in range(reps):
        for n in names[rep % len(names):] + names[:rep % len(names)]:
            t0 = time.perf_counter()
            steps[n]()
            times[n].append((time.perf_counter() - t0) * 1e3)
    over = {n: statistics.median(a - b for a, b in zip(times[n], times["plain"])) for n in names}
    return {n: _quantiles(times[n]) for n in names}, over


def bench_hooks(rec, widths, ranks, reps):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as tp
    for d in widths:
        for r in ranks:
            def theirs_state(model, r=r):
                return tp.PowerSGDState(None, matrix_approximation_rank=r, start_powerSGD_iter=2,
                                        min_compression_rate=1.0, warm_start=False, use_error_feedback=True)
            steps, models = {"plain": ddp_step(d, None, None)[0]}, {}
            steps["torch"], models["torch"] = ddp_step(d, tp.powerSGD_hook, theirs_state)
            for err in (torch.float32, torch.bfloat16):
                def ours_state(model, r=r, e=err):
                    return PowerSGDState(None, r, compress=model.matrices(), error_dtype=e)
                steps[err], models[err] = ddp_step(d, powersgd_hook, ours_state)
            t, over = interleaved(steps, reps)
            shape = f"d={d} r={r}"
            finite = {k: all(torch.isfinite(p.grad).all() for p in m.parameters()) for k, m in models.items()}
            for err in (torch.float32, torch.bfloat16):
                rec.add(op="powersgd_hook", provider=f"dalle_fast err={str(err)[6:]}", mode="ddp backward+hook",
                        shape=shape, dtype="float32", device="cpu", **t[err],
                        ratio=over["torch"] / over[err] if over[err] > 0 else "",
                        extra=f"hook overhead {over[err]:.3f} ms; torch's {over['torch']:.3f} ms (medians of paired "
                              f"differences to the plain all-reduce step, {t['plain']['median_ms']:.3f} ms); "
                              f"finite={finite[err]}")
            rec.add(op="powersgd_hook", provider="torch powerSGD_hook", mode="ddp backward+hook", shape=shape,
                    dtype="float32", device="cpu", **t["torch"], ratio=1.0,
                    extra=f"hook overhead {over['torch']:.3f} ms; finite={finite['torch']}")


def bench_rates(rec, widths, ranks):
    """Measured compression rate and collective bytes of one step of one layer, against the paper's formula."""
    for d in widths:
        for r in ranks:
            layer = Layer(d)
            params = list(layer.parameters())
            state = PowerSGDState(None, r, compress=layer.matrices(), error_dtype=torch.float16)
            state.allreduce_(params, [torch.randn_like(p) for p in params])
            dense_bytes = 4 * sum(p.numel() for p in params)
            rec.add(op="powersgd_rate", provider="dalle_fast", mode="one layer", shape=f"d={d} r={r}",
                    dtype="fp16 P/Q", device="cpu", bytes=state.bytes_sent,
                    extra=f"measured rate {state.compression_rate():.4f} (elements sent / dense); paper "
                          f"1-5r/(8d) = {paper_compression_rate(r, d):.4f}; bytes to collectives "
                          f"{state.bytes_sent} vs {dense_bytes} for an fp32 all-reduce")


def bench_qr(rec, widths, ranks, reps):
    for d in widths:
        for r in ranks:
            a = torch.randn(4, 4 * d, r)
            q = dalle_fast.householder_qr(a)
            assert ref.orthogonality_error(q) < 1e-4
            t_ours = measure(lambda: dalle_fast.householder_qr(a), reps=reps)
            t_theirs = measure(lambda: torch.linalg.qr(a), reps=reps)
            for name, t in (("dalle_fast householder_qr", t_ours), ("torch.linalg.qr", t_theirs)):
                rec.add(op="householder_qr", provider=name, mode="fwd", shape=f"4x{4 * d}x{r}", dtype="float32",
                        device="cpu", **t, ratio=t_theirs["median_ms"] / t["median_ms"])


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    widths = [128, 256] if args.quick else [256, 512, 1024]
    ranks = [4, 16] if args.quick else [4, 32]
    reps = 5 if args.quick else 10
    init_file_group(0, 1, tempfile.mktemp(prefix="bench_powersgd_"))
    rec = Recorder("powersgd")
    bench_rates(rec, widths, ranks)
    bench_qr(rec, widths, ranks, reps)
    bench_hooks(rec, widths, ranks, 2 * reps)
    rec.print_table()
    print("wrote", rec.write())
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
