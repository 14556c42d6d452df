"""The one resumable stream protocol (data/stream.py) and the streams built on it: stopped
mid-epoch and restored from a JSON round trip of the state, a fresh stream yields exactly the
batches the uninterrupted one did; epochs visit items without repeats; a state saved over other
data is refused."""

from __future__ import annotations

import itertools
import json
import threading
import time

import numpy as np
import pytest
import torch

from attnkit.data.algorithmic import GeneratedBatches, parity_examples
from attnkit.data.records import Item, ItemBatches
from attnkit.data.stream import BatchStream, EpochBatches, epoch_order
from attnkit.errors import UserError


class Rows(EpochBatches):
    """The rows themselves as the batch (the smallest subclass)."""

    def batch(self, k: int) -> list[int]:
        return self.rows(k).tolist()


def _resumed(make, cut: int, total: int) -> tuple[list, list, dict]:
    """(uninterrupted batches cut..total, resumed ones, the saved state)."""
    reference = list(itertools.islice(iter(make()), total))
    first = make()
    it = iter(first)
    for _ in range(cut):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))
    again = make()
    again.load_state_dict(state)
    return reference[cut:], list(itertools.islice(iter(again), total - cut)), state


def test_epochs_visit_every_item_once_in_seeded_orders():
    stream = Rows(n_items=10, batch_size=3, seed=5)  # 3 batches an epoch, item 10th dropped
    batches = list(itertools.islice(iter(stream), 9))
    for e in range(3):
        seen = [i for b in batches[3 * e: 3 * e + 3] for i in b]
        order = np.random.default_rng([5, e]).permutation(10)  # independent of epoch_order
        assert seen == order[:9].tolist() and len(set(seen)) == 9
    assert epoch_order(5, 0, 10).tolist() != epoch_order(5, 1, 10).tolist()


@pytest.mark.parametrize("cut", [1, 2, 4, 7])  # inside the first epoch, at a boundary, later
def test_epoch_batches_resume_mid_epoch(cut):
    want, got, state = _resumed(lambda: Rows(10, 3, seed=5), cut, 12)
    assert state["index"] == cut  # the position, not a fresh start
    assert got == want


def test_item_batches_resume_bitwise():
    items = [Item([1, 5 + i, 2], [0, 0, 0], i % 3) for i in range(11)]
    want, got, _ = _resumed(lambda: ItemBatches(items, 4, pad_id=0, seed=3), 5, 10)
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.ids, b.ids) and torch.equal(a.target, b.target)
    for k, batch in enumerate(want, start=5):  # batch k holds the items the epoch order names
        epoch, j = divmod(k, 11 // 4)
        rows = np.random.default_rng([3, epoch]).permutation(11)[4 * j: 4 * j + 4]
        assert batch.ids[:, 1].tolist() == [5 + int(r) for r in rows]
        assert batch.target.tolist() == [int(r) % 3 for r in rows]


def test_generated_batches_resume_bitwise():
    def make() -> GeneratedBatches:
        return GeneratedBatches(lambda g: parity_examples(g, 4, 6), seed=9)
    want, got, state = _resumed(make, 3, 8)
    assert state == {"index": 3, "seed": 9}
    for a, b in zip(got, want, strict=True):
        assert torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets)


def test_states_of_other_data_are_refused():
    stream = Rows(10, 3, seed=5)
    state = stream.state_dict()
    assert state == {"index": 0, "seed": 5, "n_items": 10, "batch_size": 3}
    with pytest.raises(UserError, match="10 items"):
        Rows(11, 3, seed=5).load_state_dict(state)
    with pytest.raises(UserError, match="seed 5"):
        Rows(10, 3, seed=6).load_state_dict(state)
    with pytest.raises(UserError, match="invalid data stream state"):
        stream.load_state_dict({"seed": 5})
    with pytest.raises(UserError, match="no training examples"):
        Rows(0, 3)
    with pytest.raises(UserError, match="batch_size"):
        Rows(5, 0)


def test_a_stream_without_batch_says_so():
    with pytest.raises(NotImplementedError):
        next(iter(BatchStream()))


def test_row_batch_moves_and_shards_its_tensor_fields():
    """Every batch class shares RowBatch: tensors move (but ``on_host`` ones), rows split
    ``rank::world``, ``None`` and non-tensor fields pass unchanged."""
    from attnkit.data.algorithmic import TensorBatch
    from attnkit.data.mlm import MLMBatch
    from attnkit.data.segments import MemoryCarry, SegmentBatch

    rows = torch.arange(5)
    gen = TensorBatch(rows[:, None] * 10, rows[:, None] * 20, rows + 1)
    on_meta = gen.to("meta")
    assert isinstance(on_meta, TensorBatch) and on_meta.inputs.device.type == "meta"
    assert on_meta.targets.device.type == "meta" and on_meta.counts.device.type == "cpu"
    assert len(gen) == 5 and gen.n_tokens == 15
    part = gen.shard(1, 2)
    assert part.inputs[:, 0].tolist() == [10, 30] and part.counts.tolist() == [2, 4]
    with pytest.raises(ValueError):
        gen.shard(2, 2)

    mlm = MLMBatch(rows[:, None], rows[:, None] + 1, torch.ones(5, 1, dtype=torch.long))
    part = mlm.shard(0, 3)
    assert part.labels[:, 0].tolist() == [1, 4] and part.token_types is None
    assert part.nsp is None and mlm.to("meta").token_types is None

    carry = MemoryCarry([torch.zeros(5, 2, 3)])
    seg = SegmentBatch(rows[:, None], rows[:, None], reset=True, carry=carry)
    part = seg.to("meta").shard(2, 3)
    assert part.ids.shape == (1, 1) and part.reset and part.carry is carry


# ---- batches built ahead on a background thread (what a GPU run does) -------------------------

def _lm_windows(prefetch: int | None) -> BatchStream:
    from attnkit.data.lm import LMWindows

    stream = LMWindows(torch.arange(500) % 37, block_size=8, batch_size=3, seed=4)
    stream.prefetch = prefetch
    return stream


def _token_batches(prefetch: int | None) -> BatchStream:
    from attnkit.data.batching import TokenBatches

    g = np.random.default_rng(0)
    pairs = [(list(g.integers(3, 20, g.integers(1, 9))), list(g.integers(3, 20, g.integers(1, 9))))
             for _ in range(60)]
    stream = TokenBatches(pairs, max_tokens=40, seed=2, chunk_size=16)
    stream.prefetch = prefetch
    return stream


def _fields(batch) -> list[torch.Tensor]:
    return [t for t in vars(batch).values() if isinstance(t, torch.Tensor)]


@pytest.mark.parametrize("make", [_lm_windows, _token_batches])
def test_prefetched_batches_and_states_equal_the_plain_ones(make):
    """Built 3 ahead or when asked for: the same batches, and after each the same state (the
    position of the next batch handed out, not of the next one built), across epochs of the
    token batches; restored mid-way, a prefetching stream continues exactly."""
    plain, ahead = make(0), make(3)
    for a, b in zip(itertools.islice(iter(plain), 40), itertools.islice(iter(ahead), 40),
                    strict=True):
        assert all(torch.equal(x, y) for x, y in zip(_fields(a), _fields(b), strict=True))
        assert plain.state_dict() == ahead.state_dict()
    reference, resumed, _ = _resumed(lambda: make(2), 17, 40)
    for a, b in zip(reference, resumed, strict=True):
        assert all(torch.equal(x, y) for x, y in zip(_fields(a), _fields(b), strict=True))


def test_place_builds_ahead_on_a_gpu_only_and_keeps_a_setting():
    stream = _lm_windows(None)
    stream.place(torch.device("cpu"))
    assert (stream.prefetch, stream.pin_memory) == (0, False)
    stream = _lm_windows(None)
    stream.place(torch.device("cuda"))  # only records the choice: nothing is built yet
    assert (stream.prefetch, stream.pin_memory) == (2, True)
    stream = _lm_windows(5)
    stream.place(torch.device("cuda"))
    assert stream.prefetch == 5


class Failing(BatchStream):
    def batch(self, k: int) -> int:
        if k == 5:
            raise UserError("batch 5 is broken")
        return k


def test_an_error_building_ahead_surfaces_when_its_batch_is_due_and_the_thread_stops():
    stream = Failing()
    stream.prefetch = 3
    it = iter(stream)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    with pytest.raises(UserError, match="batch 5 is broken"):
        next(it)
    assert stream.index == 5  # the position names the batch that failed
    ok = Rows(10, 2)
    ok.prefetch = 2
    it = iter(ok)
    next(it)
    it.close()  # what dropping the iterator does
    for _ in range(100):
        if not any(t.name == "attnkit-batches" and t.is_alive() for t in threading.enumerate()):
            break
        time.sleep(0.02)
    assert not any(t.name == "attnkit-batches" and t.is_alive() for t in threading.enumerate())
