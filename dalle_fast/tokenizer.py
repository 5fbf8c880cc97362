"""BPE tokenizer for captions (the paper: lower-cased, BPE vocab 16384, 10% BPE dropout in training).

Built on the `tokenizers` library and saved as one JSON file. Text is NFKC-normalised, lower-cased
and its whitespace collapsed; a Metaspace pre-tokenizer keeps word boundaries inside the tokens, so
decode(encode(s)) gives back the normalised caption exactly (for characters seen in training).

Id 0 is [PAD] and id 1 is [UNK]. The transformer turns [PAD] at text position i into its own
learned padding token (vocab_size + i), as in the paper: padding is a token, not a mask.
"""
import argparse
import os

import torch

PAD, UNK = "[PAD]", "[UNK]"
PAD_ID, UNK_ID = 0, 1
# Seeded into the alphabet so that digits and common punctuation are never unknown, whatever the corpus.
BASE_ALPHABET = list("abcdefghijklmnopqrstuvwxyz0123456789.,;:!?'\"-()/&")


def _new_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
    tok = Tokenizer(models.BPE(unk_token=UNK))
    tok.normalizer = normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(),
        normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Metaspace(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.Metaspace()
    return tok


class BPETokenizer:
    """Captions -> token ids (a byte-pair encoding of the `tokenizers` library, [PAD] = 0, [UNK] = 1).

    Args:
        tokenizer: a tokenizers.Tokenizer.
        dropout: the BPE-dropout probability used only when encoding with training=True (the saved
          file and inference never drop merges).
    """

    def __init__(self, tokenizer, dropout=0.1):
        from tokenizers import Tokenizer
        self._tok = tokenizer
        self._tok.model.dropout = None
        self.dropout = float(dropout)
        # A second instance with dropout switched on, so that training never changes inference.
        self._tok_train = Tokenizer.from_str(tokenizer.to_str())
        self._tok_train.model.dropout = self.dropout if self.dropout > 0 else None
        vocab = self._tok.get_vocab()
        if vocab.get(PAD) != PAD_ID or vocab.get(UNK) != UNK_ID:
            raise ValueError(f"tokenizer file must have {PAD} at id {PAD_ID} and {UNK} at id {UNK_ID}")

    # ---- construction and files ----
    @classmethod
    def train(cls, captions, vocab_size=16384, min_frequency=2, dropout=0.1):
        """Trains a new BPE vocabulary on captions.

        Args:
            captions: an iterable of str.
            vocab_size: vocabulary size (the paper: 16384).
            min_frequency: least count of a pair to merge.
            dropout: BPE-dropout for training-time encoding.
        Returns:
            A BPETokenizer.
        """
        from tokenizers import trainers
        if vocab_size < len(BASE_ALPHABET) + 3:
            raise ValueError(f"vocab_size must be at least {len(BASE_ALPHABET) + 3}, got {vocab_size}")
        tok = _new_tokenizer()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                      special_tokens=[PAD, UNK], initial_alphabet=BASE_ALPHABET,
                                      show_progress=False)
        tok.train_from_iterator(captions, trainer)
        return cls(tok, dropout)

    @classmethod
    def from_file(cls, path, dropout=None):
        """A tokenizer saved by save.

        Args:
            path: the JSON file.
            dropout: None: the training dropout stored in the file (model.dropout).
        Returns:
            A BPETokenizer.
        """
        from tokenizers import Tokenizer
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own exception type on bad JSON
            raise ValueError(f"cannot read tokenizer file {path}: {e}") from e
        if dropout is None:
            dropout = round(tok.model.dropout or 0.0, 6)  # stored as f32 by the library
        return cls(tok, dropout)

    def save(self, path):
        """One JSON file, written atomically; the training BPE-dropout is stored as the BPE model's dropout.

        Args:
            path: the destination.
        """
        import json
        from .checkpoint import atomic_write_json
        atomic_write_json(json.loads(self._tok_train.to_str()), path)

    # ---- encoding ----
    @property
    def vocab_size(self):
        return self._tok.get_vocab_size()

    def normalize(self, text):
        """Args:
            text: a caption.
        Returns:
            The caption as the tokenizer sees it (lower case, whitespace normalised).
        """
        return self._tok.normalizer.normalize_str(text)

    def encode(self, text, training=False):
        """Token ids of one caption (no padding). Raises ValueError on an empty caption or one made
        only of characters the tokenizer has never seen.

        Args:
            text: a caption.
            training: apply BPE-dropout.
        Returns:
            A list of int ids.
        """
        if not isinstance(text, str):
            raise TypeError(f"caption must be a str, got {type(text).__name__}")
        if not self.normalize(text):
            raise ValueError("caption is empty (nothing left after normalising whitespace)")
        enc = (self._tok_train if training else self._tok).encode(text)
        # "▁" alone is the word-boundary marker of the Metaspace pre-tokenizer: not content.
        content = [i for i, t in zip(enc.ids, enc.tokens) if t != "\u2581"]
        if not content or all(i == UNK_ID for i in content):
            raise ValueError(f"caption {text!r} has no known tokens: every character is unknown to the tokenizer")
        return enc.ids

    def decode(self, ids):
        """Args:
            ids: a list or tensor of ids; [PAD] and out-of-vocabulary ids (the per-position pads) are dropped.
        Returns:
            The text.
        """
        if torch.is_tensor(ids):
            ids = ids.tolist()
        return self._tok.decode([int(i) for i in ids if int(i) != PAD_ID and int(i) < self.vocab_size])

    def tokenize(self, captions, text_len, training=False, truncate=True):
        """A padded batch of ids.

        Args:
            captions: a str or a list of them.
            text_len: columns of the result.
            training: apply BPE-dropout.
            truncate: cut longer captions (False: raise ValueError).
        Returns:
            LongTensor (len(captions), text_len): ids, [PAD] (0) after them.
        """
        if isinstance(captions, str):
            captions = [captions]
        if text_len < 1:
            raise ValueError(f"text_len must be >= 1, got {text_len}")
        out = torch.full((len(captions), text_len), PAD_ID, dtype=torch.long)
        for b, c in enumerate(captions):
            ids = self.encode(c, training=training)
            if len(ids) > text_len and not truncate:
                raise ValueError(f"caption {c!r} has {len(ids)} tokens, more than text_len={text_len}")
            ids = ids[:text_len]
            out[b, :len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    __call__ = tokenize


def iter_captions(source, shapes_count=20000, seed=0, split="train"):
    """Captions of a data source.

    Args:
        source: a .txt file (one caption a line), an image-caption folder (every *.txt file in it,
          recursively), or "shapes" (the built-in Shapes set).
        shapes_count, seed, split: of the Shapes set.
    Yields:
        str.
    """
    if source == "shapes":
        from .data.shapes import Shapes
        yield from Shapes(length=shapes_count, seed=seed, split=split).captions()
        return
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    yield line.strip()
        return
    if os.path.isdir(source):
        for root, _, files in sorted(os.walk(source)):
            for fn in sorted(files):
                if fn.endswith(".txt"):
                    with open(os.path.join(root, fn), encoding="utf-8", errors="replace") as f:
                        for line in f:
                            if line.strip():
                                yield line.strip()
        return
    raise FileNotFoundError(f"caption source not found: {source} (a .txt file, a folder, or 'shapes')")


def _cmd_train(args):
    captions = list(iter_captions(args.data, shapes_count=args.shapes_count, seed=args.seed))
    if not captions:
        raise ValueError(f"no captions found in {args.data}")
    tok = BPETokenizer.train(captions, vocab_size=args.vocab_size, min_frequency=args.min_frequency,
                             dropout=args.dropout)
    tok.save(args.out)
    print(f"trained a BPE tokenizer on {len(captions)} captions: vocab {tok.vocab_size} -> {args.out}")
    return 0


def register(subparsers):
    """Adds the `train-tokenizer` command to the dalle-fast command line.

    Args:
        subparsers: the argparse subparsers of dalle_fast.cli.
    """
    p = subparsers.add_parser("train-tokenizer", help="train the BPE caption tokenizer (one JSON file)",
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--data", default="shapes",
                   help="captions: a .txt file (one a line), an image-caption folder, or 'shapes'")
    p.add_argument("--out", default="tokenizer.json", help="output JSON file")
    p.add_argument("--vocab-size", type=int, default=16384, help="BPE vocabulary size (the paper: 16384)")
    p.add_argument("--min-frequency", type=int, default=2, help="least count of a pair to merge")
    p.add_argument("--dropout", type=float, default=0.1, help="BPE dropout applied when training the transformer")
    p.add_argument("--shapes-count", type=int, default=20000, help="captions drawn from Shapes")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)
