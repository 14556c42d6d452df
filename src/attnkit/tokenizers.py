"""Tokenizers: a thin wrapper over Hugging Face ``tokenizers`` with fixed special ids.

Three kinds can be trained:

- ``char``: one token per Unicode code point (spaces and newlines included), a WordLevel model
  over single characters; ``decode(encode(s)) == s`` for any text whose characters were seen in
  training. Unseen characters become ``[UNK]``.
- ``bpe``: SentencePiece-style BPE (Sennrich et al. 2016; Kudo & Richardson 2018): a space is
  turned into ``"▁"`` and glued to the following word (Metaspace), so decoding gives back
  ordinary detokenised text. Used for translation, trained jointly on source and target text.
- ``wordpiece``: BERT-style WordPiece (Devlin et al. 2019): BERT normalisation and
  pre-tokenisation (split on whitespace and punctuation), continuation pieces marked ``##``.
  Cased by default (``lowercase=True`` gives the uncased variant).

Every tokenizer trained here has ``[PAD]``=0, ``[BOS]``=1, ``[EOS]``=2, ``[UNK]``=3 and
``[MASK]``=4 (for masked language modelling; BOS/EOS double as BERT's CLS/SEP). A
``tokenizer.json`` from elsewhere can be loaded too; its special ids are then looked up by
name and may differ (see :attr:`Tokenizer.standard_ids`).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import tokenizers
from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers, trainers

from attnkit.config import unknown
from attnkit.errors import UserError

KINDS = ("char", "wordpiece", "bpe")
SPECIAL_TOKENS = ("[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]")

# Names under which other tokenizer.json files keep their special tokens (first found wins).
_FOREIGN_NAMES = {
    "pad_id": ("[PAD]", "<pad>", "<|pad|>"),
    "bos_id": ("[BOS]", "<s>", "[CLS]", "<|endoftext|>", "<bos>"),
    "eos_id": ("[EOS]", "</s>", "[SEP]", "<|endoftext|>", "<eos>"),
    "unk_id": ("[UNK]", "<unk>", "<|endoftext|>"),
    "mask_id": ("[MASK]", "<mask>"),
}


def _build(kind: str, vocab_size: int, min_frequency: int, lowercase: bool
           ) -> tuple[tokenizers.Tokenizer, trainers.Trainer]:
    """An untrained backend and its trainer for one kind."""
    common = dict(vocab_size=vocab_size, min_frequency=min_frequency,
                  special_tokens=list(SPECIAL_TOKENS), show_progress=False)
    if kind == "char":
        backend = tokenizers.Tokenizer(models.WordLevel(unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
        backend.decoder = decoders.Fuse()
        return backend, trainers.WordLevelTrainer(**common)
    if kind == "bpe":
        backend = tokenizers.Tokenizer(models.BPE(unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always")
        backend.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always")
        return backend, trainers.BpeTrainer(**common)
    if kind == "wordpiece":
        backend = tokenizers.Tokenizer(models.WordPiece(unk_token="[UNK]"))
        backend.normalizer = normalizers.BertNormalizer(lowercase=lowercase,
                                                        strip_accents=None if lowercase else False)
        backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        backend.decoder = decoders.WordPiece(prefix="##")
        return backend, trainers.WordPieceTrainer(**common, continuing_subword_prefix="##")
    raise unknown("tokenizer kind", kind, KINDS)


def _infer_kind(backend: tokenizers.Tokenizer) -> str:
    """The kind of a loaded backend, read from its model (and pre-tokenizer for char)."""
    model = type(backend.model).__name__
    if model == "WordLevel" and isinstance(backend.pre_tokenizer, pre_tokenizers.Split):
        return "char"
    return {"BPE": "bpe", "WordPiece": "wordpiece"}.get(model, model.lower())


class Tokenizer:
    """A trained tokenizer: text <-> ids, with PAD=0, BOS=1, EOS=2, UNK=3, MASK=4.

    ``encode`` adds no BOS/EOS; models and batching add them where the paper does.
    """

    pad_id = 0
    bos_id = 1
    eos_id = 2
    unk_id = 3
    mask_id = 4

    def __init__(self, backend: tokenizers.Tokenizer, kind: str) -> None:
        self.backend = backend
        self.kind = kind
        for attr, names in _FOREIGN_NAMES.items():
            if backend.token_to_id(SPECIAL_TOKENS[getattr(Tokenizer, attr)]) != getattr(
                    Tokenizer, attr):
                found = [backend.token_to_id(n) for n in names]
                setattr(self, attr, next((i for i in found if i is not None), None))

    @property
    def standard_ids(self) -> bool:
        """True when the special ids are attnkit's fixed ones (always so for trained ones)."""
        return all(getattr(self, a) == getattr(Tokenizer, a) for a in _FOREIGN_NAMES)

    @classmethod
    def train(cls, kind: str, texts: Iterable[str], vocab_size: int = 8000,
              min_frequency: int = 1, lowercase: bool = False) -> Tokenizer:
        """Train a ``kind`` tokenizer on ``texts`` (an iterable of strings, e.g. lines).

        ``vocab_size`` includes the special tokens; ``lowercase`` applies to wordpiece only.
        """
        if vocab_size < len(SPECIAL_TOKENS) + 1:
            raise UserError(f"vocab_size must be at least {len(SPECIAL_TOKENS) + 1}, "
                            f"got {vocab_size}")
        if min_frequency < 1:
            raise UserError(f"min_frequency must be at least 1, got {min_frequency}")
        backend, trainer = _build(kind, vocab_size, min_frequency, lowercase)
        backend.train_from_iterator(texts, trainer)
        if backend.get_vocab_size() <= len(SPECIAL_TOKENS):
            raise UserError(f"no {kind} tokens learned: the training text is empty")
        return cls(backend, kind)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a ``tokenizer.json`` (written by :meth:`save` or by any HF tokenizer)."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise UserError(f"tokenizer file not found: {path}") from None
        except IsADirectoryError:
            raise UserError(f"tokenizer path is a directory, expected a tokenizer.json: "
                            f"{path}") from None
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read tokenizer file {path}: {err}") from None
        try:
            backend = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # the Rust side raises plain Exception
            msg = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise UserError(f"{path} is not a valid tokenizer.json: {msg}") from None
        return cls(backend, _infer_kind(backend))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically (a temporary file, then ``os.replace``)."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        try:
            tmp.write_text(self.backend.to_str(pretty=True), encoding="utf-8")
            os.replace(tmp, path)
        except OSError as err:
            tmp.unlink(missing_ok=True)
            raise UserError(f"cannot write tokenizer to {path}: {err}") from None

    @property
    def vocab_size(self) -> int:
        """Number of ids, special tokens included."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no BOS/EOS added."""
        return self.backend.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (in parallel inside the Rust backend)."""
        return [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: stops at the first EOS, drops PAD and BOS; UNK shows as [UNK]."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            if i not in (self.pad_id, self.bos_id):
                out.append(i)
        return self.backend.decode(out, skip_special_tokens=False)

    def token(self, id: int) -> str:
        """The token string of ``id`` (e.g. ``"▁dog"``, ``"##ing"``), for visualisation."""
        tok = self.backend.id_to_token(int(id))
        if tok is None:
            raise UserError(f"token id {id} is outside the vocabulary of size {self.vocab_size}")
        return tok

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size})"
