"""Quality metrics on decoded text: exact match, BLEU (sacrebleu), perplexity."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import sacrebleu


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


def perplexity(loss_sum: float, n_tokens: int) -> float:
    """exp(mean negative log-likelihood per token)."""
    return math.exp(loss_sum / max(1, n_tokens))


METRICS: dict[str, Callable[[Sequence[str], Sequence[str]], dict[str, float]]] = {
    "exact_match": exact_match,
    "bleu": bleu,
}
