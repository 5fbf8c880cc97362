"""Benchmark of block-sparse attention on the CPU at DALL-E's shape against dense and Flex attention.

    .venv/bin/python benchmarks/bench_sparse_attention.py            # T=256, 32x32, D=64, 8 heads, batch 1; fp32, bf16
    .venv/bin/python benchmarks/bench_sparse_attention.py --quick    # fp32, few reps, Flex for row only, no CSV

Providers (fwd, bwd = the gradients of an existing forward, fwd+bwd):
  dense      scaled_dot_product_attention with the dense bool mask (torch eager: the baseline, ratio 1);
  reference  dalle_fast.reference.sparse_attention (masked softmax math, materializes N x N);
  compile    the reference under torch.compile (full run only);
  flex       torch.compile'd FlexAttention with the equivalent BlockMask (forward only: it has no CPU backward);
  dalle_fast dalle_fast.sparse_attention.
Decode at positions T, T + 512 and N - 1: dalle_fast.sparse_attention_decode against a full-attention cached
step (SDPA of the query over all cached keys 0..position) and the dense backend's step (SDPA with the mask row).
Reported: mask density, ideal speedup 1/density (decode: keys of a full step / allowed keys), achieved speedup
over the baseline and its share of the ideal, GFLOP/s counting allowed pairs only (fwd 4*pairs*D, bwd 10*pairs*D
incl. the recomputed scores) against the measured matmul peak of the dtype.
Goals (issue 3, CPU): row and column fwd+bwd >= 60% of the ideal speedup over dense and faster than Flex;
decode at 1279 >= 70% of the ideal ratio over a full-attention cached step.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dalle_fast  # noqa: E402
from benchmarks.common import Recorder, matmul_peak_gflops, measure, wants_csv  # noqa: E402
from dalle_fast.nn.attention import dense_sparse_attention, flex_sparse_attention  # noqa: E402
from dalle_fast.reference import sparse_attention as ref  # noqa: E402

KINDS = dalle_fast.ops.sparse_attention.KINDS  # the one definition


def check_correctness(kind, T, S, D, dtype):
    """dalle_fast (fwd and grads) against the float64 reference, bar 2x PyTorch's own error in dtype."""
    from dalle_fast.testing import low_precision_tolerance, max_abs_err
    N = T + S * S
    g = torch.Generator().manual_seed(0)
    x = [torch.randn(1, 2, N, D, generator=g).to(dtype).requires_grad_() for _ in range(3)]
    x64 = [t.detach().double().requires_grad_() for t in x]
    xp = [t.detach().clone().requires_grad_() for t in x]
    out, e64, pt = dalle_fast.sparse_attention(*x, kind, T, S), ref.sparse_attention(*x64, kind, T, S), \
        ref.sparse_attention(*xp, kind, T, S)
    go = torch.randn(out.shape, generator=g).to(dtype)
    worst = max_abs_err(out, e64) / low_precision_tolerance(e64, pt)
    for a, e, p in zip(torch.autograd.grad(out, x, go), torch.autograd.grad(e64, x64, go.double()),
                       torch.autograd.grad(pt, xp, go)):
        worst = max(worst, max_abs_err(a, e) / low_precision_tolerance(e, p))
    print(f"correctness {kind} {dtype}: worst error / bar = {worst:.2f} {'ok' if worst <= 1 else 'FAILED'}")
    return worst <= 1


def modes(fn, inputs, go):
    """The timed callables of fn(*inputs): fwd (no autograd), bwd (autograd.grad of one retained forward,
    made on first use), fwd+bwd."""
    kept = []

    def fwd():
        with torch.no_grad():
            return fn(*inputs)

    def bwd():
        if not kept:
            kept.append(fn(*inputs))
        return torch.autograd.grad(kept[0], inputs, go, retain_graph=True)

    return {"fwd": fwd, "bwd": bwd, "fwd+bwd": lambda: torch.autograd.grad(fn(*inputs), inputs, go)}


def time_modes(fn, inputs, go, reps, warmup, wanted):
    """{mode: measure dict} for fn(*inputs), for the modes in wanted."""
    return {m: measure(f, warmup=warmup, reps=reps) for m, f in modes(fn, inputs, go).items() if m in wanted}


def bench_training(rec, kind, T, S, H, D, dtype, reps, warmup, providers, summary):
    N = T + S * S
    mask = dalle_fast.attention_mask(kind, T, S)
    pairs = int(mask.sum())
    density = pairs / N ** 2
    flops = {"fwd": 4 * pairs * D * H, "bwd": 10 * pairs * D * H, "fwd+bwd": 14 * pairs * D * H}
    peak = summary["peak"][dtype]
    x = [torch.randn(1, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3)]
    go = torch.randn(1, H, N, D, dtype=dtype)
    fns = {
        "dense": lambda q, k, v: dense_sparse_attention(q, k, v, kind, T, S),
        "reference": lambda q, k, v: ref.sparse_attention(q, k, v, kind, T, S),
        "compile": torch.compile(lambda q, k, v: ref.sparse_attention(q, k, v, kind, T, S), dynamic=False),
        "flex": lambda q, k, v: flex_sparse_attention(q, k, v, kind, T, S),
        "dalle_fast": lambda q, k, v: dalle_fast.sparse_attention(q, k, v, kind, T, S),
    }
    times = {}
    for prov in providers:
        try:
            if prov == "flex":  # FlexAttention refuses inputs that require grad on the CPU, even under no_grad
                times[prov] = time_modes(fns[prov], [t.detach() for t in x], go, reps, warmup, ("fwd",))
            else:
                times[prov] = time_modes(fns[prov], x, go, reps, warmup, ("fwd", "bwd", "fwd+bwd"))
            if prov == "flex":
                why = "FlexAttention has no backward on the CPU (NotImplementedError in torch)"
                for m in ("bwd", "fwd+bwd"):
                    rec.add(op="sparse_attention", provider=prov, mode=m, shape=f"{kind} B1xH{H}xN{N}xD{D}",
                            dtype=str(dtype).replace("torch.", ""), device="cpu", extra=f"unsupported: {why}")
        except Exception as e:  # a baseline that cannot run here is recorded, not fatal
            rec.add(op="sparse_attention", provider=prov, mode="fwd", shape=f"{kind} B1xH{H}xN{N}xD{D}",
                    dtype=str(dtype).replace("torch.", ""), device="cpu", extra=f"failed: {type(e).__name__}: {e}"[:200])
            print(f"  {prov} failed: {type(e).__name__}: {str(e)[:200]}")
    for prov, res in times.items():
        for mode, t in res.items():
            base = times["dense"][mode]["median_ms"] if "dense" in times else float("nan")
            ratio = base / t["median_ms"]
            gf = flops[mode] / (t["median_ms"] * 1e-3) / 1e9
            extra = (f"density={density:.4f};ideal={1 / density:.2f};pct_of_ideal={100 * ratio * density:.0f}%;"
                     f"peak_gflops={peak:.0f};pct_of_peak={100 * gf / peak:.0f}%")
            rec.add(op="sparse_attention", provider=prov, mode=mode, shape=f"{kind} B1xH{H}xN{N}xD{D}",
                    dtype=str(dtype).replace("torch.", ""), device="cpu", gflops=gf, ratio=ratio, extra=extra, **t)
            if prov == "dalle_fast":
                summary["train"].append((kind, dtype, mode, ratio, 1 / density, ratio * density,
                                         times.get("flex", {}).get(mode, {}).get("median_ms"), t["median_ms"]))


def bench_decode(rec, kind, T, S, H, D, dtype, reps, warmup, summary):
    N = T + S * S
    from dalle_fast.nn.attention import _dense_mask
    mask = _dense_mask(kind, T, S, 11, "cpu")
    kc, vc = (torch.randn(1, H, N, D, dtype=dtype) for _ in range(2))
    for pos in (T, T + (S * S) // 2, N - 1):
        q = torch.randn(1, H, 1, D, dtype=dtype)
        allowed = int(mask[pos].sum())
        row = mask[pos, :pos + 1].view(1, -1)
        fns = {
            "full_cache_step": lambda: F.scaled_dot_product_attention(q, kc[:, :, :pos + 1], vc[:, :, :pos + 1]),
            "dense_masked_step": lambda: F.scaled_dot_product_attention(q, kc[:, :, :pos + 1], vc[:, :, :pos + 1],
                                                                        attn_mask=row),
            "dalle_fast": lambda: dalle_fast.sparse_attention_decode(q, kc, vc, pos, kind, T, S),
        }
        ref_out = ref.sparse_attention_decode(q.double(), kc.double(), vc.double(), pos, kind, T, S)
        err = (fns["dalle_fast"]().double() - ref_out).abs().max().item()
        times = {p: measure(f, warmup=warmup, reps=reps * 20) for p, f in fns.items()}
        ideal = (pos + 1) / allowed
        for prov, t in times.items():
            ratio = times["full_cache_step"]["median_ms"] / t["median_ms"]
            rec.add(op="sparse_attention_decode", provider=prov, mode="decode", shape=f"{kind} pos={pos} H{H} D{D}",
                    dtype=str(dtype).replace("torch.", ""), device="cpu", ratio=ratio,
                    bytes=2 * (allowed if prov == "dalle_fast" else pos + 1) * H * D * dtype.itemsize,
                    extra=f"keys={allowed if prov == 'dalle_fast' else pos + 1};ideal={ideal:.2f};"
                          f"pct_of_ideal={100 * ratio / ideal:.0f}%;max_err={err:.1e}", **t)
        summary["decode"].append((kind, dtype, pos, times["full_cache_step"]["median_ms"] / times["dalle_fast"]["median_ms"],
                                  ideal))


def bench_seq(rec, kinds, dtype, image_sides, T, H, D, reps, warmup):
    """fwd+bwd speedup over dense masked SDPA as the image grows (the plot of speedup against length)."""
    for S in image_sides:
        N = T + S * S
        x = [torch.randn(1, H, N, D, dtype=dtype, requires_grad=True) for _ in range(3)]
        go = torch.randn(1, H, N, D, dtype=dtype)
        for kind in kinds:
            fns = {"dense": lambda q, k, v: dense_sparse_attention(q, k, v, kind, T, S),
                   "dalle_fast": lambda q, k, v: dalle_fast.sparse_attention(q, k, v, kind, T, S)}
            t = {p: time_modes(f, x, go, reps, warmup, ("fwd+bwd",))["fwd+bwd"] for p, f in fns.items()}
            density = int(dalle_fast.attention_mask(kind, T, S).sum()) / N ** 2
            for prov, tm in t.items():
                rec.add(op="sparse_attention_seq", provider=prov, mode="fwd+bwd", shape=f"{kind} B1xH{H}xN{N}xD{D}",
                        dtype=str(dtype).replace("torch.", ""), device="cpu",
                        ratio=t["dense"]["median_ms"] / tm["median_ms"],
                        extra=f"density={density:.4f};ideal={1 / density:.2f};text={T};image={S}x{S}", **tm)
            print(f"  seq N={N} {kind}: x{t['dense']['median_ms'] / t['dalle_fast']['median_ms']:.2f} "
                  f"(ideal x{1 / density:.2f})", flush=True)


def case(provider, mode, quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py): row attention at T=64 + 16x16
    (quick) or the paper's shape, provider dense or dalle_fast, mode fwd / bwd / fwd+bwd."""
    T, S, H, D = (64, 16, 4, 64) if quick else (256, 32, 8, 64)
    x = [torch.randn(1, H, T + S * S, D, requires_grad=True) for _ in range(3)]
    go = torch.randn(1, H, T + S * S, D)
    fn = {"dense": lambda q, k, v: dense_sparse_attention(q, k, v, "row", T, S),
          "dalle_fast": lambda q, k, v: dalle_fast.sparse_attention(q, k, v, "row", T, S)}[provider]
    return modes(fn, x, go)[mode]


CASES = [(p, m) for m in ("fwd", "fwd+bwd") for p in ("dense", "dalle_fast")]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="fp32, few reps, Flex for row only, no CSV")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--dtypes", default=None, help="comma list, default float32,bfloat16 (quick: float32)")
    ap.add_argument("--threads", type=int, default=2, help="1 gives steadier numbers on a shared machine")
    ap.add_argument("--no-seq", action="store_true", help="skip the sweep over sequence lengths")
    ap.add_argument("--seq-only", action="store_true", help="only the sweep over sequence lengths")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    T, S, H, D = 256, 32, 8, 64
    kinds = args.kinds.split(",")
    dtypes = [getattr(torch, d) for d in (args.dtypes or ("float32" if args.quick else "float32,bfloat16")).split(",")]
    reps, warmup = (3, 1) if args.quick else (10, 2)
    print(f"threads {torch.get_num_threads()}, cpu capability {torch.backends.cpu.get_cpu_capability()}, "
          f"shape T={T} {S}x{S} heads={H} D={D} batch 1")
    ok = all(check_correctness(kind, 16, 8, D, dt) for kind in kinds for dt in dtypes)
    if args.seq_only:
        rec = Recorder("sparse_attention")
        bench_seq(rec, [k for k in ("row", "column") if k in kinds], torch.float32,
                  (8, 16) if args.quick else (8, 16, 24, 32), 64 if args.quick else 256, H, D, reps, warmup)
        rec.print_table()
        if wants_csv(args.quick):
            print("CSV:", rec.write())
        return 0 if ok else 1
    summary = {"peak": {dt: matmul_peak_gflops("cpu", dt) for dt in dtypes}, "train": [], "decode": []}
    print("matmul peak GFLOP/s: " + ", ".join(f"{d}: {p:.0f}" for d, p in summary["peak"].items()))
    rec = Recorder("sparse_attention")
    for dt in dtypes:
        for kind in kinds:
            providers = ["dense", "reference", "dalle_fast"]
            if not args.quick:
                providers += ["compile"]
            if not args.quick or kind == "row":
                providers += ["flex"]
            print(f"-- {kind} {dt}", flush=True)
            bench_training(rec, kind, T, S, H, D, dt, reps, warmup, providers, summary)
            bench_decode(rec, kind, T, S, H, D, dt, reps, warmup, summary)
    if not args.no_seq:
        print("-- speedup against sequence length (row, column; fp32)", flush=True)
        bench_seq(rec, [k for k in ("row", "column") if k in kinds], torch.float32,
                  (8, 16) if args.quick else (8, 16, 24, 32), 64 if args.quick else 256, H, D, reps, warmup)
    rec.print_table()
    print("\nsummary (dalle_fast vs dense SDPA; goal row/column fwd+bwd >= 60% of ideal, faster than flex fwd):")
    for kind, dt, mode, ratio, ideal, share, flex_ms, ms in summary["train"]:
        vs_flex = f", flex fwd {flex_ms:.2f} ms -> x{flex_ms / ms:.2f}" if flex_ms else ""
        print(f"  {kind:7s} {str(dt):15s} {mode:8s} x{ratio:.2f} of ideal x{ideal:.2f} = {100 * share:.0f}%{vs_flex}")
    print("decode (vs a full-attention cached step; goal at the last position >= 70% of ideal):")
    for kind, dt, pos, ratio, ideal in summary["decode"]:
        print(f"  {kind:7s} {str(dt):15s} pos {pos:5d} x{ratio:.2f} of ideal x{ideal:.2f} = {100 * ratio / ideal:.0f}%")
    if wants_csv(args.quick):
        print("CSV:", rec.write())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
