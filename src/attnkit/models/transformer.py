"""The encoder-decoder Transformer of Vaswani et al. 2017, "Attention Is All You Need".

Notation: B batch, S source length, T target length, C = d_model, V vocabulary, L layers.
Defaults follow the paper (post-norm, sinusoidal positions, embeddings scaled by sqrt(C),
shared source/target/output embeddings, ReLU feed-forward, residual dropout 0.1).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Literal

import torch
from torch import Tensor, nn

from attnkit.config import unknown
from attnkit.errors import ConfigError, UserError
from attnkit.losses import mean_token_nll
from attnkit.models.outputs import per_layer
from attnkit.nn.attention.masks import causal_mask, padding_mask
from attnkit.nn.attention.multihead import MultiHeadAttention
from attnkit.nn.blocks import DecoderBlock, EncoderBlock
from attnkit.nn.cache import KVCache
from attnkit.nn.ffn import ACTIVATIONS, FeedForward
from attnkit.nn.positional import POSITIONS


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and options of the encoder-decoder Transformer (paper defaults = ``base``)."""

    src_vocab_size: int = 37000
    tgt_vocab_size: int = 0          # 0 = the source vocabulary (one shared vocabulary)
    d_model: int = 512
    n_heads: int = 8
    n_encoder_layers: int = 6
    n_decoder_layers: int = 6
    d_ff: int = 2048
    dropout: float = 0.1             # residual and embedding dropout (P_drop, section 5.4)
    attention_dropout: float = 0.0   # dropout on attention weights (not in the paper)
    activation: str = "relu"
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    max_len: int = 1024
    norm_first: bool = False         # pre-norm instead of the paper's post-norm
    share_embeddings: bool = True    # one embedding for source and target (needs one vocabulary)
    tie_output: bool = True          # pre-softmax projection = target embedding (section 3.4)
    scale_embeddings: bool = True    # embeddings multiplied by sqrt(d_model) (section 3.4)
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.src_vocab_size <= 0:
            raise ConfigError(f"model.src_vocab_size must be positive, got {self.src_vocab_size}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by "
                              f"model.n_heads ({self.n_heads})")
        if self.activation not in ACTIVATIONS:
            raise unknown("activation", self.activation, ACTIVATIONS)
        if self.share_embeddings and self.tgt_vocab_size not in (0, self.src_vocab_size):
            raise ConfigError("model.share_embeddings needs one vocabulary: set "
                              "tgt_vocab_size to 0 or share_embeddings to false")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")
        for name in ("n_encoder_layers", "n_decoder_layers", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")

    @property
    def target_vocab(self) -> int:
        return self.tgt_vocab_size or self.src_vocab_size


PRESETS: dict[str, dict] = {
    # the paper's Table 3 models
    "base": dict(d_model=512, n_heads=8, n_encoder_layers=6, n_decoder_layers=6, d_ff=2048,
                 dropout=0.1),
    "big": dict(d_model=1024, n_heads=16, n_encoder_layers=6, n_decoder_layers=6, d_ff=4096,
                dropout=0.3),
    # sizes that train on a CPU
    "small": dict(d_model=256, n_heads=4, n_encoder_layers=3, n_decoder_layers=3, d_ff=1024,
                  dropout=0.1),
    "tiny": dict(d_model=128, n_heads=4, n_encoder_layers=2, n_decoder_layers=2, d_ff=512,
                 dropout=0.1),
}


def transformer_config(preset: str = "base", **overrides) -> TransformerConfig:
    """A preset's config with ``overrides`` applied (e.g. the vocabulary sizes)."""
    if preset not in PRESETS:
        raise unknown("transformer preset", preset, PRESETS)
    return TransformerConfig(**{**PRESETS[preset], **overrides})


@dataclass
class EncoderOutput:
    memory: Tensor                      # (B, S, C)
    mask: Tensor                        # (B, 1, 1, S) source keys that are not padding
    weights: list[Tensor] | None = None  # per layer (B, H, S, S)


@dataclass
class Seq2SeqOutput:
    """Logits (B, T, V); the rest only when asked for, named as ``transformers``'
    ``Seq2SeqLMOutput``: per-layer attention weights (``output_attentions``), hidden states
    (``output_hidden_states``) and ``loss`` (given ``labels``)."""

    logits: Tensor
    encoder_attentions: tuple[Tensor, ...] | None = None  # (B, H, S, S)
    decoder_attentions: tuple[Tensor, ...] | None = None  # (B, H, T, T)
    cross_attentions: tuple[Tensor, ...] | None = None    # (B, H, T, S)
    loss: Tensor | None = None                            # () mean cross-entropy
    encoder_last_hidden_state: Tensor | None = None       # (B, S, C)
    encoder_hidden_states: tuple[Tensor, ...] | None = None  # L_enc + 1 x (B, S, C)
    decoder_hidden_states: tuple[Tensor, ...] | None = None  # L_dec + 1 x (B, T, C)

    def __post_init__(self) -> None:
        for name in ("encoder_attentions", "decoder_attentions", "cross_attentions",
                     "encoder_hidden_states", "decoder_hidden_states"):
            setattr(self, name, per_layer(getattr(self, name)))


@dataclass
class DecodeState:
    """What incremental decoding carries from step to step (one row per hypothesis)."""

    memory_kv: list[tuple[Tensor, Tensor]]  # per layer cross-attention keys/values
    memory_mask: Tensor                     # (B, 1, 1, S)
    caches: list[KVCache]                   # per layer self-attention keys/values
    position: int = 0
    extra: dict = field(default_factory=dict)

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (B',) of every tensor: beam search's survivors."""
        self.memory_kv = [(k.index_select(0, index), v.index_select(0, index))
                          for k, v in self.memory_kv]
        self.memory_mask = self.memory_mask.index_select(0, index)
        for cache in self.caches:
            cache.reorder(index)


class Transformer(nn.Module):
    """Encoder-decoder Transformer; ``forward(input_ids, decoder_input_ids)`` gives
    next-token logits."""

    def __init__(self, cfg: TransformerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.d_model
        self.src_embed = nn.Embedding(cfg.src_vocab_size, c, padding_idx=cfg.pad_id)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else nn.Embedding(cfg.target_vocab, c, padding_idx=cfg.pad_id))
        self.positions = POSITIONS[cfg.positions](cfg.max_len, c)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(
            EncoderBlock(self._attn(), self._ffn(), c, cfg.dropout, cfg.norm_first)
            for _ in range(cfg.n_encoder_layers))
        self.decoder = nn.ModuleList(
            DecoderBlock(self._attn(), self._attn(cross=True), self._ffn(), c, cfg.dropout,
                         cfg.norm_first) for _ in range(cfg.n_decoder_layers))
        # pre-norm stacks end with a LayerNorm; post-norm blocks already end normalised
        self.encoder_norm = nn.LayerNorm(c) if cfg.norm_first else nn.Identity()
        self.decoder_norm = nn.LayerNorm(c) if cfg.norm_first else nn.Identity()
        self.out_proj = nn.Linear(c, cfg.target_vocab, bias=False)
        if cfg.tie_output:
            self.out_proj.weight = self.tgt_embed.weight
        self.reset_parameters()

    def _attn(self, cross: bool = False) -> MultiHeadAttention:
        return MultiHeadAttention(self.cfg.d_model, self.cfg.n_heads,
                                  self.cfg.attention_dropout, cross=cross)

    def _ffn(self) -> FeedForward:
        return FeedForward(self.cfg.d_model, self.cfg.d_ff, self.cfg.dropout,
                           self.cfg.activation)

    def reset_parameters(self) -> None:
        """Xavier-uniform matrices, zero biases, N(0, C^-1/2) embeddings (unit after scaling)."""
        for name, p in self.named_parameters():
            if name.startswith(("src_embed", "tgt_embed")):
                nn.init.normal_(p, std=self.cfg.d_model ** -0.5)
                with torch.no_grad():
                    p[self.cfg.pad_id].zero_()
            elif p.dim() > 1:
                nn.init.xavier_uniform_(p)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def _embed(self, embedding: nn.Embedding, tokens: Tensor, offset: int = 0) -> Tensor:
        t = tokens.size(1)
        if offset + t > self.cfg.max_len:
            raise UserError(f"sequence of {offset + t} tokens exceeds the model's maximum "
                            f"length {self.cfg.max_len}")
        x = embedding(tokens)
        if self.cfg.scale_embeddings:
            x = x * math.sqrt(self.cfg.d_model)
        return self.embed_dropout(x + self.positions(t, offset))  # (B, T, C)

    def encode(self, src: Tensor, need_weights: bool = False,
               attention_mask: Tensor | None = None,
               states: list[Tensor] | None = None) -> EncoderOutput:
        """Source ids (B, S) -> memory (B, S, C); padding is ``pad_id`` unless
        ``attention_mask`` (B, S) (1 = real) says otherwise; ``states`` collects the hidden
        states (embeddings, then each layer's output)."""
        mask = (padding_mask(src, self.cfg.pad_id) if attention_mask is None
                else attention_mask.bool()[:, None, None, :])  # (B, 1, 1, S)
        x, weights = self._embed(self.src_embed, src), []
        for block in self.encoder:
            if states is not None:
                states.append(x)
            out = block(x, mask=mask, need_weights=need_weights)
            x = out.hidden
            weights.append(out.self_weights)
        x = self.encoder_norm(x)
        if states is not None:
            states.append(x)
        return EncoderOutput(x, mask, weights if need_weights else None)

    def memory_kv(self, memory: Tensor) -> list[tuple[Tensor, Tensor]]:
        """Cross-attention keys/values of every decoder layer, computed once per source."""
        return [block.cross_attn.project_kv(memory) for block in self.decoder]

    def forward(self, input_ids: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                *, attention_mask: Tensor | None = None,
                decoder_attention_mask: Tensor | None = None, labels: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False
                ) -> Seq2SeqOutput:
        """Teacher-forced logits (B, T, V) for source ``input_ids`` (B, S) and target inputs
        ``decoder_input_ids`` (B, T) (BOS y1 .. y_{n}).

        Keywords as ``transformers``' encoder-decoders: ``attention_mask`` (B, S) and
        ``decoder_attention_mask`` (B, T) are 1 for real tokens (default: not ``pad_id``, and
        every target); ``labels`` (B, T) (y1 .. y_{n+1}, -100 where not scored) give ``loss``,
        the mean cross-entropy. Positionally ``model(input_ids, decoder_input_ids)``.
        """
        if input_ids is None or decoder_input_ids is None:
            raise UserError("the Transformer needs input_ids and decoder_input_ids (BOS + "
                            "the target shifted right)")
        enc_states = [] if output_hidden_states else None
        enc = self.encode(input_ids, output_attentions, attention_mask, enc_states)
        t = decoder_input_ids.size(1)
        self_mask = causal_mask(t, device=decoder_input_ids.device)[None, None]  # (1, 1, T, T)
        if decoder_attention_mask is not None:
            self_mask = self_mask & decoder_attention_mask.bool()[:, None, None, :]
        x = self._embed(self.tgt_embed, decoder_input_ids)
        dec_states, dec_w, cross_w = [x], [], []
        for block, kv in zip(self.decoder, self.memory_kv(enc.memory), strict=True):
            out = block(x, kv, self_mask=self_mask, memory_mask=enc.mask,
                        need_weights=output_attentions)
            x = out.hidden
            dec_states.append(x)
            dec_w.append(out.self_weights)
            cross_w.append(out.cross_weights)
        x = self.decoder_norm(x)
        dec_states[-1] = x
        logits = self.out_proj(x)
        loss = None if labels is None else mean_token_nll(logits, labels)
        attn = (enc.weights, dec_w, cross_w) if output_attentions else (None, None, None)
        return Seq2SeqOutput(logits, *attn, loss, enc.memory, enc_states,
                             dec_states if output_hidden_states else None)

    # -- incremental decoding -------------------------------------------------------------
    def start(self, src: Tensor, max_len: int) -> DecodeState:
        """Encode ``src`` and allocate key/value caches for ``max_len`` target positions."""
        if max_len > self.cfg.max_len:
            raise UserError(f"max decoding length {max_len} exceeds the model's maximum "
                            f"length {self.cfg.max_len}")
        enc = self.encode(src)
        b, h = src.size(0), self.cfg.n_heads
        caches = [KVCache(b, h, max_len, self.cfg.d_model // h, enc.memory.dtype, src.device)
                  for _ in self.decoder]
        return DecodeState(self.memory_kv(enc.memory), enc.mask, caches)

    def step(self, state: DecodeState, tokens: Tensor) -> tuple[Tensor, DecodeState]:
        """Feed the next ``tokens`` (B, t): the logits of the last one (B, V) and the state."""
        t, pos = tokens.size(1), state.position
        x = self._embed(self.tgt_embed, tokens, offset=pos)
        self_mask = causal_mask(t, pos + t, device=tokens.device)[None, None] if t > 1 else None
        for block, kv, cache in zip(self.decoder, state.memory_kv, state.caches, strict=True):
            x = block(x, kv, self_mask=self_mask, memory_mask=state.memory_mask,
                      cache=cache).hidden
        state.position = pos + t
        return self.out_proj(self.decoder_norm(x[:, -1])), state

    def reorder(self, state: DecodeState, index: Tensor) -> DecodeState:
        """Keep rows ``index`` (B',) of the state: beam search's survivors."""
        state.reorder(index)
        return state


def count_parameters(model: nn.Module) -> int:
    """Distinct trainable parameters (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def with_vocab(cfg: TransformerConfig, src_vocab: int, tgt_vocab: int = 0) -> TransformerConfig:
    """``cfg`` sized for the given vocabularies."""
    return replace(cfg, src_vocab_size=src_vocab, tgt_vocab_size=tgt_vocab)
