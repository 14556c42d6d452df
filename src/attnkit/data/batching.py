"""Sequence-to-sequence batches by token count, with length bucketing and exact resume.

Following Vaswani et al. (2017, sec. 5.1), "sentence pairs were batched together by
approximate sequence length"; each batch holds about ``max_tokens`` tokens. A pair costs
``max(len(src), len(tgt) + 1)`` positions (the target gains BOS on the input side and EOS on the
output side) and a batch of ``n`` pairs costs ``n * max(cost)``, its padded size.

Sources are used as given (no BOS/EOS added): append EOS to sources before batching if the
model wants it. ``pairs`` are token id lists, e.g. from :meth:`Tokenizer.encode_batch`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from attnkit.data.stream import BatchStream, RowBatch, ahead
from attnkit.errors import UserError

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2

Pair = tuple[list[int], list[int]]


@dataclass
class Seq2SeqBatch(RowBatch):
    """A padded batch; ``index`` holds each row's position in the original pair list."""

    src: torch.Tensor  # (B, S) int64, right-padded with PAD
    tgt_in: torch.Tensor  # (B, T) BOS y1..yn, right-padded
    tgt_out: torch.Tensor  # (B, T) y1..yn EOS, right-padded
    index: torch.Tensor | None = None  # (B,) int64
    on_host = ("index",)  # bookkeeping: ``to`` leaves it where it is

    @property
    def n_tokens(self) -> int:
        """Number of non-PAD target tokens (the loss normaliser)."""
        return int((self.tgt_out != PAD_ID).sum())


def _pad(seqs: list[list[int]]) -> torch.Tensor:
    """Right-pad lists of ids with PAD into a (B, max(1, longest)) int64 tensor."""
    width = max(1, max((len(s) for s in seqs), default=0))
    out = torch.full((len(seqs), width), PAD_ID, dtype=torch.int64)
    for row, s in enumerate(seqs):
        out[row, : len(s)] = torch.as_tensor(s, dtype=torch.int64)
    return out


def collate(pairs: list[Pair], index: list[int] | None = None) -> Seq2SeqBatch:
    """Pad (src, tgt) id pairs: ``tgt_in`` = BOS + tgt, ``tgt_out`` = tgt + EOS."""
    if not pairs:
        raise ValueError("cannot collate an empty list of pairs")
    src = _pad([list(s) for s, _ in pairs])
    tgt_in = _pad([[BOS_ID, *t] for _, t in pairs])
    tgt_out = _pad([[*t, EOS_ID] for _, t in pairs])
    idx = None if index is None else torch.as_tensor(index, dtype=torch.int64)
    return Seq2SeqBatch(src, tgt_in, tgt_out, idx)


def _lengths(pairs: list[Pair]) -> tuple[np.ndarray, np.ndarray]:
    src = np.fromiter((len(s) for s, _ in pairs), dtype=np.int64, count=len(pairs))
    tgt = np.fromiter((len(t) for _, t in pairs), dtype=np.int64, count=len(pairs))
    return src, tgt


def _cut(order: np.ndarray, cost: np.ndarray, max_tokens: int) -> list[list[int]]:
    """Greedily cut ``order`` into batches with ``len(batch) * max(cost) <= max_tokens``."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order.tolist():
        c = int(cost[i])
        if current and (len(current) + 1) * max(longest, c) > max_tokens:
            batches.append(current)
            current, longest = [], 0
        current.append(i)
        longest = max(longest, c)
    if current:
        batches.append(current)
    return batches


def _bucket(src_len: np.ndarray, tgt_len: np.ndarray, order: np.ndarray, max_tokens: int,
            chunk_size: int) -> list[list[int]]:
    """Sort each chunk of ``order`` by length (stable: ties keep their shuffled order), cut."""
    cost = np.maximum(src_len, tgt_len + 1)
    batches = []
    for start in range(0, len(order), chunk_size):
        chunk = order[start: start + chunk_size]
        # np.lexsort sorts by the last key first: cost, then src length, then tgt length.
        chunk = chunk[np.lexsort((tgt_len[chunk], src_len[chunk], cost[chunk]))]
        batches.extend(_cut(chunk, cost, max_tokens))
    return batches


def _check(pairs: list[Pair], max_tokens: int) -> None:
    if not pairs:
        raise UserError("no training pairs to batch (is the data file empty?)")
    if max_tokens < 1:
        raise UserError(f"max_tokens must be positive, got {max_tokens}")


class TokenBatches(BatchStream):
    """Infinite, shuffled, resumable stream of Seq2SeqBatch by token count with length bucketing.

    Each epoch: shuffle the pairs (generator seeded by ``(seed, epoch)``), sort by length inside
    chunks of ``chunk_size`` pairs, cut into batches of at most ``max_tokens`` padded positions,
    then shuffle the order of the batches. A single pair longer than ``max_tokens`` forms its
    own batch. With ``shuffle=False`` every epoch is the whole set sorted by length.

    The stream's position is part of the object: :meth:`state_dict` after receiving a batch
    names the next one, so iterating a fresh object after :meth:`load_state_dict` continues
    exactly where the saved one stopped. Do not iterate one object from two loops at once.
    The position is (epoch, index within the epoch), not one batch number as in the other
    streams (:mod:`attnkit.data.stream`): epochs hold different numbers of batches.
    """

    position = ("epoch", "index")

    def __init__(self, pairs: list[Pair], max_tokens: int, seed: int = 0,
                 shuffle: bool = True, chunk_size: int = 1 << 16) -> None:
        super().__init__()
        _check(pairs, max_tokens)
        self.pairs = pairs
        self.max_tokens = max_tokens
        self.seed = seed
        self.shuffle = shuffle
        self.chunk_size = max(1, chunk_size)
        self.src_len, self.tgt_len = _lengths(pairs)
        self.epoch = 0
        self._cache: tuple[int, list[list[int]]] | None = None

    def epoch_batches(self, epoch: int) -> list[list[int]]:
        """The pair indices of every batch of ``epoch``, in order (deterministic)."""
        if self._cache is not None and self._cache[0] == epoch:
            return self._cache[1]
        n = len(self.pairs)
        if not self.shuffle:
            batches = _bucket(self.src_len, self.tgt_len, np.arange(n), self.max_tokens, n)
        else:
            rng = np.random.default_rng([self.seed, epoch])
            order = rng.permutation(n)
            batches = _bucket(self.src_len, self.tgt_len, order, self.max_tokens,
                              self.chunk_size)
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cache = (epoch, batches)
        return batches

    def _positions(self) -> Iterator[tuple[int, int]]:
        """(epoch, index) of every batch from the current position on."""
        epoch, index = self.epoch, self.index
        while True:
            yield from ((epoch, i) for i in range(index, len(self.epoch_batches(epoch))))
            epoch, index = epoch + 1, 0

    def _batch(self, at: tuple[int, int]) -> Seq2SeqBatch:
        ids = self.epoch_batches(at[0])[at[1]]
        return collate([self.pairs[i] for i in ids], ids)

    def __iter__(self) -> Iterator[Seq2SeqBatch]:
        for (epoch, index), batch in ahead(self._batch, self._positions(), self.prefetch or 0,
                                           self.pin_memory):
            self.epoch, self.index = epoch, index + 1  # the state names the next batch
            yield batch

    def fingerprint(self) -> dict:
        return {"n_pairs": len(self.pairs), "seed": self.seed}


def eval_batches(pairs: list[Pair], max_tokens: int) -> list[Seq2SeqBatch]:
    """One pass over ``pairs`` sorted by length, each exactly once; ``batch.index`` maps rows
    back to positions in ``pairs`` (to restore the original order of hypotheses)."""
    _check(pairs, max_tokens)
    src_len, tgt_len = _lengths(pairs)
    ids = _bucket(src_len, tgt_len, np.arange(len(pairs)), max_tokens, len(pairs))
    return [collate([pairs[i] for i in b], b) for b in ids]
