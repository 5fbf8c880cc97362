"""Per-resblock gradient scaling (dalle_fast.amp): shown, not asserted.

--part demo (default): a deep fp16 residual MLP stack (24 branches, fixed seed) trained three ways
on the same batches: fp32 (the reference), fp16 with torch.amp.GradScaler (one global scale), and
fp16 with dalle_fast.amp.ResblockGradScaler (one scale per branch, the paper's rule and filter).
The loss is divided by a large "global batch" (2^16 here, as the paper divides by its global batch),
so the branches' fp16 gradients sit low in fp16's range and need a scale of about 2^8 or more. One
branch (index --spiky) overflows in its own backward on --spike-rate of the steps whatever the scale
(simulated: its backward writes an Inf, like an activation near fp16's maximum would). torch's
single scale is halved at each such event for every branch and underflows; the per-resblock
filter keeps the event inside that branch. Writes docs/resblock_scales.png (per-branch scales over
the run, the paper's Figure 12, and the three loss curves) and CSV rows (benchmarks/results/
resblock_scaling.csv: final losses, skipped steps, share of gradient elements that underflowed).
--part kernels: resblock_unscale_grads_ against torch's own one-call unscale
(torch._amp_foreach_non_finite_check_and_unscale_, one global scale) and a per-tensor Python loop,
over the parameter gradients of a DALLE config; resblock_grad_scale against the eager composite.
"""
import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import RESULTS, Recorder, measure, wants_csv  # noqa: E402
from dalle_fast.amp import ResblockGradScaler, ScaledBranch  # noqa: E402
from dalle_fast.ops.resblock_scaling import resblock_grad_scale, resblock_unscale_grads_  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---- the demo model ----

class _Overflow(torch.autograd.Function):
    """Identity; its backward writes +Inf into the gradient when `fire` (a simulated fp16 overflow)."""

    @staticmethod
    def forward(ctx, x, fire):
        ctx.fire = fire
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        if ctx.fire:
            g = g.clone()
            g.view(-1)[0] = float("inf")
        return g, None


class MLPBranch(nn.Module):
    def __init__(self, dim, hidden, depth, spiky=False):
        super().__init__()
        self.norm, self.fc1, self.fc2 = nn.LayerNorm(dim), nn.Linear(dim, hidden), nn.Linear(hidden, dim)
        with torch.no_grad():
            self.fc2.weight.mul_(1 / math.sqrt(2 * depth))
        self.spiky, self.fire = spiky, False

    def forward(self, x):
        h = F.gelu(self.fc1(self.norm(x)))
        if self.spiky:
            h = _Overflow.apply(h, self.fire)
        return self.fc2(h)


class Stack(nn.Module):
    def __init__(self, dim=64, hidden=256, depth=24, spiky=3, inputs=16, outputs=8):
        super().__init__()
        self.emb = nn.Linear(inputs, dim)
        self.branches = nn.ModuleList(MLPBranch(dim, hidden, depth, spiky=(i == spiky)) for i in range(depth))
        self.head = nn.Linear(dim, outputs)

    def forward(self, x):
        h = self.emb(x)
        for b in self.branches:
            h = h + b(h)
        return self.head(h)


def _teacher_data(n, inputs, outputs, seed):
    g = torch.Generator().manual_seed(seed)
    w1, w2 = torch.randn(inputs, 64, generator=g), torch.randn(64, outputs, generator=g) / 8
    x = torch.randn(n, inputs, generator=g)
    return x, torch.tanh(x @ w1) @ w2


def train(mode, args):
    """mode: fp32 | torch | resblock. Returns per-step rows and the final validation loss."""
    torch.manual_seed(args.seed)
    model = Stack(depth=args.depth, spiky=args.spiky)
    x_all, y_all = _teacher_data(args.batch * 64, 16, 8, args.seed + 1)
    x_val, y_val = _teacher_data(512, 16, 8, args.seed + 1)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    scaler = None
    if mode == "torch":
        scaler = torch.amp.GradScaler("cpu")
    elif mode == "resblock":
        scaler = ResblockGradScaler(args.depth)
        model.branches = nn.ModuleList(ScaledBranch(b, scaler, i) for i, b in enumerate(model.branches))
    spiky = model.branches[args.spiky]
    spiky = spiky.module if isinstance(spiky, ScaledBranch) else spiky
    fire = torch.rand(args.steps, generator=torch.Generator().manual_seed(args.seed + 2)) < args.spike_rate
    rows, skipped = [], 0
    for step in range(args.steps):
        i = (step * args.batch) % x_all.shape[0]
        xb, yb = x_all[i:i + args.batch], y_all[i:i + args.batch]
        spiky.fire = bool(fire[step]) and mode != "fp32"
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.float16, enabled=mode != "fp32"):
            out = model(xb)
        loss = F.mse_loss(out.float(), yb, reduction="sum") / args.global_batch
        row = {"step": step}
        if mode == "torch":
            scaler.scale(loss).backward()
            scaler.unscale_(opt)
            row["underflow"] = _underflow(model, args)
            before = scaler.get_scale()
            scaler.step(opt)
            scaler.update()
            skipped += scaler.get_scale() < before
            row["scales"] = [before] * args.depth
        elif mode == "resblock":
            loss.backward()
            row["scales"] = scaler.scales.tolist()
            nonfinite = scaler.unscale_(model)
            row["underflow"] = _underflow(model, args)
            skipped += scaler.step(opt, nonfinite)
            scaler.update(nonfinite)
        else:
            loss.backward()
            row["underflow"] = _underflow(model, args)
            opt.step()
        if step % args.eval_every == 0 or step == args.steps - 1:
            with torch.no_grad():
                row["val"] = F.mse_loss(model(x_val), y_val).item()
        rows.append(row)
    return rows, skipped


def _underflow(model, args):
    """Share of the fc1 weight-gradient elements of the non-spiky branches that are exactly zero."""
    zeros = total = 0
    for i, b in enumerate(model.branches):
        if i == args.spiky:
            continue
        g = (b.module if isinstance(b, ScaledBranch) else b).fc1.weight.grad
        if g is not None and bool(torch.isfinite(g).all()):
            zeros += int((g == 0).sum())
            total += g.numel()
    return zeros / max(total, 1)


def demo(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    results = {m: train(m, args) for m in ("fp32", "torch", "resblock")}
    rec = Recorder("resblock_scaling")
    for mode, (rows, skipped) in results.items():
        vals = [r["val"] for r in rows if "val" in r]
        tail = rows[len(rows) // 2:]
        rec.add(op="demo_deep_fp16_stack", provider={"fp32": "fp32 reference", "torch": "torch.amp.GradScaler",
                                                     "resblock": "dalle_fast ResblockGradScaler"}[mode],
                mode="train", shape=f"depth={args.depth} dim=64 hidden=256 batch={args.batch} steps={args.steps}",
                dtype="fp32" if mode == "fp32" else "fp16", device="cpu",
                extra=(f"final_val_mse={vals[-1]:.4g} first_val_mse={vals[0]:.4g} skipped={skipped} "
                       f"underflow_2nd_half={sum(r['underflow'] for r in tail) / len(tail):.3f} "
                       f"spike_rate={args.spike_rate} global_batch={args.global_batch}"))
    rec.print_table(cols=("provider", "dtype", "extra"))
    if not args.no_write:
        print("rows ->", rec.write())
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.6))
    rows = results["resblock"][0]
    steps = [r["step"] for r in rows]
    for b in range(args.depth):
        ax1.plot(steps, [math.log2(r["scales"][b]) for r in rows], lw=0.9,
                 label=f"branch {b} (overflows on {args.spike_rate:.0%} of steps)" if b == args.spiky else None,
                 color="tab:red" if b == args.spiky else plt.cm.viridis(b / args.depth))
    ax1.plot(steps, [math.log2(max(r["scales"][0], 2 ** -30)) for r in results["torch"][0]], "k--", lw=1.2,
             label="torch.amp.GradScaler (one global scale)")
    ax1.set_xlabel("update")
    ax1.set_ylabel("log2 gradient scale")
    ax1.set_title(f"per-resblock scales, {args.depth} branches (colour = depth)")
    ax1.legend(fontsize=8)
    for mode, style in (("fp32", "k-"), ("torch", "b--"), ("resblock", "r-")):
        r = [(x["step"], x["val"]) for x in results[mode][0] if "val" in x]
        ax2.plot(*zip(*r), style, label={"fp32": "fp32", "torch": "fp16, torch.amp.GradScaler",
                                         "resblock": "fp16, ResblockGradScaler"}[mode])
    ax2.set_yscale("log")
    ax2.set_xlabel("update")
    ax2.set_ylabel("validation MSE")
    ax2.set_title("training")
    ax2.legend(fontsize=8)
    fig.tight_layout()
    # a --quick run (run_all.py --quick) draws into its results folder, never over the committed figure
    path = os.path.join(RESULTS if args.quick else os.path.join(ROOT, "docs"), "resblock_scales.png")
    if not args.no_write:
        fig.savefig(path, dpi=110)
        print("plot ->", path)


# ---- kernel timings ----

def kernels(args):
    from dalle_fast.models.dalle import DALLE, DALLEConfig
    rec = Recorder("resblock_scaling")
    model = DALLE(DALLEConfig.shapes())
    params = [p for p in model.parameters()]
    blocks = [i % 8 for i in range(len(params))]
    grads = [torch.randn_like(p) for p in params]
    n = sum(g.numel() for g in grads)
    # a scale near 1, not 2^13: every timed call divides the same gradients again, and 2^13 would drive
    # them into fp32's subnormals within a dozen calls (slow on x86 for every provider alike)
    scales = torch.full((8,), 1.0001)
    flags = torch.zeros(8, dtype=torch.bool)
    found, inv = torch.zeros(1), torch.full((1,), 1 / 1.0001)

    def ours():
        resblock_unscale_grads_(grads, blocks, scales, flags)

    def torch_one_scale():
        torch._amp_foreach_non_finite_check_and_unscale_(grads, found, inv)

    def loop():
        for g, b in zip(grads, blocks):
            g.div_(scales[b])
            flags[b] |= ~torch.isfinite(g).all()

    shape = f"DALLE shapes config, {len(grads)} tensors, {n} elements"
    times = {name: measure(fn, reps=20) for name, fn in (
        ("per-tensor python loop", loop), ("torch foreach unscale (one scale)", torch_one_scale),
        ("dalle_fast resblock_unscale_grads_", ours))}
    base = times["per-tensor python loop"]
    one = times["torch foreach unscale (one scale)"]["median_ms"]
    for name, t in times.items():
        rec.add(op="unscale_grads", provider=name, mode="in-place", shape=shape, dtype="fp32", device="cpu",
                bytes=8 * n, gbps=8 * n / (t["median_ms"] * 1e-3) / 1e9, ratio=base["median_ms"] / t["median_ms"],
                extra=f"ratio column: loop time / this; torch foreach / this = {one / t['median_ms']:.2f}", **t)
    g = torch.randn(8, 1280, 512)

    def eager():
        v = (g * scales[3]).half()
        fin = torch.isfinite(v)
        flags[3] |= ~fin.all()
        return torch.where(fin, v, torch.zeros((), dtype=v.dtype))

    times = {name: measure(fn, reps=20) for name, fn in (
        ("eager composite", eager),
        ("dalle_fast resblock_grad_scale", lambda: resblock_grad_scale(g, scales, flags, 3, False, torch.float16)))}
    base = times["eager composite"]
    for name, t in times.items():
        rec.add(op="grad_scale", provider=name, mode="fwd", shape="(8, 1280, 512) fp32 -> fp16", dtype="fp32",
                device="cpu", bytes=6 * g.numel(), gbps=6 * g.numel() / (t["median_ms"] * 1e-3) / 1e9,
                ratio=base["median_ms"] / t["median_ms"], **t)
    rec.print_table()
    if not args.no_write:
        print("rows ->", rec.write())


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--part", choices=("demo", "kernels", "all"), default="demo")
    p.add_argument("--depth", type=int, default=24)
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--global-batch", type=float, default=2.0 ** 16, help="the loss is a sum divided by this")
    p.add_argument("--spiky", type=int, default=3, help="the branch whose backward overflows now and then")
    p.add_argument("--spike-rate", type=float, default=0.1)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-write", action="store_true", help="print only (no CSV rows, no PNG)")
    p.add_argument("--quick", action="store_true",
                   help="CI-sized run (run_all.py --quick): both parts, a 60-update demo; writes only into the "
                        "folder DALLE_FAST_BENCH_RESULTS names")
    args = p.parse_args(argv)
    if args.quick:
        args.part, args.steps, args.eval_every = "all", min(args.steps, 60), min(args.eval_every, 10)
        args.no_write = args.no_write or not wants_csv(True)
    torch.set_num_threads(args.threads)
    if args.part in ("demo", "all"):
        demo(args)
    if args.part in ("kernels", "all"):
        kernels(args)


if __name__ == "__main__":
    main()
