"""Boolean attention masks (True = may attend), shaped to broadcast against (B, H, T, S)."""

from __future__ import annotations

import torch
from torch import Tensor

from attnkit.errors import ConfigError


def padding_mask(tokens: Tensor, pad_id: int) -> Tensor:
    """(B, S) token ids -> (B, 1, 1, S): keys that are not padding."""
    return (tokens != pad_id)[:, None, None, :]


def causal_mask(t: int, s: int | None = None, device: torch.device | None = None) -> Tensor:
    """(T, S) lower-triangular mask; with S > T the queries are the last T positions."""
    s = t if s is None else s
    rows = torch.arange(t, device=device)[:, None] + (s - t)
    return rows >= torch.arange(s, device=device)[None, :]


def combine(*masks: Tensor | None) -> Tensor | None:
    """Logical AND of the masks that are given (None = no constraint)."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out & m
    return out


def check_window(window: int, max_len: int | None = None) -> None:
    """ConfigError unless 0 < window < max_len (a window spanning the whole sequence is just
    global attention, and is almost always a mistake in a configuration)."""
    if window <= 0:
        raise ConfigError(f"local attention window must be positive, got {window}")
    if max_len is not None and window >= max_len:
        raise ConfigError(f"local attention window {window} covers the whole sequence "
                          f"(max_len {max_len}): use global attention or a smaller window")
