"""`dalle-fast demo`: a first look at the whole system on any machine, in about a minute.

1. Trains a small dVAE on the synthetic Shapes set for a fixed time on the CPU with the fused
   kernels and writes a PNG of originals above their reconstructions (through argmax tokens).
2. Text to image with the small model bundled in the package (dVAE + sparse transformer + BPE
   tokenizer + CLIP, trained on Shapes by scripts/make_bundled_model.sh with every green triangle
   held out): samples with the KV-cached sparse decoder, reranks with CLIP, writes a PNG grid of
   seen and held-out prompts.
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
    # a run of a few hundred steps keeps the auxiliary term on to the end (mse_frac 2: it decays to half) and
    # anneals the temperature over the whole run: with the default fractions (MSE gone and tau at 1/16 by
    # half-way) the codes collapse in the second half (quiet machine, 30 s, seeds 0/1: eval PSNR 13.8/15.7 dB,
    # one run 6.0 dB with codebook perplexity 1.5; with these 18.4/17.4 dB)
    cfg = TrainVAEConfig(data="shapes", config="small", steps=5000, batch_size=batch_size, lr=lr, seed=seed,
                         mse_weight=mse_weight, mse_frac=2.0, tau_frac=1.0,
                         device=device, log_every=5, sample_every=10 ** 9, checkpoint_every=10 ** 9,
                         eval_images=16, shapes_length=20_000)
    t0 = time.perf_counter()
    s = train_vae(run_dir, cfg, progress=progress, time_budget_s=seconds)
    s["seconds"] = time.perf_counter() - t0
    s["grid"] = os.path.join(run_dir, "reconstructions.png")
    s["run_dir"] = run_dir
    return s


SEEN = ["a large red circle", "a small blue square", "a small magenta circle above a large cyan square"]
HELD_OUT = ["a large green triangle", "a large green triangle to the left of a small red circle"]


def run_text_to_image_demo(out="demo_out", num_images=8, keep=4, seed=0, progress=True):
    """Generates the SEEN and HELD_OUT prompts with the bundled model; returns the grid's path."""
    from dalle_fast.generate import generate, load_bundle
    from dalle_fast.viz import image_grid

    model, vae, tokenizer, clip = load_bundle(None)
    captions = SEEN + HELD_OUT
    result = generate(model, vae, captions, num_images=num_images, seed=seed, clip=clip,
                      keep=keep if clip is not None else None, tokenizer=tokenizer, progress=progress)
    k = result.images.shape[1]
    labels = [(c + (" [held out]" if c in HELD_OUT else "")) if j == 0 else ""
              for c in result.captions for j in range(k)]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "text_to_image.png")
    image_grid(result.images.flatten(0, 1), nrow=k, captions=labels, scale=2, path=path)
    return path


def run_families_demo(out="demo_out", num_images=3, seed=0, steps=20, up_steps=10, progress=True):
    """The SEEN and HELD_OUT prompts from all three bundled families side by side in one PNG: per prompt
    a row of DALL-E | Imagen | unCLIP samples (64x64). Returns (path, {family: seconds per image})."""
    import torch
    import torch.nn.functional as F
    from dalle_fast.diffusion import load_pipeline
    from dalle_fast.generate import generate, load_bundle
    from dalle_fast.viz import image_grid

    captions = SEEN + HELD_OUT
    rows, per_image = [], {}
    t0 = time.perf_counter()
    model, vae, tokenizer, _ = load_bundle(None)
    rows.append(generate(model, vae, captions, num_images=num_images, seed=seed, tokenizer=tokenizer).images)
    per_image["dalle"] = (time.perf_counter() - t0) / (len(captions) * num_images)
    for family in ("imagen", "unclip"):
        t0 = time.perf_counter()
        rows.append(load_pipeline(family).generate(captions, n=num_images, seed=seed, steps=steps, up_steps=up_steps,
                                                   progress=progress))
        per_image[family] = (time.perf_counter() - t0) / (len(captions) * num_images)
    size = max(r.shape[-1] for r in rows)
    rows = [r if r.shape[-1] == size else F.interpolate(r.flatten(0, 1), size=size).view(*r.shape[:3], size, size)
            for r in rows]
    grid = torch.cat(rows, dim=1)  # (prompts, 3 * num_images, 3, S, S)
    names = ["DALL-E", "Imagen", "unCLIP"]
    labels = [(f"{names[j // num_images]}: " + c + (" [held out]" if c in HELD_OUT else "")) if j % num_images == 0
              else "" for c in captions for j in range(grid.shape[1])]
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "three_families.png")
    image_grid(grid.flatten(0, 1), nrow=grid.shape[1], captions=labels, scale=2, path=path)
    return path, per_image


def register(subparsers):
    p = subparsers.add_parser("demo", help="train a small dVAE for ~30 s, then text to image with the bundled model")
    p.add_argument("--out", default="demo_out", help="parent directory of the demo's run directory")
    p.add_argument("--seconds", type=float, default=30.0, help="training time budget")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads (1 by default: on the 2-core development box, 1 thread ran the small "
                        "dVAE's steps ~30x faster than 2 while other jobs shared it)")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--skip-vae", action="store_true", help="only the text-to-image part")
    p.add_argument("-n", "--num-images", type=int, default=8, help="samples per prompt, reranked by CLIP")
    p.add_argument("--keep", type=int, default=4, help="best samples kept per prompt")
    p.add_argument("--no-families", action="store_true",
                   help="skip the DALL-E | Imagen | unCLIP comparison (bundled diffusion models)")
    p.set_defaults(func=_main)


def _main(args):
    if not args.skip_vae:
        _dvae_part(args)
    t0 = time.perf_counter()
    grid = run_text_to_image_demo(out=args.out, num_images=args.num_images, keep=args.keep, seed=args.seed,
                                  progress=not args.no_progress)
    print(f"text to image with the bundled Shapes model ({time.perf_counter() - t0:.0f} s): {grid}")
    print(f"  prompts seen in training: {SEEN}")
    print(f"  held out of training (zero-shot composition): {HELD_OUT}")
    from dalle_fast.diffusion.pipelines import bundled_diffusion_dir
    if not args.no_families and os.path.isdir(bundled_diffusion_dir()):
        t0 = time.perf_counter()
        path, per_image = run_families_demo(out=args.out, seed=args.seed, progress=not args.no_progress)
        print(f"the same prompts from DALL-E | Imagen | unCLIP ({time.perf_counter() - t0:.0f} s): {path}")
        print("  seconds per image: " + ", ".join(f"{k} {v:.2f}" for k, v in per_image.items()))
    return 0


def _dvae_part(args):
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
