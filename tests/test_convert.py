"""The converter from OpenAI's released dVAE format (`dall-e` package) to DiscreteVAE: the package's
Encoder/Decoder with random weights (nothing downloaded) and ours give the same logits and stats."""
import pytest
import torch

from dalle_fast.models.convert import config_from_openai, convert_openai_state_dicts, from_openai

dall_e = pytest.importorskip("dall_e", reason="the DALL-E package (pip install DALL-E attrs) is a test-only peer")


@pytest.fixture(autouse=True)
def one_thread():
    """Small convolutions run fastest single-threaded on a shared, oversubscribed CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _randomise(*modules, seed=0):
    """Released weights are not N(0, init): give every tensor (biases too) non-trivial values."""
    g = torch.Generator().manual_seed(seed)
    for m in modules:
        for p in m.parameters():
            with torch.no_grad():
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / p[0].numel() ** 0.5 if p.dim() > 1 else 0.1))


@pytest.mark.parametrize("n_blk,n_hid,vocab,n_init,size", [(1, 64, 512, 32, 32), (2, 64, 600, 16, 16)])
def test_openai_encoder_decoder_match(n_blk, n_hid, vocab, n_init, size):
    torch.manual_seed(0)
    enc = dall_e.Encoder(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=vocab)
    dec = dall_e.Decoder(n_hid=n_hid, n_blk_per_group=n_blk, vocab_size=vocab, n_init=n_init)
    _randomise(enc, dec)
    model = from_openai(enc, dec, image_size=size)
    cfg = model.config
    assert (cfg.n_hid, cfg.n_blk_per_group, cfg.vocab_size, cfg.n_init, cfg.group_count) == (n_hid, n_blk, vocab, n_init, 4)
    x = torch.rand(2, 3, size, size)
    with torch.no_grad():
        want_logits = enc(dall_e.map_pixels(x))
        got_logits = model.logits(x)
        assert torch.allclose(got_logits, want_logits, atol=1e-5, rtol=1e-5)
        tokens = got_logits.argmax(1)
        assert torch.equal(model.encode(x), want_logits.argmax(1))
        one_hot = torch.nn.functional.one_hot(tokens, vocab).permute(0, 3, 1, 2).float()
        want_stats = dec(one_hot)
        assert torch.allclose(model.decode_stats(tokens), want_stats, atol=1e-5, rtol=1e-5)
        # relaxed (soft) codes go through the decoder the same way
        soft = torch.softmax(want_logits, 1)
        assert torch.allclose(model.decoder(soft), dec(soft), atol=1e-5, rtol=1e-5)
        # the released pipeline's reconstruction: unmap_pixels(sigmoid(stats[:, :3]))
        want_img = dall_e.unmap_pixels(torch.sigmoid(want_stats[:, :3]))
        assert torch.allclose(model.decode(tokens), want_img, atol=1e-6)


def test_convert_from_state_dicts_and_key_mapping():
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_hid=64, n_blk_per_group=1, vocab_size=512, n_init=32)
    sd, cfg = convert_openai_state_dicts(enc.state_dict(), dec.state_dict())
    assert len(sd) == len(enc.state_dict()) + len(dec.state_dict())
    assert torch.equal(sd["encoder.blocks.group_2.block_1.id_path.weight"], enc.blocks.group_2.block_1.id_path.w)
    assert torch.equal(sd["decoder.blocks.output.conv.bias"], dec.blocks.output.conv.b)
    assert cfg.vocab_size == 512


def test_convert_rejects_mismatched_or_foreign_weights():
    enc = dall_e.Encoder(n_hid=64, n_blk_per_group=1, vocab_size=512)
    dec = dall_e.Decoder(n_hid=64, n_blk_per_group=1, vocab_size=1024, n_init=32)
    with pytest.raises(ValueError, match="vocabulary"):
        from_openai(enc, dec)
    with pytest.raises(ValueError, match="missing"):
        config_from_openai({"foo": torch.zeros(1)}, dec.state_dict())
    with pytest.raises(TypeError, match="state dict"):
        from_openai("encoder.pkl", dec)
