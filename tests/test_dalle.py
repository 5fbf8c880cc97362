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
                dict(text_loss_weight=2.0), dict(dropout=1.0), dict(dropout=-0.1)]:
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


def test_kinds_are_the_ops_and_each_is_its_own_mask():
    """The config takes its kinds from the op's one definition, and each kind reaches the layer as a
    different mask: one model's weights under each kind give pairwise different image logits (kinds
    mapped to one mask, or a layer ignoring its kind, fail). The loss weights: test_loss_weights_*."""
    from dalle_fast.ops.sparse_attention import KINDS as OP_KINDS
    assert KINDS is OP_KINDS and set(KINDS) == {"row", "column", "conv", "full"}
    with pytest.raises(ValueError, match="attention_kinds"):
        DALLEConfig.tiny(depth=1, attention_kinds=["diagonal"])
    base = tiny(depth=1, attention_kinds=["full"])
    text, image = rand_inputs(base.config)
    logits = {}
    for kind in KINDS:
        m = tiny(depth=1, attention_kinds=[kind])
        m.load_state_dict(base.state_dict())
        assert m.layers[0].attn.kind == kind
        with torch.no_grad():
            logits[kind] = m(text, image)[1]
    for a in KINDS:
        for b in KINDS:
            if a < b:
                assert not torch.allclose(logits[a], logits[b], atol=1e-6), (a, b)


def _train_args(tmp_path, **kw):
    from argparse import Namespace
    base = dict(data="shapes", split="train", length=64, vae=str(tmp_path / "vae"), tokenizer=str(tmp_path / "tok.json"),
                run=str(tmp_path / "run"), preset="tiny", dim=None, depth=2, heads=None, dim_head=None, text_len=12,
                conv_kernel=None, backend=None, steps=8, max_minutes=None, batch_size=4, lr=1e-3, warmup=2,
                schedule="cosine", patience=500, weight_decay=4.5e-2, clip=4.0, ema_decay=0.99, ema_every=2,
                bpe_dropout=0.0, precision="fp32", device="cpu", cache_tokens=True, ckpt_every=4, keep_checkpoints=2,
                sample_every=0, sample_captions=None, log_every=1, resume=False, export_fp16=False, threads=None,
                seed=0, quiet=True)
    base.update(kw)
    return Namespace(**base)


def test_train_dalle_resumes_exactly(tmp_path, monkeypatch):
    """A run interrupted after its step-4 checkpoint and resumed ends with the weights of an
    uninterrupted run (BPE dropout off: the tokenizers library's dropout RNG cannot be seeded)."""
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    from dalle_fast.tokenizer import BPETokenizer
    from dalle_fast.train import common
    from dalle_fast.train.dalle import train_dalle
    from dalle_fast.data.shapes import Shapes
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig.tiny()).save_pretrained(tmp_path / "vae")
    BPETokenizer.train(list(Shapes(200).captions()), vocab_size=100).save(tmp_path / "tok.json")
    export = train_dalle(_train_args(tmp_path, run=str(tmp_path / "a")))
    full = DALLE.from_pretrained(f"{export}/dalle")
    rows = [r["loss"] for r in common.MetricLog(str(tmp_path / "a"), ["step", "loss"], resume_step=8).rows]
    assert len(rows) == 8 and all(math.isfinite(x) for x in rows)

    calls = {"n": 0}
    real_update = common.Progress.update

    def interrupt(self, n=1, **kw):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return real_update(self, n, **kw)

    monkeypatch.setattr(common.Progress, "update", interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_dalle(_train_args(tmp_path, run=str(tmp_path / "b")))
    monkeypatch.setattr(common.Progress, "update", real_update)
    assert common.ckpt.latest_checkpoint(str(tmp_path / "b")).endswith("step-00000004")
    export_b = train_dalle(_train_args(tmp_path, run=str(tmp_path / "b"), resume=True))
    resumed = DALLE.from_pretrained(f"{export_b}/dalle")
    for (k, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), k
    assert (tmp_path / "b" / "export" / "tokenizer.json").is_file()
    assert (tmp_path / "b" / "export" / "dvae" / "config.json").is_file()


def test_train_dalle_dropout_and_token_cache_progress(tmp_path, capsys):
    """--dropout reaches the exported config; the token cache shows a progress bar unless --quiet."""
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    from dalle_fast.tokenizer import BPETokenizer
    from dalle_fast.train.dalle import train_dalle
    from dalle_fast.data.shapes import Shapes
    torch.manual_seed(0)
    DiscreteVAE(DVAEConfig.tiny()).save_pretrained(tmp_path / "vae")
    BPETokenizer.train(list(Shapes(200).captions()), vocab_size=100).save(tmp_path / "tok.json")
    export = train_dalle(_train_args(tmp_path, steps=2, dropout=0.25, quiet=False))
    assert DALLE.from_pretrained(f"{export}/dalle").config.dropout == 0.25
    assert "encoding images to tokens" in capsys.readouterr().err
    train_dalle(_train_args(tmp_path, run=str(tmp_path / "q"), steps=2))  # quiet: no bar
    assert "encoding images to tokens" not in capsys.readouterr().err


def test_lr_schedule_warmup_cosine_and_plateau():
    from dalle_fast.train.dalle import LRSchedule
    s = LRSchedule(1.0, warmup=10, total=110, kind="cosine", final_ratio=0.01)
    assert s(0) == pytest.approx(0.1) and s(9) == pytest.approx(1.0)
    assert s(10) == pytest.approx(1.0) and s(60) == pytest.approx(0.505) and s(200) == pytest.approx(0.01)
    p = LRSchedule(1.0, warmup=0, total=10, kind="plateau", patience=3)
    for _ in range(20):
        p.observe(1.0)  # a flat loss: halved every `patience` steps without improvement
    assert p(5) == pytest.approx(0.5 ** 6)  # 19 flat steps after the first: 6 halvings
    with pytest.raises(ValueError, match="schedule"):
        LRSchedule(1.0, 1, 10, kind="linear")


def test_weight_decay_only_on_matrices():
    from dalle_fast.train.dalle import param_groups
    m = tiny()
    decay, no_decay = param_groups(m, 0.1)
    names = {id(p): n for n, p in m.named_parameters()}
    assert all(p.dim() == 2 and "emb" not in names[id(p)] and "image_row" not in names[id(p)] for p in decay["params"])
    assert any("text_emb" in names[id(p)] for p in no_decay["params"])
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
