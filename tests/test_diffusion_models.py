"""The diffusion families end to end at toy scale: the frozen text encoders (MiniLM against
sentence-transformers, the file hash, the cache), the trainers (exact resume), the Imagen and unCLIP
pipelines, and the command line (generate --model, vary, interpolate)."""
import os

import pytest
import torch

from dalle_fast.diffusion import DiffusionPrior, Imagen, PixelDiffusion, UnCLIP, UNetConfig
from dalle_fast.diffusion import text_encoder as te


@pytest.fixture(scope="module")
def minilm():
    return te.BertEncoder.from_pretrained("minilm")  # also checks model.safetensors' SHA-256


@pytest.fixture(scope="module")
def clip_text():
    return te.CLIPTextEncoder.from_pretrained()


def test_minilm_matches_sentence_transformers(minilm, tmp_path):
    st = pytest.importorskip("sentence_transformers")
    import all_minilm_l6_v2
    caps = ["a large red circle", "a small blue square to the left of a large yellow triangle", "a big red disc"]
    ref = st.SentenceTransformer(str(all_minilm_l6_v2.extract_model(str(tmp_path))), device="cpu")
    expect = torch.from_numpy(ref.encode(caps))
    torch.testing.assert_close(minilm.sentence_embedding(caps), expect, atol=1e-5, rtol=1e-4)


def test_minilm_similarity_ordering(minilm):
    e = minilm.sentence_embedding(["a large red circle", "a big red disc", "a small blue square"])
    assert float(e[0] @ e[1]) > float(e[0] @ e[2])


def test_encoder_cache_encodes_each_caption_once(minilm, monkeypatch):
    calls = []
    real = minilm._encode_uncached
    monkeypatch.setattr(minilm, "_encode_uncached", lambda caps: calls.append(list(caps)) or real(caps))
    minilm._cache.clear()
    a, ma = minilm.encode(["a small red square", "a large cyan circle", "a small red square"])
    b, mb = minilm.encode(["a large cyan circle"])
    assert calls == [["a small red square", "a large cyan circle"]]
    assert a.shape[:2] == ma.shape and a.shape[-1] == 384
    n = int(mb[0].sum())
    torch.testing.assert_close(b[0, :n], a[1, :n])
    torch.testing.assert_close(a[0], a[2])


def test_missing_encoder_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="text encoder directory not found"):
        te.load_text_encoder(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        te.load_text_encoder(str(tmp_path))


def test_clip_text_encoder(clip_text):
    tokens, mask = clip_text.encode(["a large red circle", "a small blue square above a large green circle"])
    assert tokens.shape[0] == 2 and tokens.shape[-1] == clip_text.dim and bool(mask.all())
    assert not torch.allclose(tokens[0], tokens[1])


# ---- pipelines ---------------------------------------------------------------------------------
def _pixel(**kw):
    cfg = dict(image_size=16, base=8, mults=(1, 2), res_blocks=(1, 1), attn_levels=(1,), heads=2, patch=2)
    up = kw.pop("upsampler", False)
    cfg.update(kw)
    if up:
        cfg.update(image_size=32, attn_levels=(), low_res_channels=3)
    return PixelDiffusion(UNetConfig(**cfg), text_encoder="clip" if cfg.get("cond_dim") and not
                          cfg.get("embed_tokens") else None).eval()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, clip_text):
    d = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    _pixel(cond_dim=clip_text.dim).save_pretrained(str(d / "imagen"))
    dim = clip_text.clip.embed_texts(["a"]).shape[-1]
    _pixel(cond_dim=dim, embed_tokens=2).save_pretrained(str(d / "unclip_decoder"))
    DiffusionPrior(dim, width=32, layers=1).save_pretrained(str(d / "prior"))
    _pixel(upsampler=True).save_pretrained(str(d / "upsampler"))
    return str(d)


def test_imagen_pipeline(bundle, clip_text):
    pipe = Imagen.load(bundle, text_encoder=clip_text)
    out = pipe.generate(["a large red circle", "a small blue square"], n=2, steps=3, up_steps=2, guidance=4.0)
    assert out.shape == (2, 2, 3, 32, 32) and float(out.min()) >= 0 and float(out.max()) <= 1
    low = pipe.generate("a large red circle", n=1, steps=3, upsample=False)
    assert low.shape == (1, 1, 3, 16, 16)
    again = pipe.generate("a large red circle", n=1, steps=3, upsample=False)
    torch.testing.assert_close(low, again)  # seeded


def test_unclip_pipeline(bundle):
    pipe = UnCLIP.load(bundle)
    out = pipe.generate(["a large red circle"], n=3, steps=2, prior_steps=3, up_steps=2)
    assert out.shape == (1, 3, 3, 32, 32)
    img = torch.rand(3, 64, 64)
    assert pipe.vary(img, n=2, steps=2, upsample=False).shape == (2, 3, 16, 16)
    frames = pipe.interpolate(img, torch.rand(3, 64, 64), frames=3, steps=2, upsample=False)
    assert frames.shape == (3, 3, 16, 16)
    with pytest.raises(ValueError, match="image must be"):
        pipe.vary(torch.rand(1, 3, 64, 64))


def test_prior_keeps_best_candidate(monkeypatch):
    import dalle_fast.diffusion.prior as prior_mod
    torch.manual_seed(0)
    prior = DiffusionPrior(8, width=16, layers=1).eval()
    text = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    z = prior.sample(text, candidates=4, steps=3, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(z.norm(dim=-1), torch.ones(3))
    drawn = torch.nn.functional.normalize(torch.randn(4 * 3, 8), dim=-1)  # candidate c of caption b at c * 3 + b
    monkeypatch.setattr(prior_mod, "sample", lambda *a, **k: drawn.clone())
    best = prior.sample(text, candidates=4)
    sims = (drawn.view(4, 3, 8) * text).sum(-1)
    torch.testing.assert_close(best, drawn.view(4, 3, 8)[sims.argmax(0), torch.arange(3)])
    with pytest.raises(ValueError, match="text_emb must be"):
        prior.sample(torch.randn(3, 5))


def test_residual_upsampler_starts_at_bilinear_and_learns_the_residual():
    torch.manual_seed(0)
    cfg = dict(image_size=32, base=8, mults=(1, 2), res_blocks=(1, 1), attn_levels=(), low_res_channels=3, patch=2)
    up = PixelDiffusion(UNetConfig(**cfg), param="x0", residual=True, snr_gamma=5.0).eval()
    low = torch.rand(2, 3, 16, 16) * 2 - 1
    out = up.sample(2, low_res=low, steps=3, threshold="static", generator=torch.Generator().manual_seed(0))
    # the output layer starts at zero: an x0-predicting residual model returns the bilinear upsampling
    torch.testing.assert_close(out, up.upsampled(low, 32))
    hi = torch.rand(2, 3, 32, 32) * 2 - 1
    up.train()
    loss = up.loss(hi, low_res=low)
    assert loss.ndim == 0 and loss.item() > 0
    captured = {}
    up.schedule.target = lambda x0, noise, t, param: captured.setdefault("x0", x0)
    up.loss(hi, low_res=low)
    torch.testing.assert_close(captured["x0"], hi - up.upsampled(low, 32))  # the residual is diffused
    with pytest.raises(ValueError, match="residual"):
        PixelDiffusion(UNetConfig(image_size=16, base=8, mults=(1, 2), res_blocks=(1, 1)), residual=True)
    with pytest.raises(ValueError, match="snr_gamma"):
        PixelDiffusion(UNetConfig(**cfg), snr_gamma=-1.0)


def test_time_box_refits_to_the_pace():
    from dalle_fast.train.common import time_box_steps
    assert time_box_steps(5, 5, 10.0, 1, 20000) == 30          # 2 s/step, 50 s left: 25 more
    assert time_box_steps(100, 100, 30.0, 1, 20000) == 200     # 0.3 s/step, 30 s left
    assert time_box_steps(100, 100, 70.0, 1, 20000) == 100     # over the box: stop now
    assert time_box_steps(5, 5, 0.5, 10, 50) == 50             # never beyond the upper bound


# ---- trainers and command line ---------------------------------------------------------------------
def _cli(*argv):
    from dalle_fast.cli import main
    return main([str(a) for a in argv])


def _weights(path):
    from dalle_fast.checkpoint import load_safetensors
    return load_safetensors(os.path.join(path, "model.safetensors"))


def test_train_prior_resumes_exactly(tmp_path):
    common = ["--length", 64, "--batch-size", 4, "--width", 16, "--layers", 1, "--warmup", 2, "--ckpt-every", 2,
              "--quiet", "--threads", 1, "--log-every", 1]
    assert _cli("train-prior", "--out", tmp_path / "a", "--steps", 4, *common) == 0
    assert _cli("train-prior", "--out", tmp_path / "b", "--steps", 4, "--stop-at", 2, *common) == 0
    assert _cli("train-prior", "--out", tmp_path / "b", "--steps", 4, "--resume", *common) == 0
    a, b = _weights(tmp_path / "a" / "export"), _weights(tmp_path / "b" / "export")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert os.path.isfile(tmp_path / "a" / "curves.png")


@pytest.mark.parametrize("stage", [["train-diffusion", "--model", "imagen", "--text-encoder", "clip"],
                                   ["train-diffusion", "--model", "unclip"], ["train-upsampler"]])
def test_train_stages_run(tmp_path, stage):
    assert _cli(*stage, "--out", tmp_path, "--steps", 2, "--length", 16, "--batch-size", 2, "--width", 8,
                "--quiet", "--threads", 1, "--ckpt-every", 0) == 0
    model = PixelDiffusion.from_pretrained(str(tmp_path / "export"))
    assert model.config.image_size == (64 if stage[0] == "train-upsampler" else 32)


def test_cli_generate_vary_interpolate(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(te, "load_text_encoder", lambda name: te.CLIPTextEncoder.from_pretrained())
    out = tmp_path / "g.png"
    assert _cli("generate", "a large red circle", "--model", "imagen", "--diffusion-dir", bundle, "-n", 2,
                "--steps", 2, "--up-steps", 2, "--out", out) == 0
    assert out.is_file() and len(os.listdir(tmp_path / "g")) == 2
    assert _cli("generate", "a large red circle", "--model", "unclip", "--diffusion-dir", bundle, "-n", 2,
                "--keep", 1, "--steps", 2, "--up-steps", 2, "--out", tmp_path / "u.png") == 0
    from PIL import Image
    Image.new("RGB", (64, 64), (255, 0, 0)).save(tmp_path / "a.png")
    Image.new("RGB", (64, 64), (0, 0, 255)).save(tmp_path / "b.png")
    assert _cli("vary", tmp_path / "a.png", "--diffusion-dir", bundle, "-n", 2, "--steps", 2, "--no-upsample",
                "--out", tmp_path / "v.png") == 0
    assert _cli("interpolate", tmp_path / "a.png", tmp_path / "b.png", "--diffusion-dir", bundle, "--frames", 3,
                "--steps", 2, "--no-upsample", "--out", tmp_path / "i.png") == 0
    assert (tmp_path / "v.png").is_file() and (tmp_path / "i.png").is_file()
    assert _cli("vary", tmp_path / "missing.png", "--diffusion-dir", bundle) == 2
    assert _cli("generate", "x", "--model", "imagen", "--diffusion-dir", tmp_path / "none") == 2
    assert _cli("generate", "x", "--model", "imagen", "--diffusion-dir", bundle, "-w", -1) == 2


def test_families_demo_with_the_bundled_models(tmp_path):
    from dalle_fast.demo import HELD_OUT, SEEN, run_families_demo
    path, per_image = run_families_demo(out=str(tmp_path), num_images=1, steps=2, up_steps=2, progress=False)
    from PIL import Image
    with Image.open(path) as im:
        assert im.width > 3 * 64 and im.height > len(SEEN + HELD_OUT) * 64
    assert set(per_image) == {"dalle", "imagen", "unclip"}


def _script_with_bundled_first_stages(tmp_path, **sizes):
    """scripts/make_diffusion_models.sh over a work directory that already holds the four first stages
    (the bundled exports), so only the second stages run (2 steps each): returns (work, dest)."""
    import shutil
    import subprocess
    import sys
    from dalle_fast.diffusion.pipelines import bundled_diffusion_dir
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work, dest = tmp_path / "work", tmp_path / "dest"
    for m in ("imagen", "unclip_decoder", "prior", "upsampler"):
        shutil.copytree(os.path.join(bundled_diffusion_dir(), m), work / m / "export")
    env = dict(os.environ, STEPS="2", BATCH="2", MORE_LR="3e-4", PYTHON=sys.executable, DEST=str(dest),
               **sizes)
    r = subprocess.run(["bash", os.path.join(root, "scripts", "make_diffusion_models.sh"), str(work)],
                       env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for m in ("imagen", "unclip_decoder", "prior", "upsampler"):
        assert f"{m}: {work / m / 'export'} exists, skipped" in r.stdout
    return work, dest


def _same_files(a, b):
    return sorted(os.listdir(a)) == sorted(os.listdir(b)) and all(
        open(os.path.join(a, f), "rb").read() == open(os.path.join(b, f), "rb").read() for f in os.listdir(a))


def test_diffusion_bundle_script_second_stages(tmp_path):
    """The second stages start from the first stages' exports (a warm restart at MORE_LR) and are
    what the script ships as imagen/ and unclip_decoder/; prior and upsampler ship as trained."""
    import csv
    work, dest = _script_with_bundled_first_stages(tmp_path)
    for first, more in (("imagen", "imagen_more"), ("unclip_decoder", "unclip_decoder_more")):
        assert _same_files(work / more / "export", dest / first)
        with open(work / more / "export" / "config.json") as a, open(work / first / "export" / "config.json") as b:
            assert a.read() == b.read()  # same architecture, so --init loaded the first stage's weights
        with open(work / more / "metrics.csv") as f:
            last = list(csv.DictReader(f))[-1]
        # step 2 of the script's 50-step warm-up towards MORE_LR (the first stages' lr is 1e-3)
        assert int(last["step"]) == 2 and float(last["lr"]) == pytest.approx(3e-4 * 2 / 50)
        a, b = _weights(work / more / "export"), _weights(work / first / "export")
        moved = sum(float((a[k] - b[k]).norm() ** 2) for k in a) ** 0.5
        assert 0 < moved < 0.01 * sum(float(b[k].norm() ** 2) for k in b) ** 0.5  # --init, then 2 tiny steps
    for m in ("prior", "upsampler"):
        assert _same_files(work / m / "export", dest / m)


def test_diffusion_bundle_script_without_second_stages(tmp_path):
    work, dest = _script_with_bundled_first_stages(tmp_path, IMAGEN_MORE_MIN="0", UNCLIP_MORE_MIN="0")
    assert not (work / "imagen_more").exists() and not (work / "unclip_decoder_more").exists()
    for m in ("imagen", "unclip_decoder", "prior", "upsampler"):
        assert _same_files(work / m / "export", dest / m)


def test_eval_diffusion_background_stats():
    """Shapes' clean black background reads as level ~0 and little speckle; grey noise on it does not."""
    import importlib.util
    import torch.nn.functional as F
    from dalle_fast.data.shapes import Shapes
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("eval_diffusion", os.path.join(root, "scripts", "eval_diffusion.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    ds = Shapes(length=16, seed=0, image_size=64)
    clean = F.interpolate(torch.stack([ds[i][0] for i in range(16)]).float(), size=32, mode="area")
    level, speckle = mod.background_stats(clean)
    assert level < 0.03 and speckle < 0.03
    noisy = (clean + 0.15 + 0.1 * torch.randn(clean.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    n_level, n_speckle = mod.background_stats(noisy.view(4, 4, 3, 32, 32))
    assert n_level > 0.1 and n_speckle > 3 * speckle + 0.03
