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

Building ahead (:func:`ahead`): because batch ``k`` depends on ``k`` alone, a stream may build
the next ``prefetch`` batches on a background thread while the model trains on this one, and
still hand them out, and name its position, exactly as without. :meth:`BatchStream.place` (which
:func:`~attnkit.train.loop.fit` calls) turns it on for a GPU, where the step runs while the host
waits and the batch would otherwise be built in that gap, with the batches pinned on that thread
so that their copies do not block. On the CPU the thread buys nothing: building took 0.5-0.8%
of a training step for the lm and translate recipes (bench/data_prep.py, BENCHMARKS.md). So
``batch(k)`` must be safe to call on another thread: no global random state (a generator
seeded from ``k``, as every stream here does).
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import fields, replace
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import Tensor

from attnkit.accel import pin_memory, to_device
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


PREFETCH = 2  # batches built ahead on a GPU


def ahead(make: Callable[[Any], Any], keys: Iterable[Any], depth: int = 0,
          pin: bool = False) -> Iterator[tuple[Any, Any]]:
    """``(key, make(key))`` for each of ``keys`` in order; with ``depth`` > 0 made up to
    ``depth`` ahead on a background thread (and pinned there when ``pin``: CUDA only), else
    when asked for. An exception of ``make`` is raised here, when its batch is due; the thread
    stops when the iterator is closed or dropped."""
    if depth <= 0:
        for key in keys:
            yield key, pin_memory(make(key)) if pin else make(key)
        return
    made: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: tuple) -> None:
        while not stop.is_set():
            try:
                made.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    def produce() -> None:
        try:
            for key in keys:
                if stop.is_set():
                    return
                batch = make(key)
                offer((key, pin_memory(batch) if pin else batch, None))
        except BaseException as err:  # noqa: BLE001 (handed to the consumer)
            offer((None, None, err))

    threading.Thread(target=produce, name="attnkit-batches", daemon=True).start()
    try:
        while True:
            key, batch, err = made.get()
            if err is not None:
                raise err
            yield key, batch
    finally:
        stop.set()


class BatchStream:
    """Endless, exactly resumable stream: ``batch(k)`` for k = index, index + 1, ..."""

    position: ClassVar[tuple[str, ...]] = ("index",)  # the attributes that are the state

    def __init__(self) -> None:
        self.index = 0  # the next batch to yield
        self.prefetch: int | None = None  # batches built ahead (None: :meth:`place` decides)
        self.pin_memory = False  # pin them (on the building thread) for a CUDA GPU

    def place(self, device: torch.device) -> None:
        """Where the batches will be used: on a GPU build :data:`PREFETCH` ahead, pinned for
        CUDA; on the CPU none ahead (module docstring). A ``prefetch`` already set is kept."""
        if self.prefetch is None:
            self.prefetch = 0 if device.type == "cpu" else PREFETCH
        self.pin_memory = device.type == "cuda"

    def batch(self, k: int) -> Any:
        """Batch number ``k`` (deterministic)."""
        raise NotImplementedError

    def fingerprint(self) -> dict[str, Any]:
        """Settings saved with the position and checked on resume (seed, data sizes)."""
        return {}

    def __iter__(self) -> Iterator[Any]:
        for k, batch in ahead(self.batch, itertools.count(self.index), self.prefetch or 0,
                              self.pin_memory):
            self.index = k + 1  # before yielding: the state then names the next batch
            yield batch

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
