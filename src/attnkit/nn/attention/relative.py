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

Two paths compute the same thing: ``explicit`` (materialises the T x S position bias and hands
it to the attention core; needed for training and for returning weights) and ``flex``
(forward only on CPU: a ``flex_attention`` score modification gathers the position term from
the (B, H, T, K) table of distinct distances and a block mask skips blocks beyond the causal /
span window, so no T x S score, bias or weight matrix exists).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.nn.attention.adaptive_span import AdaptiveSpan
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.flex import compiled_flex, flex_available
from attnkit.nn.attention.multihead import MHAOutput
from attnkit.nn.attention.persistent import PersistentMemory

Impl = Literal["auto", "explicit", "flex"]
FLEX_MIN_SCORES = 1 << 20  # "auto" takes the flex path from T * S >= this (compile cost ~7 s)
FLEX_MAX_SHAPES = 4  # ... for at most this many (T, S) shapes per process (one compile each)
_flex_shapes: set[tuple[int, int]] = set()


def relative_table(n: int, d_model: int, clamp_len: int = 0) -> Tensor:
    """R (n, C): row d = [sin(d w), cos(d w)] with w_f = 10000^(-2f/C), d clamped at clamp_len
    (0 = no clamp). The layout (sines then cosines) is Transformer-XL's."""
    pos = torch.arange(n, dtype=torch.float64)
    if clamp_len > 0:
        pos = pos.clamp(max=clamp_len)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d_model, 2, dtype=torch.float64) / d_model))
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
    all-attention layer. ``impl`` picks the path ("auto": flex when nothing needs gradients or
    weights and the score matrix is large, else explicit).
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, *,
                 span: AdaptiveSpan | None = None, persistent: PersistentMemory | None = None,
                 impl: Impl = "auto") -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim, self.dropout, self.impl = (
            n_heads, d_model // n_heads, dropout, impl)
        self.q_proj = nn.Linear(d_model, d_model, bias=False)
        self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=False)
        self.r_proj = nn.Linear(d_model, d_model, bias=False)  # W_{k,R}
        self.out_proj = nn.Linear(d_model, d_model, bias=False)
        self.u = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.02)  # content bias
        self.v = nn.Parameter(torch.randn(n_heads, self.head_dim) * 0.02)  # position bias
        self.span, self.persistent = span, persistent

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

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
        q = self._heads(self.q_proj(x))  # (B, H, T, D)
        k, v = (self._heads(a) for a in self.kv_proj(h).chunk(2, dim=-1))  # (B, H, S, D)
        rows = min(s, table.size(0))  # distinct distances (table rows past clamp_len repeat)
        rk = self.r_proj(table[:rows]).view(rows, self.n_heads, self.head_dim).transpose(0, 1)
        limit = s - 1 if max_distance is None else min(s - 1, max_distance)
        if self.span is not None:
            limit = min(limit, self.span.window() - 1)
        if self._use_flex(need_weights, t, s):
            out = self._flex(q, k, v, rk, limit)
            weights = None
        else:
            res = self._explicit(q, k, v, rk, limit, need_weights)
            out, weights = res.out, res.weights
        b = x.size(0)
        out = out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, C)
        return MHAOutput(self.out_proj(out), weights)

    def _use_flex(self, need_weights: bool, t: int, s: int) -> bool:
        if self.impl == "explicit" or need_weights:
            return False
        grad = torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters())
        dropping = self.training and self.dropout > 0
        if self.impl == "flex":
            if grad or dropping:
                raise RuntimeError("the flex path is forward-only here (no backward on CPU, no "
                                   "dropout): use impl='explicit' for training")
            return True
        if grad or dropping or t * s < FLEX_MIN_SCORES or not flex_available():
            return False
        if (t, s) not in _flex_shapes and len(_flex_shapes) >= FLEX_MAX_SHAPES:
            return False  # every new shape compiles again: stay explicit
        _flex_shapes.add((t, s))
        return True

    def _explicit(self, q: Tensor, k: Tensor, v: Tensor, rk: Tensor, limit: int,
                  need_weights: bool):
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
                         need_weights=need_weights,
                         dropout=self.dropout if self.training else 0.0)

    def _flex(self, q: Tensor, k: Tensor, v: Tensor, rk: Tensor, limit: int) -> Tensor:
        pos = torch.matmul(q + self.v[:, None], rk.transpose(-2, -1))  # (B, H, T, K) by distance
        if self.persistent is not None:
            k, v = self.persistent.extend(k, v)
        z = None if self.span is None else self.span.spans().detach()
        ramp = 1 if self.span is None else self.span.ramp
        return flex_relative(q + self.u[:, None], k, v, pos, context=k.size(2) - (
            0 if self.persistent is None else self.persistent.n), limit=limit, spans=z,
            ramp=ramp, scale=1.0 / math.sqrt(self.head_dim))


def flex_relative(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, *, context: int, limit: int,
                  spans: Tensor | None, ramp: int, scale: float) -> Tensor:
    """Relative attention through ``flex_attention`` (forward only on CPU): returns (B, H, T, D).

    ``q`` already holds q + u; ``pos`` (B, H, T, K) is (q + v) . W_R R_d for distances
    d = 0..K-1 (K - 1 = the clamp); keys past ``context`` are persistent (no position, never
    masked). Key j is visible to query i when 0 <= d <= ``limit``; with ``spans`` (H,) the
    score gains log m_z(d) (adaptive span). The block mask lets the kernel skip blocks
    outside the window.
    """
    from torch.nn.attention.flex_attention import create_block_mask
    t, s = q.size(2), k.size(2)
    dev = q.device
    # scalars as tensors: the compiled kernel is reused when only their values change
    offset, lim, ctx = (torch.tensor(x, device=dev) for x in (context - t, limit, context))
    last = torch.tensor(pos.size(-1) - 1, device=dev)
    z = spans if spans is not None else torch.zeros(q.size(1), device=dev)
    use_span = spans is not None

    def score_mod(score, b, h, qi, ki):
        d = qi + offset - ki
        term = pos[b, h, qi, torch.minimum(d.clamp(min=0), last)] * scale
        if use_span:
            m = ((ramp + z[h] - d) / ramp).clamp(0.0, 1.0)
            term = term + torch.log(m.clamp_min(1e-30))
        return score + torch.where(ki < ctx, term, 0.0)

    def mask_mod(b, h, qi, ki):
        d = qi + offset - ki
        return ((d >= 0) & (d <= lim)) | (ki >= ctx)

    block_mask = create_block_mask(mask_mod, None, None, t, s, device=dev)
    return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block_mask, scale=scale)
