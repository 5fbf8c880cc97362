"""dVAE training step: images/s with dalle_fast's fused Gumbel-softmax + logit-Laplace loss against
the same model with torch.nn.functional.gumbel_softmax and the eager loss (and torch.compile of
that), in fp32 and bf16 autocast, channels_last on the CPU.

    .venv/bin/python benchmarks/bench_dvae_train.py            # small config, batch 32, all modes
    .venv/bin/python benchmarks/bench_dvae_train.py --quick    # fewer reps, no torch.compile

Modes: fwd (loss, no grad), fwd+bwd (loss.backward()), step (fwd+bwd + clip + AdamW). Ratios are
against the eager provider in the same precision; GFLOP/s counts the convolutions' FLOPs
(torch.utils.flop_counter) against the measured GEMM ceiling in that precision.
"""
import argparse
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import Recorder, matmul_peak_gflops, measure, wants_csv  # noqa: E402

import dalle_fast  # noqa: E402
from dalle_fast.data import Shapes  # noqa: E402
from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig, logit_laplace_nll_eager  # noqa: E402


def check_correctness(cfg):
    """The fused ops agree with the eager math on the model's own tensors."""
    torch.manual_seed(0)
    m = DiscreteVAE(cfg)
    x = torch.stack([Shapes(4, seed=1, image_size=cfg.image_size)[i][0] for i in range(4)])
    logits = m.logits(x)
    g = -torch.empty_like(logits).exponential_().log()
    soft_f = dalle_fast.gumbel_softmax(logits, 0.5, dim=1, gumbels=g)
    soft_t = torch.softmax((logits + g) / 0.5, dim=1)
    err_gs = (soft_f - soft_t).abs().max().item()
    stats = m.decoder(soft_t)
    lf = dalle_fast.logit_laplace_loss(x, stats, eps=0.1)
    lt = logit_laplace_nll_eager(x, stats, 0.1).mean()
    err_ll = abs(lf.item() - lt.item())
    assert err_gs < 1e-5 and err_ll < 1e-4 * max(1.0, abs(lt.item())), (err_gs, err_ll)
    print(f"correctness: gumbel_softmax max err {err_gs:.2e}, logit-Laplace loss err {err_ll:.2e}")


def make_provider(name, cfg, precision, batch):
    torch.manual_seed(0)
    model = DiscreteVAE(cfg, backend="fused" if name == "dalle_fast" else "torch")
    model = model.to(memory_format=torch.channels_last)
    x = torch.stack([Shapes(batch, seed=0, image_size=cfg.image_size)[i][0] for i in range(batch)])
    x = x.contiguous(memory_format=torch.channels_last)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-4)
    fwd_model = torch.compile(model) if name == "torch.compile" else model
    ac = torch.autocast("cpu", dtype=torch.bfloat16, enabled=(precision == "bf16"))

    def fwd():
        with torch.no_grad(), ac:
            return fwd_model(x, tau=0.5, beta=1.0)["loss"]

    def fwd_bwd():
        with ac:
            loss = fwd_model(x, tau=0.5, beta=1.0)["loss"]
        loss.backward()
        return loss

    def step():
        loss = fwd_bwd()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    return {"fwd": fwd, "fwd+bwd": fwd_bwd, "step": step}, model, x


def case(provider, mode, quick=True):
    """One timed callable (shared with benchmarks/test_benchmarks.py): provider eager or dalle_fast, fp32."""
    cfg = DVAEConfig.named("tiny" if quick else "small")
    return make_provider(provider, cfg, "fp32", 4 if quick else 32)[0][mode]


CASES = [(p, "fwd+bwd") for p in ("eager", "dalle_fast")]


def count_flops(model, x):
    from torch.utils.flop_counter import FlopCounterMode
    with FlopCounterMode(display=False) as fc:
        model(x, tau=0.5, beta=1.0)["loss"].backward()
    total = fc.get_total_flops()
    with FlopCounterMode(display=False) as fc:
        with torch.no_grad():
            model(x, tau=0.5, beta=1.0)
    model.zero_grad(set_to_none=True)
    return {"fwd": fc.get_total_flops(), "fwd+bwd": total, "step": total}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repetitions, no torch.compile")
    ap.add_argument("--config", default="small", choices=["small", "tiny", "paper"])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--no-compile", action="store_true")
    ap.add_argument("--precisions", default="fp32,bf16")
    ap.add_argument("--no-csv", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(2)
    cfg = DVAEConfig.named(args.config)
    check_correctness(cfg)
    providers = ["eager", "dalle_fast"] + ([] if args.quick or args.no_compile else ["torch.compile"])
    reps, warmup = (3, 1) if args.quick else (10, 3)
    rec = Recorder("dvae_train")
    shape = f"B{args.batch}x3x{cfg.image_size}^2->{cfg.tokens_per_side}^2x{cfg.vocab_size}"
    for precision in args.precisions.split(","):
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        peak = matmul_peak_gflops("cpu", dtype)
        built = {p: make_provider(p, cfg, precision, args.batch) for p in providers}
        flops = count_flops(built["eager"][1], built["eager"][2])
        for mode in ("fwd", "fwd+bwd", "step"):
            # interleave providers rep by rep so a busy shared machine slows them alike
            times = {p: [] for p in providers}
            for p in providers:
                for _ in range(warmup + (2 if p == "torch.compile" else 0)):
                    built[p][0][mode]()
            for _ in range(reps):
                for p in providers:
                    times[p].append(measure(built[p][0][mode], warmup=0, reps=1)["median_ms"])
            base = sorted(times["eager"])[len(times["eager"]) // 2]
            for p in providers:
                ts = sorted(times[p])
                med = ts[len(ts) // 2]
                gflops = flops[mode] / (med * 1e-3) / 1e9
                rec.add(op="dvae_train", provider=p, mode=mode, shape=shape, dtype=precision, device="cpu",
                        median_ms=med, p20_ms=ts[int(0.2 * len(ts))], p80_ms=ts[min(len(ts) - 1, int(0.8 * len(ts)))],
                        gflops=gflops, ratio=base / med,
                        extra=f"{args.batch / (med * 1e-3):.1f} img/s; {100 * gflops / peak:.0f}% of {peak:.0f} GFLOP/s GEMM peak")
    rec.print_table()
    if wants_csv(args.quick) and not args.no_csv:
        print("wrote", rec.write())


if __name__ == "__main__":
    main()
