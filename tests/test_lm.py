"""Language-model data: documents, the token stream, training windows (exact resume), held-out
windows (every target once), and perplexity / bits per character against hand computations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from torch import nn

from attnkit.data.lm import (
    IGNORE,
    LMBatch,
    LMWindows,
    encode_documents,
    eval_windows,
    n_characters,
    read_documents,
    score,
    split_documents,
    truncate_documents,
)
from attnkit.errors import UserError
from attnkit.tokenizers import Tokenizer

TEXT = ("First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
        "First Citizen:\nYou are all resolved rather to die than to famish?\n")


# ---------------------------------------------------------------- documents

def test_read_file_jsonl_and_folder(tmp_path):
    (tmp_path / "a.txt").write_text("alpha\n", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("beta", encoding="utf-8")
    (tmp_path / ".hidden.txt").write_text("secret", encoding="utf-8")
    (tmp_path / "c.md").write_text("not a txt", encoding="utf-8")
    assert read_documents(tmp_path / "a.txt") == ["alpha\n"]
    assert read_documents(tmp_path) == ["alpha\n", "beta"]  # sorted, recursive, no hidden
    assert read_documents(tmp_path, pattern="*.md") == ["not a txt"]
    items = [{"question": "Q1?", "options": ["x", "y"], "answer": "(B) y"},
             {"question": "Q2?", "options": {"A": "u", "B": "v"}, "answer": "(A) u"}]
    path = tmp_path / "items.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in items) + "\n\n", encoding="utf-8")
    docs = read_documents(path, template="Question: {question}\nOptions: {options}\n"
                                         "Answer: {answer}")
    assert docs == ["Question: Q1?\nOptions: (A) x (B) y\nAnswer: (B) y",
                    "Question: Q2?\nOptions: (A) u (B) v\nAnswer: (A) u"]


def test_document_errors_are_one_line(tmp_path):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "bad.txt").write_bytes(b"ok\n\xff\n")
    (tmp_path / "x.jsonl").write_text('{"q": 1}\n[1, 2]\n', encoding="utf-8")
    (tmp_path / "broken.jsonl").write_text('{"q": 1}\n{oops\n', encoding="utf-8")
    (tmp_path / "folder").mkdir()
    cases = [(tmp_path / "missing.txt", "", "not found"), (tmp_path / "empty.txt", "", "empty"),
             (tmp_path / "bad.txt", "", "UTF-8"), (tmp_path / "x.jsonl", "", "data.template"),
             (tmp_path / "x.jsonl", "{q} {a}", "line 1 has no field 'a'"),
             (tmp_path / "x.jsonl", "{q}", "line 2 is not a JSON object"),
             (tmp_path / "broken.jsonl", "{q}", "line 2 is not valid JSON"),
             (tmp_path / "folder", "", "no files matching"),
             (tmp_path / "x.jsonl", "{0}", "plain names")]
    for path, template, fragment in cases:
        with pytest.raises(UserError, match=fragment) as err:
            read_documents(path, template=template)
        assert "\n" not in str(err.value)


def test_split_truncate_and_characters():
    train, val = split_documents(["abcdefghij"], 0.1)
    assert (train, val) == (["abcdefghi"], ["j"])  # nanoGPT's cut: int(n * 0.9)
    docs = [f"d{i}" for i in range(10)]
    assert split_documents(docs, 0.25) == (docs[:8], docs[8:])  # round(2.5) = 2
    assert split_documents(docs[:2], 0.1) == (["d0"], ["d1"])  # at least one each side
    with pytest.raises(UserError, match="too short"):
        split_documents(["a"], 0.5)
    assert n_characters(["ab", "cde"]) == 6  # 5 characters + 1 separator
    assert truncate_documents(["abcd", "efgh"], 6) == ["abcd", "e"]
    assert truncate_documents(["abcd", "efgh"], 0) == ["abcd", "efgh"]


def test_stream_has_eos_before_every_document():
    tok = Tokenizer.train("char", [TEXT])
    stream = encode_documents(tok, ["ab", "c"])
    e, a, b, c = tok.eos_id, *tok.encode("abc")
    assert stream.tolist() == [e, a, b, e, c]


# ---------------------------------------------------------------- training windows

def test_windows_are_contiguous_shifted_slices():
    stream = torch.arange(100) * 7 % 101  # distinct values: the offset is recoverable
    windows = LMWindows(stream, block_size=8, batch_size=5, seed=3)
    it = iter(windows)
    for _ in range(20):
        batch = next(it)
        assert batch.ids.shape == batch.targets.shape == (5, 8)
        assert batch.ids.dtype == torch.int64 and batch.n_tokens == 40
        for row_x, row_y in zip(batch.ids.tolist(), batch.targets.tolist(), strict=True):
            start = stream.tolist().index(row_x[0])
            assert row_x == stream[start: start + 8].tolist()
            assert row_y == stream[start + 1: start + 9].tolist()
    assert windows.state_dict()["index"] == 20
    # every offset 0 .. N - block - 1 is reachable, none beyond
    starts = {stream.tolist().index(int(x)) for k in range(400)
              for x in windows.batch(k).ids[:, 0]}
    assert starts == set(range(100 - 8))


def test_windows_resume_bitwise_from_state_dict():
    torch.manual_seed(0)
    stream = torch.randint(0, 50, (500,))
    full = LMWindows(stream, 16, 4, seed=11)
    it = iter(full)
    reference = [next(it) for _ in range(12)]
    first = LMWindows(stream, 16, 4, seed=11)
    it = iter(first)
    for _ in range(5):
        next(it)
    state = json.loads(json.dumps(first.state_dict()))  # plain data survives a round trip
    resumed = LMWindows(stream, 16, 4, seed=11)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for ref in reference[5:]:
        got = next(it)
        assert torch.equal(got.ids, ref.ids) and torch.equal(got.targets, ref.targets)
    other_seed = LMWindows(stream, 16, 4, seed=12)
    assert not torch.equal(other_seed.batch(0).ids, full.batch(0).ids)
    for key, bad in (("n_tokens", 499), ("block_size", 8), ("seed", 12)):
        with pytest.raises(UserError, match=key):
            LMWindows(stream, 16, 4, seed=11).load_state_dict({**state, key: bad})


def test_windows_shard_and_errors():
    batch = LMWindows(torch.arange(40), 4, 5).batch(0)
    parts = [batch.shard(r, 2) for r in range(2)]
    assert torch.equal(torch.cat([parts[0].ids, parts[1].ids]),
                       torch.cat([batch.ids[0::2], batch.ids[1::2]]))
    assert sum(p.n_tokens for p in parts) == batch.n_tokens
    with pytest.raises(UserError, match="lower block_size"):
        LMWindows(torch.arange(8), 8, 2)


# ---------------------------------------------------------------- held-out windows

@pytest.mark.parametrize("n,block,stride", [(50, 8, 0), (49, 8, 0), (9, 8, 0), (2, 8, 0),
                                            (50, 8, 3), (50, 8, 1), (41, 8, 8), (50, 8, 100)])
def test_eval_windows_score_every_target_once(n, block, stride):
    stream = torch.arange(n)  # token value = its position
    batches = eval_windows(stream, block, batch_size=3, stride=stride)
    scored = []
    for batch in batches:
        assert batch.ids.shape[1] <= block
        for x, y in zip(batch.ids.tolist(), batch.targets.tolist(), strict=True):
            real = [t for t in y if t != IGNORE]
            scored += real
            for i, t in enumerate(y):
                if t != IGNORE:
                    assert x[i] == t - 1  # the input before each target is its predecessor
                    if stride and stride < block and t > block:
                        assert i + 1 >= block - stride  # context after the first window
    assert sorted(scored) == list(range(1, n)) and len(scored) == n - 1


# ---------------------------------------------------------------- perplexity and bpc

class Uniform(nn.Module):
    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.vocab, dtype=torch.float64)


class Bigram(nn.Module):
    """p(next | prev) from a fixed table: logits = log P[prev]."""

    def __init__(self, logp: torch.Tensor) -> None:
        super().__init__()
        self.logp = logp

    def forward(self, ids):
        return self.logp[ids]


def test_uniform_model_gives_log_vocab_and_bpc_per_character():
    tok = Tokenizer.train("bpe", [TEXT], vocab_size=60)
    docs = [TEXT[:60], TEXT[60:]]
    stream = encode_documents(tok, docs)
    tokens = len(stream) - 1  # every token after the first EOS, separators included
    assert tokens < n_characters(docs)  # BPE: fewer tokens than characters
    for stride in (0, 5):
        result = score(Uniform(tok.vocab_size), eval_windows(stream, 16, 4, stride),
                       n_characters(docs))
        assert result.tokens == tokens
        assert result.loss == pytest.approx(math.log(tok.vocab_size), rel=1e-12)
        assert result.ppl == pytest.approx(tok.vocab_size, rel=1e-9)
        assert result.bpc == pytest.approx(tokens * math.log2(tok.vocab_size)
                                           / (sum(map(len, docs)) + 1), rel=1e-12)


def test_bigram_model_matches_hand_computed_nll():
    tok = Tokenizer.train("char", [TEXT])
    stream = encode_documents(tok, [TEXT])
    v = tok.vocab_size
    counts = torch.ones(v, v, dtype=torch.float64)  # add-one smoothed bigram counts
    for a, b in zip(stream[:-1].tolist(), stream[1:].tolist(), strict=True):
        counts[a, b] += 1
    logp = (counts / counts.sum(1, keepdim=True)).log()
    nll = -sum(float(logp[a, b]) for a, b in zip(stream[:-1].tolist(), stream[1:].tolist(),
                                                  strict=True))
    for block, stride in ((16, 0), (7, 0), (16, 4), (500, 0)):
        result = score(Bigram(logp), eval_windows(stream, block, 3, stride), len(TEXT))
        assert result.tokens == len(TEXT)  # char tokenizer: one target per character
        assert result.nll == pytest.approx(nll, rel=1e-12)
        assert result.bpc == pytest.approx(nll / math.log(2) / len(TEXT), rel=1e-12)
        assert result.ppl == pytest.approx(math.exp(nll / len(TEXT)), rel=1e-12)


def test_score_takes_a_plain_forward_function():
    stream = torch.tensor([2, 5, 6, 5, 6])
    batches = eval_windows(stream, 4, 2)
    result = score(lambda ids: torch.zeros(*ids.shape, 8), batches, n_chars=4)
    assert result.tokens == 4 and result.nll == pytest.approx(4 * math.log(8), rel=1e-6)
    assert isinstance(batches[0], LMBatch)


# ---------------------------------------------------------------- with the trainer

def test_fit_on_lm_windows_resumes_bitwise(tmp_path, capsys):
    from _resume import assert_resumed, mark_log
    from attnkit.models.gpt2 import GPT2, GPT2Config
    from attnkit.recipes.lm import loss_fn
    from attnkit.train.loop import TrainConfig, fit
    from attnkit.train.optim import OptimConfig

    torch.manual_seed(0)
    stream = torch.randint(0, 20, (300,))
    config = GPT2Config(vocab_size=20, n_positions=8, d_model=16, n_heads=2, n_layers=1)

    def run(run_dir, steps, seen):
        torch.manual_seed(1)
        model = GPT2(config)  # dropout 0.1: the RNG state must resume too
        cfg = TrainConfig(steps=steps, save_every=3, log_every=1, eval_every=0,
                          optim=OptimConfig(name="adamw", schedule="constant", warmup_steps=0))
        fit(model, lambda m, b: seen.append(b.ids) or loss_fn(m, b),
            LMWindows(stream, 8, 4, seed=5), cfg, run_dir, progress=False)
        return model.state_dict()

    straight_ids, resumed_ids = [], []
    straight = run(tmp_path / "a", 6, straight_ids)
    run(tmp_path / "b", 3, [])
    before = mark_log(tmp_path / "b")
    capsys.readouterr()
    resumed = run(tmp_path / "b", 6, resumed_ids)
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)
    assert_resumed(tmp_path / "b", 3, capsys.readouterr().err, before)
    assert len(resumed_ids) == 3  # steps 4 to 6 only, on the windows the straight run drew
    assert all(torch.equal(a, b) for a, b in zip(straight_ids[3:], resumed_ids, strict=True))
    assert not torch.equal(straight["tok_embed.weight"], GPT2(config).state_dict()[
        "tok_embed.weight"])
