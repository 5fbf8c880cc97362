"""`dalle-fast demo`: a first look at the system on any machine, in well under a minute.

For now: trains a small dVAE on the synthetic Shapes set for a fixed time on the CPU with the
fused kernels, then writes a PNG of originals above their reconstructions (through argmax tokens)
and prints a short summary. (The text-to-image stage is added by the later issues.)
"""
import os
import time


def run_dvae_demo(out="demo_out", seconds=30.0, batch_size=8, lr=2e-3, seed=0, progress=True, device="cpu",
                  mse_weight=1000.0):
    """Returns the training summary; the PNG is at summary['grid']."""
    from dalle_fast.train.vae import TrainVAEConfig, train_vae

    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    run_dir = os.path.join(out, time.strftime("dvae-%Y%m%d-%H%M%S"))
    # the step count is an upper bound: the run measures its first steps and fits the time budget
    # mse_weight: Shapes is noiseless and mostly black; see DiscreteVAE.forward for why it helps
    cfg = TrainVAEConfig(data="shapes", config="small", steps=5000, batch_size=batch_size, lr=lr, seed=seed,
                         mse_weight=mse_weight,
                         device=device, log_every=5, sample_every=10 ** 9, checkpoint_every=10 ** 9,
                         eval_images=16, shapes_length=20_000)
    t0 = time.perf_counter()
    s = train_vae(run_dir, cfg, progress=progress, time_budget_s=seconds)
    s["seconds"] = time.perf_counter() - t0
    s["grid"] = os.path.join(run_dir, "reconstructions.png")
    s["run_dir"] = run_dir
    return s


def register(subparsers):
    p = subparsers.add_parser("demo", help="train a small dVAE on Shapes for ~30 s and show reconstructions")
    p.add_argument("--out", default="demo_out", help="parent directory of the demo's run directory")
    p.add_argument("--seconds", type=float, default=30.0, help="training time budget")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 by default: on the 2-core development box, 1 thread ran the small "
                        "dVAE's steps ~30x faster than 2 while other jobs shared it)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=_main)


def _main(args):
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    s = run_dvae_demo(out=args.out, seconds=args.seconds, batch_size=args.batch_size, seed=args.seed,
                      progress=not args.no_progress)
    cfg = s["model_config"]
    print(f"dVAE demo: {s['steps']} steps in {s['seconds']:.0f} s on {s['device']} ({s['precision']}, "
          f"{s['backend']} kernels), {s['images_per_s']:.1f} images/s")
    print(f"  {cfg['image_size']}x{cfg['image_size']} images -> {cfg['image_size'] // 2 ** (cfg['group_count'] - 1)}^2 "
          f"tokens of {cfg['vocab_size']} codes")
    print(f"  reconstruction PSNR {s['eval_psnr']:.2f} dB, codebook perplexity {s['eval_perplexity']:.1f}")
    print(f"  originals above reconstructions: {s['grid']}")
    print(f"  curves: {os.path.join(s['run_dir'], 'curves.png')}; weights: {s['model_dir']}")
    return 0
