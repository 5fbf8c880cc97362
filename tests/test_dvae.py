"""DiscreteVAE: shapes of every stage, the loss against an eager float64 computation, the fused
and torch backends agreeing, encode/decode round trip, save/load, and clear errors."""
import json
import math

import pytest
import torch

import dalle_fast
from dalle_fast.checkpoint import CheckpointError
from dalle_fast.models.dvae import (DiscreteVAE, DVAEConfig, codebook_perplexity, kl_to_uniform,
                                    logit_laplace_nll_eager, psnr)
from dalle_fast.testing import devices


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions run fastest single-threaded on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _tiny(**kw):
    torch.manual_seed(0)
    return DiscreteVAE(DVAEConfig.tiny(), **kw)


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("group_count,n_blk", [(4, 1), (3, 2), (1, 1)])
def test_stage_shapes(device, group_count, n_blk):
    cfg = DVAEConfig(image_size=16, n_hid=8, n_blk_per_group=n_blk, vocab_size=24, n_init=8, group_count=group_count)
    torch.manual_seed(0)
    m = DiscreteVAE(cfg).to(device)
    x = torch.rand(3, 3, 16, 16, device=device)
    h = x
    widths = []
    for name, mod in m.encoder.blocks.named_children():
        h = mod(h)
        widths.append((name, tuple(h.shape)))
    ds = 2 ** (group_count - 1)
    assert widths[0] == ("input", (3, 8, 16, 16))
    for g in range(group_count):
        side = 16 // 2 ** min(g + 1, group_count - 1)
        assert widths[1 + g] == (f"group_{g + 1}", (3, 8 * 2 ** g, side, side))
    assert widths[-1] == ("output", (3, 24, 16 // ds, 16 // ds))
    assert m.tokens_per_side == 16 // ds and m.num_tokens == (16 // ds) ** 2 and m.vocab_size == 24
    out = m(x, tau=0.5, beta=1.0)
    assert out["logits"].shape == (3, 24, 16 // ds, 16 // ds) and out["logits"].dtype == torch.float32
    assert out["stats"].shape == (3, 6, 16, 16)
    assert out["tokens"].shape == (3, 16 // ds, 16 // ds) and out["tokens"].dtype == torch.int64
    for k in ("loss", "recon", "kl"):
        assert out[k].dim() == 0 and torch.isfinite(out[k])
    tok = m.encode(x)
    assert tok.shape == (3, 16 // ds, 16 // ds) and tok.dtype == torch.int64
    img = m.decode(tok)
    assert img.shape == (3, 3, 16, 16) and 0 <= img.min() and img.max() <= 1


def test_paper_and_small_configs():
    p, s = DVAEConfig.paper(), DVAEConfig.small()
    assert (p.image_size, p.tokens_per_side, p.vocab_size, p.n_hid, p.n_init) == (256, 32, 8192, 256, 128)
    assert (s.image_size, s.tokens_per_side) == (64, 8)
    # post gain 1 / n_layers^2 = 1/64 for the paper's 4 groups x 2 blocks
    m = DiscreteVAE(DVAEConfig(image_size=32, n_hid=8, vocab_size=16, n_init=8))
    assert m.encoder.blocks.group_1.block_1.post_gain == 1 / 64
    # the paper's init: N(0, 1/sqrt(n_in kw^2)), zero bias
    w = DiscreteVAE(DVAEConfig(image_size=32, n_hid=64, vocab_size=512, n_init=8)).encoder.blocks.group_2.block_1.res_path.conv_2.weight
    assert abs(w.std().item() - 1 / math.sqrt(32 * 9)) < 0.01
    with pytest.raises(ValueError, match="divisible"):
        DVAEConfig(image_size=20)
    with pytest.raises(ValueError, match="multiple of 4"):
        DVAEConfig(n_hid=30)
    with pytest.raises(ValueError, match="unknown dVAE config"):
        DVAEConfig.named("huge")


def _loss64(x, stats, logits, beta, eps=0.1):
    """The paper's objective in float64, written out: [sum NLL + beta sum KL] / (C H W), batch mean."""
    x, stats, logits = x.double(), stats.double(), logits.double()
    c = x.shape[1]
    mu, log_b = stats[:, :c], stats[:, c:]
    xm = (1 - 2 * eps) * x + eps
    nll = torch.log(2 * torch.exp(log_b) * xm * (1 - xm)) + (torch.log(xm / (1 - xm)) - mu).abs() / torch.exp(log_b)
    q = torch.softmax(logits, 1)
    kl = (q * torch.log(q * logits.shape[1])).sum(1)
    dims = x[0].numel()
    return ((nll.flatten(1).sum(1) + beta * kl.flatten(1).sum(1)) / dims).mean()


@pytest.mark.parametrize("backend", ["fused", "torch"])
def test_loss_matches_float64_objective(backend):
    m = _tiny(backend=backend)
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(1)
    out = m(x, tau=0.7, beta=2.5)
    ref = _loss64(x, out["stats"], out["logits"], 2.5)
    assert abs(out["loss"].item() - ref.item()) < 1e-5 * max(1, abs(ref.item()))
    assert abs(kl_to_uniform(torch.zeros(1, 7, 2, 2)).sum().item()) < 1e-5  # uniform q: KL 0


def test_fused_and_torch_backends_agree():
    """Same weights and same Gumbel noise path: the decoder sees identical inputs when tau -> the
    argmax limit is not used; compare the two losses and gradients on the same relaxed codes."""
    m_f, m_t = _tiny(backend="fused"), _tiny(backend="torch")
    x = torch.rand(2, 3, 32, 32)
    stats = m_f.decoder(torch.softmax(m_f.logits(x), 1))
    lf = m_f._recon_loss(x, stats)
    lt = m_t._recon_loss(x, stats)
    assert abs(lf.item() - lt.item()) < 1e-5
    gf, = torch.autograd.grad(lf, stats, retain_graph=True)
    gt, = torch.autograd.grad(lt, stats)
    assert torch.allclose(gf, gt, atol=1e-7, rtol=1e-4)
    # the eager NLL is the logit-Laplace density's negative log
    e = logit_laplace_nll_eager(torch.full((1, 1, 1, 1), 0.3), torch.tensor([[[[0.2]], [[-0.5]]]]))
    xm = 0.8 * 0.3 + 0.1
    b = math.exp(-0.5)
    want = -math.log(1 / (2 * b * xm * (1 - xm)) * math.exp(-abs(math.log(xm / (1 - xm)) - 0.2) / b))
    assert abs(e.item() - want) < 1e-6


def test_gradients_reach_every_parameter():
    m = _tiny()
    out = m(torch.rand(2, 3, 32, 32), tau=1.0, beta=1.0)
    out["loss"].backward()
    for name, p in m.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_decode_tokens_equals_decoder_of_one_hot():
    m = _tiny()
    tok = torch.randint(0, m.vocab_size, (3, 4, 4))
    one_hot = torch.nn.functional.one_hot(tok, m.vocab_size).permute(0, 3, 1, 2).float()
    assert torch.allclose(m.decode_stats(tok), m.decoder(one_hot), atol=1e-6)
    img = m.decode(tok)
    mu = m.decoder(one_hot)[:, :3]
    assert torch.allclose(img, ((torch.sigmoid(mu) - 0.1) / 0.8).clamp(0, 1), atol=1e-6)


def test_encode_is_argmax_of_logits_and_round_trip():
    m = _tiny()
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(m.encode(x), m.logits(x).argmax(1))
    # round trip on a decoded image: tokens are stable for the model's own outputs? Not in general;
    # what must hold: decode(encode(x)) has x's shape, and encode of a batch = encode of each item
    tok = m.encode(x)
    assert torch.equal(torch.cat([m.encode(x[:1]), m.encode(x[1:])]), tok)
    assert m.reconstruct(x).shape == x.shape


def test_non_contiguous_and_channels_last_inputs():
    m = _tiny()
    x = torch.rand(2, 3, 32, 64)[..., ::2]
    assert not x.is_contiguous()
    assert torch.equal(m.encode(x), m.encode(x.contiguous()))
    xc = x.contiguous().to(memory_format=torch.channels_last)
    assert torch.allclose(m.logits(xc), m.logits(x.contiguous()), atol=1e-5)


def test_bf16_autocast_forward_backward():
    m = _tiny()
    x = torch.rand(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = m(x, tau=1.0, beta=1.0)
    assert out["logits"].dtype == torch.float32 and out["stats"].dtype == torch.float32
    out["loss"].backward()
    assert all(torch.isfinite(p.grad).all() for p in m.parameters())


def test_bad_inputs_raise_clear_errors():
    m = _tiny()
    with pytest.raises(ValueError, match="shape"):
        m.encode(torch.rand(3, 32, 32))
    with pytest.raises(ValueError, match="shape"):
        m.encode(torch.rand(1, 4, 32, 32))
    with pytest.raises(ValueError, match="multiples of 8"):
        m.encode(torch.rand(1, 3, 30, 32))
    with pytest.raises(TypeError, match="float"):
        m.encode(torch.zeros(1, 3, 32, 32, dtype=torch.uint8))
    with pytest.raises(ValueError, match="tau"):
        m(torch.rand(1, 3, 32, 32), tau=0.0)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        m.decode(torch.full((1, 4, 4), 64))
    with pytest.raises(TypeError, match="int64"):
        m.decode(torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="backend"):
        DiscreteVAE(DVAEConfig.tiny(), backend="cuda")


def test_empty_batch():
    m = _tiny()
    x = torch.rand(0, 3, 32, 32)
    assert m.encode(x).shape == (0, 4, 4)
    assert m.decode(torch.zeros(0, 4, 4, dtype=torch.long)).shape == (0, 3, 32, 32)


def test_save_and_load_pretrained(tmp_path):
    m = _tiny()
    m.save_pretrained(tmp_path / "dvae")
    cfg = json.loads((tmp_path / "dvae" / "config.json").read_text())
    assert cfg["config"]["vocab_size"] == 64
    m2 = DiscreteVAE.from_pretrained(str(tmp_path / "dvae"))
    assert m2.config == m.config
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    x = torch.rand(1, 3, 32, 32)
    assert torch.equal(m.encode(x), m2.encode(x))


def test_corrupt_or_missing_pretrained_files(tmp_path):
    with pytest.raises(CheckpointError, match="config"):
        DiscreteVAE.from_pretrained(str(tmp_path / "none"))
    d = tmp_path / "dvae"
    _tiny().save_pretrained(d)
    data = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        DiscreteVAE.from_pretrained(str(d))
    (d / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="not found"):
        DiscreteVAE.from_pretrained(str(d))
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt"):
        DiscreteVAE.from_pretrained(str(d))
    # weights of another size than the config says
    e = tmp_path / "other"
    _tiny().save_pretrained(e)
    j = json.loads((e / "config.json").read_text())
    j["config"]["vocab_size"] = 128
    (e / "config.json").write_text(json.dumps(j))
    with pytest.raises(CheckpointError, match="do not match"):
        DiscreteVAE.from_pretrained(str(e))


def test_metrics_helpers():
    assert codebook_perplexity(torch.zeros(10, dtype=torch.long), 8) == pytest.approx(1.0)
    assert codebook_perplexity(torch.arange(8), 8) == pytest.approx(8.0)
    x = torch.rand(2, 3, 4, 4)
    assert psnr(x, x) > 100
    assert psnr(torch.zeros(1, 1, 2, 2), torch.full((1, 1, 2, 2), 0.1)) == pytest.approx(20.0)


def test_uses_fused_kernels(monkeypatch):
    """The default backend goes through dalle_fast's ops, not torch's gumbel_softmax."""
    calls = []
    real_gs, real_ll = dalle_fast.gumbel_softmax, dalle_fast.logit_laplace_loss
    monkeypatch.setattr(dalle_fast, "gumbel_softmax", lambda *a, **k: calls.append("gs") or real_gs(*a, **k))
    monkeypatch.setattr(dalle_fast, "logit_laplace_loss", lambda *a, **k: calls.append("ll") or real_ll(*a, **k))
    monkeypatch.setattr(torch.nn.functional, "gumbel_softmax", lambda *a, **k: pytest.fail("torch path used"))
    _tiny()(torch.rand(1, 3, 32, 32), tau=1.0, beta=0.0)
    assert calls == ["gs", "ll"]


def test_codebook_init_std():
    """None keeps the paper's fan-in rule for the decoder's input conv; a value sets its std."""
    torch.manual_seed(0)
    w = DiscreteVAE(DVAEConfig.tiny()).decoder.blocks.input.weight
    assert abs(w.std().item() - 1 / math.sqrt(64)) < 0.02
    torch.manual_seed(0)
    cfg = DVAEConfig(**{**DVAEConfig.tiny().to_dict(), "codebook_init_std": 1.0})
    w = DiscreteVAE(cfg).decoder.blocks.input.weight
    assert abs(w.std().item() - 1.0) < 0.1
    assert DVAEConfig.from_dict(cfg.to_dict()) == cfg


def test_encoder_output_init_gain():
    """None keeps the paper's fan-in rule for the encoder's output conv; a gain multiplies its std, and
    with it the logits' spread over the codes at initialisation."""
    x = torch.rand(4, 3, 32, 32)
    torch.manual_seed(0)
    paper = DiscreteVAE(DVAEConfig.tiny())
    torch.manual_seed(0)
    cfg = DVAEConfig(**{**DVAEConfig.tiny().to_dict(), "encoder_output_init_gain": 10.0})
    scaled = DiscreteVAE(cfg)
    w0, w1 = paper.encoder.blocks.output.conv.weight, scaled.encoder.blocks.output.conv.weight
    assert torch.allclose(w1, 10 * w0)
    with torch.no_grad():
        assert torch.allclose(scaled.logits(x), 10 * paper.logits(x), rtol=1e-4, atol=1e-5)
    assert DVAEConfig.from_dict(cfg.to_dict()) == cfg
    for bad in (0.0, -1.0, float("nan"), True, "10"):
        with pytest.raises(ValueError, match="encoder_output_init_gain"):
            DVAEConfig(encoder_output_init_gain=bad)


def test_decoder_mu_init():
    """None keeps the paper's zero bias (mid-grey); a value sets the bias of the mu channels only."""
    torch.manual_seed(0)
    assert DiscreteVAE(DVAEConfig.tiny()).decoder.blocks.output.conv.bias.abs().max() == 0
    cfg = DVAEConfig(**{**DVAEConfig.tiny().to_dict(), "decoder_mu_init": -2.0})
    bias = DiscreteVAE(cfg).decoder.blocks.output.conv.bias
    assert torch.equal(bias, torch.tensor([-2.0, -2.0, -2.0, 0.0, 0.0, 0.0]))
    assert DVAEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="decoder_mu_init"):
        DVAEConfig(decoder_mu_init=float("inf"))


def test_auxiliary_mse_and_log_b_floor():
    m = _tiny(backend="torch")
    x = torch.rand(2, 3, 32, 32)
    torch.manual_seed(3)
    a = m(x, tau=1.0, beta=1.0)
    torch.manual_seed(3)
    b = m(x, tau=1.0, beta=1.0, mse_weight=5.0)
    assert torch.allclose(b["loss"], a["loss"] + 5.0 * a["mse"], atol=1e-6)
    mu = a["stats"][:, :3]
    want = (((torch.sigmoid(mu) - 0.1) / 0.8 - x) ** 2).mean()
    assert torch.allclose(a["mse"], want, atol=1e-7)
    m.config.min_log_b = 5.0  # above every ln b: the loss sees exactly b = e^5
    torch.manual_seed(3)
    c = m(x, tau=1.0, beta=0.0)
    assert torch.all(c["stats"][:, 3:] == 5.0)
