"""What every model output shares: per-layer results as the tuples ``transformers`` returns."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor


def per_layer(xs: Sequence[Tensor] | None) -> tuple[Tensor, ...] | None:
    """A per-layer list (hidden states, attention weights) as a tuple; None stays None."""
    return None if xs is None else tuple(xs)


class EncoderPassThrough:
    """For the output of a model with heads: the per-layer results of the encoder output it
    keeps in ``.encoder``, under the names ``transformers`` gives them on the head's output."""

    @property
    def hidden_states(self) -> tuple[Tensor, ...] | None:
        return self.encoder.hidden_states

    @property
    def attentions(self) -> tuple[Tensor, ...] | None:
        return self.encoder.attentions
