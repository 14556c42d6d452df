"""Local attention: Luong's local-p / local-m and sliding-window local self-attention.

Notation: B batch, H heads, T query (target) length, S key (source) length, D head size,
C model width; Dq / Dk / Dv query / key / value widths.

Luong, Pham & Manning 2015, section 3.2 ("local attention"), with half-width ``window`` W:
- local-m (monotonic): the aligned position of target step t is p_t = t; the weights are the
  softmax of the scores over the window [p_t - W, p_t + W].
- local-p (predictive): p_t = S_b * sigmoid(v_p^T tanh(W_p h_t)) (eq. 9, S_b the source length
  of example b), and the window softmax is multiplied by a Gaussian centred on p_t (eq. 10):
      a_t(s) = align(h_t, h_s) * exp(-(s - p_t)^2 / (2 sigma^2)),  sigma = W / 2.
  The hard window carries no gradient to p_t; the Gaussian does. Weights are not renormalised
  after the Gaussian (as in the paper).

Sliding-window self-attention (Child et al. 2019; Beltagy et al. 2020), every position attending
to the positions at most W away, is an option of the shared multi-head module:
``MultiHeadAttention(d_model, n_heads, window=W)`` (:mod:`attnkit.nn.attention.multihead`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.errors import ConfigError
from attnkit.nn.attention.core import AttentionOutput, attention
from attnkit.nn.attention.masks import check_window, combine
from attnkit.nn.attention.scores import build_score

MODES = ("predictive", "monotonic")


class LocalAttention(nn.Module):
    """Luong's local attention over a source ``k``/``v`` (B, S, Dk/Dv) for queries (B, T, Dq).

    ``mode`` "predictive" (local-p, the paper's default) or "monotonic" (local-m); ``score``
    is any name of :data:`attnkit.nn.attention.scores.SCORES` (Luong used "general");
    ``max_len`` (the longest source) lets the window be checked at construction.
    """

    def __init__(self, d_query: int, d_key: int, window: int, mode: str = "predictive",
                 score: str = "general", d_hidden: int | None = None,
                 max_len: int | None = None, **score_options: object) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"local attention mode must be one of {', '.join(MODES)}, "
                              f"got {mode!r}")
        check_window(window, max_len)
        self.window, self.mode = window, mode
        self.score = build_score(score, d_query, d_key, d_hidden, **score_options)
        if mode == "predictive":
            d_hidden = d_query if d_hidden is None else d_hidden
            self.w_p = nn.Linear(d_query, d_hidden, bias=False)
            self.v_p = nn.Linear(d_hidden, 1, bias=False)

    def aligned_positions(self, q: Tensor, lengths: Tensor,
                          positions: Tensor | None = None) -> Tensor:
        """p_t (B, T): predicted (eq. 9) or, monotonic, ``positions`` (default 0..T-1)."""
        b, t = q.shape[:2]
        if self.mode == "predictive":
            gate = torch.sigmoid(self.v_p(torch.tanh(self.w_p(q)))).squeeze(-1)  # (B, T)
            return lengths.to(q.dtype)[:, None] * gate
        if positions is None:
            positions = torch.arange(t, device=q.device)
        return positions.to(q.dtype).expand(b, t)

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                lengths: Tensor | None = None, positions: Tensor | None = None,
                need_weights: bool = False) -> AttentionOutput:
        """``mask`` (bool, broadcastable to (B, T, S), True = may attend) marks valid source
        positions; ``lengths`` (B,) are the source lengths S_b (default: from a (B, 1, S) or
        (B, S) padding mask, else S); ``positions`` (T,) or (B, T) are local-m's p_t (decoders
        stepping one target at a time pass the step index). Returns out (B, T, Dv) and, when
        asked, the weights (B, T, S) actually used."""
        s = k.size(-2)
        if mask is not None and mask.dim() == 2:
            mask = mask[:, None, :]  # (B, S) padding -> (B, 1, S)
        if lengths is None:
            lengths = (torch.full((q.size(0),), s, device=q.device) if mask is None
                       else mask.reshape(q.size(0), -1, s)[:, 0].sum(-1))
        p = self.aligned_positions(q, lengths, positions)  # (B, T)
        dist = torch.arange(s, device=q.device, dtype=q.dtype) - p[..., None]  # (B, T, S)
        inside = dist.abs() <= self.window
        post = None
        if self.mode == "predictive":
            sigma = self.window / 2
            gauss = torch.exp(-dist.pow(2) / (2 * sigma**2))  # (B, T, S)
            post = lambda w: w * gauss
        res = attention(q, k, v, mask=combine(mask, inside), score_fn=self.score,
                        post_fn=post, need_weights=need_weights)
        return AttentionOutput(res.out, res.weights if need_weights else None)
