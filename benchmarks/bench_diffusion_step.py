"""Benchmark of the fused guided sampling step and dynamic thresholding against the eager composition
the public samplers write (torch.quantile + clamp + the DDPM posterior update) and torch.compile of it.

    .venv/bin/python benchmarks/bench_diffusion_step.py            # (16, 3, 64, 64) and (4, 3, 256, 256), fp32
    .venv/bin/python benchmarks/bench_diffusion_step.py --quick    # (4, 3, 64, 64), few reps, no CSV
    .venv/bin/python benchmarks/bench_diffusion_step.py --pair     # also: the guided pair as one batch of 2B
    .venv/bin/python benchmarks/bench_diffusion_step.py --cpu-time # 1 thread, CPU time instead of wall time, no CSV
                                                                   # (also each percentile selection forced)

Providers: eager (our own code written the way imagen-pytorch / diffusers write a guided, dynamically
thresholded DDPM step: guidance, x0 from eps, torch.quantile of |x0| per sample, clamp, posterior mean,
randn noise), compile (torch.compile of the same function), dalle_fast (one fused op). Ops: guided_step
(eps, DDPM, w = 5, p = 0.995) and dynamic_threshold alone. Bytes: the memory floor, i.e. what the op must
move at least: guided_step reads cond, uncond, x_t and writes x_prev (4N elements); dynamic_threshold
reads x0 and writes the result (2N). GB/s is reported against the machine's measured copy ceiling
(a large tensor copy), 'floor x' = time / (bytes / ceiling).
The machine is shared with other jobs (noisy): compare ratios measured in one run, never absolute times.
"""
import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dalle_fast  # noqa: E402
from benchmarks.common import Recorder, copy_peak_gbps, measure  # noqa: E402
from dalle_fast.ops.diffusion import sample_inputs  # noqa: E402
from dalle_fast.reference import diffusion as ref  # noqa: E402

ALPHA_BAR_T, ALPHA_BAR_PREV, GUIDANCE, PERCENTILE = 0.3, 0.4, 5.0, 0.995


def eager_threshold(x0, percentile=PERCENTILE):
    """Dynamic thresholding as the public implementations write it."""
    s = torch.quantile(x0.reshape(x0.shape[0], -1).abs(), percentile, dim=-1)
    s = s.clamp(min=1.0).view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s


def eager_step(cond, uncond, x_t, generator=None):
    """A classifier-free-guided, dynamically thresholded DDPM step in eager PyTorch ops."""
    a, p = ALPHA_BAR_T, ALPHA_BAR_PREV
    eps = uncond + GUIDANCE * (cond - uncond)
    x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    x0 = eager_threshold(x0)
    alpha, beta = a / p, 1 - a / p
    mean = (math.sqrt(p) * beta / (1 - a)) * x0 + (math.sqrt(alpha) * (1 - p) / (1 - a)) * x_t
    sigma = math.sqrt(beta * (1 - p) / (1 - a))
    return mean + sigma * torch.randn(x_t.shape, dtype=x_t.dtype, generator=generator)


def fused_step(cond, uncond, x_t):
    return dalle_fast.guided_step(cond, uncond, x_t, ALPHA_BAR_T, ALPHA_BAR_PREV, guidance=GUIDANCE,
                                  percentile=PERCENTILE, seed=1)


def check_correctness(cond, uncond, x_t):
    """The fused ops against the float64 reference on the benchmark's inputs, and the eager baseline's
    thresholding against it too (so the baseline computes the same thing)."""
    got = fused_step(cond, uncond, x_t)
    want, _ = ref.guided_step(cond.double(), uncond.double(), x_t.double(), ALPHA_BAR_T, ALPHA_BAR_PREV,
                              guidance=GUIDANCE, percentile=PERCENTILE, seed=1)
    err = (got.double() - want).abs().max().item()
    want_thr = ref.dynamic_threshold(cond.double())
    err_thr = (dalle_fast.dynamic_threshold(cond).double() - want_thr).abs().max().item()
    err_eager = (eager_threshold(cond).double() - want_thr).abs().max().item()
    ok = err < 1e-4 and err_thr < 1e-6 and err_eager < 1e-4
    print(f"correctness {cond.dtype}: against the float64 reference, guided_step max err {err:.2e}, "
          f"dynamic_threshold {err_thr:.2e} (eager baseline {err_eager:.2e}): {'ok' if ok else 'FAILED'}")
    return ok


def bench_ops(shapes, dtype, reps, rec, peak):
    ok = True
    compiled_step = torch.compile(eager_step, dynamic=False)
    compiled_thr = torch.compile(eager_threshold, dynamic=False)
    for shape in shapes:
        cond, uncond, x_t = sample_inputs(shape, dtype=dtype)
        ok &= check_correctness(cond, uncond, x_t)
        n, item = x_t.numel(), x_t.element_size()
        cases = {
            "guided_step": (4 * n * item, {"eager": lambda: eager_step(cond, uncond, x_t),
                                           "compile": lambda: compiled_step(cond, uncond, x_t),
                                           "dalle_fast": lambda: fused_step(cond, uncond, x_t)}),
            "dynamic_threshold": (2 * n * item, {"eager": lambda: eager_threshold(cond),
                                                 "compile": lambda: compiled_thr(cond),
                                                 "dalle_fast": lambda: dalle_fast.dynamic_threshold(cond)}),
        }
        for op, (nbytes, providers) in cases.items():
            base = None
            for name, fn in providers.items():
                with torch.no_grad():
                    t = measure(fn, warmup=3, reps=reps, min_time=0.5)
                base = base or t["median_ms"]
                gbps = nbytes / (t["median_ms"] * 1e-3) / 1e9
                rec.add(op=op, provider=name, mode="fwd", shape=str(tuple(shape)),
                        dtype=str(dtype).replace("torch.", ""), device="cpu", bytes=nbytes, gbps=gbps,
                        ratio=base / t["median_ms"],
                        extra=f"floor x{peak / gbps:.2f} (copy ceiling {peak:.1f} GB/s)", **t)
    return ok


class SmallUNetLike(torch.nn.Module):
    """A few conv / GroupNorm / SiLU blocks with a FiLM of the condition: the shape of a U-Net's work,
    small enough for this CPU."""

    def __init__(self, ch=64, cond_dim=32, blocks=4):
        super().__init__()
        self.inp = torch.nn.Conv2d(3, ch, 3, padding=1)
        self.blocks = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.GroupNorm(8, ch), torch.nn.SiLU(),
                                                              torch.nn.Conv2d(ch, ch, 3, padding=1))
                                          for _ in range(blocks))
        self.film = torch.nn.Linear(cond_dim, 2 * ch * blocks)
        self.null = torch.nn.Parameter(torch.zeros(cond_dim))  # the learned null condition
        self.out = torch.nn.Conv2d(ch, 3, 3, padding=1)

    def forward(self, x, cond, drop_mask):
        c = torch.where(drop_mask[:, None], self.null.expand_as(cond), cond)
        film = self.film(c).view(x.shape[0], -1, 2, self.inp.out_channels, 1, 1)
        h = self.inp(x)
        for i, blk in enumerate(self.blocks):
            h = h + blk(h) * (1 + film[:, i, 0]) + film[:, i, 1]
        return self.out(h)


def bench_pair(shape, reps, rec):
    """The guided pair: one forward of batch 2B (cond and null condition selected by a mask) against two
    forwards of batch B."""
    torch.manual_seed(0)
    net = SmallUNetLike().eval()
    b = shape[0]
    x = torch.randn(shape)
    cond = torch.randn(b, 32)
    keep, drop = torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)
    with torch.no_grad():
        two = lambda: (net(x, cond, keep), net(x, cond, drop))  # noqa: E731
        one = lambda: net(torch.cat([x, x]), torch.cat([cond, cond]), torch.cat([keep, drop])).chunk(2)  # noqa: E731
        c2, u2 = two()
        c1, u1 = one()
        torch.testing.assert_close(c1, c2, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(u1, u2, rtol=1e-4, atol=1e-4)
        base = None
        for name, fn in (("two forwards of B", two), ("one forward of 2B", one)):
            t = measure(fn, warmup=2, reps=reps, min_time=1.0)
            base = base or t["median_ms"]
            rec.add(op="guided_pair_unet", provider=name, mode="fwd", shape=str(tuple(shape)), dtype="float32",
                    device="cpu", ratio=base / t["median_ms"], extra="SmallUNetLike ch=64 blocks=4", **t)


def cpu_time_ratios(shapes, reps=15):
    """One thread, time.thread_time (CPU time of this thread): on a machine shared with other jobs,
    wall time of anything longer than a scheduler slice is inflated by their slices; CPU time is not."""
    import time

    def cpu_ms(fn):
        fn()
        ts = []
        for _ in range(reps):
            t0 = time.thread_time()
            fn()
            ts.append(time.thread_time() - t0)
        return sorted(ts)[len(ts) // 2] * 1e3

    for shape in shapes:
        cond, uncond, x_t = sample_inputs(shape)
        with torch.no_grad():
            e, f = cpu_ms(lambda: eager_step(cond, uncond, x_t)), cpu_ms(lambda: fused_step(cond, uncond, x_t))
            et, ft = cpu_ms(lambda: eager_threshold(cond)), cpu_ms(lambda: dalle_fast.dynamic_threshold(cond))
        print(f"{tuple(shape)} CPU time: guided_step eager {e:.2f} ms, dalle_fast {f:.2f} ms ({e / f:.1f}x); "
              f"dynamic_threshold eager {et:.2f} ms, dalle_fast {ft:.2f} ms ({et / ft:.1f}x)")
        # the CPU kernel's two percentile selections forced in turn (DALLE_FAST_THRESHOLD_SELECT)
        times = {}
        for method in ("histogram", "extreme"):
            os.environ["DALLE_FAST_THRESHOLD_SELECT"] = method
            try:
                with torch.no_grad():
                    times[method] = (cpu_ms(lambda: fused_step(cond, uncond, x_t)),
                                     cpu_ms(lambda: dalle_fast.dynamic_threshold(cond)))
            finally:
                del os.environ["DALLE_FAST_THRESHOLD_SELECT"]
        (hs, ht), (xs, xt) = times["histogram"], times["extreme"]
        print(f"{tuple(shape)}   selection forced: guided_step histogram {hs:.2f} ms, extreme-k {xs:.2f} ms; "
              f"dynamic_threshold histogram {ht:.2f} ms, extreme-k {xt:.2f} ms")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--pair", action="store_true", help="also time the guided pair batched (a small conv net)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--cpu-time", action="store_true", help="1 thread, CPU time of eager and dalle_fast only")
    args = ap.parse_args(argv)
    torch.set_num_threads(1 if args.cpu_time else args.threads)
    shapes = [(4, 3, 64, 64)] if args.quick else [(16, 3, 64, 64), (4, 3, 256, 256)]
    if args.cpu_time:
        cpu_time_ratios(shapes)
        return 0
    reps = 3 if args.quick else 10
    peak = copy_peak_gbps()
    print(f"machine copy ceiling: {peak:.1f} GB/s; threads: {torch.get_num_threads()}; "
          f"cpu capability: {torch.backends.cpu.get_cpu_capability()} (shared machine: timings are noisy)")
    rec = Recorder("diffusion_step")
    ok = bench_ops(shapes, torch.float32, reps, rec, peak)
    if args.pair:
        bench_pair((4, 3, 64, 64) if args.quick else (8, 3, 64, 64), reps, rec)
    rec.print_table()
    if not args.quick:
        print("wrote", rec.write())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
