"""Masked-language-model data: masking, NSP sentence pairs, FULL-SENTENCES packing, batches.

Notation: B batch, S sequence length, V vocabulary.

- Masking (Devlin et al. 2019, section 3.1): every token that is not special and not padding is
  selected with probability ``prob`` (15%), independently (Bernoulli, as Hugging Face's
  collator; BERT's own script picks round(15%) per sequence). A selected token becomes
  ``[MASK]`` with probability 0.8, a uniformly random token of the vocabulary with 0.1, and
  stays unchanged with 0.1; only selected tokens are scored. Whole-word masking selects
  WordPiece *words* (a token plus its ``##`` continuations) with probability ``prob`` and masks
  all their tokens (the 80/10/10 choice is still made per token, as in BERT's release).
- NSP pairs (BERT, section 3.1 and its ``create_pretraining_data.py``): sentences of one
  document are gathered up to a target length; segment A is a random prefix of them, B the
  rest ("IsNext") or, half of the time, a random span of another document ("NotNext", the
  unused sentences put back).
- FULL-SENTENCES packing (Liu et al. 2019, section 4.2): whole sentences, read contiguously,
  fill each sequence of at most ``max_tokens``; crossing a document boundary adds a separator.
- Static vs dynamic masking (Liu et al. 2019, section 4.1): the mask of a sequence is drawn
  from a generator seeded by (seed, example) -- the same mask every epoch -- or by
  (seed, batch number) -- a new mask every time the sequence is seen. Either way batch ``k`` is
  a pure function of ``(seed, k)``, so :class:`MLMBatches` resumes exactly from its state.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

from attnkit.data.lm import LMData
from attnkit.data.stream import EpochBatches, RowBatch
from attnkit.errors import ConfigError, UserError
from attnkit.losses import IGNORE

# special tokens of attnkit's, BERT's and RoBERTa's vocabularies: never selected for masking
SPECIAL_STRINGS = frozenset({"[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]", "[CLS]", "[SEP]",
                             "<s>", "</s>", "<pad>", "<unk>", "<mask>", "<|endoftext|>"})


@dataclass(frozen=True)
class PretrainData(LMData):
    doc_lines: int = 50  # a text without blank lines is cut into documents of this many lines

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.doc_lines < 0:
            raise ConfigError(f"data.doc_lines must be >= 0, got {self.doc_lines}")


@dataclass(frozen=True)
class MLMEvalConfig:
    batch_size: int = 32
    max_sequences: int = 256  # held-out sequences scored (0 = all)

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_sequences < 0:
            raise ConfigError("eval.batch_size must be >= 1 and eval.max_sequences >= 0")


@dataclass(frozen=True)
class MaskConfig:
    """How tokens are masked (defaults: BERT's 15% with 80/10/10)."""

    prob: float = 0.15           # share of (non-special) tokens or words selected
    mask_frac: float = 0.8       # selected -> [MASK]
    random_frac: float = 0.1     # selected -> a random token (the rest stay unchanged)
    whole_word: bool = False     # select WordPiece words (token + its "##" pieces) together
    dynamic: bool = True         # a new mask each time a sequence is seen (RoBERTa)

    def __post_init__(self) -> None:
        if not 0.0 < self.prob < 1.0:
            raise ConfigError(f"masking.prob must be in (0, 1), got {self.prob}")
        if self.mask_frac < 0 or self.random_frac < 0 or self.mask_frac + self.random_frac > 1:
            raise ConfigError("masking.mask_frac and masking.random_frac must be >= 0 and sum "
                              "to at most 1")


class Masker:
    """Applies :class:`MaskConfig` to padded id batches of one tokenizer's vocabulary."""

    def __init__(self, cfg: MaskConfig, vocab_size: int, mask_id: int | None,
                 special_ids: Sequence[int], continuation: Tensor | None = None) -> None:
        """``continuation`` (V,) bool marks "##" pieces (needed for whole-word masking)."""
        if mask_id is None:
            raise UserError("masked language modelling needs a [MASK] (or <mask>) token in the "
                            "tokenizer")
        if cfg.whole_word and continuation is None:
            raise UserError("whole-word masking needs a WordPiece tokenizer (## pieces)")
        self.cfg, self.vocab_size, self.mask_id = cfg, vocab_size, mask_id
        self.special = torch.zeros(vocab_size, dtype=torch.bool)
        self.special[[i for i in {*special_ids, mask_id} if i is not None]] = True
        self.continuation = continuation

    @classmethod
    def for_tokenizer(cls, cfg: MaskConfig, tok: Any, vocab_size: int | None = None) -> Masker:
        """A masker over ``tok``'s vocabulary; its special tokens are never selected."""
        v = vocab_size or tok.vocab_size
        cont = None
        if cfg.whole_word:
            if tok.kind != "wordpiece":
                raise UserError(f"whole-word masking needs a WordPiece tokenizer, got {tok.kind}")
            cont = continuation_table(tok, v)
        specials = [tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id]
        specials += [i for i in range(min(v, tok.vocab_size))
                     if tok.backend.id_to_token(i) in SPECIAL_STRINGS]
        return cls(cfg, v, tok.mask_id, [i for i in specials if i is not None], cont)

    def select(self, ids: Tensor, attention_mask: Tensor, gen: torch.Generator) -> Tensor:
        """(B, S) True where a token is selected for prediction."""
        eligible = ~self.special[ids] & attention_mask.bool()
        u = torch.rand(ids.shape, generator=gen)
        if self.cfg.whole_word:
            cont = self.continuation[ids] & eligible
            pos = torch.arange(ids.size(1)).expand_as(ids)
            start = torch.where(cont, 0, pos).cummax(dim=1).values  # (B, S) its word's start
            u = u.gather(1, start)  # one draw per word
        return (u < self.cfg.prob) & eligible

    def __call__(self, ids: Tensor, attention_mask: Tensor, gen: torch.Generator
                 ) -> tuple[Tensor, Tensor]:
        """(inputs, labels): inputs with selected tokens replaced 80/10/10, labels the original
        ids where selected and :data:`IGNORE` elsewhere. ``ids`` is left unchanged."""
        selected = self.select(ids, attention_mask, gen)
        labels = ids.masked_fill(~selected, IGNORE)
        u = torch.rand(ids.shape, generator=gen)
        random_ids = torch.randint(self.vocab_size, ids.shape, generator=gen)
        to_mask = selected & (u < self.cfg.mask_frac)
        to_random = selected & (u >= self.cfg.mask_frac) & (
            u < self.cfg.mask_frac + self.cfg.random_frac)
        inputs = ids.masked_fill(to_mask, self.mask_id)
        inputs = torch.where(to_random, random_ids, inputs)
        return inputs, labels


def continuation_table(tok: Any, vocab_size: int) -> Tensor:
    """(V,) bool: True for WordPiece continuation pieces (strings starting with "##")."""
    table = torch.zeros(vocab_size, dtype=torch.bool)
    for token, i in tok.backend.get_vocab(with_added_tokens=True).items():
        if i < vocab_size and token.startswith("##"):
            table[i] = True
    return table


# ---- documents and sequences -----------------------------------------------------------------

def split_sentences(text: str, doc_lines: int = 0) -> list[list[str]]:
    """Documents of sentences: BERT's input format (one sentence per line, blank lines between
    documents). With fewer than two documents and ``doc_lines`` > 0, the sentences are cut into
    documents of ``doc_lines`` lines (NSP needs another document to draw from)."""
    docs: list[list[str]] = [[]]
    for line in text.splitlines():
        line = line.strip()
        if line:
            docs[-1].append(line)
        elif docs[-1]:
            docs.append([])
    docs = [d for d in docs if d]
    if len(docs) < 2 and doc_lines > 0 and docs:
        flat = docs[0]
        docs = [flat[i: i + doc_lines] for i in range(0, len(flat), doc_lines)]
    return docs


def encode_sentences(tok: Any, docs: Sequence[Sequence[str]]) -> list[list[list[int]]]:
    """Token ids of every sentence of every document (empty sentences dropped)."""
    flat = [s for d in docs for s in d]
    ids = tok.encode_batch(flat) if flat else []
    out, i = [], 0
    for d in docs:
        enc = [x for x in ids[i: i + len(d)] if x]
        i += len(d)
        if enc:
            out.append(enc)
    return out


@dataclass
class Example:
    """One pre-training sequence (specials included), its token types and NSP label."""

    ids: list[int]
    types: list[int] | None = None
    nsp: int = -1  # 0 = B follows A, 1 = B is random (as transformers); -1 = no NSP


def pack_full_sentences(docs: Sequence[Sequence[Sequence[int]]], max_tokens: int, bos: int,
                        eos: int) -> list[Example]:
    """RoBERTa's FULL-SENTENCES inputs: ``BOS s1 s2 ... EOS``, sentences read contiguously
    across documents (an extra ``EOS`` at each document boundary), at most ``max_tokens``.

    A sentence longer than a whole sequence is cut into pieces of ``max_tokens - 2``.
    """
    if max_tokens < 4:
        raise UserError(f"max_len must be at least 4 tokens, got {max_tokens}")
    room = max_tokens - 2
    out: list[Example] = []
    cur: list[int] = []
    for d, doc in enumerate(docs):
        if d and cur:
            if len(cur) + 1 > room:
                out.append(Example([bos, *cur, eos]))
                cur = []
            else:
                cur.append(eos)  # document boundary
        for sent in doc:
            for piece in (sent[i: i + room] for i in range(0, len(sent), room)):
                if cur and len(cur) + len(piece) > room:
                    out.append(Example([bos, *cur, eos]))
                    cur = []
                cur.extend(piece)
    if cur:
        out.append(Example([bos, *cur, eos]))
    return out


def _truncate_pair(a: list[int], b: list[int], limit: int, rng: np.random.Generator) -> None:
    """BERT's truncate_seq_pair: drop a token from the front or back of the longer side."""
    while len(a) + len(b) > limit:
        side = a if len(a) > len(b) else b
        side.pop(0 if rng.random() < 0.5 else -1)


def _random_b(docs: Sequence, d: int, b_target: int, rng: np.random.Generator) -> list[int]:
    """About ``b_target`` tokens from a random position of another random document."""
    other = d
    for _ in range(10):
        other = int(rng.integers(len(docs)))
        if other != d:
            break
    b: list[int] = []
    for s in docs[other][int(rng.integers(len(docs[other]))):]:
        b.extend(s)
        if len(b) >= b_target:
            break
    return b


def _pair_from_chunk(chunk: list[list[int]], docs: Sequence, d: int, target: int,
                     rng: np.random.Generator) -> tuple[list[int], list[int], int, int]:
    """(A, B, nsp label, sentences to step back) from a chunk of sentences of document d.

    A single-sentence chunk (a one-line document) is cut at a random token when B is to be
    the actual continuation, so that the two labels stay equally likely.
    """
    is_random = rng.random() < 0.5
    if len(chunk) == 1:
        sent = chunk[0]
        if is_random or len(sent) < 2:
            return list(sent), _random_b(docs, d, max(1, target - len(sent)), rng), 1, 0
        cut = int(rng.integers(1, len(sent)))
        return sent[:cut], sent[cut:], 0, 0
    a_end = int(rng.integers(1, len(chunk)))
    a = [t for s in chunk[:a_end] for t in s]
    if is_random:  # the unused sentences are put back
        return a, _random_b(docs, d, max(1, target - len(a)), rng), 1, len(chunk) - a_end
    return a, [t for s in chunk[a_end:] for t in s], 0, 0


def nsp_pairs(docs: Sequence[Sequence[Sequence[int]]], max_tokens: int, bos: int, eos: int,
              rng: np.random.Generator, short_seq_prob: float = 0.1) -> list[Example]:
    """BERT's sentence-pair examples ``[CLS] A [SEP] B [SEP]`` with NSP labels.

    Per document: sentences are gathered until they reach a target length (``max_tokens - 3``,
    or with probability ``short_seq_prob`` a random shorter one); A is a random prefix of them;
    B is the rest (label 0) or, with probability 1/2, text from another random document
    (label 1). Needs at least two documents.
    """
    if len(docs) < 2:
        raise UserError("NSP needs at least two documents (separate them by blank lines, or "
                        "set data.doc_lines)")
    if max_tokens < 5:
        raise UserError(f"max_len must be at least 5 tokens for sentence pairs, got {max_tokens}")
    limit = max_tokens - 3
    out: list[Example] = []
    for d, doc in enumerate(docs):
        target = int(rng.integers(2, limit + 1)) if rng.random() < short_seq_prob else limit
        chunk: list[list[int]] = []
        length, i = 0, 0
        while i < len(doc):
            chunk.append(list(doc[i]))
            length += len(doc[i])
            if i == len(doc) - 1 or (length >= target and len(chunk) >= 2):
                a, b, label, back = _pair_from_chunk(chunk, docs, d, target, rng)
                i -= back
                if a and b:
                    _truncate_pair(a, b, limit, rng)
                    out.append(Example([bos, *a, eos, *b, eos],
                                       [0] * (len(a) + 2) + [1] * (len(b) + 1), label))
                chunk, length = [], 0
                if rng.random() < short_seq_prob:
                    target = int(rng.integers(2, limit + 1))
                else:
                    target = limit
            i += 1
    return out


# ---- batches ---------------------------------------------------------------------------------

@dataclass
class MLMBatch(RowBatch):
    """A padded batch: masked inputs, labels (:data:`IGNORE` = unscored), real-token mask."""

    ids: Tensor                     # (B, S) masked inputs
    labels: Tensor                  # (B, S) original ids at selected positions, else IGNORE
    attention_mask: Tensor          # (B, S) 1 = real token
    token_types: Tensor | None = None  # (B, S) segment ids (sentence pairs)
    nsp: Tensor | None = None       # (B,) 0 = IsNext, 1 = NotNext

    @property
    def n_tokens(self) -> int:
        """Real (non-padding) tokens, for throughput."""
        return int(self.attention_mask.sum())

    @property
    def n_masked(self) -> int:
        """Scored positions (the MLM loss normaliser)."""
        return int((self.labels != IGNORE).sum())


def collate(examples: Sequence[Example], pad_id: int) -> tuple[Tensor, Tensor, Tensor | None,
                                                               Tensor | None]:
    """(ids, attention mask, token types or None, NSP labels or None), right-padded."""
    width = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(examples), width, dtype=torch.long)
    has_types = examples[0].types is not None
    types = torch.zeros(len(examples), width, dtype=torch.long) if has_types else None
    for r, e in enumerate(examples):
        ids[r, : len(e.ids)] = torch.tensor(e.ids)
        mask[r, : len(e.ids)] = 1
        if types is not None:
            types[r, : len(e.ids)] = torch.tensor(e.types)
    nsp = torch.tensor([e.nsp for e in examples]) if examples[0].nsp >= 0 else None
    return ids, mask, types, nsp


def _generator(*seed: int) -> torch.Generator:
    """A torch generator seeded from a tuple of integers (NumPy's SeedSequence mixing)."""
    value = int(np.random.SeedSequence(list(seed)).generate_state(1, np.uint64)[0]) >> 1
    return torch.Generator().manual_seed(value)


def mask_examples(examples: Sequence[Example], masker: Masker, pad_id: int, gen_seed: tuple,
                  per_example: Sequence[int] | None = None) -> MLMBatch:
    """Collate and mask; ``per_example`` indices give each row its own generator (static)."""
    ids, mask, types, nsp = collate(examples, pad_id)
    if per_example is None:
        inputs, labels = masker(ids, mask, _generator(*gen_seed))
    else:
        rows = [masker(ids[r: r + 1], mask[r: r + 1], _generator(*gen_seed, int(i)))
                for r, i in enumerate(per_example)]
        inputs, labels = torch.cat([x for x, _ in rows]), torch.cat([y for _, y in rows])
    return MLMBatch(inputs, labels, mask, types, nsp)


class MLMBatches(EpochBatches):
    """Endless, exactly resumable stream of masked batches over fixed examples.

    Epoch ``e`` visits the examples in a permutation seeded by (seed, e), in batches of
    ``batch_size`` (the last partial batch of an epoch is dropped; the next epoch's order
    differs; :class:`attnkit.data.stream.EpochBatches`). Batch ``k`` is masked with a generator
    seeded by (seed, k) when ``masker.cfg.dynamic``, else each row by (seed, example index):
    BERT's static mask. The state is just ``k``.
    """

    def __init__(self, examples: Sequence[Example], batch_size: int, masker: Masker,
                 pad_id: int, seed: int = 0) -> None:
        if not examples:
            raise UserError("no training sequences: the text is empty")
        super().__init__(len(examples), batch_size, seed)
        self.examples, self.masker, self.pad_id = list(examples), masker, pad_id

    def batch(self, k: int) -> MLMBatch:
        """Batch number ``k`` (deterministic)."""
        rows = self.rows(k)
        chosen = [self.examples[i] for i in rows]
        if self.masker.cfg.dynamic:
            return mask_examples(chosen, self.masker, self.pad_id, (self.seed, 1, k))
        return mask_examples(chosen, self.masker, self.pad_id, (self.seed, 2), rows.tolist())


def eval_batches(examples: Sequence[Example], batch_size: int, masker: Masker, pad_id: int,
                 seed: int = 1234) -> list[MLMBatch]:
    """Held-out batches in order, each example masked once with its own fixed generator."""
    out = []
    for start in range(0, len(examples), batch_size):
        idx = list(range(start, min(start + batch_size, len(examples))))
        out.append(mask_examples([examples[i] for i in idx], masker, pad_id, (seed, 3), idx))
    return out


# ---- pre-training sequences of raw text -------------------------------------------------------

def sentence_docs(texts: list[str], doc_lines: int) -> list[list[str]]:
    """Documents of sentences from raw texts (see :func:`split_sentences`)."""
    docs = [d for t in texts for d in split_sentences(t, 0)]
    if len(docs) < 2 and doc_lines:
        docs = split_sentences("\n".join(s for d in docs for s in d), doc_lines)
    return docs


def make_examples(tok: Any, texts: list[str], *, max_len: int, nsp: bool, doc_lines: int,
                  seed: int, short_seq_prob: float = 0.1) -> list[Example]:
    """Training or held-out sequences: NSP pairs (BERT with nsp) or packed full sentences."""
    docs = encode_sentences(tok, sentence_docs(texts, doc_lines))
    if tok.bos_id is None or tok.eos_id is None:
        raise UserError("pre-training needs [CLS]/[SEP] (BOS/EOS) tokens in the tokenizer")
    if nsp:
        rng = np.random.default_rng(seed)
        return nsp_pairs(docs, max_len, tok.bos_id, tok.eos_id, rng, short_seq_prob)
    return pack_full_sentences(docs, max_len, tok.bos_id, tok.eos_id)


def held_out(examples: list[Example], eval_cfg: MLMEvalConfig, masker: Masker, pad_id: int
             ) -> list[MLMBatch]:
    """Held-out batches (the first ``max_sequences``), masked once with fixed seeds."""
    if eval_cfg.max_sequences:
        examples = examples[: eval_cfg.max_sequences]
    if not examples:
        raise UserError("the held-out text gives no sequences (raise data.val_fraction)")
    return eval_batches(examples, eval_cfg.batch_size, masker, pad_id)  # static masks
