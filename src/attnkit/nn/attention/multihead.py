"""Multi-head attention (Vaswani et al. 2017, section 3.2.2) over the attention core.

Notation: B batch, T query length, S key length, H heads, D head size, C = H * D model width.
Self-attention projects queries, keys and values with one fused (C -> 3C) linear layer;
cross-attention projects queries from ``x`` and keys/values from ``context`` (C -> 2C).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from attnkit.nn.attention.core import attention
from attnkit.nn.cache import KVCache


@dataclass
class MHAOutput:
    """``out`` (B, T, C) and, only when asked, the attention ``weights`` (B, H, T, S)."""

    out: Tensor
    weights: Tensor | None = None


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_H) W^O with
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 cross: bool = False) -> None:
        super().__init__()
        if d_model % n_heads:
            raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
        self.n_heads, self.head_dim, self.dropout, self.cross = (
            n_heads, d_model // n_heads, dropout, cross)
        if cross:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=bias)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def _heads(self, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return x.view(b, t, self.n_heads, self.head_dim).transpose(1, 2)  # (B, H, T, D)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, S, D) of ``context`` (cross-attention; cached by decoders)."""
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        return self._heads(k), self._heads(v)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                bias: Tensor | None = None, cache: KVCache | None = None,
                kv: tuple[Tensor, Tensor] | None = None, need_weights: bool = False,
                causal: bool = False) -> MHAOutput:
        """Attend from ``x`` (B, T, C) to itself (self) or to ``context`` / precomputed ``kv``.

        ``cache`` (self-attention) receives the new keys/values and supplies the earlier ones.
        ``causal`` adds the causal mask inside the core (the fused kernel's fast path when the
        queries and keys are the same positions).
        """
        if self.cross:
            q = self._heads(self.q_proj(x))
            k, v = kv if kv is not None else self.project_kv(context)
        else:
            q, k, v = (self._heads(t) for t in self.qkv_proj(x).chunk(3, dim=-1))
            if cache is not None:
                k, v = cache.append(k, v)
        res = attention(q, k, v, mask=mask, bias=bias, need_weights=need_weights, causal=causal,
                        dropout=self.dropout if self.training else 0.0)
        b, _, t, _ = res.out.shape
        out = res.out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, C)
        return MHAOutput(self.out_proj(out), res.weights)
