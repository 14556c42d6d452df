"""MLM data: masking statistics, specials, whole words, NSP pairs, packing, resumable streams;
the masked-LM loss; a tiny bert-pretrain run."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from attnkit.data.mlm import (
    IGNORE,
    Example,
    MaskConfig,
    Masker,
    MLMBatches,
    nsp_pairs,
    pack_full_sentences,
    split_sentences,
)
from attnkit.errors import UserError
from attnkit.losses import token_nll

V, MASK, SPECIALS = 1000, 4, [0, 1, 2, 3]


@pytest.fixture(autouse=True)
def _restore_threads():
    """Recipes run with train.threads=1 here; give the other tests their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _within(count: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    """count / n within ``sigmas`` binomial standard deviations of p."""
    return abs(count / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


def _batch(b: int = 64, s: int = 512, seed: int = 0):
    """Random ids with [CLS] ... [SEP] and right padding: (ids, attention mask)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, V, (b, s), generator=g)
    lengths = torch.randint(s // 2, s + 1, (b,), generator=g)
    mask = (torch.arange(s)[None] < lengths[:, None]).long()
    ids[:, 0] = 1
    ids[torch.arange(b), lengths - 1] = 2
    ids[:, 7] = 3  # an [UNK] in every row
    return ids.masked_fill(mask == 0, 0), mask


def test_masking_rates_follow_80_10_10():
    torch.manual_seed(0)
    ids, attn = _batch()
    masker = Masker(MaskConfig(), V, MASK, SPECIALS)
    inputs, labels = masker(ids, attn, torch.Generator().manual_seed(1))
    eligible = (attn == 1) & (ids > 4)
    selected = labels != IGNORE
    n_eligible, n_sel = int(eligible.sum()), int(selected.sum())
    assert _within(n_sel, n_eligible, 0.15)
    assert torch.equal(labels[selected], ids[selected])
    masked = int((inputs[selected] == MASK).sum())
    same = int((inputs[selected] == ids[selected]).sum())
    assert _within(masked, n_sel, 0.8)
    assert _within(same, n_sel, 0.1 + 0.1 / V)  # a random draw can hit the same token
    assert _within(n_sel - masked - same, n_sel, 0.1 * (1 - 1 / V))
    assert torch.equal(inputs[~selected], ids[~selected])  # nothing else changes


def test_specials_and_padding_are_never_masked():
    ids, attn = _batch(b=32, s=64, seed=3)
    masker = Masker(MaskConfig(prob=0.9), V, MASK, SPECIALS)
    for seed in range(20):
        inputs, labels = masker(ids, attn, torch.Generator().manual_seed(seed))
        protected = (attn == 0) | (ids <= 4)
        assert (labels[protected] == IGNORE).all()
        assert torch.equal(inputs[protected], ids[protected])


def test_whole_words_are_masked_together():
    ids, attn = _batch(b=64, s=256, seed=5)
    cont = torch.zeros(V, dtype=torch.bool)
    cont[600:] = True  # ids 600.. are "##" pieces
    masker = Masker(MaskConfig(whole_word=True), V, MASK, SPECIALS, continuation=cont)
    _, labels = masker(ids, attn, torch.Generator().manual_seed(2))
    selected = (labels != IGNORE).tolist()
    words, chosen = 0, 0
    for r in range(ids.size(0)):
        row, real = ids[r].tolist(), attn[r].tolist()
        j = 0
        while j < len(row):
            if not real[j] or row[j] <= 4:
                assert not selected[r][j]
                j += 1
                continue
            k = j + 1
            while k < len(row) and real[k] and row[k] >= 600:
                k += 1
            flags = {selected[r][i] for i in range(j, k)}
            assert len(flags) == 1, f"word {row[j:k]} partly masked"
            words, chosen = words + 1, chosen + flags.pop()
            j = k
    assert _within(chosen, words, 0.15)


def test_whole_word_masking_with_a_wordpiece_tokenizer():
    from attnkit.tokenizers import Tokenizer

    text = "unbelievable transformations happened quietly " * 20
    tok = Tokenizer.train("wordpiece", [text], vocab_size=60)
    masker = Masker.for_tokenizer(MaskConfig(whole_word=True, prob=0.5), tok)
    ids = torch.tensor([[tok.bos_id, *tok.encode(text)[:60], tok.eos_id]])
    _, labels = masker(ids, torch.ones_like(ids), torch.Generator().manual_seed(0))
    pieces = [tok.token(i) for i in ids[0].tolist()]
    for j in range(1, len(pieces)):
        if pieces[j].startswith("##"):
            assert (labels[0, j] != IGNORE) == (labels[0, j - 1] != IGNORE)
    with pytest.raises(UserError, match="WordPiece"):
        Masker.for_tokenizer(MaskConfig(whole_word=True),
                             Tokenizer.train("bytelevel", [text], vocab_size=300))


def _docs(n_docs: int = 12, seed: int = 0) -> list[list[list[int]]]:
    """Documents whose tokens are distinct increasing ids, so continuity can be checked."""
    rng = np.random.default_rng(seed)
    docs, nxt = [], 10
    for _ in range(n_docs):
        doc = []
        for _ in range(int(rng.integers(1, 8))):
            n = int(rng.integers(1, 9))
            doc.append(list(range(nxt, nxt + n)))
            nxt += n
        docs.append(doc)
    return docs


def test_nsp_pairs_are_half_next_half_random():
    docs = _docs(200)
    owner = {t: d for d, doc in enumerate(docs) for s in doc for t in s}
    pairs = nsp_pairs(docs, 512, 1, 2, np.random.default_rng(0))
    labels = [p.nsp for p in pairs]
    assert _within(sum(labels), len(labels), 0.5)
    for p in pairs:
        sep = p.ids.index(2)
        a, b = p.ids[1:sep], p.ids[sep + 1: -1]
        assert p.ids[0] == 1 and p.ids[-1] == 2 and a and b
        assert p.types == [0] * (len(a) + 2) + [1] * (len(b) + 1)
        if p.nsp == 0:  # B is the text right after A in the same document
            assert a + b == list(range(a[0], a[0] + len(a) + len(b)))
        else:
            assert owner[b[0]] != owner[a[0]] or len(docs) < 2
    with pytest.raises(UserError, match="two documents"):
        nsp_pairs(docs[:1], 64, 1, 2, np.random.default_rng(0))


def test_nsp_pairs_respect_max_len():
    pairs = nsp_pairs(_docs(50), 12, 1, 2, np.random.default_rng(1))
    assert pairs and all(len(p.ids) <= 12 for p in pairs)


def test_full_sentence_packing_keeps_order_and_marks_documents():
    docs = _docs(30)
    packed = pack_full_sentences(docs, 16, 1, 2)
    assert all(len(e.ids) <= 16 and e.ids[0] == 1 and e.ids[-1] == 2 for e in packed)
    body = [t for e in packed for t in e.ids[1:-1]]
    expected = []
    for d, doc in enumerate(docs):
        if d and body[len(expected)] == 2:
            expected.append(2)  # the separator at a document boundary inside a sequence
        expected.extend(t for s in doc for t in s)
    assert body == expected
    assert sum(len(e.ids) for e in packed) / (16 * len(packed)) > 0.7  # sequences are full


def test_split_sentences_reads_bert_format():
    text = "a b.\nc d.\n\n\ne f.\n"
    assert split_sentences(text) == [["a b.", "c d."], ["e f."]]
    assert split_sentences("1\n2\n3\n4\n5", doc_lines=2) == [["1", "2"], ["3", "4"], ["5"]]


def _stream(dynamic: bool) -> MLMBatches:
    examples = [Example([1, *range(10 + i, 40 + i), 2]) for i in range(12)]
    return MLMBatches(examples, 4, Masker(MaskConfig(dynamic=dynamic), V, MASK, SPECIALS),
                      pad_id=0, seed=7)


def _mask_of(stream: MLMBatches, example: int, epoch: int):
    """The labels that ``example`` gets in ``epoch``."""
    for j in range(stream.per_epoch):
        k = epoch * stream.per_epoch + j
        rows = stream.rows(k).tolist()
        if example in rows:
            return stream.batch(k).labels[rows.index(example)]
    raise AssertionError("example not seen")


def test_dynamic_masks_differ_between_epochs_static_ones_do_not():
    dyn, static = _stream(True), _stream(False)
    assert not torch.equal(_mask_of(dyn, 3, 0), _mask_of(dyn, 3, 1))
    assert torch.equal(_mask_of(static, 3, 0), _mask_of(static, 3, 1))


@pytest.mark.parametrize("dynamic", [True, False])
def test_streams_resume_exactly(dynamic):
    whole = _stream(dynamic)
    it = iter(whole)
    expected = [next(it) for _ in range(9)]
    part = _stream(dynamic)
    it = iter(part)
    for _ in range(4):
        next(it)
    state = part.state_dict()
    resumed = _stream(dynamic)
    resumed.load_state_dict(state)
    it = iter(resumed)
    for want in expected[4:]:
        got = next(it)
        assert torch.equal(got.ids, want.ids) and torch.equal(got.labels, want.labels)
    with pytest.raises(UserError, match="batch_size"):
        resumed.load_state_dict({**state, "batch_size": 5})


def test_token_nll_matches_float64_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.full((2, 5), IGNORE)
    labels[0, 1], labels[1, 3], labels[1, 4] = 3, 0, 6
    total, n = token_nll(logits, labels)
    expected = 0.0
    for b, s in [(0, 1), (1, 3), (1, 4)]:
        z = logits[b, s].double()
        expected -= float(z[labels[b, s]] - torch.log(torch.exp(z).sum()))
    assert n == 3 and abs(float(total) - expected) < 1e-5


def test_bert_pretrain_recipe_runs_and_reports(tmp_path):
    from attnkit.recipes import get_recipe, resolve_config

    torch.manual_seed(0)
    lines = [f"the {w} sat on the {v} mat ." for w in ("cat", "dog", "bird", "fox")
             for v in ("red", "blue", "green")]
    text = "\n\n".join("\n".join(lines[i: i + 3]) for i in range(0, len(lines), 2)) * 4
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    recipe = get_recipe("bert-pretrain")
    sets = [f"data.train={tmp_path / 'text.txt'}", f"run_dir={tmp_path / 'run'}",
            "train.steps=4", "train.threads=1", "train.eval_every=2", "train.save_every=2",
            "train.log_every=2",
            "batch_size=4", "max_len=24", "tokenizer.vocab_size=60", "arch.d_model=32",
            "arch.d_ff=64", "masking.whole_word=true", "train.accum_steps=2"]
    results = recipe.main(resolve_config(recipe, None, sets), recipe=recipe.name)
    val = results["val"]
    assert 0.0 <= val["val_mlm_acc"] <= 1.0 and "val_nsp_acc" in val
    assert math.isclose(val["val_mlm_ppl"], math.exp(val["val_mlm_loss"]), rel_tol=1e-9)
    assert (tmp_path / "run" / "results.json").is_file()
    bad = resolve_config(recipe, None, ["data.train=/no/such/file.txt",
                                        f"run_dir={tmp_path / 'bad'}"])
    with pytest.raises(UserError, match="not found"):
        recipe.main(bad, recipe=recipe.name)
    assert not (tmp_path / "bad").exists()
