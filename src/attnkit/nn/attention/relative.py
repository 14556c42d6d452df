"""Relative multi-head attention of Transformer-XL (Dai et al. 2019, section 3.3, eq. in 3.3).

Notation: B batch, T queries (the current segment), M memory positions, S = M + T keys,
H heads, D head size, C = H * D. Query i sits at position M + i, key j at position j, and their
distance is d = M + i - j (>= 0 for the keys it may see). The score of query i for key j is

    A_ij = q_i . k_j          (a) content             + q_i . W_R R_d    (b) content-dep. position
         + u . k_j            (c) global content bias + v . W_R R_d      (d) global position bias
         = (q_i + u) . k_j + (q_i + v) . W_R R_d

with R_d the sinusoid of distance d (``relative_table``, clamped at ``clamp_len``), and u, v
learned per head. Terms (b)+(d) are computed for all T x S pairs at once as
(q + v) (W_R R)^T against R ordered by decreasing distance, then moved into place with the
efficient relative shift (``rel_shift``, appendix B of the paper). Scores are scaled by
1/sqrt(D); the adaptive span (``AdaptiveSpan``) and persistent memory (``PersistentMemory``)
plug in as extra bias and extra keys.

``path`` is the attention core's switch ("auto", "fused", "flex", "explicit"). "fused" and
"explicit" materialise the T x S position bias and hand it to the core (SDPA with the bias, or
the explicit softmax that can return weights; needed for training). "flex" (forward only on
CPU) adds the position term inside the compiled ``flex_attention`` kernel by gathering it from
the (B, H, T, K) table of distinct distances, with the core's cached tiled band block mask
(:func:`attnkit.nn.attention.flex.band_block_mask`) skipping tiles beyond the causal / span
window, so no T x S score, bias or weight matrix exists. "auto" asks the core's one flex policy
(:func:`attnkit.nn.attention.flex.use_flex`, one compile budget for every caller) and
otherwise lets the core choose between SDPA and the explicit softmax.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.nn.attention import flex
from attnkit.nn.attention.adaptive_span import AdaptiveSpan
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.multihead import MHAOutput, head_size, split_heads
from attnkit.nn.attention.persistent import PersistentMemory


def relative_table(n: int, d_model: int, clamp_len: int = 0) -> Tensor:
    """R (n, C): row d = [sin(d w), cos(d w)] with w_f = 10000^(-2f/C), d clamped at clamp_len
    (0 = no clamp). The layout (sines then cosines) is Transformer-XL's."""
    cpu = torch.device("cpu")  # float64 on the CPU whatever the default device (MPS has none)
    pos = torch.arange(n, dtype=torch.float64, device=cpu)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, dtype=torch.float64, device=cpu)
                             / d_model))
    angle = pos[:, None] * inv[None, :]  # (n, C/2)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).float()


def rel_shift(x: Tensor) -> Tensor:
    """The efficient relative shift (Dai et al. 2019, appendix B).

    ``x`` (..., T, S) has column k for distance S - 1 - k. Returns y with
    y[..., i, j] = x[..., i, j + T - 1 - i], the term for distance M + i - j, wherever
    j <= i + M (M = S - T); the other entries are leftovers that the causal mask removes.
    """
    *lead, t, s = x.shape
    padded = F.pad(x, (1, 0))  # (..., T, S + 1): a zero column in front
    return padded.view(*lead, s + 1, t)[..., 1:, :].reshape(*lead, t, s)


def distances(t: int, s: int, device: torch.device | None = None) -> Tensor:
    """(T, S) integer distances d = (S - T) + i - j (negative = a future key)."""
    rows = torch.arange(t, device=device)[:, None] + (s - t)
    return rows - torch.arange(s, device=device)[None, :]


class RelativeMultiHeadAttention(nn.Module):
    """Transformer-XL attention over [memory, segment] with relative positions.

    ``span`` and ``persistent`` (optional modules) turn it into adaptive-span attention and the
    all-attention layer. ``path`` picks the kernel (see the module docstring).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *,
                 span: AdaptiveSpan | None = None, persistent: PersistentMemory | None = None,
                 path: str = "auto") -> None:
        super().__init__()
        self.n_heads, self.head_dim, self.dropout, self.path = (
            n_heads, head_size(d_model, n_heads, path), dropout, path)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.r_proj = nn.Linear(d_model, d_model, bias=False)  # W_{k,R}
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.02)  # content bias
        self.v = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.02)  # position bias
        self.span, self.persistent = span, persistent

    def memory_needed(self, mem_len: int) -> int:
        """How many memory positions the layer reads: all, or what the spans can reach."""
        if self.span is None:
            return mem_len
        return min(mem_len, self.span.window() - 1)

    def forward(self, x: Tensor, mem: Tensor | None, table: Tensor, *,
                max_distance: int | None = None, need_weights: bool = False) -> MHAOutput:
        """``x`` (B, T, C) attends over [mem (B, M, C), x]; ``table`` (>= S rows, C) is
        :func:`relative_table`; keys farther than ``max_distance`` are masked."""
        if mem is not None and self.span is not None:
            keep = self.memory_needed(mem.size(1))
            mem = mem[:, mem.size(1) - keep:]  # trimmed to the largest current span
        h = x if mem is None or mem.size(1) == 0 else torch.cat([mem, x], dim=1)  # (B, S, C)
        t, s = x.size(1), h.size(1)
        q = split_heads(self.q_proj(x), self.n_heads)  # (B, H, T, D)
        k, v = (split_heads(a, self.n_heads) for a in self.kv_proj(h).chunk(2, -1))  # (B, H, S, D)
        rows = min(s, table.size(0))  # distinct distances (table rows past clamp_len repeat)
        rk = self.r_proj(table[:rows]).view(rows, self.n_heads, self.head_dim).transpose(0, 1)
        limit = s - 1 if max_distance is None else min(s - 1, max_distance)
        if self.span is not None:
            limit = min(limit, self.span.window() - 1)
        if self._use_flex(q, s, rows, need_weights):
            out, weights = self._flex(q, k, v, rk, limit), None
        else:
            res = self._with_bias(q, k, v, rk, limit, need_weights)
            out, weights = res.out, res.weights
        b = x.size(0)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, C)
        return MHAOutput(self.out_proj(out), weights)

    def _use_flex(self, q: Tensor, s: int, rows: int, need_weights: bool) -> bool:
        """Whether this call runs on flex (the core's policy, :func:`flex.use_flex`)."""
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        blockers = {"the attention weights were requested": need_weights,
                    "gradients are needed (no flex backward here)": grad,
                    "dropout > 0": self.training and self.dropout > 0}
        extra = 0 if self.persistent is None else self.persistent.n
        kind = ("relative", None if self.span is None else self.span.ramp, rows, extra)
        return flex.use_flex(self.path, q, s + extra, blockers, kind)

    def _with_bias(self, q: Tensor, k: Tensor, v: Tensor, rk: Tensor, limit: int,
                   need_weights: bool):
        """The (B, H, T, S) position bias materialised and handed to the attention core."""
        t, s = q.size(2), k.size(2)
        scale = 1.0 / math.sqrt(self.head_dim)
        dist = distances(t, s, q.device)  # (T, S)
        index = torch.arange(s - 1, -1, -1, device=q.device).clamp(max=rk.size(1) - 1)
        bd = rel_shift(torch.matmul(q + self.v[:, None], rk[:, index].transpose(-2, -1)))
        bias = bd * scale  # (B, H, T, S): terms (b) + (d), scaled
        mask = (dist >= 0) & (dist <= limit)  # (T, S)
        if self.span is not None:
            log_m, alive = self.span.bias_and_mask(dist)  # (H, T, S)
            bias, mask = bias + log_m, mask & alive
        if self.persistent is not None:
            k, v = self.persistent.extend(k, v)
            n = self.persistent.n
            bias = F.pad(bias, (0, n))  # no position term for persistent keys
            mask = F.pad(mask, (0, n), value=True)
        return attention(q + self.u[:, None], k, v, bias=bias, mask=mask, scale=scale,
                         need_weights=need_weights, path=self.path,
                         dropout=self.dropout if self.training else 0.0)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, rk: Tensor, limit: int) -> Tensor:
        """Forward only: the position term inside the flex kernel, the band's block mask."""
        pos = torch.matmul(q + self.v[:, None], rk.transpose(-2, -1))  # (B, H, T, K) by distance
        context, extra = k.size(2), 0
        if self.persistent is not None:
            k, v = self.persistent.extend(k, v)
            extra = self.persistent.n
        scale = 1.0 / math.sqrt(self.head_dim)
        mod = relative_score_mod(pos, context, scale, self.span)
        return flex.flex_band_attention(q + self.u[:, None], k, v, limit, True, scale,
                                        score_mod=mod, extra=extra)


def relative_score_mod(pos: Tensor, context: int, scale: float,
                       span: AdaptiveSpan | None) -> Callable[..., Tensor]:
    """flex_attention's score_mod adding the position term of Transformer-XL (forward only).

    ``pos`` (B, H, T, K) is (q + v) . W_R R_d for distances d = 0..K-1 (K - 1 = the clamp);
    query i and key j < ``context`` are d = context - T + i - j apart, and the score gains
    ``pos[b, h, i, min(d, K - 1)] * scale`` plus, with ``span``, log m_z(d) (adaptive span).
    Keys from ``context`` on are persistent: no position term. The band's block mask (see
    :func:`attnkit.nn.attention.flex.band_block_mask`) hides the keys with d < 0 or d > limit.
    """
    dev = pos.device
    # scalars as tensors: the compiled kernel is reused when only their values change
    offset, ctx = (torch.tensor(x, device=dev) for x in (context - pos.size(2), context))
    last = torch.tensor(pos.size(-1) - 1, device=dev)
    z = span.spans().detach() if span is not None else torch.zeros(pos.size(1), device=dev)
    use_span, ramp = span is not None, 1 if span is None else span.ramp  # not the module itself:
    # the compiled kernel would guard on its identity and recompile for every layer

    def score_mod(score, b, h, qi, ki):
        d = qi + offset - ki
        term = pos[b, h, qi, torch.minimum(d.clamp(min=0), last)] * scale
        if use_span:
            m = ((ramp + z[h] - d) / ramp).clamp(0.0, 1.0)
            term = term + torch.log(m.clamp_min(1e-30))
        return score + torch.where(ki < ctx, term, 0.0)

    return score_mod
