"""Pictures of runs: PNG image grids (optionally captioned) and metric curves (matplotlib, Agg)."""
import os
import textwrap

import torch
from PIL import Image, ImageDraw, ImageFont


def _to_uint8_hwc(img):
    if img.dim() != 3 or img.shape[0] not in (1, 3):
        raise ValueError(f"images must be (C, H, W) with C in (1, 3), got {tuple(img.shape)}")
    img = img.detach().float().cpu().clamp(0, 1)
    if img.shape[0] == 1:
        img = img.expand(3, -1, -1)
    return (img * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def image_grid(images, nrow=8, captions=None, path=None, scale=1, pad=2, caption_width=None):
    """A grid of images (a tensor (N, C, H, W) or a list of (C, H, W)) in [0, 1], `nrow` per row,
    each upscaled `scale` times (nearest) with an optional caption below it. Returns the PIL image
    and writes a PNG to `path` when given."""
    images = list(images)
    if not images:
        raise ValueError("image_grid needs at least one image")
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"{len(captions)} captions for {len(images)} images")
    tiles = [Image.fromarray(_to_uint8_hwc(im)) for im in images]
    if scale != 1:
        tiles = [t.resize((t.width * scale, t.height * scale), Image.NEAREST) for t in tiles]
    tw, th = max(t.width for t in tiles), max(t.height for t in tiles)
    font = ImageFont.load_default()
    lines = []
    if captions is not None:
        width_chars = caption_width or max(8, tw // 6)
        lines = [textwrap.wrap(str(c), width_chars)[:4] for c in captions]
    cap_h = 11 * max((len(ls) for ls in lines), default=0) + (2 if lines else 0)
    ncol = min(nrow, len(tiles))
    nrows = (len(tiles) + ncol - 1) // ncol
    grid = Image.new("RGB", (ncol * (tw + pad) + pad, nrows * (th + cap_h + pad) + pad), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for i, tile in enumerate(tiles):
        r, c = divmod(i, ncol)
        x, y = pad + c * (tw + pad), pad + r * (th + cap_h + pad)
        grid.paste(tile, (x, y))
        for k, line in enumerate(lines[i] if lines else []):
            draw.text((x, y + th + 1 + 11 * k), line, fill=(0, 0, 0), font=font)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        grid.save(path)
    return grid


def reconstruction_grid(originals, reconstructions, path=None, nrow=8, scale=2, captions=None):
    """Rows of originals with the matching reconstructions in the row below."""
    if originals.shape != reconstructions.shape:
        raise ValueError(f"originals {tuple(originals.shape)} and reconstructions "
                         f"{tuple(reconstructions.shape)} differ in shape")
    tiles, caps = [], []
    for start in range(0, len(originals), nrow):
        o, r = originals[start:start + nrow], reconstructions[start:start + nrow]
        tiles += list(o) + list(r)
        if captions is not None:
            caps += list(captions[start:start + nrow]) + ["(reconstruction)"] * len(r)
    return image_grid(tiles, nrow=min(nrow, len(originals)), captions=caps if captions is not None else None,
                      path=path, scale=scale)


def plot_curves(rows, keys, path, x="step", title=None, log_keys=()):
    """One subplot per key of `rows` (dicts, e.g. MetricLog.rows) against `x`; PNG at `path`."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    keys = [k for k in keys if any(_is_num(r.get(k)) for r in rows)]
    if not keys:
        raise ValueError("plot_curves: none of the keys has numeric values")
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.0 * nrows), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        pts = [(float(r[x]), float(r[key])) for r in rows if _is_num(r.get(key)) and _is_num(r.get(x))]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], lw=1.2)
        ax.set_title(key)
        ax.set_xlabel(x)
        ax.grid(alpha=0.3)
        if key in log_keys:
            ax.set_yscale("log")
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _is_num(v):
    try:
        float(v)
        return v != ""
    except (TypeError, ValueError):
        return False
