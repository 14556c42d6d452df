"""Text reading, seq2seq batching (budget, coverage, exact resume, sharding), synthetic tasks."""

from __future__ import annotations

import gzip
import itertools
import random
from pathlib import Path

import pytest
import torch

from attnkit.data import (
    TASKS,
    Seq2SeqBatch,
    TokenBatches,
    collate,
    eval_batches,
    read_lines,
    read_parallel,
    read_text,
    synthetic_pairs,
)
from attnkit.errors import UserError

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "multi30k").exists(), reason="shared data missing")


# ---------------------------------------------------------------- text files

def test_read_lines_plain_crlf_and_gz(tmp_path):
    (tmp_path / "a.txt").write_bytes("eins\r\nzwei\n\ndrei ü\n".encode())
    assert read_lines(tmp_path / "a.txt") == ["eins", "zwei", "", "drei ü"]
    with gzip.open(tmp_path / "b.txt.gz", "wt", encoding="utf-8") as f:
        f.write("x y\nlast line without newline")
    assert read_lines(tmp_path / "b.txt.gz") == ["x y", "last line without newline"]
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello\n")
    assert read_lines(tmp_path / "bom.txt") == ["hello"]
    assert read_text(tmp_path / "a.txt") == "eins\r\nzwei\n\ndrei ü\n"


def test_read_errors_are_one_line(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.txt").write_bytes(b"ok\nfine\nbad \xff byte\n")
    (tmp_path / "bad.gz").write_bytes(b"not gzip at all")
    cases = [(tmp_path / "missing.txt", "not found"), (tmp_path / "empty.txt", "empty"),
             (tmp_path, "directory"), (tmp_path / "bad.txt", r"UTF-8 \(line 3"),
             (tmp_path / "bad.gz", "gzip")]
    for path, pattern in cases:
        for fn in (read_lines, read_text):
            with pytest.raises(UserError, match=pattern) as err:
                fn(path)
            assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_read_parallel(tmp_path):
    (tmp_path / "s").write_text("a\nb\nc\n", encoding="utf-8")
    (tmp_path / "t").write_text("A\nB\nC\n", encoding="utf-8")
    (tmp_path / "u").write_text("A\nB\n", encoding="utf-8")
    assert read_parallel(tmp_path / "s", tmp_path / "t") == [("a", "A"), ("b", "B"), ("c", "C")]
    with pytest.raises(UserError, match="has 3 lines.*has 2"):
        read_parallel(tmp_path / "s", tmp_path / "u")


# ---------------------------------------------------------------- batching

def _random_pairs(n: int, seed: int = 0, max_len: int = 40) -> list[tuple[list[int], list[int]]]:
    rng = random.Random(seed)
    return [([rng.randint(5, 99) for _ in range(rng.randint(1, max_len))],
             [rng.randint(5, 99) for _ in range(rng.randint(1, max_len))]) for _ in range(n)]


def test_collate_layout():
    b = collate([([7, 8, 9], [5]), ([6], [4, 4, 4])], index=[3, 1])
    assert torch.equal(b.src, torch.tensor([[7, 8, 9], [6, 0, 0]]))
    assert torch.equal(b.tgt_in, torch.tensor([[1, 5, 0, 0], [1, 4, 4, 4]]))
    assert torch.equal(b.tgt_out, torch.tensor([[5, 2, 0, 0], [4, 4, 4, 2]]))
    assert b.src.dtype == torch.int64 and b.n_tokens == 6 and len(b) == 2
    assert torch.equal(b.index, torch.tensor([3, 1]))
    moved = b.to("cpu")
    assert isinstance(moved, Seq2SeqBatch) and torch.equal(moved.tgt_out, b.tgt_out)


def _cost(batch: Seq2SeqBatch) -> int:
    return len(batch) * max(batch.src.shape[1], batch.tgt_in.shape[1])


def test_token_budget_and_coverage_per_epoch():
    pairs = _random_pairs(500) + [([9] * 300, [9] * 10)]  # one pair longer than the budget
    stream = TokenBatches(pairs, max_tokens=256, seed=3, chunk_size=128)
    for epoch in range(3):
        batches = stream.epoch_batches(epoch)
        seen = sorted(i for b in batches for i in b)
        assert seen == list(range(len(pairs)))  # every pair exactly once
        for b in batches:
            cost = len(b) * max(max(len(pairs[i][0]), len(pairs[i][1]) + 1) for i in b)
            assert cost <= 256 or b == [500]
    assert stream.epoch_batches(0) != stream.epoch_batches(1)  # reshuffled per epoch
    assert TokenBatches(pairs, 256, seed=3, chunk_size=128).epoch_batches(1) == \
        stream.epoch_batches(1)  # deterministic from seed + epoch
    assert TokenBatches(pairs, 256, seed=4, chunk_size=128).epoch_batches(1) != \
        stream.epoch_batches(1)
    first = list(itertools.islice(iter(stream), len(stream.epoch_batches(0))))
    assert all(_cost(b) <= 256 for b in first if b.index.tolist() != [500])
    assert sorted(torch.cat([b.index for b in first]).tolist()) == list(range(len(pairs)))


def test_batch_contents_match_pairs():
    pairs = _random_pairs(50)
    stream = TokenBatches(pairs, max_tokens=200, seed=1)
    batch = next(iter(stream))
    for row, i in enumerate(batch.index.tolist()):
        src, tgt = pairs[i]
        assert batch.src[row, : len(src)].tolist() == src
        assert batch.tgt_out[row, : len(tgt) + 1].tolist() == tgt + [2]


def test_resume_from_state_dict_is_exact():
    pairs = _random_pairs(120, seed=5)
    n_epoch = len(TokenBatches(pairs, 300, seed=7).epoch_batches(0))
    total = 2 * n_epoch + 5  # crosses two epoch boundaries
    reference = list(itertools.islice(iter(TokenBatches(pairs, 300, seed=7)), total))
    for cut in (0, 3, n_epoch - 1, n_epoch, n_epoch + 2):
        first = TokenBatches(pairs, 300, seed=7)
        it = iter(first)
        for _ in range(cut):
            next(it)
        state = first.state_dict()
        resumed = TokenBatches(pairs, 300, seed=7)
        resumed.load_state_dict(dict(state))
        rest = list(itertools.islice(iter(resumed), total - cut))
        for a, b in zip(rest, reference[cut:], strict=True):
            assert torch.equal(a.index, b.index) and torch.equal(a.src, b.src)
            assert torch.equal(a.tgt_in, b.tgt_in)


def test_state_dict_errors():
    stream = TokenBatches(_random_pairs(20), 100)
    with pytest.raises(UserError, match="invalid data stream state"):
        stream.load_state_dict({"epoch": 1})
    with pytest.raises(UserError, match="19 pairs"):
        stream.load_state_dict({"epoch": 0, "index": 0, "n_pairs": 19})
    with pytest.raises(UserError):
        TokenBatches([], 100)
    with pytest.raises(UserError):
        TokenBatches(_random_pairs(3), 0)


def test_no_shuffle_is_sorted_and_repeats():
    pairs = _random_pairs(100)
    stream = TokenBatches(pairs, 200, shuffle=False)
    order = [i for b in stream.epoch_batches(0) for i in b]
    costs = [max(len(pairs[i][0]), len(pairs[i][1]) + 1) for i in order]
    assert costs == sorted(costs)
    assert stream.epoch_batches(0) == stream.epoch_batches(5)


def test_eval_batches_cover_once_in_length_order():
    pairs = _random_pairs(200, seed=2)
    batches = eval_batches(pairs, max_tokens=150)
    index = torch.cat([b.index for b in batches]).tolist()
    assert sorted(index) == list(range(200))
    costs = [max(len(pairs[i][0]), len(pairs[i][1]) + 1) for i in index]
    assert costs == sorted(costs)
    assert all(_cost(b) <= 150 for b in batches)


def test_shard_rows():
    batch = collate(_random_pairs(7), index=list(range(7)))
    shards = [batch.shard(r, 3) for r in range(3)]
    assert [s.index.tolist() for s in shards] == [[0, 3, 6], [1, 4], [2, 5]]
    for r, s in enumerate(shards):
        assert torch.equal(s.src, batch.src[r::3]) and torch.equal(s.tgt_out, batch.tgt_out[r::3])
    assert sum(s.n_tokens for s in shards) == batch.n_tokens
    with pytest.raises(ValueError):
        batch.shard(3, 3)


@needs_data
def test_padding_is_low_on_multi30k_lengths():
    pairs = read_parallel(DATA / "multi30k" / "train.en.gz", DATA / "multi30k" / "train.de.gz")
    ids = [([5] * len(s.split()), [6] * len(t.split())) for s, t in pairs]  # word-level lengths
    for max_tokens in (500, 2000):
        batches = TokenBatches(ids, max_tokens, seed=0).epoch_batches(0)
        slots = real = 0
        for b in batches:
            s_max = max(len(ids[i][0]) for i in b)
            t_max = max(len(ids[i][1]) for i in b) + 1
            slots += len(b) * (s_max + t_max)
            real += sum(len(ids[i][0]) + len(ids[i][1]) + 1 for i in b)
        assert 1 - real / slots < 0.20


# ---------------------------------------------------------------- synthetic tasks

def test_synthetic_tasks():
    for task, fn in TASKS.items():
        pairs = synthetic_pairs(task, 200, 2, 9, seed=1, alphabet="abcde")
        assert pairs == synthetic_pairs(task, 200, 2, 9, seed=1, alphabet="abcde")
        assert {len(s) for s, _ in pairs} == set(range(2, 10))
        for s, t in pairs:
            assert set(s) <= set("abcde") and t == fn(s)
    assert synthetic_pairs("reverse", 1, 4, 4, seed=0, alphabet="x") == [("xxxx", "xxxx")]
    s, t = synthetic_pairs("sort", 1, 30, 30, seed=0)[0]
    assert list(t) == sorted(s) and sorted(t) == sorted(s)
    assert synthetic_pairs("copy", 50, 1, 5, seed=1) != synthetic_pairs("copy", 50, 1, 5, seed=2)


def test_synthetic_errors():
    with pytest.raises(UserError, match="did you mean 'reverse'"):
        synthetic_pairs("revers", 5, 1, 3, seed=0)
    with pytest.raises(UserError, match="min_len"):
        synthetic_pairs("copy", 5, 4, 3, seed=0)
    with pytest.raises(UserError, match="alphabet"):
        synthetic_pairs("copy", 5, 1, 3, seed=0, alphabet="aa")
