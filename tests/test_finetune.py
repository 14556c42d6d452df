"""Task heads against transformers' heads, best-span search, metrics against hand
computations, record reading, and a tiny end-to-end fine-tune above chance."""

from __future__ import annotations

import itertools
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import transformers

from attnkit.convert import bert as cb
from attnkit.data.records import FinetuneData, encode, read_records
from attnkit.errors import UserError
from attnkit.evaluation import accuracy, macro_f1, normalize_answer, span_f1, squad_scores
from attnkit.models.heads import (
    SequenceClassifier,
    SpanExtractor,
    TokenClassifier,
    best_spans,
    task_head,
)
from attnkit.recipes.finetune import FinetuneConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "finetune"


@pytest.fixture(autouse=True)
def _restore_threads():
    """Recipes run with train.threads=1 here; give the other tests their thread count back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _hf_and_ours(hf_class: str, ours_class, num_labels: int = 5, **head):
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_attention_heads=4,
                                     num_hidden_layers=2, intermediate_size=37,
                                     max_position_embeddings=40,
                                     num_labels=2 if "Question" in hf_class else num_labels,
                                     initializer_range=0.2, attn_implementation="eager")
    hf = getattr(transformers, hf_class)(hf_cfg).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    cfg = cb.config_from_hf({**hf_cfg.to_dict(), "architectures": ["BertModel"]})
    cfg = replace(cfg, pooler=hf.bert.pooler is not None)  # token / QA heads have none
    encoder = cb.build(cfg)
    encoder.load_state_dict(cb.state_from_hf(hf.bert.state_dict(), cfg))
    ours = ours_class(encoder, **head).eval()
    out_layer = ours.qa_outputs if hasattr(ours, "qa_outputs") else ours.classifier
    theirs = hf.qa_outputs if hasattr(hf, "qa_outputs") else hf.classifier
    out_layer.load_state_dict(theirs.state_dict())
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 99, (3, 11), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 7:], mask[2, 4:] = 0, 0
    types = (torch.arange(11) >= 5).long().expand(3, -1) * mask
    return hf, ours, (ids.masked_fill(mask == 0, 0), mask, types)


def test_sequence_classifier_matches_transformers():
    hf, ours, (ids, mask, types) = _hf_and_ours("BertForSequenceClassification",
                                                SequenceClassifier, n_labels=5)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
    assert got.shape == (3, 5) and torch.allclose(got, want, atol=1e-5)


def test_token_classifier_matches_transformers():
    hf, ours, (ids, mask, types) = _hf_and_ours("BertForTokenClassification",
                                                TokenClassifier, n_labels=5)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types).logits
        got = ours(ids, attention_mask=mask, token_type_ids=types).logits
    real = mask.bool()  # padding positions are not defined outputs
    assert got.shape == (3, 11, 5) and torch.allclose(got[real], want[real], atol=1e-5)


def test_span_extractor_matches_transformers():
    hf, ours, (ids, mask, types) = _hf_and_ours("BertForQuestionAnswering", SpanExtractor)
    with torch.no_grad():
        want = hf(ids, attention_mask=mask, token_type_ids=types)
        got = ours(ids, attention_mask=mask, token_type_ids=types)
    real = mask.bool()
    assert torch.allclose(got.start_logits[real], want.start_logits[real], atol=1e-5)
    assert torch.allclose(got.end_logits[real], want.end_logits[real], atol=1e-5)


def _same_outputs(got, want, real, logits=("logits",)) -> None:
    """loss, the ``logits`` (real positions), hidden_states and attentions of two outputs."""
    assert want.loss > 0.1
    torch.testing.assert_close(got.loss, want.loss, atol=1e-5, rtol=0)
    for name in logits:
        torch.testing.assert_close(getattr(got, name)[real], getattr(want, name)[real],
                                   atol=1e-5, rtol=0)
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    assert len(got.attentions) == len(want.attentions) == 2
    for a, b in zip(got.hidden_states, want.hidden_states, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("labels", ["single", "multi", "regression"])
def test_sequence_classifier_keywords_and_loss_match_transformers(labels):
    """Labels decide the loss as in BertForSequenceClassification: class ids -> cross-entropy,
    float rows -> binary cross-entropy, one output -> mean squared error."""
    k = 1 if labels == "regression" else 5
    hf, ours, (ids, mask, types) = _hf_and_ours("BertForSequenceClassification",
                                                SequenceClassifier, num_labels=k, n_labels=k)
    g = torch.Generator().manual_seed(3)
    y = {"single": torch.tensor([4, 0, 2]), "multi": torch.rand(3, 5, generator=g).round(),
         "regression": torch.randn(3, generator=g)}[labels]
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=y,
              output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        _same_outputs(ours(**kw), hf(**kw), slice(None))


def test_token_classifier_and_span_losses_match_transformers():
    hf, ours, (ids, mask, types) = _hf_and_ours("BertForTokenClassification",
                                                TokenClassifier, n_labels=5)
    y = torch.randint(0, 5, ids.shape, generator=torch.Generator().manual_seed(4))
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types,
              labels=y.masked_fill(mask == 0, -100), output_attentions=True,
              output_hidden_states=True)
    with torch.no_grad():
        _same_outputs(ours(**kw), hf(**kw), mask.bool())
    hf, ours, (ids, mask, types) = _hf_and_ours("BertForQuestionAnswering", SpanExtractor)
    kw = dict(input_ids=ids, attention_mask=mask, token_type_ids=types, output_attentions=True,
              start_positions=torch.tensor([1, 2, 30]), end_positions=torch.tensor([3, 6, 30]),
              output_hidden_states=True)  # 30: outside the sequence, ignored as transformers
    with torch.no_grad():
        _same_outputs(ours(**kw), hf(**kw), mask.bool(), ("start_logits", "end_logits"))


def test_mean_and_cls_pooling():
    torch.manual_seed(0)
    _, ours, (ids, mask, types) = _hf_and_ours("BertForSequenceClassification",
                                               SequenceClassifier, n_labels=5, pooling="mean")
    with torch.no_grad():
        out = ours(ids, attention_mask=mask, token_type_ids=types)
        hidden = out.encoder.last_hidden_state.double()
        w = mask[..., None].double()
        mean = (hidden * w).sum(1) / w.sum(1)
        want = mean @ ours.classifier.weight.double().T + ours.classifier.bias.double()
    assert torch.allclose(out.logits.double(), want, atol=1e-5)


def test_best_spans_matches_brute_force():
    torch.manual_seed(0)
    b, s, max_len = 6, 12, 4
    start, end = torch.randn(b, s), torch.randn(b, s)
    allowed = torch.zeros(b, s, dtype=torch.bool)
    for r in range(b):
        allowed[r, 2 + r: s - 1] = True
    got_s, got_e, got = best_spans(start, end, allowed, max_len)
    for r in range(b):
        best = max(((float(start[r, i] + end[r, j]), i, j)
                    for i, j in itertools.product(range(s), repeat=2)
                    if allowed[r, i] and allowed[r, j] and i <= j < i + max_len))
        assert (int(got_s[r]), int(got_e[r])) == best[1:]
        assert abs(float(got[r]) - best[0]) < 1e-6


def test_task_head_picks_the_head_and_falls_back_to_cls_without_a_pooler():
    _, with_pooler, _ = _hf_and_ours("BertForSequenceClassification", SequenceClassifier,
                                     n_labels=5)
    _, no_pooler, _ = _hf_and_ours("BertForTokenClassification", TokenClassifier, n_labels=5)
    assert task_head("classify", with_pooler.bert, 3).pooling == "pooler"
    assert task_head("classify", no_pooler.bert, 3).pooling == "cls"
    assert task_head("classify", no_pooler.bert, 3, "mean").pooling == "mean"
    assert type(task_head("tokens", no_pooler.bert, 3)) is TokenClassifier
    assert type(task_head("qa", no_pooler.bert, 1)) is SpanExtractor
    assert task_head("tokens", no_pooler.bert, 3).classifier.out_features == 3
    with pytest.raises(UserError, match="task"):
        task_head("translate", no_pooler.bert, 3)


def test_classification_metrics_by_hand():
    preds = ["a", "a", "b", "c", "c", "a"]
    golds = ["a", "b", "b", "c", "a", "a"]
    assert accuracy(preds, golds) == 4 / 6
    # a: tp 2, fp 1, fn 1 -> 4/6; b: tp 1, fp 0, fn 1 -> 2/3; c: tp 1, fp 1, fn 0 -> 2/3
    assert abs(macro_f1(preds, golds) - (4 / 6 + 2 / 3 + 2 / 3) / 3) < 1e-12


def test_squad_metrics_by_hand():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    # "cat sat" vs "cat sat down": precision 1, recall 2/3 -> F1 0.8
    assert abs(span_f1("the cat sat", "a cat sat down") - 0.8) < 1e-12
    scores = squad_scores(["Paris", "in Lagos"], [["paris"], ["Oslo", "Lagos"]])
    assert scores["exact_match"] == 0.5
    assert abs(scores["f1"] - (1.0 + 2 / 3) / 2) < 1e-12  # "in lagos" vs "lagos": P 1/2, R 1


def test_qa_encoding_maps_answers_to_token_spans():
    from attnkit.tokenizers import Tokenizer

    records = read_records(EXAMPLES / "qa.jsonl")[:40]
    tok = Tokenizer.train("wordpiece", [r["context"] + " " + r["question"] for r in records],
                          vocab_size=200)
    for item, record in zip(encode("qa", tok, records, FinetuneData(), [], 64, "qa"), records,
                            strict=True):
        i, j = item.target
        off, base = item.extra["offsets"], item.extra["base"]
        assert item.extra["context"][off[i - base][0]: off[j - base][1]] == \
            record["answers"]["text"][0]
        assert item.types[i] == 1 and item.ids[base - 1] == tok.eos_id


def test_label_and_tag_encoding_and_unknown_labels():
    from attnkit.losses import IGNORE
    from attnkit.tokenizers import Tokenizer

    tok = Tokenizer.train("wordpiece", ["the cat sat", "a dog ran"], vocab_size=60)
    names = FinetuneData()
    records = [{"text": "the cat", "label": "pos"}, {"text": "a dog", "label": "neg"}]
    items = encode("classify", tok, records, names, ["neg", "pos"], 16, "train")
    assert [item.target for item in items] == [1, 0]
    with pytest.raises(UserError, match="valid record 2: label 'meh' does not occur"):
        encode("classify", tok, [records[0], {"text": "a", "label": "meh"}], names,
               ["neg", "pos"], 16, "valid")
    (item,) = encode("tokens", tok, [{"tokens": ["the", "cat"], "tags": ["O", "B"]}], names,
                     ["B", "O"], 16, "train")
    assert item.target[0] == item.target[-1] == IGNORE  # BOS, EOS
    assert [t for t in item.target if t != IGNORE] == [1, 0]  # first piece of each word
    with pytest.raises(UserError, match="test record 1: tag 'X' does not occur"):
        encode("tokens", tok, [{"tokens": ["a", "dog"], "tags": ["O", "X"]}], names,
               ["B", "O"], 16, "test")


def test_records_and_config_errors(tmp_path):
    assert read_records(EXAMPLES / "sentiment.csv")[0].keys() == {"text", "label"}
    (tmp_path / "x.txt").write_text("a", encoding="utf-8")
    with pytest.raises(UserError, match="csv"):
        read_records(tmp_path / "x.txt")
    (tmp_path / "bad.jsonl").write_text('{"text": 1}\nnot json\n', encoding="utf-8")
    with pytest.raises(UserError, match="line 2"):
        read_records(tmp_path / "bad.jsonl")
    from attnkit.errors import ConfigError
    with pytest.raises(ConfigError, match="task"):
        FinetuneConfig(task="summarise")


@pytest.fixture(scope="module")
def tiny_init(tmp_path_factory) -> Path:
    """A random tiny BERT with a WordPiece tokenizer, saved as a Hugging Face directory."""
    from attnkit.convert.hf import save_pretrained
    from attnkit.models.bert import BertModel, bert_config
    from attnkit.tokenizers import Tokenizer

    texts = [r["text"] for r in read_records(EXAMPLES / "sentiment.csv")]
    tok = Tokenizer.train("wordpiece", texts, vocab_size=150)
    torch.manual_seed(0)
    cfg = bert_config("bert-tiny", vocab_size=tok.vocab_size, d_model=32, n_heads=2, d_ff=64,
                      max_len=64)
    path = tmp_path_factory.mktemp("init") / "tiny-bert"
    save_pretrained(BertModel(cfg), path, tok)
    return path


def test_finetune_classification_rises_above_chance(tiny_init, tmp_path):
    from attnkit.recipes import get_recipe, resolve_config

    torch.manual_seed(0)
    recipe = get_recipe("finetune")
    sets = [f"init={tiny_init}", f"data.train={EXAMPLES / 'sentiment.csv'}",
            f"run_dir={tmp_path / 'run'}", "train.steps=40", "train.eval_every=40",
            "train.save_every=40", "train.log_every=10", "train.optim.lr=2e-3", "train.threads=1",
            "train.optim.warmup_steps=5", "max_len=24", "pooling=mean"]
    results = recipe.main(resolve_config(recipe, None, sets), recipe=recipe.name)
    assert results["valid"]["accuracy"] >= 0.75  # chance is 0.5 (balanced labels)
    from attnkit import load
    record = load(tmp_path / "run").record["model"]
    assert record["head"]["labels"] == ["negative", "positive"]


def test_finetune_token_and_qa_tasks_run(tiny_init, tmp_path):
    from attnkit.recipes import get_recipe, resolve_config

    recipe = get_recipe("finetune")
    for task, file in (("tokens", "ner.jsonl"), ("qa", "qa.jsonl")):
        sets = [f"init={tiny_init}", f"task={task}", f"data.train={EXAMPLES / file}",
                f"run_dir={tmp_path / task}", "train.steps=2", "train.eval_every=2",
                "train.save_every=2", "train.threads=1", "max_len=64"]
        results = recipe.main(resolve_config(recipe, None, sets), recipe=recipe.name)
        assert 0.0 <= results["valid"]["f1"] <= 1.0
    bad = [f"init={tiny_init}", "data.train=/no/such.csv", f"run_dir={tmp_path / 'bad'}",
           "max_len=64"]
    with pytest.raises(UserError, match="not found"):
        recipe.main(resolve_config(recipe, None, bad), recipe=recipe.name)
