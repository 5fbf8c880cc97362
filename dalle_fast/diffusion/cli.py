"""Command line of the diffusion families: `generate --model imagen|unclip` (its options are added to
`dalle-fast generate`), `vary IMAGE` and `interpolate A B` (unCLIP)."""
import argparse
import os
import time

MODELS = ("dalle", "imagen", "unclip")


def add_generate_args(p):
    """The diffusion options of `dalle-fast generate` (ignored by --model dalle)."""
    p.add_argument("--model", default="dalle", choices=MODELS,
                   help="the family: dalle (transformer + dVAE), imagen (cascaded diffusion over a frozen "
                        "text encoder) or unclip (CLIP prior + diffusion decoder)")
    p.add_argument("--diffusion-dir", default=None,
                   help="imagen/unclip: a directory with imagen/, unclip_decoder/, prior/, upsampler/ "
                        "(default: the bundled Shapes models)")
    _sampling_args(p)


def _sampling_args(p):
    p.add_argument("--guidance", "-w", type=float, default=3.0, help="classifier-free guidance weight w (>= 0)")
    p.add_argument("--steps", type=int, default=50, help="sampling steps of the 32x32 stage")
    p.add_argument("--up-steps", type=int, default=25, help="sampling steps of the super-resolution stage")
    p.add_argument("--sampler", default="ddim", choices=("ddim", "ddpm"))
    p.add_argument("--threshold", default="dynamic", choices=("dynamic", "static", "none"),
                   help="x0 thresholding at every step (Imagen's dynamic thresholding by default)")
    p.add_argument("--no-upsample", action="store_true", help="stop at 32x32")


def _sample_kw(args):
    return dict(guidance=args.guidance, steps=args.steps, up_steps=args.up_steps, sampler=args.sampler,
                threshold=args.threshold, upsample=not args.no_upsample)


def generate_diffusion(args):
    """`dalle-fast generate --model imagen|unclip`: samples, optional CLIP reranking, a PNG grid."""
    import torch
    from ..generate import save_images
    from ..viz import image_grid
    from .pipelines import load_pipeline
    pipe = load_pipeline(args.model, args.diffusion_dir)
    t0 = time.perf_counter()
    images = pipe.generate(args.captions, n=args.num_images, seed=args.seed, progress=True, **_sample_kw(args))
    seconds = time.perf_counter() - t0
    scores = None
    clip = getattr(pipe, "clip", None)
    if not args.no_clip and args.keep is not None:
        if clip is None:
            from ..clip import CLIPReranker
            from .pipelines import bundled_diffusion_dir
            clip = CLIPReranker.from_pretrained(os.path.join(os.path.dirname(bundled_diffusion_dir()), "clip"))
        kept, scores = [], []
        for i, cap in enumerate(args.captions):
            im, sc = clip.rerank(images[i], cap, args.keep)
            kept.append(im)
            scores.append(sc)
        images, scores = torch.stack(kept), torch.stack(scores)
    k = images.shape[1]
    labels = [c if j == 0 else "" for c in args.captions for j in range(k)]
    image_grid(images.flatten(0, 1), nrow=k, captions=labels, scale=args.scale, path=args.out)
    paths = save_images(images, os.path.splitext(args.out)[0], list(args.captions), scores)
    n = len(args.captions) * args.num_images
    print(f"wrote {args.out} and {len(paths)} images in {os.path.splitext(args.out)[0]}/ "
          f"({args.model}: {seconds / n:.2f} s per image)")
    return 0


def _load_image(path, size=64):
    from ..data import load_image
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image not found: {path}")
    return load_image(path, size)


def _resized(images, like):
    """images (B, 3, h, w) area-resized to like's spatial size."""
    import torch.nn.functional as F
    return images if images.shape[-2:] == like.shape[-2:] else F.interpolate(images, size=like.shape[-2:], mode="area")


def _cmd_vary(args):
    from ..viz import image_grid
    from .pipelines import UnCLIP
    import torch
    src = _load_image(args.image)
    pipe = UnCLIP.load(args.diffusion_dir)
    out = pipe.vary(src, n=args.num_images, seed=args.seed, **_sample_kw(args))
    out = torch.cat([_resized(src[None], out), out])
    image_grid(out, nrow=out.shape[0], captions=["input"] + [""] * (out.shape[0] - 1), scale=args.scale,
               path=args.out)
    print(f"wrote {args.out}: the input, then {args.num_images} variations")
    return 0


def _cmd_interpolate(args):
    import torch
    from ..viz import image_grid
    from .pipelines import UnCLIP
    a, b = _load_image(args.a), _load_image(args.b)
    pipe = UnCLIP.load(args.diffusion_dir)
    frames = pipe.interpolate(a, b, frames=args.frames, seed=args.seed, **_sample_kw(args))
    row = torch.cat([_resized(a[None], frames), frames, _resized(b[None], frames)])
    image_grid(row, nrow=row.shape[0], captions=["A"] + [""] * args.frames + ["B"], scale=args.scale, path=args.out)
    print(f"wrote {args.out}: A, {args.frames} frames of the slerp from A's CLIP embedding to B's, B")
    return 0


def register(subparsers):
    fmt = argparse.ArgumentDefaultsHelpFormatter
    p = subparsers.add_parser("vary", formatter_class=fmt,
                              help="unCLIP: variations of an image (its CLIP embedding decoded with new noise)")
    p.add_argument("image")
    p.add_argument("-n", "--num-images", type=int, default=6)
    _shared(p, "variations.png")
    p.set_defaults(func=_cmd_vary)
    p = subparsers.add_parser("interpolate", formatter_class=fmt,
                              help="unCLIP: images along the slerp between two images' CLIP embeddings")
    p.add_argument("a")
    p.add_argument("b")
    p.add_argument("--frames", type=int, default=6)
    _shared(p, "interpolation.png")
    p.set_defaults(func=_cmd_interpolate)


def _shared(p, out):
    p.add_argument("--diffusion-dir", default=None, help="default: the bundled Shapes models")
    _sampling_args(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=out)
