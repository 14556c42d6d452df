"""The shared evaluation pieces against independent references: perplexity and bits per
character from hand sums, classification scores by brute force over a confusion table, task
losses by explicit float64 log-softmax loops, and the evaluation loop's progress bar."""

from __future__ import annotations

import io
import math
import time

import pytest
import torch

from attnkit import progress
from attnkit.evaluation import (
    NLLScore,
    accuracy,
    bits_per_character,
    eval_loop,
    macro_f1,
    perplexity,
)
from attnkit.losses import IGNORE, TASK_LOSSES, mlm_nsp_loss, span_loss, span_nll


def _nll(row: list[float], y: int) -> float:
    """-log softmax(row)[y], by hand in float64."""
    top = max(row)
    return -(row[y] - top - math.log(sum(math.exp(x - top) for x in row)))


def test_perplexity_and_bpc_from_hand_sums():
    # three tokens with probabilities 1/2, 1/4, 1/8: nll = ln 2 + ln 4 + ln 8 = 6 ln 2
    nll = -(math.log(0.5) + math.log(0.25) + math.log(0.125))
    assert perplexity(nll, 3) == pytest.approx(4.0, rel=1e-12)  # exp(2 ln 2)
    assert bits_per_character(nll, 6) == pytest.approx(1.0, rel=1e-12)  # 6 bits / 6 chars
    score = NLLScore(nll, 3, 6)
    assert score.loss == pytest.approx(2 * math.log(2), rel=1e-12)
    assert (score.ppl, score.bpc) == (perplexity(nll, 3), bits_per_character(nll, 6))
    assert score.as_dict("val_")["val_tokens"] == 3
    assert perplexity(1e6, 1) == math.exp(700.0)  # capped, not an OverflowError
    assert perplexity(0.0, 0) == 1.0


def test_accuracy_and_macro_f1_by_brute_force():
    golds = ["a", "b", "c", "a", "a", "b", "c", "c", "b", "a"]
    preds = ["a", "b", "a", "a", "c", "b", "c", "b", "b", "b"]
    assert accuracy(preds, golds) == 6 / 10
    f1s = []
    for c in ("a", "b", "c"):  # precision and recall from the counts, then their harmonic mean
        predicted = [i for i, p in enumerate(preds) if p == c]
        actual = [i for i, g in enumerate(golds) if g == c]
        right = len(set(predicted) & set(actual))
        prec, rec = right / len(predicted), right / len(actual)
        f1s.append(0.0 if right == 0 else 2 * prec * rec / (prec + rec))
    assert macro_f1(preds, golds) == pytest.approx(sum(f1s) / 3, rel=1e-12)
    assert macro_f1(golds, golds) == 1.0
    with pytest.raises(ValueError):
        accuracy(preds[:-1], golds)


def test_task_losses_against_float64_loops():
    torch.manual_seed(0)
    logits = torch.randn(4, 5, dtype=torch.float64) * 2
    labels = torch.tensor([0, 3, 4, 1])
    total, n = TASK_LOSSES["classify"](logits, labels)
    assert n == 4
    ref = sum(_nll(logits[i].tolist(), int(labels[i])) for i in range(4))
    assert float(total) == pytest.approx(ref, rel=1e-6)

    spans_logits = torch.randn(3, 6, 2, dtype=torch.float64)
    spans = torch.tensor([[1, 2], [0, 5], [4, 4]])
    total, n = span_nll(spans_logits, spans)
    ref = sum((_nll(spans_logits[b, :, 0].tolist(), int(spans[b, 0]))
               + _nll(spans_logits[b, :, 1].tolist(), int(spans[b, 1]))) / 2 for b in range(3))
    assert n == 3 and float(total) == pytest.approx(ref, rel=1e-9)
    assert float(total) / n == pytest.approx(float(span_loss(
        spans_logits[..., 0], spans_logits[..., 1], spans[:, 0], spans[:, 1])), rel=1e-12)

    tags = torch.tensor([[IGNORE, 2, IGNORE], [1, IGNORE, 0]])
    tag_logits = torch.randn(2, 3, 4, dtype=torch.float64)
    total, n = TASK_LOSSES["tokens"](tag_logits, tags)
    ref = sum(_nll(tag_logits[b, t].tolist(), int(tags[b, t]))
              for b in range(2) for t in range(3) if tags[b, t] != IGNORE)
    assert n == 3 and float(total) == pytest.approx(ref, rel=1e-9)


def test_mlm_nsp_loss_is_mean_mlm_plus_mean_nsp_after_dividing_by_n():
    torch.manual_seed(1)
    mlm_logits, mlm_labels = torch.randn(5, 9, dtype=torch.float64), torch.randint(0, 9, (5,))
    nsp_logits, nsp = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 1])
    total, n = mlm_nsp_loss(mlm_logits, mlm_labels, nsp_logits, nsp)
    mean_mlm = sum(_nll(mlm_logits[i].tolist(), int(mlm_labels[i])) for i in range(5)) / 5
    mean_nsp = sum(_nll(nsp_logits[i].tolist(), int(nsp[i])) for i in range(3)) / 3
    # the NSP term is computed in float32
    assert n == 5 and float(total) / n == pytest.approx(mean_mlm + mean_nsp, rel=1e-6)
    alone, _ = mlm_nsp_loss(mlm_logits, mlm_labels)
    assert float(alone) / 5 == pytest.approx(mean_mlm, rel=1e-9)


class _Batch:
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def to(self, device):
        return _Batch(self.x.to(device))


def test_eval_loop_yields_every_batch_on_the_device_and_is_quiet_off_a_terminal(capsys):
    batches = [_Batch(torch.full((2,), float(i))) for i in range(5)]
    got = list(eval_loop(batches, torch.device("meta")))
    assert [b.x.device.type for b in got] == ["meta"] * 5
    assert [float(b.x[0]) for b in eval_loop(batches)] == [0.0, 1.0, 2.0, 3.0, 4.0]
    assert list(eval_loop(range(3))) == [0, 1, 2]  # items without .to pass unchanged
    assert capsys.readouterr().err == ""  # pytest's stderr is no terminal: no bar at all


def test_quiet_bars_show_on_a_terminal_only(monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: False, raising=False)
    assert progress.progress_bar(quiet=True, total=3).disable
    assert not progress.progress_bar(quiet=False, total=3).disable  # training: a line a 30 s
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    bar = progress.progress_bar(quiet=True, total=3, delay=1.0)
    assert not bar.disable
    bar.close()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_slow_evaluation_shows_its_bar_on_a_terminal(monkeypatch):
    """`attnkit eval`'s passes walk eval_loop: past the one-second delay a bar is drawn."""
    term = _Terminal()
    monkeypatch.setattr(progress.sys, "stderr", term)
    for _ in eval_loop(range(3), desc="scoring"):
        time.sleep(0.6)
    assert "scoring" in term.getvalue() and "3/3" in term.getvalue()
    quick = _Terminal()
    monkeypatch.setattr(progress.sys, "stderr", quick)
    assert list(eval_loop(range(3), desc="scoring")) == [0, 1, 2]
    assert "scoring" not in quick.getvalue()  # done within the delay: nothing drawn
