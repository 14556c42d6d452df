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

Sliding-window self-attention (Child et al. 2019; Beltagy et al. 2020): every position attends
to the positions at most W away (and, if causal, not ahead). It runs on the fused kernels: the
compiled ``flex_attention`` with a block mask for long inputs without gradients, SDPA with a
band mask otherwise (see :mod:`attnkit.nn.attention.core`).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from attnkit.errors import ConfigError
from attnkit.nn.attention.core import AttentionOutput, attention
from attnkit.nn.attention.masks import combine
from attnkit.nn.attention.multihead import MHAOutput, MultiHeadAttention
from attnkit.nn.attention.scores import build_score
from attnkit.nn.cache import KVCache

MODES = ("predictive", "monotonic")


def check_window(window: int, max_len: int | None = None) -> None:
    """ConfigError unless 0 < window < max_len (a window spanning the whole sequence is just
    global attention, and is almost always a mistake in a configuration)."""
    if window <= 0:
        raise ConfigError(f"local attention window must be positive, got {window}")
    if max_len is not None and window >= max_len:
        raise ConfigError(f"local attention window {window} covers the whole sequence "
                          f"(max_len {max_len}): use global attention or a smaller window")


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


class SlidingWindowAttention(MultiHeadAttention):
    """Multi-head self-attention restricted to a band: |i - j| <= window (j <= i if causal).

    Same parameters (and state-dict keys) as :class:`MultiHeadAttention`; ``max_len`` lets the
    window be checked at construction. Memory O(T * window) on the flex path (inference on long
    inputs), O(T * S) for the boolean band mask of the SDPA path.
    """

    def __init__(self, d_model: int, n_heads: int, window: int, causal: bool = False,
                 dropout: float = 0.0, bias: bool = True, max_len: int | None = None) -> None:
        super().__init__(d_model, n_heads, dropout=dropout, bias=bias)
        check_window(window, max_len)
        self.window, self.causal = window, causal

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                bias: Tensor | None = None, cache: KVCache | None = None,
                kv: tuple[Tensor, Tensor] | None = None, need_weights: bool = False,
                causal: bool = False, path: str = "auto") -> MHAOutput:
        """``x`` (B, T, C) -> (B, T, C); ``cache`` as in :class:`MultiHeadAttention`."""
        if context is not None or kv is not None:
            raise ConfigError("sliding-window attention is self-attention: no context/kv")
        q, k, v = (self._heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))  # (B, H, T, D)
        if cache is not None:
            k, v = cache.append(k, v)
        res = attention(q, k, v, mask=mask, bias=bias, need_weights=need_weights,
                        causal=causal or self.causal, window=self.window, path=path,
                        dropout=self.dropout if self.training else 0.0)
        b, _, t, _ = res.out.shape
        out = res.out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, C)
        return MHAOutput(self.out_proj(out), res.weights)
