"""Generated algorithmic tasks as tensors: sorting numbers, copying bit vectors, parity.

- ``sort``: lists of numbers to sort, the task of Vinyals, Bengio & Kudlur (2016, "Order
  Matters", sec. 4.3: floats drawn uniformly from [0, 1)) solved with a pointer network
  (Vinyals, Fortunato & Jaitly 2015); integers in [0, max_value) as an option. The target is
  the stable ``argsort``: the input positions in output order.
- ``copy``: the neural Turing machine's copy task (Graves, Wayne & Danihelka 2014, sec. 4.1):
  random binary vectors of ``width`` bits, a delimiter on an extra channel, then as many blank
  steps as vectors, during which the model must emit the sequence.
- ``parity``: Graves (2016, sec. 3.1): vectors of ``size`` entries of which a random number
  (1..size) are set to +1 or -1 at random positions, the rest 0; the target is 1 when the
  number of +1 entries is odd.

Every generator draws from the ``torch.Generator`` it is given, so a batch is fixed by its
seed. :class:`GeneratedBatches` is the endless, resumable stream :func:`attnkit.train.loop.fit`
consumes: batch ``i`` is drawn from a generator seeded by ``(seed, i)``, and its state is just
``i``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from attnkit.data.stream import BatchStream, RowBatch
from attnkit.errors import UserError


@dataclass
class TensorBatch(RowBatch):
    """Generated examples: ``inputs`` and ``targets`` (B, ...) and ``counts`` (B,), the number
    of loss units (sorted positions, copied bits, parity labels) each row carries."""

    inputs: Tensor
    targets: Tensor
    counts: Tensor  # (B,) int64
    on_host = ("counts",)  # read on the host (``n_tokens``): ``to`` leaves it there

    @property
    def n_tokens(self) -> int:
        """Loss units in the batch (what the trainer counts as tokens seen)."""
        return int(self.counts.sum())


def _check_batch(batch: int, length: int) -> None:
    if batch < 1 or length < 1:
        raise UserError(f"batch size and length must be >= 1, got {batch} and {length}")


def sort_examples(gen: torch.Generator, batch: int, length: int, kind: str = "float",
                  max_value: int = 100) -> TensorBatch:
    """``batch`` lists of ``length`` numbers; targets are the stable argsort (B, length).

    ``kind="float"``: float32 uniform in [0, 1); ``kind="int"``: int64 uniform in
    [0, max_value) (ties keep input order).
    """
    _check_batch(batch, length)
    if kind == "float":
        inputs = torch.rand(batch, length, generator=gen)  # (B, L)
    elif kind == "int":
        if max_value < 1:
            raise UserError(f"max_value must be >= 1, got {max_value}")
        inputs = torch.randint(0, max_value, (batch, length), generator=gen)  # (B, L)
    else:
        raise UserError(f"sort kind must be 'float' or 'int', got {kind!r}")
    targets = torch.sort(inputs, dim=1, stable=True).indices  # (B, L) positions in output order
    return TensorBatch(inputs, targets, torch.full((batch,), length, dtype=torch.int64))


def copy_examples(gen: torch.Generator, batch: int, length: int, width: int = 8) -> TensorBatch:
    """The copy task: inputs (B, 2 * length + 1, width + 1), targets (B, length, width).

    Steps 0..length-1 hold the random bits (channel ``width`` is 0), step ``length`` is the
    delimiter (only channel ``width`` is 1), the last ``length`` steps are blank: the model's
    outputs there are compared with the bits. ``counts`` are the bits to reproduce per row.
    """
    _check_batch(batch, length)
    if width < 1:
        raise UserError(f"copy width must be >= 1, got {width}")
    bits = torch.randint(0, 2, (batch, length, width), generator=gen).float()  # (B, L, W)
    inputs = torch.zeros(batch, 2 * length + 1, width + 1)  # (B, 2L+1, W+1)
    inputs[:, :length, :width] = bits
    inputs[:, length, width] = 1.0
    return TensorBatch(inputs, bits, torch.full((batch,), length * width, dtype=torch.int64))


def parity_examples(gen: torch.Generator, batch: int, size: int = 64) -> TensorBatch:
    """Graves (2016) parity: inputs (B, size) in {-1, 0, 1}, targets (B,) float in {0, 1}."""
    _check_batch(batch, size)
    nonzero = torch.randint(1, size + 1, (batch, 1), generator=gen)  # (B, 1) how many set
    ranks = torch.rand(batch, size, generator=gen).argsort(dim=1)  # random positions
    chosen = ranks < nonzero  # (B, size): exactly `nonzero` True per row
    signs = torch.randint(0, 2, (batch, size), generator=gen).float() * 2 - 1
    inputs = torch.where(chosen, signs, torch.zeros(()))
    targets = ((inputs == 1).sum(dim=1) % 2).float()  # (B,)
    return TensorBatch(inputs, targets, torch.ones(batch, dtype=torch.int64))


def batch_generator(seed: int, index: int) -> torch.Generator:
    """The generator of batch ``index`` of a stream seeded with ``seed`` (independent streams)."""
    state = np.random.SeedSequence([seed, index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class GeneratedBatches(BatchStream):
    """Endless resumable stream: batch ``i`` is ``make(batch_generator(seed, i))``
    (:class:`attnkit.data.stream.BatchStream`: the state is ``i`` and the seed)."""

    def __init__(self, make: Callable[[torch.Generator], TensorBatch], seed: int = 0) -> None:
        super().__init__()
        self.make = make
        self.seed = seed

    def batch(self, k: int) -> TensorBatch:
        return self.make(batch_generator(self.seed, k))

    def fingerprint(self) -> dict:
        return {"seed": self.seed}


def fixed_batches(make: Callable[[torch.Generator], TensorBatch], seed: int, n: int
                  ) -> list[TensorBatch]:
    """``n`` batches drawn as a stream seeded with ``seed`` would (evaluation sets)."""
    return [make(batch_generator(seed, i)) for i in range(n)]
