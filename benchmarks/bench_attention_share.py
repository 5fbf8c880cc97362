"""How much of a transformer training step is attention, at several widths: the most that sparse
attention can save end to end (CPU, fp32, batch 1, the paper's sequence: 256 text + 32x32 image tokens).

    .venv/bin/python benchmarks/bench_attention_share.py           # dims 128..1024, CSV in results/attention_share.csv
    .venv/bin/python benchmarks/bench_attention_share.py --quick   # dims 64, 128 at 64 + 16x16 tokens

For each width (heads = dim / 64, depth 2 with the schedule row, conv; 8192 image codes):
  step_dense   fwd+bwd of the whole model with dense masked attention (SDPA with the boolean mask)
  step_fused   the same weights with dalle_fast's block-sparse kernels
  attn_dense   fwd+bwd of the model's attention calls alone (same shapes, same masks) with dense SDPA
  attn_fused   the same with dalle_fast.sparse_attention
share = attn_dense / step_dense (the part of the step that attention is); the bound on the end-to-end
speedup from any attention kernel is 1 / (1 - share), and what the fused kernels can save is
share * (1 - attn_fused / attn_dense). The attention's cost grows with N^2 * dim (heads x 64), the
MLPs' and projections' with N * dim^2, the image head's with N * dim * 8192: at a fixed sequence the
share is largest where dim is small against N, and the 8192-way head keeps it down at every width.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import dalle_fast  # noqa: E402
from benchmarks.bench_dalle_train import step_modes  # noqa: E402
from benchmarks.common import Recorder, bench_parser, measure, wants_csv  # noqa: E402
from dalle_fast.models.dalle import DALLE, DALLEConfig  # noqa: E402
from dalle_fast.nn.attention import dense_sparse_attention  # noqa: E402

FULL = dict(dims=(128, 256, 512, 1024), text_len=256, image_size=32, depth=2)
QUICK = dict(dims=(64, 128), text_len=64, image_size=16, depth=2)


def model(dim, kw, backend):
    torch.manual_seed(0)
    return DALLE(DALLEConfig(num_text_tokens=1000, num_image_tokens=8192, text_len=kw["text_len"],
                             image_size=kw["image_size"], dim=dim, depth=kw["depth"], heads=max(1, dim // 64),
                             dim_head=64, backend=backend))


def step_fn(m, text, image):
    return step_modes(m, text, image)["fwd+bwd"]


def attention_fn(kinds, heads, kw, fused):
    """fwd+bwd of one attention call per layer at the model's shapes."""
    T, S = kw["text_len"], kw["image_size"]
    N = T + S * S
    g = torch.Generator().manual_seed(0)
    qkv = [torch.randn(1, heads, N, 64, generator=g).requires_grad_() for _ in range(3)]
    go = torch.randn(1, heads, N, 64, generator=g)
    attn = dalle_fast.sparse_attention if fused else dense_sparse_attention

    def run():
        for kind in kinds:
            torch.autograd.grad(attn(*qkv, kind, T, S), qkv, go)
    return run


def case(provider, mode="fwd+bwd", quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py): provider is one of
    step_dense, step_fused, attn_dense, attn_fused at the smallest width."""
    kw = QUICK if quick else FULL
    dim = kw["dims"][0]
    if provider.startswith("step"):
        m = model(dim, kw, "dense" if provider == "step_dense" else "fused")
        text = torch.randint(1, 1000, (1, kw["text_len"]))
        image = torch.randint(0, 8192, (1, kw["image_size"] ** 2))
        return step_fn(m, text, image)
    kinds = model(dim, kw, "fused").config.kinds()
    return attention_fn(kinds, max(1, dim // 64), kw, provider == "attn_fused")


CASES = [(p, "fwd+bwd") for p in ("step_dense", "step_fused", "attn_dense", "attn_fused")]


def run(kw, reps, write_csv, threads):
    torch.set_num_threads(threads)
    rec = Recorder("attention_share")
    T, S = kw["text_len"], kw["image_size"]
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, 1000, (1, T), generator=g)
    image = torch.randint(0, 8192, (1, S * S), generator=g)
    for dim in kw["dims"]:
        dense, fused = model(dim, kw, "dense"), model(dim, kw, "fused")
        fused.load_state_dict(dense.state_dict())
        kinds, heads = dense.config.kinds(), dense.config.heads
        fns = {"step_dense": step_fn(dense, text, image), "step_fused": step_fn(fused, text, image),
               "attn_dense": attention_fn(kinds, heads, kw, False), "attn_fused": attention_fn(kinds, heads, kw, True)}
        t = {name: measure(f, warmup=1, reps=reps) for name, f in fns.items()}
        ms = {k: v["median_ms"] for k, v in t.items()}
        share = ms["attn_dense"] / ms["step_dense"]
        saving = share * (1 - ms["attn_fused"] / ms["attn_dense"])
        print(f"dim {dim:5d} heads {heads:3d}: step dense {ms['step_dense']:.0f} ms, fused {ms['step_fused']:.0f} ms "
              f"({ms['step_dense'] / ms['step_fused']:.2f}x); attention {100 * share:.0f}% of the step, "
              f"kernels {ms['attn_dense'] / ms['attn_fused']:.2f}x -> at most {1 / (1 - saving):.2f}x end to end",
              flush=True)
        for name, tm in t.items():
            base = ms["step_dense"] if name.startswith("step") else ms["attn_dense"]
            rec.add(op="attention_share", provider=name, mode="fwd+bwd",
                    shape=f"dim={dim} heads={heads} depth={kw['depth']} N={T + S * S} B=1", dtype="float32",
                    device="cpu", ratio=base / tm["median_ms"],
                    extra=f"share={share:.4f};saving_bound={saving:.4f};kinds={'/'.join(kinds)}", **tm)
    rec.finish(write_csv)


def main():
    p = bench_parser(__doc__)
    p.add_argument("--dims", default=None, help="comma list of widths (default 128,256,512,1024; quick 64,128)")
    a = p.parse_args()
    kw = dict(QUICK if a.quick else FULL)
    if a.dims:
        kw["dims"] = tuple(int(d) for d in a.dims.split(","))
    t0 = time.time()
    run(kw, reps=2 if a.quick else 3, write_csv=wants_csv(a.quick), threads=a.threads)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
