"""Quality metrics: exact match, BLEU (sacrebleu), classification and SQuAD scores, the one
perplexity / bits-per-character formula, held-out masked-LM scores, and the loop every
evaluation walks its batches with.

Notation: an evaluation sums the negative log-likelihood ``nll`` (nats) of ``tokens`` scored
targets; the held-out text stands for ``chars`` characters. Then

    loss = nll / tokens,   perplexity = exp(loss),   bpc = nll / (ln 2 * chars),

bits per character being comparable across tokenizers (char, BPE) because it counts the
characters of the text, not its tokens.
"""

from __future__ import annotations

import collections
import math
import re
import string
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import sacrebleu
import torch
from torch import nn

from attnkit.losses import IGNORE, token_nll
from attnkit.progress import progress_bar

B = TypeVar("B")


# ---- decoded text ------------------------------------------------------------------------------
def exact_match(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Fraction of outputs equal to their reference after stripping outer whitespace.

    The mathematics benchmark's protocol (Saxton et al. 2019): an answer is right only when the
    whole string matches.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    right = sum(h.strip() == r.strip() for h, r in zip(hyps, refs, strict=True))
    return {"exact_match": right / max(1, len(refs))}


def bleu(hyps: Sequence[str], refs: Sequence[str]) -> dict[str, float]:
    """Corpus BLEU with sacrebleu's defaults (13a tokenisation, one reference)."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses for {len(refs)} references")
    return {"bleu": sacrebleu.corpus_bleu(list(hyps), [list(refs)]).score}


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], dict[str, float]]] = {
    "exact_match": exact_match,
    "bleu": bleu,
}


# ---- labels ------------------------------------------------------------------------------------
def accuracy(preds: Sequence, golds: Sequence) -> float:
    """Share of predictions equal to their gold label."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} labels")
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / max(1, len(golds))


def macro_f1(preds: Sequence, golds: Sequence) -> float:
    """Unweighted mean over the gold labels' classes of F1 = 2 TP / (2 TP + FP + FN)."""
    classes = sorted(set(golds), key=str)
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        scores.append(2 * tp / max(1, 2 * tp + fp + fn))
    return sum(scores) / max(1, len(scores))


# ---- extractive question answering (SQuAD) -----------------------------------------------------
def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def span_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 between two answers after :func:`normalize_answer`."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(preds: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 (each the best over a question's gold answers), averaged."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs)
          for p, gs in zip(preds, golds, strict=True)]
    f1 = [max(span_f1(p, g) for g in gs) for p, gs in zip(preds, golds, strict=True)]
    return {"exact_match": sum(em) / max(1, len(em)), "f1": sum(f1) / max(1, len(f1))}


# ---- likelihood --------------------------------------------------------------------------------
def perplexity(nll: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token); capped at exp(700) (a float's range)."""
    return math.exp(min(nll / max(1, n_tokens), 700.0))


def bits_per_character(nll: float, n_chars: float) -> float:
    """Total nats over ln 2 times the characters the scored text stands for."""
    return nll / (math.log(2) * max(1e-9, n_chars))


@dataclass(frozen=True)
class NLLScore:
    """Summed NLL of held-out text: ``nll`` nats over ``tokens`` targets standing for
    ``chars`` characters; loss, perplexity and bits per character by the formulas above."""

    nll: float
    tokens: int
    chars: float

    @property
    def loss(self) -> float:
        """Mean NLL per token (nats)."""
        return self.nll / max(1, self.tokens)

    @property
    def ppl(self) -> float:
        """Per-token perplexity (:func:`perplexity`)."""
        return perplexity(self.nll, self.tokens)

    @property
    def bpc(self) -> float:
        """Bits per character (:func:`bits_per_character`)."""
        return bits_per_character(self.nll, self.chars)

    def as_dict(self, prefix: str = "") -> dict[str, float]:
        return {f"{prefix}loss": self.loss, f"{prefix}ppl": self.ppl, f"{prefix}bpc": self.bpc,
                f"{prefix}tokens": self.tokens, f"{prefix}chars": self.chars}


@torch.no_grad()
def mlm_scores(model: nn.Module, batches: Sequence[Any]) -> dict[str, float]:
    """Held-out masked-LM loss (nats per masked token), perplexity and accuracy over the masked
    tokens, and next-sentence accuracy when the model and batches have NSP. ``batches`` are
    :class:`attnkit.data.mlm.MLMBatch`; ``model(input_ids, attention_mask=, token_type_ids=,
    mlm_mask=)`` gives ``.logits`` at the masked positions and ``.seq_relationship_logits``
    (BERT's pre-training heads)."""
    device = next(model.parameters()).device
    nll, right, n, nsp_right, nsp_n = 0.0, 0, 0, 0, 0
    for batch in eval_loop(batches, device):
        selected = batch.labels != IGNORE
        out = model(batch.ids, attention_mask=batch.attention_mask,
                    token_type_ids=batch.token_types, mlm_mask=selected)
        labels = batch.labels[selected]
        loss, count = token_nll(out.logits, labels)
        nll, n = nll + float(loss.double()), n + count
        right += int((out.logits.argmax(-1) == labels).sum())
        if out.seq_relationship_logits is not None and batch.nsp is not None:
            nsp_right += int((out.seq_relationship_logits.argmax(-1) == batch.nsp).sum())
            nsp_n += len(batch.nsp)
    scores = {"val_mlm_loss": nll / max(1, n), "val_mlm_ppl": perplexity(nll, n),
              "val_mlm_acc": right / max(1, n), "val_masked": float(n)}
    if nsp_n:
        scores["val_nsp_acc"] = nsp_right / nsp_n
    return scores


# ---- the loop ----------------------------------------------------------------------------------
def eval_loop(batches: Iterable[B], device: Any = None, desc: str = "evaluating",
              total: int | None = None) -> Iterator[B]:
    """The batches of one evaluation pass, each moved to ``device`` (when given and the batch
    has ``.to``), with a progress bar on stderr (:func:`attnkit.progress.progress_bar`) that
    shows only on a terminal and only once the pass has taken more than a second.

    Gradients and eval/train mode stay the caller's business (a generator must not hold
    ``torch.no_grad`` open: a loop left early would leave it switched off).
    """
    if total is None and isinstance(batches, Sequence):
        total = len(batches)
    with progress_bar(total=total, desc=desc, unit="batch", leave=False, delay=1.0,
                      quiet=True) as bar:
        for batch in batches:
            yield batch.to(device) if device is not None and hasattr(batch, "to") else batch
            bar.update()
