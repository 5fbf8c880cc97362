"""tune-vae-decoder (dalle_fast.train.vae_decoder): the decoder learns, the encoder and so every image's tokens
stay exactly as they were, limits and bad arguments; scripts/dvae_ceiling.py (the judge on reconstructions) and
scripts/bundle_step_cost.py."""
import importlib.util
import os

import pytest
import torch

from dalle_fast.data.shapes import Shapes
from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
from dalle_fast.train.vae_decoder import TuneDecoderConfig, tune_decoder

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_vae(seed=0):
    torch.manual_seed(seed)
    return DiscreteVAE(DVAEConfig.tiny())


def _images(n=16, seed=5):
    ds = Shapes(length=n, seed=seed, image_size=32)
    return torch.stack([ds[i][0] for i in range(n)])


def test_decoder_learns_and_tokens_do_not_change(tmp_path):
    vae = _tiny_vae()
    enc = {k: v.clone() for k, v in vae.encoder.state_dict().items()}
    dec = {k: v.clone() for k, v in vae.decoder.state_dict().items()}
    x = _images()
    tokens = vae.encode(x)
    s = tune_decoder(vae, tmp_path / "tuned", steps=15, batch_size=8, lr=3e-3, shapes_length=200, eval_images=16)
    assert s["steps"] == 15 and s["psnr_after"] > s["psnr_before"] + 1.0, s
    loaded = DiscreteVAE.from_pretrained(str(tmp_path / "tuned"))
    assert loaded.config == vae.config
    for k, v in loaded.encoder.state_dict().items():
        assert torch.equal(v, enc[k]), k
    assert any(not torch.equal(v, dec[k]) for k, v in loaded.decoder.state_dict().items())
    assert torch.equal(loaded.encode(x), tokens)
    assert all(p.requires_grad for p in vae.parameters())  # the caller's model is left trainable


def test_time_limit_stops_the_run(tmp_path):
    s = tune_decoder(_tiny_vae(), tmp_path / "t", steps=10_000, minutes=1e-4, batch_size=4, shapes_length=100,
                     eval_images=4)
    assert s["steps"] < 10_000 and os.path.isfile(tmp_path / "t" / "model.safetensors")


@pytest.mark.parametrize("bad", [dict(steps=0), dict(batch_size=-1), dict(lr=0.0), dict(minutes=-1.0),
                                 dict(steps=True), dict(eval_images=2.5)])
def test_bad_config_raises(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        TuneDecoderConfig(**bad)


def test_command_from_a_saved_dvae(tmp_path, capsys):
    from dalle_fast.cli import main
    _tiny_vae().save_pretrained(str(tmp_path / "vae"))
    assert main(["tune-vae-decoder", "--vae", str(tmp_path / "vae"), "--out", str(tmp_path / "out"),
                 "--steps", "3", "--batch-size", "4", "--threads", "1", "--quiet"]) == 0
    assert "eval PSNR" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "out" / "config.json")
    assert main(["tune-vae-decoder", "--vae", str(tmp_path / "missing"), "--out", str(tmp_path / "o2")]) != 0


def test_ceiling_script_judges_reconstructions(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("dvae_ceiling", os.path.join(ROOT, "scripts", "dvae_ceiling.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    images, prompts = mod.scenes(16, seed=1)
    assert images.shape == (16, 3, 64, 64) and sum(p.group == "heldout" for p in prompts) == 4
    truth = mod.judged(images, prompts)
    assert truth["all"]["shape"] == 1.0 and truth["heldout"]["shape"] == 1.0
    # an all-black 'reconstruction' gets no shape right: the ceiling can fail
    assert mod.judged(torch.zeros_like(images), prompts)["all"]["shape"] == 0.0
    small = DiscreteVAE(DVAEConfig(image_size=64, group_count=2, n_hid=8, n_blk_per_group=1, vocab_size=16, n_init=8))
    small.save_pretrained(str(tmp_path / "v"))
    assert mod.main([str(tmp_path / "v"), "--count", "8"]) == 0
    out = capsys.readouterr().out
    assert "ground truth" in out and str(tmp_path / "v")[-40:] in out


def test_step_cost_script_times_both_grids(capsys):
    spec = importlib.util.spec_from_file_location("bundle_step_cost", os.path.join(ROOT, "scripts", "bundle_step_cost.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main(["--batch", "1", "--steps", "1", "--dim", "64"]) == 0
    out = capsys.readouterr().out
    assert "8x8 image tokens" in out and "16x16 image tokens" in out


def test_small16_preset_gives_a_16x16_grid():
    cfg = DVAEConfig.named("small16")
    assert (cfg.image_size, cfg.tokens_per_side, cfg.vocab_size) == (64, 16, 512)
    vae = DiscreteVAE(cfg)
    assert vae.encode(_images(2, seed=1).repeat(1, 1, 2, 2)).shape == (2, 16, 16)
