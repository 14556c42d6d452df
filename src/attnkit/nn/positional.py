"""Absolute position encodings added to token embeddings.

Sinusoidal (Vaswani et al. 2017, section 3.5):
    PE(pos, 2i) = sin(pos / 10000^(2i/C)),  PE(pos, 2i+1) = cos(pos / 10000^(2i/C))
Learned: one trained vector per position (Gehring et al. 2017; BERT; GPT-2).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def sinusoidal_table(max_len: int, d_model: int) -> Tensor:
    """(max_len, C) table of the paper's sinusoids."""
    pos = torch.arange(max_len, dtype=torch.float64)[:, None]
    inv = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float64)
                    * (-math.log(10000.0) / d_model))
    table = torch.zeros(max_len, d_model, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * inv)
    table[:, 1::2] = torch.cos(pos * inv)[:, : d_model // 2]
    return table.float()


class SinusoidalPositions(nn.Module):
    """Fixed sinusoids; ``forward(t, offset)`` gives (t, C) for positions offset..offset+t-1."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.register_buffer("table", sinusoidal_table(max_len, d_model), persistent=False)

    def forward(self, t: int, offset: int = 0) -> Tensor:
        return self.table[offset: offset + t]


class LearnedPositions(nn.Module):
    """A trained embedding per position."""

    def __init__(self, max_len: int, d_model: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(max_len, d_model)

    def forward(self, t: int, offset: int = 0) -> Tensor:
        return self.embedding.weight[offset: offset + t]


POSITIONS = {"sinusoidal": SinusoidalPositions, "learned": LearnedPositions}
