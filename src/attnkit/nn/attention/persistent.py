"""Persistent memory vectors: the all-attention layer (Sukhbaatar et al. 2019, "Augmenting
Self-attention with Persistent Memory").

Notation: B batch, H heads, N persistent vectors per head, S context keys, D head size.
Each head owns N learned key vectors M_k and value vectors M_v that are concatenated to the
context keys and values; the softmax is taken jointly over the S context keys and the N
persistent ones (section 4.1, eq. 6-7):

    K = [k_1 .. k_S, M_k],  V = [v_1 .. v_S, M_v],  a = softmax(q K^T / sqrt(D)) V

Persistent vectors carry no position (no relative term, never masked). With them the
feed-forward sublayer can be dropped (the "all-attention" layer). Initialisation as in the
paper: keys ~ N(0, 1/D), values ~ N(0, 1/N).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.errors import ConfigError


class PersistentMemory(nn.Module):
    """N key/value vectors per head, shared by all positions and sequences."""

    def __init__(self, n_heads: int, head_dim: int, n: int) -> None:
        super().__init__()
        if n < 1:
            raise ConfigError(f"persistent memory needs n >= 1 vectors per head, got {n}")
        self.n = n
        self.key = nn.Parameter(torch.randn(n_heads, n, head_dim) / math.sqrt(head_dim))
        self.value = nn.Parameter(torch.randn(n_heads, n, head_dim) / math.sqrt(n))

    def extend(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Context (B, H, S, D) keys/values -> (B, H, S + N, D) with the persistent ones last."""
        b = k.size(0)
        pk = self.key.unsqueeze(0).expand(b, -1, -1, -1).to(k.dtype)  # (B, H, N, D)
        pv = self.value.unsqueeze(0).expand(b, -1, -1, -1).to(v.dtype)
        return torch.cat([k, pk], dim=2), torch.cat([v, pv], dim=2)

    def extra_repr(self) -> str:
        return f"heads={self.key.size(0)}, n={self.n}, head_dim={self.key.size(2)}"
