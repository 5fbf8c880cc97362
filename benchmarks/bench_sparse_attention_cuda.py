#!/usr/bin/env python
"""Sparse attention on the GPU: dalle_fast's CUDA kernels against dense masked SDPA (the baseline),
the dense reference math, and FlexAttention (torch.compile'd, with the equivalent block mask).

Paper shape: T = 256 text tokens + a 32x32 image (N = 1280), D = 64, heads 8, batch 8, fp16 and
bf16; modes fwd, bwd, fwd+bwd, and decode (one new query per sequence at a position, against a
full-attention KV-cache step and a masked dense step). FLOP/s count allowed pairs only
(4 D per pair forward, 10 D backward: the useful work), reported against the measured GEMM peak.

    .venv/bin/python benchmarks/bench_sparse_attention_cuda.py [--quick] [--kinds row,column] [--dtypes fp16]

Exits with a message (status 0) where there is no CUDA device or dalle_fast was built without CUDA.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import Recorder, matmul_peak_gflops, measure  # noqa: E402
from dalle_fast.ops.sparse_attention import KINDS  # noqa: E402  (the one definition)
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def dense_mask(kind, T, S, k=11, device="cuda"):
    N = T + S * S
    i, j = torch.arange(N, device=device)[:, None], torch.arange(N, device=device)[None, :]
    p, q, h = i - T, j - T, (k - 1) // 2
    image = {"full": torch.ones(N, N, dtype=torch.bool, device=device), "row": q >= p - S,
             "column": q % S == p % S, "conv": (q // S >= p // S - h) & ((q % S - p % S).abs() <= h)}[kind]
    return (j <= i) & ((i < T) | (j < T) | image)


def flex_mask_mod(kind, T, S, k=11):
    h = (k - 1) // 2

    def mask_mod(b, hd, qi, kj):
        p, q = qi - T, kj - T
        image = {"full": q >= -T, "row": q >= p - S, "column": q % S == p % S,
                 "conv": (q // S >= p // S - h) & ((q % S - p % S).abs() <= h)}[kind]
        return (kj <= qi) & ((qi < T) | (kj < T) | image)
    return mask_mod


def reference(q, k, v, mask, scale):
    s = (q @ k.transpose(-1, -2)) * scale
    return torch.softmax(s.masked_fill(~mask, -float("inf")), -1) @ v


def providers(kind, T, S, scale, device):
    import dalle_fast
    mask = dense_mask(kind, T, S, device=device)
    out = {
        "dense_sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale),
        "reference": lambda q, k, v: reference(q, k, v, mask, scale),
        "dalle_fast": lambda q, k, v: dalle_fast.sparse_attention(q, k, v, kind, T, S, scale=scale),
    }
    try:
        if device != "cuda":
            raise NotImplementedError("the CPU dry run leaves FlexAttention out (no backward on the CPU)")
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        N = T + S * S
        block_mask = create_block_mask(flex_mask_mod(kind, T, S), None, None, N, N, device=device)
        flex = torch.compile(flex_attention)
        out["flex_compiled"] = lambda q, k, v: flex(q, k, v, block_mask=block_mask, scale=scale)
    except Exception as e:  # FlexAttention missing or not supported here: say so, keep the others
        print(f"FlexAttention unavailable: {e!r}")
    return out, mask


def check_correctness(fns, kind, T, S, dtype, device):
    """Every provider against the float64 dense math before anything is timed."""
    N, D = T + S * S, 64
    g = torch.Generator(device="cpu").manual_seed(0)
    q, k, v, go = (torch.randn(1, 2, N, D, generator=g).to(device, dtype) for _ in range(4))
    e = reference(q.double(), k.double(), v.double(), dense_mask(kind, T, S, device=device), D ** -0.5)
    for name, fn in fns.items():
        x = [t.clone().requires_grad_() for t in (q, k, v)]
        out = fn(*x)
        err = (out.double() - e).abs().max().item()
        torch.autograd.grad(out, x, go)
        if err > 5e-2:
            raise SystemExit(f"{name} {kind} {dtype}: max error {err:.3e} against the float64 reference")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="batch 2, fewer repetitions")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--device", default="cuda", help="cpu: a dry run of this script's logic (not a CUDA benchmark)")
    args = ap.parse_args(argv)
    import dalle_fast
    device = args.device
    if device == "cuda" and ("cuda" not in dalle_fast.backends() or not torch.cuda.is_available()):
        print("bench_sparse_attention_cuda: needs a CUDA device and dalle_fast built with CUDA "
              f"(backends: {dalle_fast.backends()}, torch.cuda.is_available(): {torch.cuda.is_available()}); skipped")
        return 0
    torch.set_num_threads(2)
    on_gpu = device == "cuda"
    device_name = torch.cuda.get_device_name() if on_gpu else "cpu"
    T, S, D, H = 256, 32, 64, args.heads
    B = args.batch or (2 if args.quick else 8)
    N, scale = T + S * S, D ** -0.5
    reps, warmup = (5, 2) if args.quick else (20, 5)
    rec = Recorder("sparse_attention_cuda")
    shape = f"B{B}xH{H}xN{N}xD{D}"
    for dname in args.dtypes.split(","):
        dtype = DTYPES[dname]
        peak = matmul_peak_gflops(device, dtype, n=4096 if on_gpu else 512)
        print(f"{dname}: measured GEMM peak {peak:.0f} GFLOP/s")
        for kind in args.kinds.split(","):
            fns, mask = providers(kind, T, S, scale, device)
            check_correctness(fns, kind, T, S, dtype, device)
            pairs = int(mask.sum())
            density = pairs / N ** 2
            q, k, v, go = (torch.randn(B, H, N, D, device=device, dtype=dtype) for _ in range(4))
            flops = {"fwd": 4 * B * H * D * pairs, "bwd": 10 * B * H * D * pairs, "fwd+bwd": 14 * B * H * D * pairs}
            for mode in ("fwd", "bwd", "fwd+bwd"):
                base = None
                for name, fn in fns.items():
                    x = [t.clone().requires_grad_(mode != "fwd") for t in (q, k, v)]
                    if mode == "fwd":
                        run = lambda: fn(*x)  # noqa: E731
                    elif mode == "bwd":
                        out = fn(*x)
                        run = lambda: torch.autograd.grad(out, x, go, retain_graph=True)  # noqa: E731
                    else:
                        run = lambda: torch.autograd.grad(fn(*x), x, go)  # noqa: E731
                    if on_gpu:
                        torch.cuda.reset_peak_memory_stats()
                    mem0 = torch.cuda.memory_allocated() if on_gpu else 0
                    t = measure(run, device, warmup=warmup, reps=reps)
                    mem = (torch.cuda.max_memory_allocated() - mem0) / 2 ** 20 if on_gpu else 0.0
                    base = base or t["median_ms"]
                    gflops = flops[mode] / (t["median_ms"] * 1e-3) / 1e9
                    rec.add(op=f"sparse_attention_{kind}", provider=name, mode=mode, shape=shape, dtype=dname,
                            device=device_name, ratio=base / t["median_ms"], gflops=gflops,
                            extra=f"density={density:.3f} ideal={1 / density:.2f}x peak%={100 * gflops / peak:.1f} "
                                  f"mem={mem:.0f}MiB", **t)
                    del run
            # Decode: one new query per sequence against caches holding the whole sequence.
            for pos in (T, N - 1):
                qd = q[:, :, pos:pos + 1]
                allowed = int(mask[pos].sum())
                dec = {
                    "full_kv_cache": lambda: F.scaled_dot_product_attention(qd, k[:, :, :pos + 1], v[:, :, :pos + 1],
                                                                            scale=scale),
                    "dense_masked": lambda: F.scaled_dot_product_attention(
                        qd, k, v, attn_mask=mask[pos:pos + 1], scale=scale),
                    "dalle_fast": lambda: dalle_fast.sparse_attention_decode(qd, k, v, pos, kind, T, S, scale=scale),
                }
                want = reference(qd.double(), k.double(), v.double(), mask[pos:pos + 1], scale)
                err = (dec["dalle_fast"]().double() - want).abs().max().item()
                if err > 2e-2:
                    raise SystemExit(f"decode {kind} position {pos}: max error {err:.3e}")
                base = None
                for name, fn in dec.items():
                    t = measure(fn, device, warmup=warmup, reps=reps * 5)
                    base = base or t["median_ms"]
                    nbytes = 2 * B * H * allowed * D * q.element_size()  # the K and V rows the sparse step needs
                    rec.add(op=f"sparse_attention_{kind}", provider=name, mode=f"decode@{pos}", shape=shape, dtype=dname,
                            device=device_name, ratio=base / t["median_ms"], bytes=nbytes,
                            gbps=nbytes / (t["median_ms"] * 1e-3) / 1e9,
                            extra=f"keys={allowed}/{pos + 1} ideal={(pos + 1) / allowed:.2f}x", **t)
    rec.print_table()
    if on_gpu:  # a CPU dry run is no CUDA measurement: it stays out of the results
        print("wrote", rec.write())
    return 0


if __name__ == "__main__":
    sys.exit(main())
