"""The attention core: one pure function every attention variant in attnkit feeds.

Notation (shared by every attention module): B batch, H heads, T query length, S key length,
D head size. ``q`` is (B, H, T, D); ``k`` and ``v`` are (B, H, S, D). Masks are boolean with
True = may attend, broadcastable to (B, H, T, S); an additive ``bias`` (relative positions,
ALiBi, ...) is a float tensor broadcastable to the same shape.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + bias, masked) V   (Vaswani et al. 2017, eq. 1)

When nobody asks for the weights, :func:`attention` calls PyTorch's fused
``scaled_dot_product_attention`` (O(T) memory); otherwise it computes the same thing explicitly
and returns the (B, H, T, S) weights too. Both paths are tested equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.nn.attention.masks import causal_mask, combine


@dataclass
class AttentionOutput:
    """``out`` (B, H, T, D) and, only when asked for, ``weights`` (B, H, T, S)."""

    out: Tensor
    weights: Tensor | None = None


def _combined_mask(mask: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One ``attn_mask`` for SDPA: the boolean mask, or the bias with -inf where masked."""
    if bias is None:
        return mask
    bias = bias.to(dtype)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, float("-inf"))


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
              bias: Tensor | None = None, dropout: float = 0.0, need_weights: bool = False,
              scale: float | None = None, causal: bool = False) -> AttentionOutput:
    """Scaled dot-product attention with an optional boolean ``mask`` and additive ``bias``.

    ``causal`` lets query i attend to keys j <= i + (S - T) (queries are the last T positions,
    as after a key/value cache); it is ANDed with ``mask``. ``dropout`` is applied to the
    attention weights (pass 0.0 in evaluation). With ``need_weights=False`` the fused kernel
    runs and ``weights`` is None.
    """
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    t, s = q.size(-2), k.size(-2)
    if causal and (need_weights or mask is not None or bias is not None or t != s):
        mask = combine(mask, causal_mask(t, s, device=q.device))
        causal = False
    if not need_weights:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=_combined_mask(mask, bias, q.dtype), dropout_p=dropout,
            scale=scale, is_causal=causal)  # is_causal: only square and unmasked (fastest)
        return AttentionOutput(out)
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    dead = None
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
        dead = ~mask.any(dim=-1, keepdim=True)  # queries that may attend to nothing
        if dead.any():
            scores = scores.masked_fill(dead, 0.0)
    weights = torch.softmax(scores, dim=-1)
    if dead is not None and dead.any():
        weights = weights.masked_fill(dead, 0.0)  # as the fused kernel: a zero output
    dropped = F.dropout(weights, p=dropout) if dropout > 0 else weights
    return AttentionOutput(torch.matmul(dropped, v), weights)  # (B, H, T, D)
