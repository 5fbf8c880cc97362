"""Image tokens per second of text-to-image sampling, batch 1 and 16, on the CPU.

    .venv/bin/python benchmarks/bench_generate.py           # both configurations, CSV in results/generate.csv
    .venv/bin/python benchmarks/bench_generate.py --quick   # matched configuration only, fewer reps, no CSV

Configurations: "matched" = dalle-pytorch's comparison point (dim 256, depth 4, heads 4, dim_head 64,
text 32, 16x16 image tokens) and "paper-seq" = the paper's sequence (text 256, 32x32 image tokens) at
depth 2. Providers (same weights for the first three):
  dalle_fast        the sparse KV cache: each step reads only the keys its layer's mask allows
                    (SparseSelfAttention(position=p) -> dalle_fast.sparse_attention_decode)
  full_kv_cache     the same model with a full-attention KV cache (backend="dense": each step attends
                    over every cached position with the dense mask, through the module path)
  full_attention_fused  the same weights, every layer plain causal attention, through the same fused step
                    (isolates what reading only the allowed keys saves)
  no_cache          the whole prefix recomputed every step (what a plain loop does)
  dalle_pytorch     dalle-pytorch 1.6.6 generate_images (cond_scale 1: its use_cache is silently ignored,
                    so every step recomputes the prefix)
  dalle_pytorch_cache  its working cached loop: forward(text, image, cache=cache) one token at a time
  dalle_fast_bf16 / dalle_pytorch_cache_bf16  the same in 16-bit: ours in the paper's mixed precision
                    (DALLE.cast_resblocks_: bf16 branch matrices and KV caches, fp32 embeddings, gains,
                    heads and logits), the peer's whole model in bf16
Timed: the token loop only (the dVAE decode is the same for everybody and left out). Cached providers
run whole generations; uncached ones (cost grows with the prefix) are timed on steps spread evenly
over the image, whose mean is the mean step of a whole generation ("est" in the extra column).
Ratios are against dalle_pytorch_cache (the peer's working cached loop); the goal is >= 5x at batch 1.
"""
import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Recorder, import_peer, matmul_peak_gflops, measure, wants_csv  # noqa: E402
from dalle_fast.generate import sample_logits, sample_tokens  # noqa: E402
from dalle_fast.models.dalle import DALLE, DALLEConfig  # noqa: E402

CONFIGS = {
    "matched": dict(dim=256, depth=4, heads=4, dim_head=64, text_len=32, image_size=16),
    "paper-seq": dict(dim=256, depth=2, heads=4, dim_head=64, text_len=256, image_size=32),
}
VOCAB_TEXT, VOCAB_IMAGE = 1000, 8192


def ours(cfg_kw, backend):
    torch.manual_seed(0)
    cfg = DALLEConfig(num_text_tokens=VOCAB_TEXT, num_image_tokens=VOCAB_IMAGE, conv_kernel=11, backend=backend,
                      **cfg_kw)
    return DALLE(cfg).eval()


def peer(dp, cfg_kw):
    torch.manual_seed(0)
    layers = 3  # the peer's DiscreteVAE only sets the token grid: image_size / 2**layers
    vae = dp.DiscreteVAE(image_size=cfg_kw["image_size"] * 2 ** layers, num_layers=layers, num_tokens=VOCAB_IMAGE,
                         codebook_dim=64, hidden_dim=16)
    m = dp.DALLE(dim=cfg_kw["dim"], vae=vae, num_text_tokens=VOCAB_TEXT, text_seq_len=cfg_kw["text_len"],
                 depth=cfg_kw["depth"], heads=cfg_kw["heads"], dim_head=cfg_kw["dim_head"]).eval()
    m.vae.decode = lambda seq: seq  # time the token loop only
    return m


@torch.no_grad()
def peer_cached_loop(m, text, steps=None):
    """dalle-pytorch's working cache: generate_images' loop with forward(..., cache=cache)."""
    from dalle_pytorch.dalle_pytorch import gumbel_sample, top_k
    out, cache = text, {}
    T = m.text_seq_len
    for _ in range(steps or m.image_seq_len):
        logits = m(out[:, :T], out[:, T:], cache=cache)[:, -1, :]
        sample = gumbel_sample(top_k(logits, thres=0.5), temperature=1.0, dim=-1) - m.num_text_tokens
        out = torch.cat((out, sample[:, None]), dim=-1)
    return out


@torch.no_grad()
def check(model, dense, m_peer, text, text_peer):
    """Cached logits of each provider against its own uncached forward on the first steps."""
    cfg = model.config
    img = torch.randint(0, VOCAB_IMAGE, (text.shape[0], 12))
    full = model(text, img)[1]
    for name, mdl in (("dalle_fast", model), ("full_kv_cache", dense)):
        caches = mdl.new_kv_caches(text.shape[0])
        steps = [mdl.prefill(text, caches)] + [mdl.decode_step(img[:, j], j, caches) for j in range(11)]
        err = (torch.stack(steps, 1) - full).abs().max().item()
        print(f"  {name}: cached vs uncached logits, max err {err:.2e} ({'ok' if err < 1e-3 else 'FAILED'})")
    if m_peer is not None:
        cache = {}
        T, off = m_peer.text_seq_len, m_peer.num_text_tokens
        ref = m_peer(text_peer, img)[:, T:T + 12]
        got = [m_peer(text_peer, img[:, :j], cache=cache)[:, -1] for j in range(12)]
        err = (torch.stack(got, 1)[..., off:] - ref[..., off:]).abs().max().item()
        print(f"  dalle_pytorch_cache: cached vs uncached logits, max err {err:.2e} "
              f"({'works' if err < 1e-3 else 'DIFFERS'})")
    del cfg


def uncached_step_fns(model, m_peer, text, text_peer, positions):
    """One uncached sampling step at each of `positions` (image tokens already there)."""
    B = text.shape[0]
    img = torch.randint(0, VOCAB_IMAGE, (B, max(positions) + 1))

    @torch.no_grad()
    def ours_steps():
        for j in positions:
            sample_logits(model.image_logits(model.hidden(text, img[:, :j])[:, -1]))

    @torch.no_grad()
    def peer_steps():
        from dalle_pytorch.dalle_pytorch import gumbel_sample, top_k
        for j in positions:
            logits = m_peer(text_peer, img[:, :j])[:, -1, :]
            gumbel_sample(top_k(logits, thres=0.5), temperature=1.0, dim=-1)
    return ours_steps, peer_steps


def case(provider, mode="sample", quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py): a whole generation's token loop at
    batch 1; provider dalle_fast, full_kv_cache or dalle_pytorch_cache; quick: dim 128, depth 2, 8x8 image."""
    kw = dict(dim=128, depth=2, heads=2, dim_head=64, text_len=16, image_size=8) if quick else CONFIGS["matched"]
    text = torch.randint(1, VOCAB_TEXT, (1, kw["text_len"]), generator=torch.Generator().manual_seed(0))
    if provider == "dalle_pytorch_cache":
        dp = import_peer()
        if dp is None:
            raise ModuleNotFoundError("dalle-pytorch is not installed")
        m = peer(dp, kw)
        return lambda: peer_cached_loop(m, text)
    model = ours(kw, "dense" if provider == "full_kv_cache" else "fused")
    return lambda: sample_tokens(model, text)


CASES = [(p, "sample") for p in ("dalle_fast", "full_kv_cache", "dalle_pytorch_cache")]


def run(config_names, batches, reps, write_csv, threads=2):
    torch.set_num_threads(threads)
    dp = import_peer()
    if dp is not None:
        print(f"dalle-pytorch {getattr(dp, '__version__', '')} imported")
    peak = matmul_peak_gflops()
    print(f"matmul ceiling {peak:.1f} GFLOP/s (fp32, {threads} threads)")
    rec = Recorder("generate")
    for cname in config_names:
        kw = CONFIGS[cname]
        model, dense = ours(kw, "fused"), ours(kw, "dense")
        dense.load_state_dict(model.state_dict())
        full = ours(dict(kw, attention_kinds=["full"] * kw["depth"]), "fused")
        full.load_state_dict(model.state_dict())
        mixed = ours(kw, "fused")
        mixed.load_state_dict(model.state_dict())
        mixed.cast_resblocks_(torch.bfloat16)
        m_peer = peer(dp, kw) if dp is not None else None
        peer_bf16 = None
        if m_peer is not None:
            peer_bf16 = peer(dp, kw).bfloat16()
            peer_bf16.vae.decode = m_peer.vae.decode
        M = kw["image_size"] ** 2
        # GEMM work per generated token (weights of every layer + the image head), for GFLOP/s
        flops_tok = 2 * (kw["depth"] * 12 * kw["dim"] ** 2 + kw["dim"] * VOCAB_IMAGE)
        n_pos = 4 if reps <= 2 else 8
        positions = [round((i + 0.5) * M / n_pos) for i in range(n_pos)]
        for B in batches:
            g = torch.Generator().manual_seed(0)
            text = torch.randint(1, VOCAB_TEXT, (B, kw["text_len"]), generator=g)
            text_peer = text.clone()
            print(f"{cname} batch {B}: correctness")
            check(model, dense, m_peer, text, text_peer)
            timings = {}
            timings["dalle_fast"] = (measure(lambda: sample_tokens(model, text), warmup=1, reps=reps), M, "")
            timings["dalle_fast_bf16"] = (measure(lambda: sample_tokens(mixed, text), warmup=1, reps=reps), M,
                                          "bf16 residual branches, fp32 heads (cast_resblocks_)")
            timings["full_kv_cache"] = (measure(lambda: sample_tokens(dense, text), warmup=1, reps=reps), M, "")
            timings["full_attention_fused"] = (measure(lambda: sample_tokens(full, text), warmup=1, reps=reps), M,
                                               "the fused step with every layer full (causal) attention")
            ours_steps, peer_steps = uncached_step_fns(model, m_peer, text, text_peer, positions)
            timings["no_cache"] = (measure(ours_steps, warmup=1, reps=max(1, reps // 2)), n_pos,
                                   f"est from {n_pos} steps")
            if m_peer is not None:
                timings["dalle_pytorch"] = (measure(peer_steps, warmup=1, reps=max(1, reps // 2)), n_pos,
                                            f"est from {n_pos} steps (generate_images path)")
                timings["dalle_pytorch_cache"] = (measure(lambda: peer_cached_loop(m_peer, text_peer), warmup=1,
                                                          reps=reps), M, "")
                timings["dalle_pytorch_cache_bf16"] = (measure(lambda: peer_cached_loop(peer_bf16, text_peer),
                                                               warmup=1, reps=reps), M, "the whole model in bf16")
            base_name = "dalle_pytorch_cache" if m_peer is not None else "full_kv_cache"
            tok_s = {k: B * steps / (t["median_ms"] * 1e-3) for k, (t, steps, _) in timings.items()}
            if "dalle_pytorch_cache_bf16" in tok_s:  # bf16 against bf16 too
                r = tok_s["dalle_fast_bf16"] / tok_s["dalle_pytorch_cache_bf16"]
                t, steps, extra = timings["dalle_fast_bf16"]
                timings["dalle_fast_bf16"] = (t, steps, f"{extra}; {r:.2f}x dalle_pytorch_cache_bf16")
            for k, (t, steps, extra) in timings.items():
                rec.add(op="generate", provider=k, mode="sample", shape=f"{cname} B={B} N={kw['text_len'] + M}",
                        dtype="bfloat16" if k.endswith("_bf16") else "float32", device=f"cpu x{threads}",
                        median_ms=t["median_ms"] * M / steps,
                        p20_ms=t["p20_ms"] * M / steps, p80_ms=t["p80_ms"] * M / steps,
                        gflops=flops_tok * tok_s[k] / 1e9, ratio=tok_s[k] / tok_s[base_name],
                        extra=f"{tok_s[k]:.1f} image tok/s; vs {base_name}; peak {peak:.0f} GFLOP/s {extra}".strip())
    rec.finish(write_csv)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--configs", nargs="*", default=None, choices=list(CONFIGS))
    p.add_argument("--threads", type=int, default=2,
                   help="intra-op threads (1 is steadier on a shared machine: one-token steps are too small to split)")
    a = p.parse_args()
    configs = a.configs or (["matched"] if a.quick else list(CONFIGS))
    t0 = time.time()
    run(configs, [1, 16], reps=2 if a.quick else 3, write_csv=wants_csv(a.quick), threads=a.threads)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
