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
- ``bytelevel``: byte-level BPE as GPT-2 and RoBERTa (Radford et al. 2019, section 2.2): text
  is UTF-8 bytes, each shown as a printable character (a space is ``Ġ``), so with the full
  256-byte alphabet (``vocab_size`` >= 261) every text encodes without ``[UNK]`` and
  ``decode(encode(s)) == s`` exactly. A smaller vocabulary keeps only the bytes seen in
  training and maps the others to ``[UNK]``.

Every tokenizer trained here has ``[PAD]``=0, ``[BOS]``=1, ``[EOS]``=2, ``[UNK]``=3 and
``[MASK]``=4 (for masked language modelling; BOS/EOS double as BERT's CLS/SEP). A
``tokenizer.json`` from elsewhere can be loaded too; its special ids are then looked up by
name and may differ (see :attr:`Tokenizer.standard_ids`). :func:`load_pretrained_tokenizer`
reads a checkpoint directory (``tokenizer.json``, or BERT's ``vocab.txt``, or GPT-2/RoBERTa's
``vocab.json`` + ``merges.txt``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import tokenizers
from tokenizers import (
    AddedToken,
    Regex,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

from attnkit.config import unknown
from attnkit.errors import ConfigError, UserError
from attnkit.rundir import write_text_atomic

KINDS = ("char", "wordpiece", "bpe", "bytelevel")
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
    if kind == "bytelevel":
        backend = _bytelevel_backend(models.BPE(unk_token="[UNK]"), add_prefix_space=False)
        alphabet = (pre_tokenizers.ByteLevel.alphabet()
                    if vocab_size >= len(SPECIAL_TOKENS) + 256 else [])
        return backend, trainers.BpeTrainer(**common, initial_alphabet=alphabet)
    raise unknown("tokenizer kind", kind, KINDS)


def _bytelevel_backend(model: models.Model, add_prefix_space: bool) -> tokenizers.Tokenizer:
    """GPT-2's byte-level pipeline around a BPE model; offsets trimmed of the leading space."""
    backend = tokenizers.Tokenizer(model)
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=add_prefix_space)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.ByteLevel(trim_offsets=True)
    return backend


def _infer_kind(backend: tokenizers.Tokenizer) -> str:
    """The kind of a loaded backend, read from its model (and pre-tokenizer for char)."""
    model = type(backend.model).__name__
    if model == "WordLevel" and isinstance(backend.pre_tokenizer, pre_tokenizers.Split):
        return "char"
    pre = backend.pre_tokenizer
    if model == "BPE" and pre is not None and b'"ByteLevel"' in pre.__getstate__():
        return "bytelevel"
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
        backend.no_truncation()  # HF files may pin a length (all-MiniLM: pad/cut to 128):
        backend.no_padding()     # encode here means "the ids of this text", nothing more
        return cls(backend, _infer_kind(backend))

    def save(self, path: str | Path) -> None:
        """Write ``tokenizer.json`` atomically (:func:`attnkit.rundir.write_text_atomic`)."""
        try:
            write_text_atomic(path, self.backend.to_str(pretty=True))
        except OSError as err:
            raise UserError(f"cannot write tokenizer to {path}: {err.strerror or err}") from None

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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids of ``text`` and each token's (start, end) character span in ``text``.

        For visualisation and token classification (word labels -> token labels). Byte-level
        tokens do not count their leading space; a character split over several byte-level
        tokens gives each of them that character's span.
        """
        enc = self.backend.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def encode_pair(self, a: str, b: str, max_len: int | None = None
                    ) -> tuple[list[int], list[int]]:
        """BERT's sentence pair: ``[CLS] a [SEP] b [SEP]`` (BOS/EOS ids) and its token types.

        Token types are 0 up to the first separator, 1 after it. With ``max_len`` the longer
        side loses its last token until the pair fits (BERT's ``truncate_seq_pair``; the
        second side on ties).
        """
        if self.bos_id is None or self.eos_id is None:
            raise UserError("encode_pair needs BOS/CLS and EOS/SEP tokens in the vocabulary")
        ta, tb = self.encode(a), self.encode(b)
        if max_len is not None:
            if max_len < 3:
                raise UserError(f"encode_pair needs max_len >= 3, got {max_len}")
            while len(ta) + len(tb) > max_len - 3:
                (ta if len(ta) > len(tb) else tb).pop()
        ids = [self.bos_id, *ta, self.eos_id, *tb, self.eos_id]
        return ids, [0] * (len(ta) + 2) + [1] * (len(tb) + 1)

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids``: stops at the first EOS, drops PAD and BOS; UNK shows as [UNK].

        When one token is both BOS and EOS (GPT-2's ``<|endoftext|>``), a leading one is read
        as BOS and skipped, and the next one ends the text.
        """
        out = []
        if self.bos_id == self.eos_id and len(ids) and int(ids[0]) == self.bos_id:
            ids = ids[1:]
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


# -- checkpoint directories -------------------------------------------------------------------
_BERT_SPECIALS = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                  "cls_token": "[CLS]", "mask_token": "[MASK]"}
_BYTELEVEL_SPECIALS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
                       "pad_token": "<pad>", "mask_token": "<mask>"}


def _read_json(file: Path) -> dict:
    """A JSON object from ``file``; {} when absent; UserError when unreadable."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {file}: {str(err).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise UserError(f"{file} must hold a JSON object")
    return data


def _special_names(conf: dict, defaults: dict[str, str]) -> list[str]:
    """Special-token strings named in tokenizer_config.json (plain or {"content": ...})."""
    names = []
    for key, default in defaults.items():
        value = conf.get(key, default)
        value = value.get("content") if isinstance(value, dict) else value
        if isinstance(value, str):
            names.append(value)
    return names


def _add_specials(backend: tokenizers.Tokenizer, names: Iterable[str]) -> None:
    """Register the names found in the vocabulary as special tokens (never split)."""
    found = [n for n in dict.fromkeys(names) if backend.token_to_id(n) is not None]
    backend.add_special_tokens([AddedToken(n, special=True, normalized=False) for n in found])


def _from_model_files(kind: str, build) -> tokenizers.Tokenizer:
    try:
        return build()
    except Exception as err:  # the Rust side raises plain Exception
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"cannot read the {kind} vocabulary: {msg}") from None


def _wordpiece_from_vocab(vocab: Path, conf: dict) -> Tokenizer:
    """BERT's tokenizer from vocab.txt, normalised as tokenizer_config.json says."""
    unk = _special_names(conf, {"unk_token": "[UNK]"})[0]
    model = _from_model_files("WordPiece", lambda: models.WordPiece.from_file(
        str(vocab), unk_token=unk, max_input_chars_per_word=100))
    backend = tokenizers.Tokenizer(model)
    lowercase = bool(conf.get("do_lower_case", True))  # BertTokenizer's default
    backend.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=bool(conf.get("tokenize_chinese_chars", True)),
        strip_accents=conf.get("strip_accents"), lowercase=lowercase)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.decoder = decoders.WordPiece(prefix="##")
    _add_specials(backend, _special_names(conf, _BERT_SPECIALS))
    return Tokenizer(backend, "wordpiece")


def _bytelevel_from_files(vocab: Path, merges: Path, conf: dict) -> Tokenizer:
    """GPT-2 / RoBERTa byte-level BPE from vocab.json + merges.txt."""
    model = _from_model_files("byte-level BPE", lambda: models.BPE.from_file(str(vocab),
                                                                             str(merges)))
    backend = _bytelevel_backend(model, bool(conf.get("add_prefix_space", False)))
    _add_specials(backend, [*_special_names(conf, _BYTELEVEL_SPECIALS), "<|endoftext|>"])
    return Tokenizer(backend, "bytelevel")


def load_pretrained_tokenizer(path: str | Path) -> Tokenizer | None:
    """The tokenizer of a checkpoint directory, or None when it has no tokenizer files.

    Reads, first found: ``tokenizer.json``; BERT's ``vocab.txt`` (WordPiece with BERT
    normalisation; ``tokenizer_config.json``'s ``do_lower_case``, ``strip_accents`` and
    ``tokenize_chinese_chars`` honoured, lower-cased by default as ``BertTokenizer``); GPT-2 /
    RoBERTa's ``vocab.json`` + ``merges.txt`` (byte-level BPE). Special ids are looked up by
    name (e.g. [CLS] = BOS, [SEP] = EOS for BERT; see :attr:`Tokenizer.standard_ids`).
    """
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"not a checkpoint directory: {path}")
    if (path / "tokenizer.json").is_file():
        return Tokenizer.load(path / "tokenizer.json")
    conf = _read_json(path / "tokenizer_config.json")
    if (path / "vocab.txt").is_file():
        return _wordpiece_from_vocab(path / "vocab.txt", conf)
    if (path / "vocab.json").is_file() and (path / "merges.txt").is_file():
        return _bytelevel_from_files(path / "vocab.json", path / "merges.txt", conf)
    return None


# ---- the tokenizer of a run ---------------------------------------------------------------------
@dataclass(frozen=True)
class TokenizerConfig:
    """A run's tokenizer: trained (``kind``, ``vocab_size``) or read from ``path``."""

    kind: Literal["char", "wordpiece", "bpe", "bytelevel"] = "char"
    vocab_size: int = 8000        # ignored for char
    path: str = ""                # a tokenizer.json or checkpoint directory instead of training

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ConfigError(f"tokenizer.kind must be one of {', '.join(KINDS)}")


SPECIAL_NEEDS: dict[str, tuple[Callable[[Tokenizer], bool], str]] = {
    "standard": (lambda t: t.standard_ids,
                 "attnkit's special tokens [PAD] [BOS] [EOS] [UNK] at ids 0-3"),
    "eos": (lambda t: t.eos_id is not None,
            "end-of-text token ([EOS], </s>, [SEP] or <|endoftext|>)"),
    "bos": (lambda t: t.bos_id is not None, "start token ([BOS], <s> or [CLS])"),
    "pad": (lambda t: t.pad_id is not None, "padding token ([PAD] or <pad>)"),
    "mask": (lambda t: t.mask_id is not None, "mask token ([MASK] or <mask>)"),
}
"""What a recipe may need of its tokenizer -> (test, what is missing)."""


def check_specials(tok: Tokenizer, needs: Iterable[str], where: str) -> Tokenizer:
    """``tok`` when it has every special token of ``needs`` (keys of :data:`SPECIAL_NEEDS`),
    else a UserError naming what ``where`` lacks."""
    missing = [SPECIAL_NEEDS[n][1] for n in needs if not SPECIAL_NEEDS[n][0](tok)]
    if missing:
        raise UserError(f"tokenizer {where} has no {'; no '.join(missing)}")
    return tok


def load_tokenizer_path(path: str | Path) -> Tokenizer:
    """A ``tokenizer.json`` file, or the tokenizer of a checkpoint directory."""
    path = Path(path)
    if not path.is_dir():
        return Tokenizer.load(path)
    tok = load_pretrained_tokenizer(path)
    if tok is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json and "
                        "merges.txt)")
    return tok


def resolve_tokenizer(cfg: TokenizerConfig, texts: Callable[[], Iterable[str]],
                      run_dir: str | Path | None = None, needs: Iterable[str] = ()
                      ) -> Tokenizer:
    """The tokenizer of a run, decided in one place:

    1. ``run_dir/tokenizer.json`` when the run has one (a resumed run keeps its own);
    2. else ``cfg.path`` (a tokenizer.json or a checkpoint directory's tokenizer);
    3. else a new ``cfg.kind`` tokenizer of ``cfg.vocab_size`` trained on ``texts()``;

    then checked for the special tokens the recipe ``needs`` (:func:`check_specials`). Saving
    it into the run directory is the caller's business (rank 0 only).
    """
    own = Path(run_dir) / "tokenizer.json" if run_dir else None
    if own is not None and own.is_file():
        tok, where = Tokenizer.load(own), str(own)
    elif cfg.path:
        tok, where = load_tokenizer_path(cfg.path), cfg.path
    else:
        tok = Tokenizer.train(cfg.kind, texts(), vocab_size=cfg.vocab_size)
        where = f"trained ({cfg.kind})"
    return check_specials(tok, needs, where)
