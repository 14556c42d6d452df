"""A toy model family for test_toy_family.py: what a newcomer writes to add a family.

One causal self-attention layer over token + learned position embeddings, then a linear
output layer. It speaks what the commands need of a decoder-only family: ``forward`` returns
``.logits`` (and ``.attentions`` when asked), ``new_cache`` and the decoding protocol
(``start``, ``step``, ``reorder``) feed generation, ``config`` carries ``vocab_size`` and
``n_positions``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit.config import from_dict
from attnkit.models import Family
from attnkit.nn.attention.multihead import MultiHeadAttention
from attnkit.nn.cache import KVCache


@dataclass(frozen=True)
class ToyConfig:
    vocab_size: int = 16
    d_model: int = 16
    n_heads: int = 2
    n_positions: int = 32


@dataclass
class ToyOutput:
    logits: Tensor                          # (B, T, V)
    attentions: list[Tensor] | None = None  # one (B, H, T, S)


@dataclass
class ToyState:
    cache: list[KVCache]
    mask: Tensor | None  # (B, P + N) True on real tokens; None when no row is padded


class ToyLM(nn.Module):
    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.positions = nn.Embedding(config.n_positions, config.d_model)
        self.attn = MultiHeadAttention(config.d_model, config.n_heads)
        self.out = nn.Linear(config.d_model, config.vocab_size)

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        c = self.config
        return [KVCache(batch, c.n_heads, max_len, c.d_model // c.n_heads)]

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                position_ids: Tensor | None = None, cache: list[KVCache] | None = None,
                last_only: bool = False, output_attentions: bool = False) -> ToyOutput:
        start = cache[0].length if cache else 0
        if position_ids is None:
            position_ids = torch.arange(start, start + input_ids.size(1))[None]
        x = self.embed(input_ids) + self.positions(position_ids)  # (B, T, C)
        mask = None if attention_mask is None else attention_mask.bool()[:, None, None, :]
        res = self.attn(x, cache=cache[0] if cache else None, mask=mask, causal=True,
                        need_weights=output_attentions)
        h = x + res.out
        logits = self.out(h[:, -1:] if last_only else h)
        return ToyOutput(logits, [res.weights] if output_attentions else None)

    def start(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              max_new_tokens: int = 0) -> ToyState:
        b, p = input_ids.shape
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = torch.ones(b, p + max_new_tokens, dtype=torch.bool)
            mask[:, :p] = attention_mask.bool()
        return ToyState(self.new_cache(b, p + max_new_tokens), mask)

    def step(self, state: ToyState, tokens: Tensor) -> tuple[Tensor, ToyState]:
        end = state.cache[0].length + tokens.size(1)
        mask = positions = None
        if state.mask is not None:
            mask = state.mask[:, :end]
            positions = (mask.long().cumsum(-1) - 1).clamp_min(0)[:, -tokens.size(1):]
        out = self(tokens, attention_mask=mask, position_ids=positions, cache=state.cache,
                   last_only=True)
        return out.logits[:, -1], state

    def reorder(self, state: ToyState, index: Tensor) -> ToyState:
        for layer in state.cache:
            layer.reorder(index)
        if state.mask is not None:
            state.mask = state.mask.index_select(0, index)
        return state


def toy_arch(preset: str, arch: dict, vocab: int) -> ToyConfig:
    return from_dict(ToyConfig, {**arch, "vocab_size": vocab}, prefix="arch.")


TOY = Family(ToyConfig, ToyLM, toy_arch, decoding="lm", viz="attnkit.viz.families:LM")
