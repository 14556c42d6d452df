"""Transformer-XL batching: B parallel contiguous token streams cut into consecutive segments.

The token stream is cut into ``batch_size`` equal contiguous rows (the tail that does not fill
a row is dropped); row b is read left to right in segments of ``seg_len`` tokens, and batch k
holds segment k of every row, so the memory a model keeps from batch k is exactly the context
of batch k + 1 (Dai et al. 2019, section 3.2; the original ``LMOrderedIterator``).

Memory reset rules (training, :class:`SegmentStream`):

- the memory lives in the stream's :class:`MemoryCarry`, which the loss function reads before
  and writes after each segment (``batch.carry``);
- it is dropped (``batch.reset`` is True) at the first segment of every pass over the data:
  when the stream wraps around, the next segment does not follow the previous one;
- it is saved in :meth:`SegmentStream.state_dict`, so a resumed run continues with the memory
  it had (bitwise equal to an uninterrupted run). Under torch.distributed each rank keeps the
  memory of its own rows; the training loop gathers every rank's state into the checkpoint
  (``per_rank_state``) and each rank takes its own back. Resumed with another number of
  processes, the rows move between ranks and the memory starts empty (one segment of less
  context, said on stderr).

Evaluation (:func:`score_segments`) reads held-out text the same way (one row by default, so
every character is scored) with the memory carried across all its segments, and reports bits
per character.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from attnkit.data.stream import BatchStream, RowBatch
from attnkit.errors import UserError
from attnkit.evaluation import NLLScore, eval_loop
from attnkit.losses import token_nll


@dataclass
class MemoryCarry:
    """The recurrence memory carried from one segment to the next (per layer (B, M, C))."""

    mems: list[Tensor] | None = None


@dataclass
class SegmentBatch(RowBatch):
    """Segment k of every row: inputs, next-token targets, and the memory to continue from."""

    ids: Tensor  # (B, T) int64
    targets: Tensor  # (B, T) int64
    reset: bool = False  # True: this segment does not continue the previous one
    carry: MemoryCarry = field(default_factory=MemoryCarry)

    @property
    def n_tokens(self) -> int:
        return self.targets.numel()


def stream_rows(stream: Tensor, batch_size: int) -> Tensor:
    """(B, N // B) contiguous rows of a 1-D token stream (the tail is dropped)."""
    if stream.dim() != 1:
        raise UserError(f"expected a 1-D token stream, got shape {tuple(stream.shape)}")
    if batch_size < 1:
        raise UserError(f"batch_size must be >= 1, got {batch_size}")
    n = len(stream) // batch_size
    if n < 2:
        raise UserError(f"{len(stream)} tokens cannot fill {batch_size} rows of 2 tokens")
    return stream[: n * batch_size].view(batch_size, n)


class SegmentStream(BatchStream):
    """Endless, exactly resumable stream of :class:`SegmentBatch` for :func:`fit`.

    Not epoch-shuffled like the other streams (:mod:`attnkit.data.stream`): Transformer-XL
    reads its rows in order, because the memory kept from segment k is the context of
    segment k + 1. The position is :class:`~attnkit.data.stream.BatchStream`'s; the state
    adds the memory (per rank under torch.distributed).
    """

    def __init__(self, stream: Tensor, batch_size: int, seg_len: int) -> None:
        super().__init__()
        if seg_len < 1:
            raise UserError(f"seg_len must be >= 1, got {seg_len}")
        self.rows = stream_rows(stream.long(), batch_size)
        self.batch_size, self.seg_len = batch_size, seg_len
        self.n_segments = (self.rows.size(1) - 1) // seg_len  # full segments per pass
        if self.n_segments < 1:
            raise UserError(f"the training text has {len(stream)} tokens: {batch_size} rows of "
                            f"{self.rows.size(1)} cannot hold one segment of {seg_len} + 1 "
                            "(lower seg_len or batch_size)")
        self.carry = MemoryCarry()

    def batch(self, k: int) -> SegmentBatch:
        """Batch number ``k``: segment k mod n_segments of every row."""
        pos = k % self.n_segments
        start = pos * self.seg_len
        window = self.rows[:, start: start + self.seg_len + 1]
        return SegmentBatch(window[:, :-1].contiguous(), window[:, 1:].contiguous(),
                            reset=pos == 0, carry=self.carry)

    per_rank_state = True  # the memory differs between ranks: fit saves every rank's state

    def fingerprint(self) -> dict:
        return {"batch_size": self.batch_size, "seg_len": self.seg_len,
                "n_segments": self.n_segments}

    def state_dict(self) -> dict:
        mems = self.carry.mems or []
        return {**super().state_dict(), "memory": [m.detach().cpu() for m in mems]}

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        mems = list(state.get("memory") or [])
        from attnkit.train import distributed as dist
        rows = len(range(dist.rank(), self.batch_size, dist.world_size()))
        if mems and any(m.dim() < 1 or m.size(0) != rows for m in mems):
            print(f"note: the saved segment memory holds {mems[0].size(0)} rows, this process "
                  f"reads {rows}: starting with an empty memory", file=sys.stderr)
            mems = []
        self.carry.mems = mems or None


Forward = Callable[[Tensor, list[Tensor] | None], tuple[Tensor, list[Tensor]]]


def score_segments(forward: Forward, stream: Tensor, seg_len: int, batch_size: int = 1,
                   chars: int | None = None, device: torch.device | str = "cpu") -> NLLScore:
    """Score every target of ``batch_size`` contiguous rows of ``stream``, segment by segment,
    carrying the memory: ``forward(ids (B, t), mems) -> (logits (B, t, V), new mems)``.

    ``chars`` is the number of characters the stream stands for (default: its targets); with
    several rows the dropped tail and row starts are not scored, and the characters are
    counted in proportion. Gradients are not kept.
    """
    rows = stream_rows(stream.long(), batch_size).to(device)  # the model's device
    total_targets = len(stream) - 1
    chars = total_targets if chars is None else chars
    nll, count, mems = 0.0, 0, None
    with torch.no_grad():
        for start in eval_loop(range(0, rows.size(1) - 1, seg_len)):
            window = rows[:, start: start + seg_len + 1]
            logits, mems = forward(window[:, :-1], mems)
            loss, n = token_nll(logits, window[:, 1:])
            nll, count = nll + float(loss), count + n  # a Python float sum: MPS has no float64
    return NLLScore(nll, count, chars * count / max(1, total_targets))
