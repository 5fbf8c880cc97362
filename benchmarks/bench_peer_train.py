"""Training steps against dalle-pytorch 1.6.6 at matched sizes (CPU, fp32).

    .venv/bin/python benchmarks/bench_peer_train.py           # CSV in results/peer_train.csv
    .venv/bin/python benchmarks/bench_peer_train.py --quick   # smaller sizes, fewer reps

Transformer: dalle-pytorch's DALLE with attn_types full, axial_row and conv_like against our DALLE with
every layer full, row or conv attention (the nearest of the paper's masks; conv with the peer's kernel
size 5), both at dim 256, depth 4, heads 4 of 64, text 32 + 16x16 image tokens of 8192 codes, batch 4
(--quick: dim 128, depth 2, text 16 + 8x8). Both take token ids (no dVAE in the step).
dVAE: dalle-pytorch's DiscreteVAE (3 stride-2 convs, hidden 64, codebook dim 512, softmax
straight-through with F.gumbel_softmax, MSE loss) against our DiscreteVAE (the paper's resnet
encoder/decoder, fused Gumbel-softmax and logit-Laplace loss), both 64x64 -> 8x8 tokens of 512 codes,
batch 16. The dVAEs are not the same network: the rows give both parameter counts, and the ratio says
what a user switching gets, not a like-for-like kernel comparison.
Modes: fwd (loss, no grad), bwd (gradients of a kept graph), fwd+bwd. ratio = peer time / our time.
"""
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import Recorder, bench_parser, import_peer, measure, train_modes, wants_csv  # noqa: E402
from dalle_fast.models.dalle import DALLE, DALLEConfig  # noqa: E402

VOCAB_TEXT, VOCAB_IMAGE = 1000, 8192
FULL = dict(dim=256, depth=4, heads=4, dim_head=64, text_len=32, image_size=16, batch=4, vae_batch=16)
QUICK = dict(dim=128, depth=2, heads=2, dim_head=64, text_len=16, image_size=8, batch=2, vae_batch=4)
# dalle-pytorch attention type -> ours (kernel of conv_like: 5 in dalle-pytorch)
KINDS = {"full": "full", "axial_row": "row", "conv_like": "conv"}
MODES = ("fwd", "bwd", "fwd+bwd")


def n_params(m):
    return sum(p.numel() for p in m.parameters() if p.requires_grad)


def transformer_pair(dp, kw, peer_kind):
    """(ours, peer, inputs) for one attention type at the matched size, or peer None without dalle-pytorch."""
    torch.manual_seed(0)
    ours = DALLE(DALLEConfig(num_text_tokens=VOCAB_TEXT, num_image_tokens=VOCAB_IMAGE, text_len=kw["text_len"],
                             image_size=kw["image_size"], dim=kw["dim"], depth=kw["depth"], heads=kw["heads"],
                             dim_head=kw["dim_head"], conv_kernel=5, backend="fused",
                             attention_kinds=[KINDS[peer_kind]] * kw["depth"]))
    peer = None
    if dp is not None:
        layers = 3
        vae = dp.DiscreteVAE(image_size=kw["image_size"] * 2 ** layers, num_layers=layers, num_tokens=VOCAB_IMAGE,
                             codebook_dim=64, hidden_dim=16)
        peer = dp.DALLE(dim=kw["dim"], vae=vae, num_text_tokens=VOCAB_TEXT, text_seq_len=kw["text_len"],
                        depth=kw["depth"], heads=kw["heads"], dim_head=kw["dim_head"], attn_types=(peer_kind,))
        for p in peer.vae.parameters():  # frozen, as in dalle-pytorch's training script
            p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    text = torch.randint(1, VOCAB_TEXT, (kw["batch"], kw["text_len"]), generator=g)
    image = torch.randint(0, VOCAB_IMAGE, (kw["batch"], kw["image_size"] ** 2), generator=g)
    return ours, peer, text, image


def transformer_modes(model, text, image, peer):
    if peer:
        loss = lambda: model(text, image, return_loss=True)  # noqa: E731
    else:
        loss = lambda: model(text, image, return_loss=True)[0]  # noqa: E731
    return train_modes(loss, [p for p in model.parameters() if p.requires_grad])


def dvae_pair(dp, batch):
    from dalle_fast.data import Shapes
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    torch.manual_seed(0)
    cfg = DVAEConfig.small()
    ours = DiscreteVAE(cfg, backend="fused")
    x = torch.stack([Shapes(batch, seed=0, image_size=cfg.image_size)[i][0] for i in range(batch)])
    peer = None
    if dp is not None:
        peer = dp.DiscreteVAE(image_size=cfg.image_size, num_tokens=cfg.vocab_size, codebook_dim=512, num_layers=3,
                              hidden_dim=64)
    return ours, peer, x


def dvae_modes(model, x, peer):
    if peer:
        loss = lambda: model(x, return_loss=True)  # noqa: E731
    else:
        loss = lambda: model(x, tau=1.0, beta=1.0)["loss"]  # noqa: E731
    return train_modes(loss, list(model.parameters()))


def case(provider, mode, quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py): provider is
    '<ours|peer>-<full|axial_row|conv_like|dvae>'."""
    who, what = provider.split("-", 1)
    kw = QUICK if quick else FULL
    dp = import_peer() if who == "peer" else None
    if who == "peer" and dp is None:
        raise ModuleNotFoundError("dalle-pytorch is not installed")
    if what == "dvae":
        ours, peer, x = dvae_pair(dp, kw["vae_batch"])
        return dvae_modes(peer if who == "peer" else ours, x, who == "peer")[mode]
    ours, peer, text, image = transformer_pair(dp, kw, what)
    return transformer_modes(peer if who == "peer" else ours, text, image, who == "peer")[mode]


CASES = [(f"{who}-{what}", "fwd+bwd") for what in ("full", "axial_row", "conv_like", "dvae")
         for who in ("ours", "peer")]


def run(kw, reps, write_csv, threads):
    torch.set_num_threads(threads)
    dp = import_peer()
    rec = Recorder("peer_train")
    for peer_kind in KINDS:
        shape_t = (f"{peer_kind} B={kw['batch']} text={kw['text_len']} image={kw['image_size']}x{kw['image_size']} "
                   f"dim={kw['dim']} depth={kw['depth']}")
        ours, peer, text, image = transformer_pair(dp, kw, peer_kind)
        models = {"dalle_fast": (ours, False)}
        if peer is not None:
            models["dalle_pytorch"] = (peer, True)
        print(f"-- {peer_kind}: ours {n_params(ours) / 1e6:.2f}M params"
              + (f", dalle-pytorch {n_params(peer) / 1e6:.2f}M" if peer is not None else ""), flush=True)
        times = {name: {m: measure(f, warmup=1, reps=reps)
                        for m, f in transformer_modes(mdl, text, image, is_peer).items()}
                 for name, (mdl, is_peer) in models.items()}
        tokens = kw["batch"] * (kw["text_len"] + kw["image_size"] ** 2)
        for name, res in times.items():
            for mode, t in res.items():
                base = times.get("dalle_pytorch", times["dalle_fast"])[mode]["median_ms"]
                rec.add(op="train_step_transformer", provider=name, mode=mode, shape=shape_t,
                        dtype="float32", device="cpu", ratio=base / t["median_ms"],
                        extra=f"{peer_kind} (ours: {KINDS[peer_kind]}); {tokens / (t['median_ms'] * 1e-3):.0f} tok/s; "
                              f"{n_params(models[name][0]) / 1e6:.2f}M params; ratio = dalle_pytorch time / this", **t)
    ours, peer, x = dvae_pair(dp, kw["vae_batch"])
    models = {"dalle_fast": (ours, False)}
    if peer is not None:
        models["dalle_pytorch"] = (peer, True)
    times = {name: {m: measure(f, warmup=1, reps=reps) for m, f in dvae_modes(mdl, x, is_peer).items()}
             for name, (mdl, is_peer) in models.items()}
    for name, res in times.items():
        for mode, t in res.items():
            base = times.get("dalle_pytorch", times["dalle_fast"])[mode]["median_ms"]
            rec.add(op="train_step_dvae", provider=name, mode=mode, shape=f"B={kw['vae_batch']} 64x64->8x8x512",
                    dtype="float32", device="cpu", ratio=base / t["median_ms"],
                    extra=f"{kw['vae_batch'] / (t['median_ms'] * 1e-3):.1f} img/s; "
                          f"{n_params(models[name][0]) / 1e6:.2f}M params; ratio = dalle_pytorch time / this", **t)
    rec.finish(write_csv)


def main():
    a = bench_parser(__doc__).parse_args()
    t0 = time.time()
    run(QUICK if a.quick else FULL, reps=2 if a.quick else 5, write_csv=wants_csv(a.quick), threads=a.threads)
    print(f"({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
