"""What every model output shares: per-layer results as the tuples ``transformers`` returns."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def per_layer(xs: Sequence[Tensor] | None) -> tuple[Tensor, ...] | None:
    """A per-layer list (hidden states, attention weights) as a tuple; None stays None."""
    return None if xs is None else tuple(xs)
