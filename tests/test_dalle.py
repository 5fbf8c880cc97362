"""The DALL-E transformer: layer schedule and masks, loss weights, padding tokens, cached decoding,
the 12B configuration, files and bad input."""
import math

import pytest
import torch
import torch.nn.functional as F

import dalle_fast
from dalle_fast.models.dalle import DALLE, DALLEConfig, KINDS


def tiny(**kw):
    torch.manual_seed(kw.pop("seed", 0))
    backend = kw.pop("backend", "fused")
    return DALLE(DALLEConfig.tiny(backend=backend, **kw))


def rand_inputs(cfg, batch=2, pad_from=None, seed=1):
    g = torch.Generator().manual_seed(seed)
    text = torch.randint(2, cfg.num_text_tokens, (batch, cfg.text_len), generator=g)
    if pad_from is not None:
        text[:, pad_from:] = 0
    image = torch.randint(0, cfg.num_image_tokens, (batch, cfg.image_len), generator=g)
    return text, image


def test_layers_follow_the_paper_schedule():
    m = tiny(depth=6)
    kinds = [layer.attn.kind for layer in m.layers]
    assert kinds == list(dalle_fast.attention_schedule(6)) == ["row", "column", "row", "row", "row", "conv"]
    assert [layer.attn.attn.kind for layer in m.layers] == kinds


def test_residual_branches_are_separate_modules():
    m = tiny(depth=3)
    blocks = list(m.resblocks())
    assert len(blocks) == 6 and all(isinstance(b, torch.nn.Module) for b in blocks)
    # a branch has no identity path: zeroing its output projection makes it output exactly zero
    x = torch.randn(2, m.config.seq_len, m.config.dim)
    mlp = m.layers[0].mlp
    with torch.no_grad():
        mlp.fc2.weight.zero_()
        mlp.fc2.bias.zero_()
    assert mlp(x).abs().max() == 0


@pytest.mark.parametrize("kind", ["row", "column", "conv"])
def test_one_layer_model_sees_exactly_its_mask(kind):
    """With a single attention layer, logits at position p can depend on token q only where the mask
    allows it (or q == p); every allowed image key does change the output."""
    cfg = DALLEConfig.tiny(depth=1, attention_kinds=[kind], text_len=3, image_size=4, conv_kernel=3)
    torch.manual_seed(0)
    m = DALLE(cfg).double().eval()
    text, image = rand_inputs(cfg, batch=1)
    T, M = cfg.text_len, cfg.image_len
    emb = torch.cat([m.embed_text(text), m.embed_image(image)], 1).detach().requires_grad_(True)
    x = emb
    for layer in m.layers:
        x = layer(x)
    mask = dalle_fast.attention_mask(kind, T, cfg.image_size, cfg.conv_kernel)
    for p in range(T, T + M):
        (g,) = torch.autograd.grad(x[0, p].sum(), emb, retain_graph=True)
        depends = g[0].abs().sum(-1) > 0
        assert torch.equal(depends, mask[p]), f"position {p}"


def test_loss_weights_are_one_eighth_and_seven_eighths():
    m = tiny().double()
    cfg = m.config
    text, image = rand_inputs(cfg, pad_from=5)
    loss, tl, il = m(text, image, return_loss=True)
    tlog, ilog = m(text, image)
    ids = m.text_ids(text)
    ref_t = F.cross_entropy(tlog.reshape(-1, tlog.shape[-1]), ids[:, 1:].reshape(-1))
    ref_i = F.cross_entropy(ilog.reshape(-1, ilog.shape[-1]), image.reshape(-1))
    assert torch.allclose(tl, ref_t) and torch.allclose(il, ref_i)
    assert torch.allclose(loss, ref_t / 8 + 7 * ref_i / 8)
    assert tlog.shape == (2, cfg.text_len - 1, cfg.num_text_tokens + cfg.text_len)
    assert ilog.shape == (2, cfg.image_len, cfg.num_image_tokens)
    m.config.text_loss_weight = 0.5
    assert torch.allclose(m(text, image, return_loss=True)[0], (ref_t + ref_i) / 2)


def test_each_text_position_has_its_own_padding_token():
    m = tiny()
    cfg = m.config
    text = torch.tensor([[5, 6, 0, 0, 0, 0, 0, 0], [5, 6, 7, 0, 0, 0, 0, 0]])
    ids = m.text_ids(text)
    assert ids[0].tolist() == [5, 6] + [cfg.num_text_tokens + i for i in range(2, cfg.text_len)]
    assert ids[1, 3:].tolist() == [cfg.num_text_tokens + i for i in range(3, cfg.text_len)]
    # padding is a token, not a mask: changing the padded length changes the image logits, and
    # only the used padding embeddings receive gradient
    img = torch.randint(0, cfg.num_image_tokens, (2, cfg.image_len))
    m(text, img, return_loss=True)[0].backward()
    g = m.text_emb.weight.grad.abs().sum(-1)
    pads = g[cfg.num_text_tokens:]
    assert (pads[2:] > 0).all() and (pads[:2] == 0).all()
    a = m(text[:1], img[:1])[1]
    b = m(text[1:], img[:1])[1]
    assert not torch.allclose(a, b)


def test_logits_are_fp32_under_bf16_autocast():
    m = tiny()
    text, image = rand_inputs(m.config)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        tl, il = m(text, image)
        loss = m(text, image, return_loss=True)[0]
    assert tl.dtype == il.dtype == loss.dtype == torch.float32 and torch.isfinite(loss)


def test_prefix_forward_matches_full_forward():
    m = tiny().double().eval()
    text, image = rand_inputs(m.config)
    full = m(text, image)[1]
    part = m(text, image[:, :7])[1]
    assert torch.allclose(part, full[:, :7], atol=1e-12)


@pytest.mark.parametrize("batch", [1, 3])
def test_cached_decoding_matches_full_forward(batch):
    m = tiny(depth=3, text_len=5, attention_kinds=["row", "column", "conv"]).double().eval()
    cfg = m.config
    text, image = rand_inputs(cfg, batch=batch, pad_from=3)
    full = m(text, image)[1]
    caches = m.new_kv_caches(batch)
    assert len(caches) == cfg.depth and caches[0].k.shape == (batch, cfg.heads, cfg.seq_len, cfg.dim_head)
    steps = [m.prefill(text, caches)] + [m.decode_step(image[:, j], j, caches) for j in range(cfg.image_len - 1)]
    assert torch.allclose(torch.stack(steps, 1), full, atol=1e-10)


def test_paper_config_has_about_12_billion_parameters():
    with torch.device("meta"):
        m = DALLE(DALLEConfig.paper())
    n = m.num_parameters()
    cfg = m.config
    assert (cfg.depth, cfg.heads, cfg.dim_head, cfg.dim, cfg.text_len, cfg.image_len) == (64, 62, 64, 3968, 256, 1024)
    assert (cfg.num_text_tokens, cfg.num_image_tokens) == (16384, 8192)
    assert abs(n - 12.0e9) / 12.0e9 < 0.03, n
    assert len(list(m.resblocks())) == 128
    assert [layer.attn.kind for layer in m.layers][:4] == ["row", "column", "row", "row"]
    assert m.layers[-1].attn.kind == "conv"


def test_save_and_load(tmp_path):
    m = tiny().eval()
    m.save_pretrained(tmp_path / "d")
    m2 = DALLE.from_pretrained(tmp_path / "d")
    text, image = rand_inputs(m.config)
    assert m2.config == m.config
    assert torch.equal(m(text, image)[1], m2(text, image)[1])
    m.save_pretrained(tmp_path / "h", dtype=torch.float16)
    m3 = DALLE.from_pretrained(tmp_path / "h")
    assert (m3(text, image)[1] - m(text, image)[1]).abs().max() < 1e-2
    with pytest.raises(FileNotFoundError):
        DALLE.from_pretrained(tmp_path / "missing")


def test_bad_input_gives_clear_errors():
    m = tiny()
    cfg = m.config
    text, image = rand_inputs(cfg)
    with pytest.raises(ValueError, match="text_len"):
        m(text[:, :3], image)
    with pytest.raises(ValueError, match="text ids"):
        m(text + cfg.num_text_tokens, image)
    with pytest.raises(TypeError, match="integer"):
        m(text.float(), image)
    with pytest.raises(ValueError, match="image tokens"):
        m(text, torch.cat([image, image], 1))
    with pytest.raises(ValueError, match="image tokens"):
        m(text, image + cfg.num_image_tokens)
    with pytest.raises(ValueError, match="needs all"):
        m(text, image[:, :3], return_loss=True)
    for bad in [dict(depth=0), dict(conv_kernel=4), dict(backend="cuda"), dict(attention_kinds=["row"]),
                dict(text_loss_weight=2.0)]:
        with pytest.raises(ValueError, match="DALLEConfig"):
            DALLEConfig.tiny(**bad)
    with pytest.raises(ValueError, match="unknown"):
        DALLEConfig.from_dict({"bogus": 1})


def test_empty_batch():
    m = tiny()
    cfg = m.config
    tl, il = m(torch.zeros(0, cfg.text_len, dtype=torch.long), torch.zeros(0, cfg.image_len, dtype=torch.long))
    assert tl.shape[0] == il.shape[0] == 0


def test_vae_must_match():
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    vae = DiscreteVAE(DVAEConfig.tiny())
    with pytest.raises(ValueError, match="does not match"):
        DALLE(DALLEConfig.tiny(num_image_tokens=vae.vocab_size + 1, image_size=vae.tokens_per_side), vae=vae)
    m = DALLE(DALLEConfig.tiny(num_image_tokens=vae.vocab_size, image_size=vae.tokens_per_side), vae=vae)
    assert m.vae is vae and not any(k.startswith("vae") for k in m.state_dict())


def test_kinds_constant():
    assert set(KINDS) == {"row", "column", "conv", "full"}
    assert math.isclose(DALLEConfig().text_loss_weight, 1 / 8)
