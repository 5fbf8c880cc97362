"""CLIP reranking: open_clip local-dir round trip, a built-in-style architecture from a checkpoint
file, scores and rerank order, train-clip, and clear errors. Nothing is downloaded."""
import json

import pytest
import torch
import torch.nn.functional as F

from dalle_fast.clip import CLIPReranker, build_clip, save_clip, shapes_clip_config
from dalle_fast.data.shapes import Shapes
from dalle_fast.tokenizer import BPETokenizer


@pytest.fixture(scope="module")
def tok_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    BPETokenizer.train(list(Shapes(300, seed=2).captions()), vocab_size=100).save(path)
    return str(path)


@pytest.fixture(scope="module")
def batch():
    ds = Shapes(6, seed=4)
    return torch.stack([ds[i][0] for i in range(6)]), [ds[i][1] for i in range(6)]


def _shapes_clip(tok_file, tmp_path):
    torch.manual_seed(0)
    tok = BPETokenizer.from_file(tok_file)
    cfg = shapes_clip_config(tok.vocab_size, 16, width=64)
    model = build_clip(cfg).eval()
    save_clip(model, tmp_path / "clip", cfg, tokenizer_file=tok_file)
    return model, tok, tmp_path / "clip"


def test_local_dir_round_trip_scores_are_cosines(tok_file, batch, tmp_path):
    model, tok, path = _shapes_clip(tok_file, tmp_path)
    meta = json.loads((path / "open_clip_config.json").read_text())
    assert meta["dalle_fast_tokenizer"] == "tokenizer.json" and "model_cfg" in meta
    r = CLIPReranker.from_pretrained(str(path))
    images, caps = batch
    scores = r.score(images, caps)
    with torch.no_grad():
        im = F.normalize(model.encode_image((images - 0.5) / 0.5), dim=-1)
        tx = F.normalize(model.encode_text(tok.tokenize(caps, 16)), dim=-1)
    assert torch.allclose(scores, (im * tx).sum(-1), atol=1e-5)
    assert scores.shape == (6,) and (scores.abs() <= 1 + 1e-6).all()
    # one caption for many images: the same numbers as passing it per image
    assert torch.allclose(r.score(images, caps[0]), r.score(images, [caps[0]] * 6), atol=1e-6)


def test_padding_is_a_token_not_a_truncation(tok_file, batch, tmp_path):
    _, _, path = _shapes_clip(tok_file, tmp_path)
    r = CLIPReranker.from_pretrained(str(path))
    e = r.embed_texts(["a large red circle", "a large red circle above a small blue square"])
    assert not torch.allclose(e[0], e[1])


def test_rerank_returns_best_first(tok_file, batch, tmp_path):
    _, _, path = _shapes_clip(tok_file, tmp_path)
    r = CLIPReranker.from_pretrained(str(path))
    images, caps = batch
    scores = r.score(images, caps[0])
    best, best_scores = r.rerank(images, caps[0], keep=3)
    order = scores.argsort(descending=True)[:3]
    assert torch.equal(best, images[order]) and torch.allclose(best_scores, scores[order])
    assert (best_scores[:-1] >= best_scores[1:]).all()


def test_builtin_style_architecture_from_a_checkpoint_file(tmp_path, batch):
    """Any open_clip architecture with a local weights file: registered here as a tiny config (the
    standard open_clip text tower and tokenizer, whose vocabulary file ships with open_clip)."""
    import open_clip
    cfg = {"embed_dim": 32, "vision_cfg": {"image_size": 32, "layers": 1, "width": 64, "patch_size": 8},
           "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (tmp_path / "cfgs").mkdir()
    (tmp_path / "cfgs" / "dalle-fast-test-tiny.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(str(tmp_path / "cfgs"))
    torch.manual_seed(0)
    model = open_clip.create_model("dalle-fast-test-tiny").eval()
    torch.save(model.state_dict(), tmp_path / "w.pt")
    r = CLIPReranker.from_pretrained(str(tmp_path / "w.pt"), arch="dalle-fast-test-tiny")
    images, caps = batch
    with torch.no_grad():
        x = F.interpolate(images, size=(32, 32), mode="bilinear", align_corners=False, antialias=True)
        mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN).view(1, 3, 1, 1)
        std = torch.tensor(open_clip.OPENAI_DATASET_STD).view(1, 3, 1, 1)
        im = F.normalize(model.encode_image((x - mean) / std), dim=-1)
        tx = F.normalize(model.encode_text(open_clip.get_tokenizer("dalle-fast-test-tiny")(caps)), dim=-1)
    assert torch.allclose(r.score(images, caps), (im * tx).sum(-1), atol=1e-5)


def test_errors(tok_file, batch, tmp_path):
    with pytest.raises(FileNotFoundError):
        CLIPReranker.from_pretrained(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="open_clip_config"):
        CLIPReranker.from_pretrained(str(tmp_path / "empty"))
    (tmp_path / "w.pt").write_bytes(b"x")
    with pytest.raises(ValueError, match="architecture"):
        CLIPReranker.from_pretrained(str(tmp_path / "w.pt"))
    with pytest.raises(ValueError, match="unknown open_clip architecture"):
        CLIPReranker.from_pretrained(str(tmp_path / "w.pt"), arch="no-such-arch")
    _, _, path = _shapes_clip(tok_file, tmp_path)
    r = CLIPReranker.from_pretrained(str(path))
    images, caps = batch
    with pytest.raises(ValueError, match="captions"):
        r.score(images, caps[:2])
    with pytest.raises(ValueError, match="images must be"):
        r.score(images[:, :1], caps)


@pytest.mark.parametrize("hard_negatives", [False, True])
def test_train_clip_learns(tok_file, tmp_path, hard_negatives):
    from argparse import Namespace
    from dalle_fast.train.clip import train_clip
    args = Namespace(data="shapes", split="train", length=2000, tokenizer=tok_file, out=str(tmp_path / "c"),
                     image_size=64, text_len=16, embed_dim=32, width=64, layers=1, steps=40,
                     batch_size=16 if hard_negatives else 32, hard_negatives=hard_negatives, patch_size=8,
                     lr=2e-3, warmup=5, weight_decay=0.1, device="cpu", log_every=5, seed=0, quiet=True,
                     through_vae=None, vae_fraction=1.0)
    out = train_clip(args)
    rows = json.loads((tmp_path / "c" / "metrics.json").read_text())["history"]
    first, last = rows[0]["loss"], sum(r["loss"] for r in rows[-2:]) / 2
    assert last < first - 0.2, (first, last)
    r = CLIPReranker.from_pretrained(out)
    # the saved reranker learned something about the pictures: on fresh Shapes images, each image scores
    # its own caption above the others' captions more often than chance (a reranker that ignores the
    # image, loads the wrong weights or mixes up the towers scores at chance)
    ds = Shapes(32, seed=123, split="train")
    images = torch.stack([ds[i][0] for i in range(32)])
    caps = [ds[i][1] for i in range(32)]
    with torch.no_grad():
        sims = torch.stack([r.score(images, [c] * 32) for c in caps], 1)  # sims[i, j]: image i, caption j
    assert sims.shape == (32, 32)
    own = sims.diagonal()
    wins = (own[:, None] > sims).float().sum() / (32 * 31)
    assert wins > 0.6, float(wins)


def test_through_vae_replaces_the_chosen_share_by_reconstructions():
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    from dalle_fast.train.clip import through_vae
    torch.manual_seed(0)
    vae = DiscreteVAE(DVAEConfig.tiny()).eval()
    ds = Shapes(8, image_size=32, seed=5)
    images = torch.stack([ds[i][0] for i in range(8)])
    every = through_vae(vae, images, 1.0)
    torch.testing.assert_close(every, vae.reconstruct(images).clamp(0, 1))
    assert torch.equal(through_vae(vae, images, 0.0), images)
    half = through_vae(vae, images, 0.5, torch.Generator().manual_seed(3))
    same = (half == images).flatten(1).all(1)
    recon = (half == every).flatten(1).all(1)
    assert bool((same | recon).all()) and 0 < int(recon.sum()) < 8 and not torch.equal(images, every)
    with pytest.raises(ValueError, match="fraction"):
        through_vae(vae, images, 1.5)


def test_train_clip_through_vae(tok_file, tmp_path):
    """--through-vae trains on dVAE reconstructions (a dVAE of another image size is refused by name)."""
    from argparse import Namespace
    from dalle_fast.models.dvae import DiscreteVAE, DVAEConfig
    from dalle_fast.train.clip import train_clip
    DiscreteVAE(DVAEConfig.tiny()).save_pretrained(tmp_path / "vae")
    kw = dict(data="shapes", split="train", length=200, tokenizer=tok_file, out=str(tmp_path / "c"), text_len=16,
              embed_dim=32, width=64, layers=1, steps=3, batch_size=4, hard_negatives=True, patch_size=8, lr=2e-3,
              warmup=1, weight_decay=0.1, device="cpu", log_every=1, seed=0, quiet=True,
              through_vae=str(tmp_path / "vae"), vae_fraction=1.0)
    with pytest.raises(ValueError, match="--through-vae"):
        train_clip(Namespace(image_size=64, **kw))
    out = train_clip(Namespace(image_size=32, **kw))
    assert CLIPReranker.from_pretrained(out).score(torch.rand(2, 3, 32, 32), ["a small red circle"] * 2).shape == (2,)
