"""Sampling: the KV-cached loop draws exactly the tokens of the uncached one, seeds, top-k/top-p,
CLIP reranking order, the generate command, and clear errors on bad input."""
import os

import pytest
import torch

from dalle_fast.data.shapes import Shapes
from dalle_fast.generate import _filter_logits, generate, load_bundle, sample_logits
from dalle_fast.models.dalle import DALLE, DALLEConfig
from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
from dalle_fast.tokenizer import BPETokenizer

CAPS = ["a large red circle", "a small blue square to the left of a yellow triangle"]


@pytest.fixture(scope="module")
def parts():
    torch.manual_seed(0)
    tok = BPETokenizer.train(list(Shapes(300, seed=1).captions()), vocab_size=100)
    vae = DiscreteVAE(DVAEConfig.tiny()).eval()
    cfg = DALLEConfig.tiny(num_text_tokens=tok.vocab_size, num_image_tokens=vae.vocab_size,
                           image_size=vae.tokens_per_side, text_len=12, depth=3,
                           attention_kinds=["row", "column", "conv"])
    model = DALLE(cfg, vae=vae).eval()
    model.tokenizer = tok
    return model, vae, tok


def test_cached_sampling_draws_the_same_tokens_as_uncached(parts):
    model, vae, tok = parts
    m64 = DALLE(model.config, vae=vae).double().eval()
    m64.load_state_dict(model.state_dict())
    m64.tokenizer = tok
    # float64 so that rounding can never move a draw across a probability boundary
    a = generate(m64, vae, CAPS, num_images=3, seed=7)
    b = generate(m64, vae, CAPS, num_images=3, seed=7, use_cache=False)
    assert a.tokens.shape == (2, 3, vae.tokens_per_side, vae.tokens_per_side)
    assert torch.equal(a.tokens, b.tokens)
    assert torch.equal(a.images, b.images)
    # a flat model would make the check vacuous: the samples must differ between sequences
    assert len({tuple(t.flatten().tolist()) for t in a.tokens.flatten(0, 1)}) > 1


def test_fp32_cache_also_matches(parts):
    model, vae, tok = parts
    a = generate(model, vae, CAPS, num_images=2, seed=3, top_k=8)
    b = generate(model, vae, CAPS, num_images=2, seed=3, top_k=8, use_cache=False)
    assert torch.equal(a.tokens, b.tokens)


def test_output_shapes_and_value_range(parts):
    model, vae, tok = parts
    out = generate(model, vae, CAPS[0], num_images=4, seed=0)
    assert out.images.shape == (1, 4, 3, vae.image_size, vae.image_size) and out.scores is None
    assert out.images.min() >= 0 and out.images.max() <= 1 and out.captions == [CAPS[0]]


def test_seed_reproducible_and_batching_invariant(parts):
    model, vae, tok = parts
    a = generate(model, vae, CAPS, num_images=2, seed=11)
    b = generate(model, vae, CAPS, num_images=2, seed=11)
    c = generate(model, vae, CAPS, num_images=2, seed=12)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)


def test_top_k_1_is_greedy(parts):
    model, vae, tok = parts
    out = generate(model, vae, CAPS[:1], num_images=2, seed=0, top_k=1)
    text = tok.tokenize(CAPS[:1], model.config.text_len)
    greedy = []
    with torch.no_grad():
        img = torch.zeros(1, 0, dtype=torch.long)
        for _ in range(model.config.image_len):
            nxt = model.image_logits(model.hidden(text, img)[:, -1]).argmax(-1)
            img = torch.cat([img, nxt[:, None]], 1)
    assert torch.equal(out.tokens[0, 0].flatten(), img[0]) and torch.equal(out.tokens[0, 1], out.tokens[0, 0])


def test_filters():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    assert torch.isinf(_filter_logits(logits, top_k=2)[0, :2]).all()
    assert torch.isfinite(_filter_logits(logits, top_k=2)[0, 2:]).all()
    # top_p: keep the fewest most likely tokens whose mass reaches p
    p = logits.softmax(-1)[0]
    kept = torch.isfinite(_filter_logits(logits, top_p=float(p[3] + 0.01)))[0]
    assert kept.tolist() == [False, False, True, True]
    assert torch.isfinite(_filter_logits(logits, top_p=1.0)).all()
    g = torch.Generator().manual_seed(0)
    draws = torch.stack([sample_logits(logits, top_k=1, generator=g) for _ in range(5)])
    assert (draws == 3).all()


class FakeCLIP:
    """Scores an image by its mean brightness: reranking must return the brightest first."""

    def __init__(self):
        self.calls = []

    def score(self, images, captions):
        self.calls.append(list(captions))
        return images.float().mean((1, 2, 3))


def test_clip_reranking_keeps_the_best_in_order(parts):
    model, vae, tok = parts
    clip = FakeCLIP()
    full = generate(model, vae, CAPS, num_images=6, seed=5)
    best = generate(model, vae, CAPS, num_images=6, seed=5, clip=clip, keep=3)
    assert best.images.shape[:2] == (2, 3) and best.scores.shape == (2, 3)
    assert clip.calls[0] == [c for c in CAPS for _ in range(6)]
    for i in range(2):
        brightness = full.images[i].mean((1, 2, 3))
        order = brightness.argsort(descending=True)[:3]
        assert torch.allclose(best.scores[i], brightness[order])
        assert torch.equal(best.tokens[i], full.tokens[i, order])
        assert (best.scores[i][:-1] >= best.scores[i][1:]).all()


@pytest.mark.parametrize("kwargs,match", [
    (dict(captions=[""]), "empty"),
    (dict(captions=["%%% ###"]), "no known tokens"),
    (dict(captions=[]), "non-empty"),
    (dict(num_images=0), "num_images"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(keep=5, num_images=2), "keep"),
    (dict(keep=1, num_images=2), "CLIP"),
])
def test_bad_input_gives_clear_errors(parts, kwargs, match):
    model, vae, tok = parts
    args = dict(captions=CAPS[:1], num_images=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        generate(model, vae, **args)


def test_generate_command_writes_grid_and_images(parts, tmp_path):
    from PIL import Image
    from dalle_fast.cli import main
    model, vae, tok = parts
    root = tmp_path / "model"
    model.save_pretrained(root / "dalle")
    vae.save_pretrained(root / "dvae")
    tok.save(root / "tokenizer.json")
    m2, v2, t2, clip = load_bundle(str(root))
    assert clip is None and m2.config == model.config
    out = tmp_path / "grid.png"
    rc = main(["generate", CAPS[0], CAPS[1], "--checkpoint", str(root), "-n", "3", "--out", str(out), "--seed", "1"])
    assert rc == 0 and out.is_file()
    files = sorted(os.listdir(tmp_path / "grid"))
    assert len(files) == 6 and Image.open(out).size[0] > 3 * vae.image_size
    assert main(["generate", CAPS[0], "--checkpoint", str(root), "-n", "3", "--keep", "2",
                 "--out", str(out)]) == 2  # --keep needs a CLIP model
    assert main(["generate", "", "--checkpoint", str(root), "--out", str(out)]) == 2
    assert main(["generate", "a red circle", "--checkpoint", str(tmp_path / "nope"), "--out", str(out)]) == 2
    # sampling with 16-bit residual branches (the paper's mixed precision; heads stay fp32)
    m16 = load_bundle(str(root), dtype=torch.bfloat16)[0]
    assert m16.layers[0].mlp.fc1.weight.dtype == torch.bfloat16 and m16.to_image_logits.weight.dtype == torch.float32
    assert main(["generate", CAPS[0], "--checkpoint", str(root), "-n", "2", "--dtype", "bfloat16",
                 "--out", str(tmp_path / "bf16.png")]) == 0 and (tmp_path / "bf16.png").is_file()
