"""Encoder and decoder blocks with residual sublayers, post-norm or pre-norm.

Post-norm (Vaswani et al. 2017, section 5.4; the default):  x = LayerNorm(x + Dropout(Sublayer(x)))
Pre-norm (``norm_first``; Wang et al. 2019, GPT-2):         x = x + Dropout(Sublayer(LayerNorm(x)))
Blocks take their attention and feed-forward modules ready-made (composition): the builder
decides what they are.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor, nn

from attnkit.nn.attention.multihead import MHAOutput, MultiHeadAttention, Packing
from attnkit.nn.cache import KVCache
from attnkit.nn.checkpointing import CheckpointableBlock


class Residual(nn.Module):
    """One residual sublayer with its LayerNorm, before or after the addition."""

    def __init__(self, d_model: int, dropout: float, norm_first: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d_model, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.norm_first = norm_first

    def forward(self, x: Tensor, sublayer: Callable[[Tensor], Tensor]) -> Tensor:
        if self.norm_first:
            return x + self.dropout(sublayer(self.norm(x)))
        return self.norm(x + self.dropout(sublayer(x)))


@dataclass
class BlockOutput:
    """A block's hidden states (B, T, C) and, when asked, its attention weights."""

    hidden: Tensor
    self_weights: Tensor | None = None
    cross_weights: Tensor | None = None


class EncoderBlock(CheckpointableBlock):
    """Self-attention then feed-forward (an encoder layer, or a GPT layer with ``causal``)."""

    def __init__(self, self_attn: MultiHeadAttention, ffn: nn.Module, d_model: int,
                 dropout: float, norm_first: bool = False, eps: float = 1e-5) -> None:
        super().__init__()
        self.self_attn, self.ffn = self_attn, ffn
        self.attn_res = Residual(d_model, dropout, norm_first, eps)
        self.ffn_res = Residual(d_model, dropout, norm_first, eps)

    def forward(self, x: Tensor, mask: Tensor | None = None, need_weights: bool = False, *,
                causal: bool = False, cache: KVCache | None = None,
                packing: Packing | None = None) -> BlockOutput:
        """``causal`` and ``cache`` make it a decoder-only (GPT) block; with ``packing`` ``x``
        is the packed real tokens (N, C) of a padded batch (see :class:`Packing`)."""
        box: list[MHAOutput] = []

        def attend(h: Tensor) -> Tensor:
            box.append(self.self_attn(h, mask=mask, need_weights=need_weights, causal=causal,
                                      cache=cache, packing=packing))
            return box[0].out

        x = self.attn_res(x, attend)
        return BlockOutput(self.ffn_res(x, self.ffn), box[0].weights)


class DecoderBlock(CheckpointableBlock):
    """Masked self-attention, cross-attention over the encoder memory, feed-forward."""

    def __init__(self, self_attn: MultiHeadAttention, cross_attn: MultiHeadAttention,
                 ffn: nn.Module, d_model: int, dropout: float, norm_first: bool = False) -> None:
        super().__init__()
        self.self_attn, self.cross_attn, self.ffn = self_attn, cross_attn, ffn
        self.self_res = Residual(d_model, dropout, norm_first)
        self.cross_res = Residual(d_model, dropout, norm_first)
        self.ffn_res = Residual(d_model, dropout, norm_first)

    def forward(self, x: Tensor, memory_kv: tuple[Tensor, Tensor], *,
                self_mask: Tensor | None = None, memory_mask: Tensor | None = None,
                cache: KVCache | None = None, need_weights: bool = False) -> BlockOutput:
        """``memory_kv``: the cross-attention keys/values of the encoder output (B, H, S, D)."""
        box: dict[str, MHAOutput] = {}

        def self_attend(h: Tensor) -> Tensor:
            box["self"] = self.self_attn(h, mask=self_mask, cache=cache,
                                         need_weights=need_weights)
            return box["self"].out

        def cross_attend(h: Tensor) -> Tensor:
            box["cross"] = self.cross_attn(h, kv=memory_kv, mask=memory_mask,
                                           need_weights=need_weights)
            return box["cross"].out

        x = self.self_res(x, self_attend)
        x = self.cross_res(x, cross_attend)
        return BlockOutput(self.ffn_res(x, self.ffn), box["self"].weights,
                           box["cross"].weights)
