"""One decoding protocol, one greedy/sampling loop and one beam search for every family.

The protocol: every model that decodes has three methods.

    state = model.start(...)                  # seq2seq: start(src (B, S), max_len)
                                              # decoder-only: start(input_ids (B, P),
                                              #     attention_mask=None, max_new_tokens=N)
    logits, state = model.step(state, tokens) # feed tokens (B, t): logits of the last (B, V)
    state = model.reorder(state, index)       # keep rows index (B',): beam search's survivors

``start`` encodes the source (seq2seq) or prepares the cache for left-padded prompts
(decoder-only: attention mask 0 on the pads, as Hugging Face pads); the first ``step`` then
feeds BOS (seq2seq) or the prompts themselves, and every later step one token per row. A
row's output never depends on the other rows of its batch. Families: the encoder-decoder
Transformer (key/value caches), the RNNs (the recurrent state), GPT-2 (a preallocated key/value
cache; past its context of absolute positions the window slides: each token is predicted from
the last ``n_positions`` tokens, re-encoded), Transformer-XL (its segment memory, one token at
a time; no window).

Over it: :func:`decode_steps` (greedy or sampling: ``choose`` picks one token per row) and
:func:`decode_beams` (beam search over log-probabilities from ``score``), used by the seq2seq
front end here (:func:`greedy_search`, :func:`beam_search`) and by :mod:`attnkit.generation`.
Generated lengths count the ending token; ``limits`` (one per row) bound them.

Beam scores use the GNMT length penalty (Wu et al. 2016, eq. 14):
    s(Y) = log P(Y | X) / lp(Y),   lp(Y) = ((5 + |Y|) / 6) ** alpha
Each step extends the K live hypotheses of every source by every token, keeps the best K that
do not end, and moves those ending (EOS, or the source's last step) that rank above the K-th
kept one to the finished list. A source stops when its K-th best finished score beats the best
score any live hypothesis could still reach (its log-probability can only fall, so
logprob / lp(limit) bounds it).

Seq2seq (:func:`greedy_search`, :func:`beam_search`): PAD and BOS are never generated, a
hypothesis still open at its source's limit is closed with EOS, and outputs exclude EOS.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from attnkit.errors import UserError

# (logits (R, V), step t, the row's tokens so far (R, t)) -> next tokens (R,) / log-probs (R, V)
Choose = Callable[[Tensor, int, Tensor], Tensor]
Score = Callable[[Tensor, int, Tensor], Tensor]
OnToken = Callable[[int, int], "bool | None"]  # (row, token) -> True ends that row


@dataclass
class Hypothesis:
    """A finished output: ``tokens``, length-penalised ``score``, raw ``logprob``."""

    tokens: list[int]
    score: float
    logprob: float


def length_penalty(length: int, alpha: float) -> float:
    """GNMT's lp(Y) = ((5 + |Y|) / 6) ** alpha; alpha = 0 gives plain log-probabilities."""
    return ((5.0 + length) / 6.0) ** alpha


# -- the two loops --------------------------------------------------------------------------------
def decode_steps(model: Any, state: Any, tokens: Tensor, limits: Tensor, choose: Choose,
                 eos: int | None, on_token: OnToken | None = None) -> list[list[int]]:
    """Greedy or sampling: feed ``tokens`` (B, t), then one chosen token per row per step.

    Row i ends with its EOS (kept), when ``on_token(i, token)`` returns True, or after
    ``limits[i]`` tokens; the loop stops when every row has ended.
    """
    b, device = tokens.size(0), tokens.device
    out: list[list[int]] = [[] for _ in range(b)]
    alive, ends = [True] * b, limits.tolist()
    history = torch.empty((b, 0), dtype=torch.long, device=device)
    logits, state = model.step(state, tokens)
    for t in range(max(ends)):
        nxt = choose(logits, t, history).to(device)  # (B,)
        for i, tok in enumerate(nxt.tolist()):
            if alive[i]:
                out[i].append(tok)
                stop = on_token is not None and on_token(i, tok)
                if tok == eos or stop or t + 1 >= ends[i]:
                    alive[i] = False
        if not any(alive):
            break
        history = torch.cat([history, nxt[:, None]], dim=1)
        logits, state = model.step(state, nxt[:, None])
    return out


def decode_beams(model: Any, state: Any, tokens: Tensor, limits: Tensor, beam_size: int,
                 score: Score, eos: int | None, alpha: float) -> list[list[Hypothesis]]:
    """Beam search after ``tokens`` (B, t): every source's finished hypotheses, best first.

    The first step runs on the B rows; the state is then copied to K rows per source (row
    b * K + beam) and reordered after every step. A hypothesis ends at EOS or at its source's
    limit; ``score`` gives the log-probabilities every step ranks by.
    """
    b, k, device = tokens.size(0), beam_size, tokens.device
    logits, state = model.step(state, tokens)
    expand = torch.arange(b, device=device).repeat_interleave(k)
    state, logits = model.reorder(state, expand), logits[expand]  # (B*K, V)
    scores = torch.full((b, k), float("-inf"))
    scores[:, 0] = 0.0
    history = torch.empty((b * k, 0), dtype=torch.long)
    finished: list[list[Hypothesis]] = [[] for _ in range(b)]
    done = [False] * b
    for t in range(int(limits.max())):
        logp = score(logits, t, history).float().cpu()  # (B*K, V)
        rows, new_tok, scores = _beam_step(scores, logp, history, finished, done,
                                           (limits, eos, alpha), t)
        if all(done):
            break
        state = model.reorder(state, rows.to(device))
        history = torch.cat([history[rows], new_tok[:, None]], dim=1)
        logits, state = model.step(state, new_tok[:, None].to(device))
    return [sorted(f, key=lambda h: -h.score) for f in finished]


def _beam_step(scores: Tensor, logp: Tensor, history: Tensor, finished: list[list[Hypothesis]],
               done: list[bool], rule: tuple[Tensor, int | None, float], t: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """One beam step: the rows (B*K,) to keep, their new tokens (B*K,) and scores (B, K)."""
    limits, eos, alpha = rule
    b, k = scores.shape
    vocab = logp.size(-1)
    cand = (scores[:, :, None] + logp.view(b, k, vocab)).view(b, -1)  # (B, K*V)
    top_s, top_i = cand.topk(min(2 * k, cand.size(1)), dim=-1)
    rows = torch.arange(b).repeat_interleave(k) * k
    new_tok = torch.zeros((b, k), dtype=torch.long)
    new_scores = torch.full((b, k), float("-inf"))
    lp = length_penalty(t + 1, alpha)
    for i in range(b):
        if done[i]:
            continue
        kept, last = 0, t == int(limits[i]) - 1
        for s, idx in zip(top_s[i].tolist(), top_i[i].tolist(), strict=True):
            if s == float("-inf") or kept == k:
                break
            beam, tok = divmod(idx, vocab)
            if tok == eos or last:
                finished[i].append(Hypothesis(history[i * k + beam].tolist() + [tok], s / lp, s))
                if tok == eos:
                    continue
            else:
                rows[i * k + kept], new_tok[i, kept], new_scores[i, kept] = i * k + beam, tok, s
            kept += 1
        done[i] = last or _is_done(finished[i], new_scores[i], k, int(limits[i]), alpha)
    return rows, new_tok.view(-1), new_scores


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


# -- the seq2seq front end ------------------------------------------------------------------------
def _limits(max_len: int | Sequence[int], batch: int) -> Tensor:
    """Per-source length limits (B,) from one number or a sequence."""
    limits = torch.as_tensor([max_len] * batch if isinstance(max_len, int) else list(max_len),
                             dtype=torch.long)
    if limits.numel() != batch:
        raise ValueError(f"{limits.numel()} length limits for {batch} sources")
    if batch and limits.min() < 1:
        raise UserError(f"max decoding length must be at least 1, got {limits.min().item()}")
    return limits


def _seq2seq_score(banned: Sequence[int], eos: int, limits: Tensor) -> Score:
    """log-softmax with never-generated tokens removed; rows at their last step: EOS only.
    ``limits`` has one entry per row (B, or B*K for beams)."""
    banned = list(banned)

    def score(logits: Tensor, t: int, history: Tensor) -> Tensor:
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        logp[:, banned] = float("-inf")
        last = limits - 1 == t
        if last.any():
            eos_col = logp[last, eos]
            logp[last] = float("-inf")
            logp[last, eos] = eos_col
        return logp
    return score


def _without_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:-1] if tokens and tokens[-1] == eos else tokens


@torch.no_grad()
def greedy_search(model: Any, src: Tensor, max_len: int | Sequence[int], bos: int = 1,
                  eos: int = 2, banned: tuple[int, ...] = (0, 1)) -> list[list[int]]:
    """The most probable next token at every step, for a batch of sources (B, S)."""
    b = src.size(0)
    limits = _limits(max_len, b)
    state = model.start(src, int(limits.max()))
    score = _seq2seq_score(banned, eos, limits)
    bos_col = torch.full((b, 1), bos, dtype=torch.long, device=src.device)
    out = decode_steps(model, state, bos_col, limits,
                       lambda logits, t, h: score(logits, t, h).argmax(-1), eos)
    return [_without_eos(row, eos) for row in out]


@torch.no_grad()
def beam_search(model: Any, src: Tensor, max_len: int | Sequence[int], beam_size: int = 4,
                alpha: float = 0.6, nbest: int = 1, bos: int = 1, eos: int = 2,
                banned: tuple[int, ...] = (0, 1)) -> list[list[Hypothesis]]:
    """Batched beam search; the ``nbest`` best hypotheses per source (tokens without EOS)."""
    if alpha < 0:
        raise UserError(f"length penalty alpha must be >= 0, got {alpha}")
    if not 1 <= nbest <= beam_size:
        raise UserError(f"nbest must be in [1, beam size {beam_size}], got {nbest}")
    b = src.size(0)
    limits = _limits(max_len, b)
    state = model.start(src, int(limits.max()))
    score = _seq2seq_score(banned, eos, limits.repeat_interleave(beam_size))
    bos_col = torch.full((b, 1), bos, dtype=torch.long, device=src.device)
    found = decode_beams(model, state, bos_col, limits, beam_size, score, eos, alpha)
    return [[Hypothesis(_without_eos(h.tokens, eos), h.score, h.logprob) for h in hyps[:nbest]]
            for hyps in found]
