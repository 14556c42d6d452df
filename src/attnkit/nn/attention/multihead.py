"""Multi-head attention (Vaswani et al. 2017, section 3.2.2) over the attention core.

Notation: B batch, T query length, S key length, H heads, D head size, C = H * D model width,
N the real (non-padding) tokens of a padded batch.
Self-attention projects queries, keys and values with one fused (C -> 3C) linear layer;
cross-attention projects queries from ``x`` and keys/values from ``context`` (C -> 2C).

Two options of the same module (and of the blocks built on it):
- ``window``: sliding-window local self-attention (Child et al. 2019; Beltagy et al. 2020):
  query i sees keys at most ``window`` positions away (and, with ``causal``, none ahead); the
  core runs it on SDPA with a band mask, or on the compiled flex kernel for long inputs
  without gradients (``path``, see :mod:`attnkit.nn.attention.core`).
- ``packing`` (a :class:`Packing`, per call): ``x`` holds only the N real tokens of a padded
  (B, S) batch as one (N, C) matrix. Projections (and the block's feed-forward and norms) then
  compute N rows instead of B * S, through oneDNN's GEMM in inference
  (:func:`~attnkit.nn.fast_linear.inference_linear`); queries, keys and values are scattered
  into the (B, S) grid for the masked fused kernel. Padding positions are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from attnkit.config import unknown
from attnkit.errors import ConfigError
from attnkit.nn.attention.core import PATHS, attention
from attnkit.nn.attention.masks import check_window, combine
from attnkit.nn.cache import KVCache
from attnkit.nn.fast_linear import inference_linear


@dataclass
class MHAOutput:
    """``out`` (B, T, C) (or (N, C) packed) and, only when asked, ``weights`` (B, H, T, S)."""

    out: Tensor
    weights: Tensor | None = None


@dataclass(frozen=True)
class Packing:
    """Where the N real tokens of a padded (B, S) batch sit in the flat B * S positions.

    ``index`` (N,) holds their flat positions b * S + j (None: every position is real,
    N = B * S); ``mask`` (B, 1, 1, S) marks the real keys (None: all).
    """

    batch: int
    length: int
    index: Tensor | None = None
    mask: Tensor | None = None

    @classmethod
    def of(cls, mask: Tensor | None, batch: int, length: int) -> Packing:
        """The packing of a batch whose real keys are ``mask`` ((B, 1, 1, S) or None)."""
        index = None if mask is None else mask.reshape(-1).nonzero().squeeze(1)
        return cls(batch, length, index, mask)

    def pack(self, x: Tensor) -> Tensor:
        """(B, S, F) or (B * S, F) -> (N, F): the real tokens' rows."""
        x = x.reshape(self.batch * self.length, x.size(-1))
        return x if self.index is None else x.index_select(0, self.index)

    def unpack(self, x: Tensor) -> Tensor:
        """(N, F) -> (B, S, F) with zeros at the padding positions (zeros, not garbage: the
        masked keys' values must stay finite)."""
        if self.index is not None:
            x = x.new_zeros(self.batch * self.length, x.size(-1)).index_copy(0, self.index, x)
        return x.view(self.batch, self.length, x.size(-1))


def head_size(d_model: int, n_heads: int, path: str) -> int:
    """D = C / H, after checking that the heads divide the width and that ``path`` is one of
    the core's kernels (:data:`~attnkit.nn.attention.core.PATHS`)."""
    if d_model % n_heads:
        raise ValueError(f"d_model {d_model} is not divisible by n_heads {n_heads}")
    if path not in PATHS:
        raise unknown("attention path", path, PATHS)
    return d_model // n_heads


def split_heads(x: Tensor, n_heads: int) -> Tensor:
    """(B, T, C) -> (B, H, T, D): each head's slice of the projection."""
    b, t, c = x.shape
    return x.view(b, t, n_heads, c // n_heads).transpose(1, 2)


class MultiHeadAttention(nn.Module):
    """MultiHead(Q, K, V) = Concat(head_1..head_H) W^O with
    head_i = Attention(Q W_i^Q, K W_i^K, V W_i^V).

    ``window`` (self-attention only) restricts it to a band (see the module docstring;
    ``max_len``, the longest sequence, lets the window be checked at construction); ``path``
    picks the core's kernel ("auto", "fused", "flex", "explicit").
    """

    def __init__(self, d_model: int, n_heads: int, dropout: float = 0.0, bias: bool = True,
                 cross: bool = False, *, window: int | None = None, max_len: int | None = None,
                 path: str = "auto") -> None:
        super().__init__()
        head_dim = head_size(d_model, n_heads, path)
        if window is not None:
            if cross:
                raise ConfigError("a sliding window is for self-attention, not cross-attention")
            check_window(window, max_len)
        self.n_heads, self.head_dim, self.dropout, self.cross = n_heads, head_dim, dropout, cross
        self.window, self.path = window, path
        if cross:
            self.q_proj = nn.Linear(d_model, d_model, bias=bias)
            self.kv_proj = nn.Linear(d_model, 2 * d_model, bias=bias)
        else:
            self.qkv_proj = nn.Linear(d_model, 3 * d_model, bias=bias)
        self.out_proj = nn.Linear(d_model, d_model, bias=bias)

    def project_kv(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """Keys and values (B, H, S, D) of ``context`` (cross-attention; cached by decoders)."""
        k, v = self.kv_proj(context).chunk(2, dim=-1)
        return split_heads(k, self.n_heads), split_heads(v, self.n_heads)

    def forward(self, x: Tensor, context: Tensor | None = None, *, mask: Tensor | None = None,
                bias: Tensor | None = None, cache: KVCache | None = None,
                kv: tuple[Tensor, Tensor] | None = None, need_weights: bool = False,
                causal: bool = False, packing: Packing | None = None) -> MHAOutput:
        """Attend from ``x`` (B, T, C) to itself (self) or to ``context`` / precomputed ``kv``.

        ``cache`` (self-attention) receives the new keys/values and supplies the earlier ones.
        ``causal`` adds the causal mask inside the core (the fused kernel's fast path when the
        queries and keys are the same positions). With ``packing`` (self-attention), ``x`` and
        the output are the packed real tokens (N, C).
        """
        if self.cross:
            if packing is not None:
                raise ConfigError("packed sequences are for self-attention")
            q = split_heads(self.q_proj(x), self.n_heads)
            k, v = kv if kv is not None else self.project_kv(context)
        else:
            qkv = inference_linear(x, self.qkv_proj)  # (B, T, 3C), or packed (N, 3C)
            if packing is not None:
                qkv, mask = packing.unpack(qkv), combine(mask, packing.mask)  # (B, S, 3C)
            q, k, v = (split_heads(t, self.n_heads) for t in qkv.chunk(3, -1))  # (B, H, T, D)
            if cache is not None:
                k, v = cache.append(k, v)
        res = attention(q, k, v, mask=mask, bias=bias, need_weights=need_weights, causal=causal,
                        window=self.window, path=self.path,
                        dropout=self.dropout if self.training else 0.0)
        b, _, t, _ = res.out.shape
        out = res.out.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim)  # (B, T, C)
        if packing is not None:
            out = packing.pack(out)  # (N, C)
        return MHAOutput(inference_linear(out, self.out_proj), res.weights)
