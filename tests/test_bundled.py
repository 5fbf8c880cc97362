"""The bundled text-to-image model: it loads from the package and generates with no --checkpoint, and
scripts/make_bundled_model.sh reproduces such a bundle end to end (a shortened run here)."""
import os
import subprocess
import sys

import pytest
import torch

from dalle_fast.generate import bundled_model_dir, generate, load_bundle

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bundled_assets_are_small_and_complete():
    root = bundled_model_dir()
    for need in ("dalle/config.json", "dalle/model.safetensors", "dvae/config.json", "dvae/model.safetensors",
                 "tokenizer.json", "clip/open_clip_config.json", "clip/open_clip_model.safetensors"):
        assert os.path.isfile(os.path.join(root, need)), need
    size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
    # the DALL-E bundle (~8 MB) and the four diffusion models (~12.5 MB)
    assert size < 24 * 2 ** 20, f"bundle is {size / 2 ** 20:.1f} MiB"


def test_bundled_model_generates_with_the_fused_backend_and_reranks():
    model, vae, tok, clip = load_bundle()
    assert model.config.backend == "fused" and clip is not None
    assert model.config.num_image_tokens == vae.vocab_size and model.config.image_size == vae.tokens_per_side
    out = generate(model, vae, ["a large green triangle", "a small red circle"], num_images=3, keep=2,
                   clip=clip, seed=0, tokenizer=tok)
    assert out.images.shape == (2, 2, 3, vae.image_size, vae.image_size)
    assert (out.scores[:, 0] >= out.scores[:, 1]).all()


def _box_fill(image):
    """Lit pixels over their bounding box: about 1 for a square, 0.79 for a circle, 0.5 for a triangle."""
    lit = image.max(0).values > 0.5
    ys, xs = torch.nonzero(lit, as_tuple=True)
    if len(ys) < 20:
        return None
    return lit.sum().item() / ((ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)).item()


def test_bundled_model_draws_shapes_and_composes_a_held_out_one():
    """Triangles fill their bounding box far less than squares, for a seen colour and for green, whose
    triangles were held out of training (zero-shot composition of colour and shape). A model that
    draws blobs for every shape (the previous bundle: 0.74 against 0.80 for green) fails this."""
    model, vae, tok, _ = load_bundle()
    caps = ["a large yellow triangle", "a large red square", "a large green triangle", "a large green square"]
    out = generate(model, vae, caps, num_images=12, seed=0, tokenizer=tok)
    fill = []
    for i in range(len(caps)):
        f = [x for x in map(_box_fill, out.images[i]) if x is not None]
        assert len(f) >= 8, caps[i]
        fill.append(sum(f) / len(f))
    assert fill[0] < fill[1] - 0.15, fill
    assert fill[2] < fill[3] - 0.15, fill


def test_generate_command_without_checkpoint_uses_the_bundle(tmp_path):
    from dalle_fast.cli import main
    out = tmp_path / "g.png"
    assert main(["generate", "a large green triangle", "-n", "2", "--keep", "1", "--out", str(out)]) == 0
    assert out.is_file() and len(os.listdir(tmp_path / "g")) == 1


def test_bundle_script_end_to_end_shortened(tmp_path):
    """The real script with tiny step counts: tokenizer, dVAE, transformer, CLIP, export, grid."""
    env = dict(os.environ, VAE_STEPS="2", TUNE_STEPS="2", TUNE2_STEPS="2", TUNE_MORE="2:1.5e-4 2:1e-4", DALLE_STEPS="3", DALLE_MINUTES="", CLIP_STEPS="2", LENGTH="64", BATCH="8",
               N_SAMPLES="2", KEEP="1", DEST="", GRID=str(tmp_path / "grid.png"), PYTHON=sys.executable)
    before = _asset_digests()
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "make_bundled_model.sh"), str(tmp_path / "work")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert _asset_digests() == before, "DEST='' must leave the bundled model in dalle_fast/assets untouched"
    export = tmp_path / "work" / "dalle" / "export"
    model, vae, tok, clip = load_bundle(str(export))
    assert clip is not None and (tmp_path / "grid.png").is_file()
    # the shipped decoder is the last tuning run's (every image, after tuned_all and tuned_more1), same encoder
    shipped = tmp_path / "work" / "vae" / "tuned_more2" / "model.safetensors"
    assert (tmp_path / "work" / "vae" / "tuned_more1" / "model.safetensors").is_file()
    assert shipped.is_file() and (export / "dvae" / "model.safetensors").read_bytes() == shipped.read_bytes()
    assert model.config.text_len == 16 and model.config.image_size == vae.tokens_per_side == 8
    assert next(model.parameters()).dtype == torch.float32  # exported in fp16, loaded back as fp32


def test_bundle_script_16x16_tokens_shortened(tmp_path):
    """VAE_CONFIG=small16: the same script makes a 16x16-token dVAE and a transformer over its 256 tokens."""
    env = dict(os.environ, VAE_CONFIG="small16", VAE_STEPS="2", TUNE_STEPS="2", TUNE2_STEPS="0", DALLE_STEPS="2",
               DALLE_MINUTES="", CLIP_STEPS="1", LENGTH="32", BATCH="4", DEST="", GRID="", PYTHON=sys.executable)
    grid = os.path.join(ROOT, "docs", "generate_grid.png")
    grid_before = os.path.getmtime(grid)
    r = subprocess.run(["bash", os.path.join(ROOT, "scripts", "make_bundled_model.sh"), str(tmp_path / "work")],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    export = tmp_path / "work" / "dalle" / "export"
    model, vae, _, _ = load_bundle(str(export))
    assert model.config.image_size == vae.tokens_per_side == 16 and vae.image_size == 64
    assert os.path.getmtime(grid) == grid_before, "GRID='' must draw no grid (the README's stays)"
    # TUNE2_STEPS=0: the first tuned decoder is the one shipped
    assert (export / "dvae" / "model.safetensors").read_bytes() == \
        (tmp_path / "work" / "vae" / "tuned" / "model.safetensors").read_bytes()


def _asset_digests():
    import hashlib
    root = os.path.join(ROOT, "dalle_fast", "assets")
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


@pytest.mark.parametrize("caption,channel", [("a large red circle", 0), ("a small blue square", 2),
                                             ("a large green triangle", 1)])
def test_bundled_model_draws_the_named_colour(caption, channel):
    """A guard against shipping an untrained or wrong bundle: the lit pixels of the samples carry the
    caption's colour (green triangles were held out of training: colour composes zero-shot)."""
    from dalle_fast.generate import generate
    model, vae, tok, _ = load_bundle(None)
    out = generate(model, vae, [caption], num_images=4, seed=0, tokenizer=tok)
    img = out.images.flatten(0, 1)                      # (4, 3, H, W)
    lit = img.amax(dim=1, keepdim=True) > 0.5           # object pixels on the black background
    assert lit.float().mean() > 0.01, "the samples are blank"
    mean = (img * lit).sum(dim=(0, 2, 3)) / lit.sum()
    others = [c for c in range(3) if c != channel]
    assert (mean[channel] > mean[others] + 0.3).all(), f"{caption}: mean colour of lit pixels {mean.tolist()}"
