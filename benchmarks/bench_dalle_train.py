"""Training-step throughput (tokens/s) of the transformer with the paper's layer schedule (row,
column, row, row, ..., conv) through the fused block-sparse kernels, against the same model with dense
masked attention (scaled_dot_product_attention with the boolean mask) and FlexAttention.

    .venv/bin/python benchmarks/bench_dalle_train.py           # the paper's sequence, CSV in results/dalle_train.csv
    .venv/bin/python benchmarks/bench_dalle_train.py --quick   # a shorter sequence, fewer reps, no CSV

Providers: dense (the baseline), flex (backend="flex", where it runs on the CPU), compile (the dense model
under torch.compile, with --compile: slow to compile on 2 cores), dalle_fast (backend="fused").
Modes: fwd (loss), bwd (backward of a kept graph), fwd+bwd (a whole step without the optimizer).
GFLOP/s counts the model's GEMMs (6 x matmul parameters x tokens for fwd+bwd) against the measured peak.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Recorder, matmul_peak_gflops, measure, train_modes, wants_csv  # noqa: E402
from dalle_fast.models.dalle import DALLE, DALLEConfig  # noqa: E402

FULL = dict(dim=256, depth=4, heads=4, dim_head=64, text_len=256, image_size=32, batch=2)
QUICK = dict(dim=128, depth=4, heads=2, dim_head=64, text_len=64, image_size=16, batch=2)


def build(kw, backend):
    torch.manual_seed(0)
    cfg = DALLEConfig(num_text_tokens=1000, num_image_tokens=8192, conv_kernel=11, backend=backend,
                      **{k: v for k, v in kw.items() if k != "batch"})
    return DALLE(cfg)


def step_modes(m, text, image):
    """fwd / bwd / fwd+bwd callables of one training step of model m (benchmarks/common.train_modes)."""
    return train_modes(lambda: m(text, image, return_loss=True)[0], m.parameters())


def case(provider, mode, quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py): provider dense, flex or dalle_fast."""
    kw = QUICK if quick else FULL
    m = build(kw, "fused" if provider == "dalle_fast" else provider)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 1000, (kw["batch"], m.config.text_len), generator=g)
    image = torch.randint(0, 8192, (kw["batch"], m.config.image_len), generator=g)
    return step_modes(m, text, image)[mode]


CASES = [(p, "fwd+bwd") for p in ("dense", "dalle_fast")]


def run(kw, reps, write_csv, with_compile):
    torch.set_num_threads(2)
    peak = matmul_peak_gflops()
    print(f"matmul ceiling {peak:.1f} GFLOP/s; schedule {DALLEConfig(depth=kw['depth']).kinds()}")
    B = kw["batch"]
    ref = build(kw, "dense")
    cfg = ref.config
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 1000, (B, cfg.text_len), generator=g)
    image = torch.randint(0, 8192, (B, cfg.image_len), generator=g)
    providers = {"dense": ref}
    for backend in ("flex", "fused"):
        try:
            m = build(kw, backend)
            m.load_state_dict(ref.state_dict())
            m(text, image, return_loss=True)
            providers["dalle_fast" if backend == "fused" else backend] = m
        except Exception as e:  # a backend that does not run here is reported, not fatal
            print(f"backend {backend} unavailable: {e!r}"[:300])
    if with_compile:
        providers["compile"] = torch.compile(ref)
    # correctness: loss and gradients of every provider against dense on the benchmark's inputs
    want = ref(text, image, return_loss=True)[0]
    gw = torch.autograd.grad(want, list(ref.parameters()))
    for name, m in providers.items():
        got = m(text, image, return_loss=True)[0]
        gg = torch.autograd.grad(got, [p for p in m.parameters()])
        gerr = max((a - b).abs().max().item() / (b.abs().max().item() + 1e-12) for a, b in zip(gg, gw))
        print(f"  {name}: |loss - dense| {abs(got.item() - want.item()):.2e}, grad max rel err {gerr:.2e}")
    rec = Recorder("dalle_train")
    n_mm = sum(p.numel() for n, p in ref.named_parameters() if p.dim() == 2 and "emb" not in n)
    tokens = B * cfg.seq_len
    base = {}
    for name, m in providers.items():
        fns = step_modes(m, text, image)
        for mode, mult in (("fwd", 2), ("bwd", 4), ("fwd+bwd", 6)):
            f = fns[mode]
            t = measure(f, warmup=1, reps=reps)
            if name == "dense":
                base[mode] = t["median_ms"]
            tok_s = tokens / (t["median_ms"] * 1e-3)
            rec.add(op="dalle_train_step", provider=name, mode=mode,
                    shape=f"B={B} N={cfg.seq_len} dim={cfg.dim} depth={cfg.depth}", dtype="float32", device="cpu",
                    **t, gflops=mult * n_mm * tok_s / 1e9, ratio=base[mode] / t["median_ms"],
                    extra=f"{tok_s:.0f} tok/s; peak {peak:.0f} GFLOP/s")
    rec.finish(write_csv)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--compile", action="store_true", help="also time the dense model under torch.compile")
    a = p.parse_args()
    t0 = time.time()
    run(QUICK if a.quick else FULL, reps=2 if a.quick else 5, write_csv=wants_csv(a.quick), with_compile=a.compile)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
