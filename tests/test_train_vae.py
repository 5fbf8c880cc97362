"""dVAE training: schedules, EMA, exact resume after a stop, non-finite steps skipped, bad data
counted, run outputs, the CLI, and a corrupt checkpoint giving a clear error."""
import argparse
import json
import math
import os

import numpy as np
import pytest
import torch
from PIL import Image

from dalle_fast.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from dalle_fast.models.dvae import DiscreteVAE
from dalle_fast.train import common
from dalle_fast.train.vae import TrainVAEConfig, register, train_vae

TINY = dict(config="tiny", batch_size=4, steps=12, log_every=2, sample_every=6, checkpoint_every=4,
            eval_images=4, shapes_length=64, device="cpu", precision="fp32")


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded, above all on a shared, oversubscribed CI box
    (OpenMP barriers wait for descheduled threads); it also makes the runs bitwise repeatable."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_cosine_schedule():
    assert common.cosine(0, 100, 1.0, 1 / 16) == 1.0
    assert common.cosine(100, 100, 1.0, 1 / 16) == 1 / 16
    assert common.cosine(500, 100, 1.0, 1 / 16) == 1 / 16
    assert common.cosine(50, 100, 0.0, 6.6) == pytest.approx(3.3)
    assert common.cosine(25, 100, 0.0, 1.0) == pytest.approx(0.5 * (1 - math.cos(math.pi / 4)))
    vals = [common.cosine(s, 100, 1e-4, 1.25e-6) for s in range(101)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    assert common.cosine(3, 0, 1.0, 2.0) == 2.0
    assert common.scaled_steps(150_000, 3_000_000, 3_000_000) == 150_000
    assert common.scaled_steps(5_000, 3_000_000, 2_000) == 3


def test_train_config_schedules_scale_with_run_length():
    cfg = TrainVAEConfig(steps=1000, lr=1e-3, beta=6.6, beta_frac=0.05, tau_frac=0.5, lr_frac=1.0)
    s0, s_beta, s_tau, s_end = cfg.schedules(0), cfg.schedules(50), cfg.schedules(500), cfg.schedules(1000)
    assert (s0["beta"], s0["tau"], s0["lr"]) == (0.0, 1.0, 1e-3)
    assert s_beta["beta"] == pytest.approx(6.6) and s_tau["tau"] == pytest.approx(1 / 16)
    assert s_end["lr"] == pytest.approx(1e-3 * 1.25e-6 / 1e-4)
    assert 0 < cfg.schedules(25)["beta"] < 6.6 and 1 / 16 < cfg.schedules(250)["tau"] < 1
    long = TrainVAEConfig(steps=2000, beta_frac=0.05)
    assert long.schedules(50)["beta"] < 6.6 and long.schedules(100)["beta"] == pytest.approx(6.6)


def test_ema_tracks_with_warmup():
    m = torch.nn.Linear(2, 2)
    ema = common.EMA(m, decay=0.999)
    assert ema.decay_at(0) == pytest.approx(0.1) and ema.decay_at(10 ** 6) == 0.999
    before = m.weight.detach().clone()
    with torch.no_grad():
        m.weight.fill_(1.0)
    ema.update(m, step=0)            # decay 0.1: 10% old, 90% new
    target = ema.copy_to(torch.nn.Linear(2, 2))
    assert torch.allclose(target.weight, 0.1 * before + 0.9, atol=1e-6)
    for step in range(10 ** 6, 10 ** 6 + 3):
        ema.update(m, step)          # decay 0.999: moves 0.1% of the remaining distance per step
    gap = (ema.shadow["weight"] - 1).abs()
    assert torch.all(gap <= 0.1 * (before - 1).abs() * 0.999 ** 3 + 1e-6)


def _weights(run_dir):
    groups, meta = load_checkpoint(latest_checkpoint(run_dir))
    return groups, meta


def test_resume_after_stop_is_bit_exact(tmp_path):
    # (the one_thread fixture: the same thread count in both runs, so identical reductions)
    full = train_vae(str(tmp_path / "full"), TrainVAEConfig(**TINY), progress=False)
    part = train_vae(str(tmp_path / "part"), TrainVAEConfig(**TINY), progress=False, stop_after=10)
    assert part["steps"] == 10 and not part["finished"]
    # the "killed" run kept its step-8 checkpoint; steps 9-10 are lost and redone
    assert json.load(open(tmp_path / "part" / "checkpoints" / "latest.json"))["step"] == 8
    with pytest.raises(ValueError, match="resume"):
        train_vae(str(tmp_path / "part"), TrainVAEConfig(**TINY), progress=False)
    resumed = train_vae(str(tmp_path / "part"), TrainVAEConfig(**TINY), progress=False, resume=True)
    assert resumed["steps"] == full["steps"] == 12 and resumed["finished"]
    ga, ma = _weights(tmp_path / "full")
    gb, mb = _weights(tmp_path / "part")
    assert ma["step"] == mb["step"] == 12
    for group in ("model", "ema", "optim"):
        assert ga[group].keys() == gb[group].keys()
        for k in ga[group]:
            assert torch.equal(ga[group][k], gb[group][k]), (group, k)
    assert ma["data"] == mb["data"]
    # the metric log holds each step once, as the uninterrupted run's
    rows_a = [r["step"] for r in json.load(open(tmp_path / "full" / "metrics.json"))["history"]]
    rows_b = [r["step"] for r in json.load(open(tmp_path / "part" / "metrics.json"))["history"]]
    assert rows_a == rows_b == sorted(set(rows_a))


def test_run_outputs_and_model_export(tmp_path):
    s = train_vae(str(tmp_path / "run"), TrainVAEConfig(**TINY), progress=False)
    run = tmp_path / "run"
    for f in ("metrics.csv", "metrics.json", "curves.png", "reconstructions.png", "samples/step-00000006.png",
              "model/config.json", "model/model.safetensors"):
        assert (run / f).is_file(), f
    assert s["skipped_steps"] == 0 and s["bad_data"] == 0 and math.isfinite(s["eval_psnr"])
    # the reported perplexity is exp(entropy) of the saved model's codes on the eval batch, recomputed here
    # from its definition: a wrong base, a missing normalisation or the wrong model's codes fail
    from dalle_fast.data import open_dataset
    from dalle_fast.train.vae import _eval_batch
    size = s["model_config"]["image_size"]
    images = _eval_batch(open_dataset("shapes", image_size=size, length=TINY["shapes_length"]),
                         TINY["eval_images"], 0, size)[0]
    with torch.no_grad():
        codes = DiscreteVAE.from_pretrained(str(run / "model")).encode(images).flatten().numpy()
    p = np.bincount(codes, minlength=s["model_config"]["vocab_size"]) / codes.size
    p = p[p > 0]
    assert math.isclose(s["eval_perplexity"], math.exp(-(p * np.log(p)).sum()), rel_tol=1e-9)
    assert 1 <= s["eval_perplexity"] <= min(codes.size, s["model_config"]["vocab_size"])
    hist = json.load(open(run / "metrics.json"))["history"]
    assert [r["step"] for r in hist] == list(range(2, 13, 2))
    assert all(math.isfinite(float(r["loss"])) for r in hist)
    m = DiscreteVAE.from_pretrained(str(run / "model"))
    assert torch.equal(m.state_dict()["encoder.blocks.input.weight"],
                       s["ema_model"].state_dict()["encoder.blocks.input.weight"])


def test_training_reduces_loss(tmp_path):
    cfg = TrainVAEConfig(**dict(TINY, steps=30, lr=3e-3, log_every=10, sample_every=30, checkpoint_every=30))
    train_vae(str(tmp_path / "run"), cfg, progress=False)
    hist = json.load(open(tmp_path / "run" / "metrics.json"))["history"]
    assert float(hist[-1]["recon"]) < float(hist[0]["recon"]) - 0.05
    assert float(hist[-1]["psnr"]) > float(hist[0]["psnr"])


def test_non_finite_loss_is_skipped(tmp_path, monkeypatch):
    real = DiscreteVAE.forward
    calls = {"n": 0}

    def poisoned(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if calls["n"] in (3, 5):
            out["loss"] = out["loss"] * float("nan")
        return out

    monkeypatch.setattr(DiscreteVAE, "forward", poisoned)
    s = train_vae(str(tmp_path / "run"), TrainVAEConfig(**dict(TINY, steps=6)), progress=False)
    assert s["skipped_steps"] == 2 and s["steps"] == 6
    for k, v in s["model"].state_dict().items():
        assert torch.isfinite(v).all(), k
    groups, meta = _weights(tmp_path / "run")
    assert meta["skipped_steps"] == 2
    assert all(torch.isfinite(v).all() for v in groups["ema"].values())


def test_bad_data_in_a_folder_is_counted(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(d / f"{i}.png")
        (d / f"{i}.txt").write_text(f"image {i}")
    (d / "broken.png").write_bytes(b"\x89PNG but not really")
    (d / "broken.txt").write_text("broken")
    (d / "nocap.png").write_bytes((d / "0.png").read_bytes())
    with pytest.warns(Warning):
        s = train_vae(str(tmp_path / "run"), TrainVAEConfig(**dict(TINY, data=str(d), steps=4, eval_images=2)),
                      progress=False)
    assert s["bad_data"] == 2 and s["bad_data_by_reason"] == {"missing_caption": 1, "unreadable_image": 1}
    assert s["finished"]


def test_corrupt_checkpoint_gives_clear_error(tmp_path):
    train_vae(str(tmp_path / "run"), TrainVAEConfig(**dict(TINY, steps=4)), progress=False)
    ck = latest_checkpoint(str(tmp_path / "run"))
    path = os.path.join(ck, "optim.safetensors")
    data = open(path, "rb").read()
    open(path, "wb").write(data[:100])
    with pytest.raises(CheckpointError, match="optim.safetensors"):
        train_vae(str(tmp_path / "run"), TrainVAEConfig(**dict(TINY, steps=8)), progress=False, resume=True)
    open(os.path.join(tmp_path / "run", "checkpoints", "latest.json"), "w").write("{broken")
    with pytest.raises(CheckpointError, match="latest.json"):
        train_vae(str(tmp_path / "run"), TrainVAEConfig(**dict(TINY, steps=8)), progress=False, resume=True)


def test_cli_train_vae(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    register(parser.add_subparsers(dest="command"))
    out = str(tmp_path / "cli")
    args = parser.parse_args(["train-vae", "--data", "shapes", "--out", out, "--steps", "3", "--batch-size", "2",
                              "--config", "tiny", "--no-progress", "--device", "cpu", "--precision", "fp32"])
    assert args.func(args) == 0
    printed = capsys.readouterr().out
    assert "eval PSNR" in printed and "perplexity" in printed
    assert os.path.isfile(os.path.join(out, "model", "model.safetensors"))
    # asking again without --resume refuses to overwrite; with --resume a finished run just reports
    with pytest.raises(ValueError, match="resume"):
        args.func(args)
    args = parser.parse_args(["train-vae", "--out", out, "--steps", "3", "--config", "tiny", "--no-progress",
                              "--resume", "--device", "cpu"])
    assert args.func(args) == 0


def test_bad_arguments():
    with pytest.raises(ValueError, match="steps"):
        train_vae("/nonexistent/never", TrainVAEConfig(steps=0))
    with pytest.raises(ValueError, match="precision"):
        common.choose_precision(torch.device("cpu"), "fp8")
    with pytest.raises(ValueError, match="fp16"):
        common.choose_precision(torch.device("cpu"), "fp16")


def test_on_step_hook_sees_each_forward_before_its_backward(tmp_path):
    seen = []

    def hook(step, model, out, images, sched):
        # before the backward: no gradient yet, and the hook may take its own from the live graph
        assert all(p.grad is None for p in model.parameters())
        g, = torch.autograd.grad(out["recon"], out["logits"], retain_graph=True)
        assert g.shape == out["logits"].shape and torch.isfinite(g).all()
        seen.append((step, images.shape[0], sched["tau"]))

    cfg = TrainVAEConfig(**dict(TINY, steps=3, checkpoint_every=3, sample_every=3))
    train_vae(str(tmp_path / "run"), cfg, progress=False, on_step=hook)
    assert [s for s, _, _ in seen] == [0, 1, 2]
    assert all(b == TINY["batch_size"] for _, b, _ in seen)
    assert [t for _, _, t in seen] == [cfg.schedules(s)["tau"] for s in range(3)]
