"""A preallocated key/value cache for incremental decoding.

Keys and values live in (B, H, max_len, D) buffers written in place; ``append`` returns views
of the filled prefix, so each decoding step costs no reallocation.
"""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys/values of one attention layer for positions 0..length-1."""

    def __init__(self, batch: int, heads: int, max_len: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        shape = (batch, heads, max_len, head_dim)
        self.k = torch.empty(shape, dtype=dtype, device=device)
        self.v = torch.empty(shape, dtype=dtype, device=device)
        self.length = 0

    @property
    def max_len(self) -> int:
        return self.k.size(2)

    def append(self, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write (B, H, t, D) new keys/values; return all keys/values so far."""
        end = self.length + k.size(2)
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} positions > max_len {self.max_len}")
        self.k[:, :, self.length:end] = k
        self.v[:, :, self.length:end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]

    def reorder(self, index: Tensor) -> None:
        """Keep batch rows ``index`` (beam search reordering)."""
        self.k = self.k.index_select(0, index)
        self.v = self.v.index_select(0, index)
