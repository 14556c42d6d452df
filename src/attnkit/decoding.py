"""Greedy and beam-search decoding with cached incremental steps.

Any model that offers ``start(src, max_len) -> state``, ``step(tokens, state) -> logits (B, V)``
and ``state.reorder(index)`` can be decoded here (the encoder-decoder Transformer does).
Generated lengths count the EOS token; ``max_len`` (one number, or one per source) bounds them,
and a hypothesis still open at its source's limit is closed with EOS. A source's output never
depends on the other sources in its batch.

Beam scores use the GNMT length penalty (Wu et al. 2016, eq. 14):
    s(Y) = log P(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6) ** alpha
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from attnkit.errors import UserError


@dataclass
class Hypothesis:
    """A finished output: ``tokens`` (no BOS/EOS), length-penalised ``score``, raw ``logprob``."""

    tokens: list[int]
    score: float
    logprob: float


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha; alpha = 0 gives plain log-probabilities."""
    return ((5.0 + length) / 6.0) ** alpha


def _log_probs(logits: Tensor, banned: list[int], eos: int, last: Tensor) -> Tensor:
    """log-softmax with never-generated tokens removed; rows at their ``last`` step: EOS only."""
    logp = torch.log_softmax(logits.float(), dim=-1).cpu()
    logp[:, banned] = float("-inf")
    if last.any():
        eos_col = logp[last, eos]
        logp[last] = float("-inf")
        logp[last, eos] = eos_col
    return logp


def _limits(max_len: int | Sequence[int], batch: int) -> Tensor:
    """Per-source length limits (B,) from one number or a sequence."""
    limits = torch.as_tensor([max_len] * batch if isinstance(max_len, int) else list(max_len),
                             dtype=torch.long)
    if limits.numel() != batch:
        raise ValueError(f"{limits.numel()} length limits for {batch} sources")
    if batch and limits.min() < 1:
        raise UserError(f"max decoding length must be at least 1, got {limits.min().item()}")
    return limits


@torch.no_grad()
def greedy_search(model, src: Tensor, max_len: int | Sequence[int], bos: int = 1, eos: int = 2,
                  banned: tuple[int, ...] = (0, 1)) -> list[list[int]]:
    """The most probable next token at every step, for a batch of sources (B, S)."""
    b = src.size(0)
    limits = _limits(max_len, b)
    max_len = int(limits.max())
    state = model.start(src, max_len)
    tokens = torch.full((b, 1), bos, dtype=torch.long, device=src.device)
    out = torch.full((b, max_len), eos, dtype=torch.long)
    alive = torch.ones(b, dtype=torch.bool)
    for t in range(max_len):
        logp = _log_probs(model.step(tokens, state), list(banned), eos, limits - 1 == t)
        choice = logp.argmax(-1)  # (B,)
        out[:, t] = torch.where(alive, choice, eos)
        alive &= choice != eos
        tokens = choice[:, None].to(src.device)
        if not alive.any():
            break
    return [row[: (row == eos).nonzero()[0, 0]].tolist() for row in out]


@torch.no_grad()
def beam_search(model, src: Tensor, max_len: int | Sequence[int], beam_size: int = 4,
                alpha: float = 0.6,
                nbest: int = 1, bos: int = 1, eos: int = 2,
                banned: tuple[int, ...] = (0, 1)) -> list[list[Hypothesis]]:
    """Batched beam search; returns the ``nbest`` best hypotheses per source, best first.

    Each step extends the K live hypotheses of every source by every token, keeps the best K
    that do not end, and moves those ending in EOS that rank above the K-th kept one to the
    finished list. A source stops when its K-th best finished score beats the best score any
    live hypothesis could still reach (its log-probability can only fall, so
    logprob / lp(max_len) bounds it).
    """
    if alpha < 0:
        raise UserError(f"length penalty alpha must be >= 0, got {alpha}")
    if not 1 <= nbest <= beam_size:
        raise UserError(f"nbest must be in [1, beam size {beam_size}], got {nbest}")
    b, k = src.size(0), beam_size
    limits = _limits(max_len, b)
    max_len = int(limits.max())
    last_rows = (limits - 1).repeat_interleave(k)  # (B*K,) the step at which a row must end
    state = model.start(src, max_len)
    state.reorder(torch.arange(b, device=src.device).repeat_interleave(k))  # rows b*K + beam
    scores = torch.full((b, k), float("-inf"))
    scores[:, 0] = 0.0
    history = torch.empty((b * k, 0), dtype=torch.long)
    tokens = torch.full((b * k, 1), bos, dtype=torch.long, device=src.device)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    done = [False] * b
    for t in range(max_len):
        logp = _log_probs(model.step(tokens, state), list(banned), eos, last_rows == t)
        vocab = logp.size(-1)
        cand = (scores[:, :, None] + logp.view(b, k, vocab)).view(b, -1)  # (B, K*V)
        top_s, top_i = cand.topk(min(2 * k, cand.size(1)), dim=-1)
        rows = torch.zeros(b, k, dtype=torch.long)
        new_tok = torch.full((b, k), eos, dtype=torch.long)
        new_scores = torch.full((b, k), float("-inf"))
        for i in range(b):
            rows[i] = i * k
            if done[i]:
                continue
            n = 0
            for s, idx in zip(top_s[i].tolist(), top_i[i].tolist(), strict=True):
                if s == float("-inf") or n == k:
                    break
                beam, tok = divmod(idx, vocab)
                if tok == eos:
                    prefix = history[i * k + beam].tolist()
                    finished[i].append(Hypothesis(
                        prefix, s / length_penalty(t + 1, alpha), s))
                else:
                    rows[i, n], new_tok[i, n], new_scores[i, n] = i * k + beam, tok, s
                    n += 1
            done[i] = _is_done(finished[i], new_scores[i], k, int(limits[i]), alpha)
        if all(done):
            break
        rows = rows.view(-1)
        state.reorder(rows.to(src.device))
        history = torch.cat([history[rows], new_tok.view(-1, 1)], dim=1)
        tokens = new_tok.view(-1, 1).to(src.device)
        scores = new_scores
    return [sorted(f, key=lambda h: -h.score)[:nbest] for f in finished]


def _is_done(finished: list[Hypothesis], live: Tensor, k: int, max_len: int,
             alpha: float) -> bool:
    """No live hypothesis can still enter the K best finished ones."""
    best_live = live.max().item()
    if best_live == float("-inf"):
        return True
    if len(finished) < k:
        return False
    kth = sorted(h.score for h in finished)[-k]
    # log-probs only fall as hypotheses grow; for alpha >= 0 the score is bounded by dividing
    # the current log-prob by the largest penalty, lp(max_len).
    return best_live / length_penalty(max_len, alpha) <= kth
