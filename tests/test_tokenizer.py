"""The BPE caption tokenizer: round trip, lower-casing, padding/truncation, dropout only in training,
files, the CLI, and clear errors on bad input."""
import json

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from dalle_fast.data.shapes import Shapes
from dalle_fast.tokenizer import PAD_ID, UNK_ID, BPETokenizer

CAPTIONS = list(Shapes(400, seed=3, split="all").captions()) + ["the quick brown fox jumps over the lazy dog"] * 5


@pytest.fixture(scope="module")
def tok():
    return BPETokenizer.train(CAPTIONS, vocab_size=160, min_frequency=2, dropout=0.1)


def test_round_trip_of_normalised_text(tok):
    for c in CAPTIONS[:50] + ["a small red circle, above a cyan square!", "fox 123 (dog)"]:
        assert tok.decode(tok.encode(c)) == tok.normalize(c) == " ".join(c.lower().split())


def test_lower_cased_and_whitespace_collapsed(tok):
    assert tok.encode("  A   LARGE Red\tcircle ") == tok.encode("a large red circle")


def test_vocab_size_is_configurable_and_bigger_merges_more(tok):
    small = BPETokenizer.train(CAPTIONS, vocab_size=80)
    assert small.vocab_size <= 80 and tok.vocab_size <= 160 and tok.vocab_size > small.vocab_size
    c = "a small blue square to the left of a yellow triangle"
    assert len(tok.encode(c)) < len(small.encode(c))
    assert small.decode(small.encode(c)) == c


def test_special_ids(tok):
    vocab = tok._tok.get_vocab()
    assert vocab["[PAD]"] == PAD_ID and vocab["[UNK]"] == UNK_ID


def test_tokenize_pads_with_zero_and_truncates(tok):
    ids = tok.encode("a large red circle")
    out = tok.tokenize(["a large red circle", "a large red circle above a small blue square"], text_len=len(ids) + 3)
    assert out.dtype == torch.long and out.shape == (2, len(ids) + 3)
    assert out[0, :len(ids)].tolist() == ids and (out[0, len(ids):] == PAD_ID).all()
    assert (out[1] != PAD_ID).all()  # truncated, no room for padding
    with pytest.raises(ValueError, match="more than text_len"):
        tok.tokenize(["a large red circle above a small blue square"], text_len=3, truncate=False)
    with pytest.raises(ValueError, match="text_len"):
        tok.tokenize(["a"], text_len=0)


def test_dropout_only_when_training():
    t = BPETokenizer.train(CAPTIONS, vocab_size=160, dropout=0.5)
    c = "a small blue square to the left of a yellow triangle"
    ref = t.encode(c)
    assert all(t.encode(c) == ref for _ in range(20))           # inference is deterministic
    seen = {tuple(t.encode(c, training=True)) for _ in range(20)}
    assert len(seen) > 1 and any(len(s) > len(ref) for s in seen)  # dropped merges split words further
    assert all(t.decode(list(s)) == c for s in seen)              # still the same text
    assert t.encode(c) == ref                                       # training calls leave inference alone
    t0 = BPETokenizer.train(CAPTIONS, vocab_size=160, dropout=0.0)
    assert all(t0.encode(c, training=True) == t0.encode(c) for _ in range(10))


def test_file_round_trip_keeps_training_dropout(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    data = json.loads(path.read_text())
    assert data["model"]["type"] == "BPE"
    loaded = BPETokenizer.from_file(path)
    assert loaded.dropout == pytest.approx(0.1) and loaded.vocab_size == tok.vocab_size
    for c in CAPTIONS[:20]:
        assert loaded.encode(c) == tok.encode(c)
    assert BPETokenizer.from_file(path, dropout=0.0).dropout == 0.0


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        BPETokenizer.from_file(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read tokenizer"):
        BPETokenizer.from_file(bad)


@pytest.mark.parametrize("caption,match", [("", "empty"), ("   \t ", "empty"), ("%%% ###", "no known tokens"),
                                           ("\u20ac\u20ac \u4e2d", "no known tokens")])
def test_bad_captions_raise_clear_errors(tok, caption, match):
    with pytest.raises(ValueError, match=match):
        tok.encode(caption)
    with pytest.raises(ValueError, match=match):
        tok.tokenize(["a red circle", caption], 8)


def test_non_string_caption(tok):
    with pytest.raises(TypeError, match="str"):
        tok.encode(123)


def test_too_small_vocab():
    with pytest.raises(ValueError, match="vocab_size"):
        BPETokenizer.train(CAPTIONS, vocab_size=10)


@given(st.text(max_size=40))
def test_any_text_encodes_or_raises_value_error(text):
    t = _shared()
    try:
        ids = t.encode(text)
    except ValueError:
        return
    assert ids and all(0 <= i < t.vocab_size for i in ids)
    assert any(i != UNK_ID for i in ids)


_CACHE = {}


def _shared():
    if "t" not in _CACHE:
        _CACHE["t"] = BPETokenizer.train(CAPTIONS, vocab_size=160)
    return _CACHE["t"]


def test_cli_train_tokenizer(tmp_path):
    from dalle_fast.cli import main
    src = tmp_path / "caps.txt"
    src.write_text("\n".join(CAPTIONS[:200]))
    out = tmp_path / "t.json"
    assert main(["train-tokenizer", "--data", str(src), "--vocab-size", "120", "--out", str(out)]) == 0
    t = BPETokenizer.from_file(out)
    assert t.vocab_size <= 120 and t.decode(t.encode(CAPTIONS[0])) == CAPTIONS[0]
    assert main(["train-tokenizer", "--data", str(tmp_path / "nope"), "--out", str(out)]) == 2
