"""The protocol of every training stream :func:`attnkit.train.loop.fit` reads, in one place.

A stream is endless and exactly resumable: batch ``k`` is a pure function of the stream's
settings and ``k`` (its seed mixed with ``k``, or with the epoch ``k`` falls in), so the
position alone is the state. :meth:`BatchStream.state_dict` taken after receiving a batch
names the next one; a fresh stream over the same data continues bitwise after
:meth:`BatchStream.load_state_dict`, which refuses a state saved over other data (the
:meth:`BatchStream.fingerprint` keys: seed, sizes).

- :class:`BatchStream`: the position ``index``, iteration, state, fingerprint checks;
  a subclass gives ``batch(k)`` (random windows of a text, generated problems, segments).
- :class:`RowBatch`: what every batch a stream yields shares: ``to(device)``,
  ``shard(rank, world)`` and ``len`` over its tensor fields, one row per example.
- :class:`EpochBatches`: fixed items visited epoch by epoch, epoch ``e`` in a permutation
  seeded by ``(seed, e)``, ``batch_size`` items a batch, the last partial batch of an epoch
  dropped; a subclass turns the rows of batch ``k`` into a batch (masked sequences, encoded
  records).

Streams whose position is not one number say so by overriding ``position`` (token-count
batching, whose epochs hold different numbers of batches) or by adding to the state
(Transformer-XL's segment memory).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import fields, replace
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import Tensor

from attnkit.accel import to_device
from attnkit.errors import UserError


class RowBatch:
    """Base of the batch dataclasses: their tensor fields hold one row per example (``None``
    and other fields, such as a carried memory, are passed along unchanged)."""

    on_host: ClassVar[tuple[str, ...]] = ()  # bookkeeping tensors ``to`` leaves where they are

    def _tensors(self) -> dict[str, Tensor]:
        return {f.name: v for f in fields(self)
                if isinstance(v := getattr(self, f.name), Tensor)}

    def to(self, device: torch.device | str) -> Self:
        """The batch with its tensors (but ``on_host``) on ``device`` (:func:`to_device`)."""
        return to_device(self, device)

    def __len__(self) -> int:
        return next(iter(self._tensors().values())).shape[0]

    def shard(self, rank: int, world: int) -> Self:
        """Rows ``rank::world`` (data parallel); may be empty when the batch has < world rows."""
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside world of size {world}")
        return replace(self, **{k: v[rank::world] for k, v in self._tensors().items()})


class BatchStream:
    """Endless, exactly resumable stream: ``batch(k)`` for k = index, index + 1, ..."""

    position: ClassVar[tuple[str, ...]] = ("index",)  # the attributes that are the state

    def __init__(self) -> None:
        self.index = 0  # the next batch to yield

    def batch(self, k: int) -> Any:
        """Batch number ``k`` (deterministic)."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """Settings saved with the position and checked on resume (seed, data sizes)."""
        return {}

    def __iter__(self) -> Iterator[Any]:
        while True:
            k = self.index
            self.index += 1  # before yielding: the state then names the next batch
            yield self.batch(k)

    def state_dict(self) -> dict[str, Any]:
        return {**{name: getattr(self, name) for name in self.position}, **self.fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a :meth:`state_dict` of a stream over the same data."""
        try:
            values = {name: int(state[name]) for name in self.position}
        except (KeyError, TypeError, ValueError):
            raise UserError(f"invalid data stream state: {state!r}") from None
        for key, have in self.fingerprint().items():
            if key in state and state[key] != have:
                saved = (f"over {state[key]} {key[2:]} ({key})" if key.startswith("n_")
                         else f"with {key} {state[key]}")
                raise UserError(f"data stream state was saved {saved}, but the data now has "
                                f"{have}")
        for name, value in values.items():
            setattr(self, name, value)


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The visiting order of ``n`` items in ``epoch``: a permutation seeded by (seed, epoch)."""
    return np.random.default_rng([seed, epoch]).permutation(n)


class EpochBatches(BatchStream):
    """Fixed items in epoch-shuffled batches; a subclass's ``batch(k)`` reads ``rows(k)``."""

    def __init__(self, n_items: int, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        if batch_size < 1:
            raise UserError(f"batch_size must be >= 1, got {batch_size}")
        if n_items < 1:
            raise UserError("no training examples")
        self.n_items, self.seed = n_items, seed
        self.batch_size = min(batch_size, n_items)
        self.per_epoch = n_items // self.batch_size

    def rows(self, k: int) -> np.ndarray:
        """Item indices of batch ``k``."""
        epoch, j = divmod(k, self.per_epoch)
        order = epoch_order(self.seed, epoch, self.n_items)
        return order[j * self.batch_size: (j + 1) * self.batch_size]

    def fingerprint(self) -> dict[str, Any]:
        return {"seed": self.seed, "n_items": self.n_items, "batch_size": self.batch_size}
