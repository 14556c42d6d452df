"""GPT-2 (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners").

A decoder-only Transformer: token embeddings plus learned positions, L pre-norm blocks of causal
self-attention and a GELU(tanh) feed-forward network, a final LayerNorm and an output projection
tied to the token embedding. Notation: B batch, T new positions, S = cached + T key positions,
C = d_model, H heads, D = C / H, V vocabulary, L layers.

Initialisation follows the reference code: every weight N(0, 0.02), the two residual output
projections of each block N(0, 0.02 / sqrt(2 L)) (the paper's section 2.3: "scale the weights of
residual layers at initialization by a factor of 1/sqrt(N) where N is the number of residual
layers"), biases zero, LayerNorm gains one.

Padding follows Hugging Face: prompts padded on the left, ``attention_mask`` 0 on pads and
``position_ids = cumsum(attention_mask) - 1`` (clamped at 0), see :func:`left_pad_positions`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.config import unknown
from attnkit.errors import ConfigError, UserError
from attnkit.losses import causal_lm_loss
from attnkit.models.outputs import per_layer
from attnkit.nn.attention.multihead import MultiHeadAttention
from attnkit.nn.blocks import EncoderBlock
from attnkit.nn.cache import KVCache
from attnkit.nn.ffn import ACTIVATIONS, FeedForward
from attnkit.nn.positional import LearnedPositions


@dataclass(frozen=True)
class GPT2Config:
    """Sizes and options of GPT-2 (defaults: the 124M "small" model of the paper's Table 2)."""

    vocab_size: int = 50257
    n_positions: int = 1024
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    d_ff: int = 0                  # 0 = 4 * d_model
    dropout: float = 0.1           # embedding and residual dropout
    attention_dropout: float = 0.1
    activation: str = "gelu_tanh"
    layer_norm_eps: float = 1e-5
    tie_embeddings: bool = True
    init_std: float = 0.02

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "d_model", "n_heads", "n_layers"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by "
                              f"model.n_heads ({self.n_heads})")
        if self.d_ff < 0:
            raise ConfigError(f"model.d_ff must be >= 0 (0 = 4 * d_model), got {self.d_ff}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")
        if self.activation not in ACTIVATIONS:
            raise unknown("activation", self.activation, ACTIVATIONS)
        if not self.layer_norm_eps > 0 or not self.init_std > 0:
            raise ConfigError("model.layer_norm_eps and model.init_std must be > 0")

    @property
    def ff_dim(self) -> int:
        """The feed-forward width (``d_ff``, or 4 C when it is 0)."""
        return self.d_ff or 4 * self.d_model

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads


PRESETS: dict[str, dict] = {
    # the paper's four models (Table 2; "small" counts 124,439,808 parameters, tied)
    "small": dict(d_model=768, n_heads=12, n_layers=12),
    "medium": dict(d_model=1024, n_heads=16, n_layers=24),
    "large": dict(d_model=1280, n_heads=20, n_layers=36),
    "xl": dict(d_model=1600, n_heads=25, n_layers=48),
    # sizes that train on a CPU
    "mini": dict(d_model=384, n_heads=6, n_layers=6),
    "tiny": dict(d_model=128, n_heads=4, n_layers=2),
}


def gpt2_config(preset: str = "small", **overrides) -> GPT2Config:
    """A preset's config with ``overrides`` applied (e.g. ``vocab_size``, ``dropout``)."""
    if preset not in PRESETS:
        raise unknown("gpt2 preset", preset, PRESETS)
    return GPT2Config(**{**PRESETS[preset], **overrides})


@dataclass
class LMOutput:
    """Next-token logits and, only when asked for, the loss, states, weights and cache.

    Named as ``transformers``' ``CausalLMOutputWithPast``: ``loss`` when ``labels`` were given,
    ``past_key_values`` (the per-layer caches, filled) when a cache was passed or
    ``use_cache=True``.
    """

    logits: Tensor                                   # (B, T, V), or (B, 1, V) with last_only
    hidden_states: tuple[Tensor, ...] | None = None  # L + 1 tensors (B, T, C), as transformers
    attentions: tuple[Tensor, ...] | None = None     # L tensors (B, H, T, S)
    loss: Tensor | None = None                       # () mean next-token cross-entropy
    past_key_values: list[KVCache] | None = None     # one cache per layer, filled in place

    def __post_init__(self) -> None:
        self.hidden_states = per_layer(self.hidden_states)
        self.attentions = per_layer(self.attentions)

    @property
    def cache(self) -> list[KVCache] | None:
        """``past_key_values`` under the name ``transformers`` >= 5.24 gives it."""
        return self.past_key_values


@dataclass
class GPT2State:
    """Incremental decoding: the key/value cache and every token fed so far (to re-encode the
    window past the context). Columns: the left-padded prompts, then one per step."""

    cache: list[KVCache]
    ids: Tensor           # (B, P + N), the first ``length`` columns filled
    mask: Tensor | None   # (B, P + N) True on real tokens; None when no row is padded
    length: int = 0


def left_pad_positions(attention_mask: Tensor) -> Tensor:
    """Position ids (B, S) for left-padded rows: ``cumsum(mask) - 1`` clamped at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


class GPT2(nn.Module):
    """GPT-2: ``forward(input_ids)`` gives next-token logits; ``new_cache`` enables cached
    decoding (``past_key_values``)."""

    def __init__(self, config: GPT2Config) -> None:
        super().__init__()
        self.config = cfg = config
        c = cfg.d_model
        self.tok_embed = nn.Embedding(cfg.vocab_size, c)
        self.positions = LearnedPositions(cfg.n_positions, c)
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(
            EncoderBlock(MultiHeadAttention(c, cfg.n_heads, cfg.attention_dropout),
                         FeedForward(c, cfg.ff_dim, 0.0, cfg.activation), c, cfg.dropout,
                         norm_first=True, eps=cfg.layer_norm_eps)
            for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(c, eps=cfg.layer_norm_eps)
        self.lm_head = nn.Linear(c, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.tok_embed.weight
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference initialisation (see the module docstring)."""
        std = self.config.init_std
        residual_std = std / math.sqrt(2 * self.config.n_layers)
        for module in self.modules():
            if isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=std)
                if getattr(module, "bias", None) is not None:
                    nn.init.zeros_(module.bias)
        for block in self.blocks:
            nn.init.normal_(block.self_attn.out_proj.weight, std=residual_std)
            nn.init.normal_(block.ffn.fc2.weight, std=residual_std)

    def new_cache(self, batch: int, max_len: int) -> list[KVCache]:
        """One empty key/value cache per layer for ``max_len`` positions (prompt + new tokens)."""
        cfg = self.config
        if max_len > cfg.n_positions:
            raise UserError(f"{max_len} positions exceed the model's context of "
                            f"{cfg.n_positions}")
        p = self.tok_embed.weight
        return [KVCache(batch, cfg.n_heads, max_len, cfg.head_dim, p.dtype, p.device)
                for _ in self.blocks]

    # -- incremental decoding (the protocol of attnkit.decoding) --------------------------------
    def start(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              max_new_tokens: int = 0) -> GPT2State:
        """A cache for the prompts ``input_ids`` (B, P), left-padded where ``attention_mask``
        (B, P) is 0, and ``max_new_tokens`` more tokens; the first step feeds the prompts."""
        b, p = input_ids.shape
        total = p + max_new_tokens
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = torch.ones((b, total), dtype=torch.bool, device=input_ids.device)
            mask[:, :p] = attention_mask.bool()
        ids = input_ids.new_zeros((b, total))
        return GPT2State(self.new_cache(b, min(total, self.config.n_positions)), ids, mask)

    def step(self, state: GPT2State, tokens: Tensor) -> tuple[Tensor, GPT2State]:
        """Feed ``tokens`` (B, t): the logits of the last one (B, V) and the state.

        Past the context (absolute positions end at ``n_positions``) the window slides: the
        newest token and the ``n_positions - 1`` before it are re-encoded into the emptied
        cache, so the next token is predicted from the last ``n_positions``.
        """
        cache, t = state.cache, tokens.size(1)
        first, end = state.length, state.length + t
        state.ids[:, first:end] = tokens
        state.length = end
        if cache[0].length + t > cache[0].max_len:  # slide: re-encode the last max_len columns
            first = end - cache[0].max_len
            for layer in cache:
                layer.length = 0
        mask = positions = None
        if state.mask is not None:
            mask = state.mask[:, first - cache[0].length:end]  # (B, cached + fed columns)
            positions = left_pad_positions(mask)[:, first - end:]  # (B, fed columns)
        out = self(state.ids[:, first:end], attention_mask=mask, position_ids=positions,
                   past_key_values=cache, last_only=True)
        return out.logits[:, -1], state

    def reorder(self, state: GPT2State, index: Tensor) -> GPT2State:
        """Keep rows ``index`` (B',) of the state: beam search's survivors."""
        for layer in state.cache:
            layer.reorder(index)
        state.ids = state.ids.index_select(0, index)
        if state.mask is not None:
            state.mask = state.mask.index_select(0, index)
        return state

    def _check(self, ids: Tensor, past: int, attention_mask: Tensor | None,
               position_ids: Tensor | None) -> None:
        """One-line errors for inputs the model cannot take (cheap: no copies)."""
        cfg = self.config
        if ids.dim() != 2 or ids.dtype not in (torch.int64, torch.int32):
            raise UserError(f"ids must be a (B, T) integer tensor, got {tuple(ids.shape)} "
                            f"{ids.dtype}")
        b, t = ids.shape
        if t == 0:
            raise UserError("ids has no positions (T = 0)")
        if position_ids is None and past + t > cfg.n_positions:
            raise UserError(f"{past + t} positions exceed the model's context of "
                            f"{cfg.n_positions}")
        if position_ids is not None and tuple(position_ids.shape) != (b, t):
            raise UserError(f"position_ids must be {(b, t)}, got {tuple(position_ids.shape)}")
        if attention_mask is not None and tuple(attention_mask.shape) != (b, past + t):
            raise UserError(f"attention_mask must be {(b, past + t)} (cached + new positions), "
                            f"got {tuple(attention_mask.shape)}")
        if not ids.is_cpu:  # reading values would make the host wait for a GPU at every call
            return
        lo, hi = torch.aminmax(ids)
        if lo.item() < 0 or hi.item() >= cfg.vocab_size:
            raise UserError(f"token ids must be in [0, {cfg.vocab_size}), got "
                            f"[{lo.item()}, {hi.item()}]")

    def _embed(self, ids: Tensor, past: int, position_ids: Tensor | None) -> Tensor:
        """Token plus position embeddings (B, T, C), then the embedding dropout."""
        x = self.tok_embed(ids)
        if position_ids is None:
            x = x + self.positions(ids.size(1), past)  # (T, C) broadcast over B
        else:
            if position_ids.is_cpu and (int(position_ids.max()) >= self.config.n_positions
                                        or int(position_ids.min()) < 0):  # no GPU sync
                raise UserError(f"position_ids must be in [0, {self.config.n_positions})")
            x = x + F.embedding(position_ids, self.positions.embedding.weight)
        return self.dropout(x) if self.training and self.dropout.p > 0 else x

    def forward(self, input_ids: Tensor | None = None,
                past_key_values: list[KVCache] | None = None,
                attention_mask: Tensor | None = None, *, position_ids: Tensor | None = None,
                labels: Tensor | None = None, use_cache: bool | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False,
                last_only: bool = False,
                cache: list[KVCache] | None = None,  # transformers >= 5.24's name: kept
                ) -> LMOutput:
        """Logits (B, T, V) for ``input_ids`` (B, T) after the ``past_key_values``' positions.

        As ``transformers``' ``GPT2LMHeadModel``: ``attention_mask`` (B, S) is 1 for real
        tokens over cached + new positions; ``position_ids`` (B, T) default to the cache length
        + arange(T); ``labels`` (B, T) (usually ``input_ids``, -100 where not scored) are
        shifted inside and give ``loss`` (:func:`~attnkit.losses.causal_lm_loss`).
        ``past_key_values`` is a list of preallocated caches (:meth:`new_cache`) filled in
        place; ``use_cache=True`` without one allocates caches for the whole context.
        ``cache`` is the same argument under the name ``transformers`` 5.24 gives it (where
        ``past_key_values`` is deprecated); the output carries both names too.
        """
        past_key_values = cache if past_key_values is None else past_key_values
        if input_ids is None:
            raise UserError("GPT2.forward needs input_ids")
        if past_key_values is None and use_cache:
            past_key_values = self.new_cache(input_ids.size(0), self.config.n_positions)
        cache = past_key_values
        past = cache[0].length if cache else 0
        self._check(input_ids, past, attention_mask, position_ids)
        mask = None  # no mask tensor at all when every position is real (the fused fast path)
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]  # (B, 1, 1, S)
        x = self._embed(input_ids, past, position_ids)
        states = [x] if output_hidden_states else None
        weights = [] if output_attentions else None
        causal = input_ids.size(1) > 1  # one new position sees every cached one: no mask
        for i, block in enumerate(self.blocks):
            out = block(x, mask, output_attentions, causal=causal,
                        cache=cache[i] if cache is not None else None)
            x = out.hidden
            if weights is not None:
                weights.append(out.self_weights)
            if states is not None and i < len(self.blocks) - 1:
                states.append(x)
        x = self.final_norm(x[:, -1:] if last_only and states is None else x)
        if states is not None:
            states.append(x)  # transformers' last hidden state is after the final norm
            x = x[:, -1:] if last_only else x
        logits = self.lm_head(x)
        return LMOutput(logits, states, weights,
                        None if labels is None else causal_lm_loss(logits, labels), cache)

