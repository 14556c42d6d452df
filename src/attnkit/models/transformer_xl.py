"""Transformer-XL (Dai et al. 2019) and its long-context relatives, one family.

Notation: B batch, T segment length, M memory length, S = M + T keys, C = d_model, V vocabulary,
L layers. A language model read segment by segment: each layer attends over a detached memory
of the hidden states its input had in the previous segments (segment-level recurrence,
section 3.2) with relative positional attention (section 3.3,
:class:`~attnkit.nn.attention.relative.RelativeMultiHeadAttention`).

Options of the same family (a preset each, see :data:`PRESETS`):

- ``adaptive_span``: per-head learned spans over the memory (Sukhbaatar et al. 2019a); the
  memory is the span cache (max_span <= mem_len + 1) and is trimmed to the longest span.
- ``n_persistent`` > 0: N persistent key/value vectors per head (Sukhbaatar et al. 2019b);
  with ``d_ff = 0`` the feed-forward sublayer is dropped: the all-attention layer.

Both papers' models use learned relative position embeddings on the keys; here every variant
keeps Transformer-XL's sinusoidal relative term and u/v biases, so that the comparison isolates
the span and the persistent memory. Defaults follow Transformer-XL: post-norm, embeddings scaled
by sqrt(C), dropout on embeddings, R and the output, tied input/output embeddings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from attnkit.config import from_dict, unknown
from attnkit.errors import ConfigError, UserError
from attnkit.losses import causal_lm_loss
from attnkit.models.outputs import per_layer
from attnkit.nn.attention.adaptive_span import AdaptiveSpan
from attnkit.nn.attention.core import PATHS
from attnkit.nn.attention.multihead import MHAOutput
from attnkit.nn.attention.persistent import PersistentMemory
from attnkit.nn.attention.relative import RelativeMultiHeadAttention, relative_table
from attnkit.nn.blocks import BlockOutput, Residual
from attnkit.nn.ffn import FeedForward

FAMILY = "transformer-xl"
RENAMED = {"attn_impl": "attention_path"}  # old config key -> new, for run configs saved before


@dataclass(frozen=True)
class TransformerXLConfig:
    """Sizes and options of a Transformer-XL language model (see the module docstring)."""

    vocab_size: int = 256
    d_model: int = 512
    n_heads: int = 8
    n_layers: int = 12
    d_ff: int = 2048                 # 0 = no feed-forward sublayer (needs n_persistent > 0)
    dropout: float = 0.1
    attention_dropout: float = 0.0
    mem_len: int = 512               # memory positions kept per layer (training default)
    clamp_len: int = 0               # clamp relative distances at this value; 0 = no clamp
    same_length: bool = False        # every query sees the same number (mem_len) of keys
    norm_first: bool = False         # pre-norm instead of the paper's post-norm
    tie_output: bool = True
    adaptive_span: bool = False
    max_span: int = 0                # 0 = mem_len; spans z are learned in [0, max_span]
    span_ramp: int = 32              # R of the soft mask
    span_init: float = 0.0           # initial z / max_span
    span_loss: float = 2e-6          # coefficient of the L1 span penalty (per token)
    n_persistent: int = 0            # persistent key/value vectors per head (all-attention)
    attention_path: str = "auto"     # the attention core's switch: auto, fused, flex, explicit

    def __post_init__(self) -> None:
        if self.vocab_size <= 0:
            raise ConfigError(f"model.vocab_size must be positive, got {self.vocab_size}")
        if self.d_model <= 0 or self.n_heads <= 0 or self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be a positive multiple of "
                              f"model.n_heads ({self.n_heads})")
        if self.d_model % 2:
            raise ConfigError(f"model.d_model must be even (sinusoids), got {self.d_model}")
        for name in ("n_layers",):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        for name in ("d_ff", "mem_len", "clamp_len", "max_span", "n_persistent"):
            if getattr(self, name) < 0:
                raise ConfigError(f"model.{name} must be >= 0, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")
        if self.d_ff == 0 and self.n_persistent == 0:
            raise ConfigError("model.d_ff = 0 drops the feed-forward sublayer: only with "
                              "persistent memory (model.n_persistent > 0, all-attention)")
        if self.same_length and self.mem_len == 0:
            raise ConfigError("model.same_length needs model.mem_len > 0 (the window length)")
        if self.attention_path not in PATHS:
            raise unknown("model.attention_path", self.attention_path, PATHS)
        self._check_span()

    def _check_span(self) -> None:
        if not self.adaptive_span:
            return
        if self.span_max > self.mem_len + 1:
            raise ConfigError(f"model.max_span ({self.max_span}) exceeds mem_len + 1 "
                              f"({self.mem_len + 1}): the memory cannot hold that span")
        if self.span_max < 1:
            raise ConfigError("model.adaptive_span needs model.mem_len or model.max_span >= 1")
        if self.span_ramp < 1:
            raise ConfigError(f"model.span_ramp must be >= 1, got {self.span_ramp}")
        if not 0.0 <= self.span_init <= 1.0:
            raise ConfigError(f"model.span_init is a fraction of max_span in [0, 1], got "
                              f"{self.span_init}")
        if self.span_loss < 0:
            raise ConfigError(f"model.span_loss must be >= 0, got {self.span_loss}")

    @property
    def span_max(self) -> int:
        """The largest span in positions (max_span, or mem_len when it is 0)."""
        return self.max_span or self.mem_len


PRESETS: dict[str, dict] = {
    # Dai et al. 2019, enwik8 base (12 layers, 41M parameters; segment and memory 512)
    "enwik8-base": dict(d_model=512, n_heads=8, n_layers=12, d_ff=2048, dropout=0.1,
                        mem_len=512),
    # Sukhbaatar et al. 2019a, enwik8 small: 12 layers, spans up to 8192, ramp 32, span loss
    # 5e-7 (the released experiments/enwik8.sh; segments of 512)
    "adaptive-span-small": dict(d_model=512, n_heads=8, n_layers=12, d_ff=2048, dropout=0.3,
                                mem_len=8192, adaptive_span=True, span_loss=5e-7),
    # Sukhbaatar et al. 2019b, enwik8 small all-attention: 18 layers, N = 1024, no FFN, span
    # loss 1e-7 (experiments/enwik8_pers_small.sh)
    "all-attention-small": dict(d_model=512, n_heads=8, n_layers=18, d_ff=0, dropout=0.3,
                                mem_len=8192, adaptive_span=True, n_persistent=1024,
                                span_loss=1e-7),
    # sizes that train on a CPU (bench/long_context.py, the xl-lm recipe)
    "tiny": dict(d_model=128, n_heads=4, n_layers=4, d_ff=512, dropout=0.1, mem_len=128),
    "tiny-span": dict(d_model=128, n_heads=4, n_layers=4, d_ff=512, dropout=0.1,
                      mem_len=256, adaptive_span=True, span_ramp=16, span_loss=2e-6),
    "tiny-all-attention": dict(d_model=128, n_heads=4, n_layers=4, d_ff=0, dropout=0.1,
                               mem_len=256, adaptive_span=True, span_ramp=16, n_persistent=192),
}


@dataclass
class XLOutput:
    """Logits (B, T, V), the next segment's memory ``mems`` (per layer (B, M', C), detached)
    and, only when asked, per layer the attention weights (B, H, T, S [+ N]), the hidden
    states (L + 1 x (B, T, C)) and ``loss`` (given ``labels``), named as ``transformers``'
    ``TransfoXLLMHeadModelOutput``."""

    logits: Tensor
    mems: list[Tensor]
    attentions: tuple[Tensor, ...] | None = None
    loss: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None

    def __post_init__(self) -> None:
        self.attentions = per_layer(self.attentions)
        self.hidden_states = per_layer(self.hidden_states)


@dataclass
class XLState:
    """Incremental decoding: the memory per layer (B, M, C), None before the first step."""

    mems: list[Tensor] | None = None


class XLBlock(nn.Module):
    """Relative attention over [memory, segment], then (optionally) the feed-forward sublayer."""

    def __init__(self, attn: RelativeMultiHeadAttention, ffn: nn.Module | None, d_model: int,
                 dropout: float, norm_first: bool, eps: float = 1e-5) -> None:
        super().__init__()
        self.attn, self.ffn, self.norm_first = attn, ffn, norm_first
        self.attn_res = Residual(d_model, dropout, norm_first, eps)
        self.ffn_res = Residual(d_model, dropout, norm_first, eps) if ffn is not None else None

    def forward(self, x: Tensor, mem: Tensor | None, table: Tensor, max_distance: int | None,
                need_weights: bool = False) -> BlockOutput:
        box: list[MHAOutput] = []
        if mem is not None and self.norm_first:
            mem = self.attn_res.norm(mem)  # pre-norm normalises the memory with the segment

        def attend(h: Tensor) -> Tensor:
            box.append(self.attn(h, mem, table, max_distance=max_distance,
                                 need_weights=need_weights))
            return box[0].out

        x = self.attn_res(x, attend)
        if self.ffn is not None:
            x = self.ffn_res(x, self.ffn)
        return BlockOutput(x, box[0].weights)


class TransformerXL(nn.Module):
    """The language model: ``forward(input_ids, mems)`` -> :class:`XLOutput`."""

    family = FAMILY

    def __init__(self, cfg: TransformerXLConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, c)
        self.drop = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(self._block() for _ in range(cfg.n_layers))
        self.final_norm = nn.LayerNorm(c) if cfg.norm_first else None
        self.head = nn.Linear(c, cfg.vocab_size, bias=False)
        self.apply(_init)
        if cfg.tie_output:
            self.head.weight = self.embed.weight

    def _block(self) -> XLBlock:
        cfg = self.cfg
        span = (AdaptiveSpan(cfg.n_heads, cfg.span_max, cfg.span_ramp, cfg.span_init)
                if cfg.adaptive_span else None)
        persistent = (PersistentMemory(cfg.n_heads, cfg.d_model // cfg.n_heads,
                                       cfg.n_persistent) if cfg.n_persistent else None)
        attn = RelativeMultiHeadAttention(cfg.d_model, cfg.n_heads, cfg.attention_dropout,
                                          span=span, persistent=persistent,
                                          path=cfg.attention_path)
        ffn = FeedForward(cfg.d_model, cfg.d_ff, cfg.dropout) if cfg.d_ff else None
        return XLBlock(attn, ffn, cfg.d_model, cfg.dropout, cfg.norm_first)

    # ---- memory ---------------------------------------------------------------------------------
    def _check_mems(self, mems: list[Tensor] | None, input_ids: Tensor) -> int:
        """The memory length M of ``mems`` (0 for None), after checking its shapes."""
        if mems is None:
            return 0
        if len(mems) != len(self.layers):
            raise UserError(f"memory has {len(mems)} layers, the model {len(self.layers)}")
        m = mems[0].size(1)
        for mem in mems:
            if mem.dim() != 3 or mem.size(0) != input_ids.size(0) or mem.size(1) != m or \
                    mem.size(2) != self.cfg.d_model:
                raise UserError(f"memory of shape {tuple(mem.shape)} does not fit a batch of "
                                f"{input_ids.size(0)} rows and d_model {self.cfg.d_model}")
        return m

    @staticmethod
    def update_mems(mems: list[Tensor] | None, hiddens: list[Tensor], mem_len: int
                    ) -> list[Tensor]:
        """New memory per layer: the last ``mem_len`` positions of [old memory, layer input],
        detached (no gradient flows into past segments, section 3.2)."""
        out = []
        for i, h in enumerate(hiddens):
            cat = h if mems is None else torch.cat([mems[i], h], dim=1)
            out.append(cat[:, max(0, cat.size(1) - mem_len):].detach())
        return out

    # ---- forward --------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor | None = None, mems: list[Tensor] | None = None, *,
                labels: Tensor | None = None, mem_len: int | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False
                ) -> XLOutput:
        """``input_ids`` (B, T) after the memory ``mems`` (the ``mems`` of the previous
        segment's output; transformers' TransfoXL used the same name: it holds hidden states,
        not keys and values); ``mem_len`` overrides the configured memory length for this call
        (e.g. a longer memory in evaluation). ``labels`` (B, T) (``labels = input_ids``, -100
        where not scored) are shifted inside and give ``loss``, the mean next-token
        cross-entropy within the segment."""
        if input_ids is None:
            raise UserError("Transformer-XL needs input_ids")
        cfg = self.cfg
        mem_len = cfg.mem_len if mem_len is None else mem_len
        if mem_len < 0:
            raise UserError(f"mem_len must be >= 0, got {mem_len}")
        m = self._check_mems(mems, input_ids)
        x = self.drop(self.embed(input_ids) * math.sqrt(cfg.d_model))  # (B, T, C)
        s = m + input_ids.size(1)
        rows = min(s, cfg.clamp_len + 1) if cfg.clamp_len else s
        table = self.drop(relative_table(rows, cfg.d_model, cfg.clamp_len).to(x))  # (K, C)
        window = mem_len - 1 if cfg.same_length else None
        hiddens, weights = [], []
        for i, layer in enumerate(self.layers):
            hiddens.append(x)
            out = layer(x, None if mems is None or m == 0 else mems[i], table, window,
                        output_attentions)
            x = out.hidden
            weights.append(out.self_weights)
        if self.final_norm is not None:
            x = self.final_norm(x)
        logits = self.head(self.drop(x))  # (B, T, V)
        return XLOutput(logits, self.update_mems(mems if m else None, hiddens, mem_len),
                        weights if output_attentions else None,
                        None if labels is None else causal_lm_loss(logits, labels),
                        [*hiddens, x] if output_hidden_states else None)

    # ---- incremental decoding (the protocol of attnkit.decoding) ---------------------------------
    left_padding = False  # no attention mask: prompts of different lengths decode one at a time

    def start(self, input_ids: Tensor, attention_mask: Tensor | None = None,
              max_new_tokens: int = 0) -> XLState:
        """An empty memory for the prompts ``input_ids`` (B, P), which must not be padded;
        the first step feeds the prompts (one segment), every later one a token after the
        memory (so nothing slides while the memory holds the whole text)."""
        if attention_mask is not None and not bool(attention_mask.all()):
            raise UserError("Transformer-XL has no attention mask: decode prompts of "
                            "different lengths one at a time")
        return XLState()

    def step(self, state: XLState, tokens: Tensor) -> tuple[Tensor, XLState]:
        """Feed ``tokens`` (B, t) after the memory: the logits of the last (B, V), the state."""
        out = self(tokens, state.mems)
        return out.logits[:, -1], XLState(out.mems)

    def reorder(self, state: XLState, index: Tensor) -> XLState:
        """Keep rows ``index`` (B',) of the memory: beam search's survivors."""
        return XLState(None if state.mems is None else
                       [m.index_select(0, index) for m in state.mems])

    # ---- adaptive span ---------------------------------------------------------------------------
    def spans(self) -> list[Tensor]:
        """Per layer the (H,) learned spans in positions (empty without adaptive span)."""
        return [b.attn.span.spans() for b in self.layers if b.attn.span is not None]

    def clamp_spans_(self) -> None:
        """Keep every span parameter inside [0, max_span]."""
        for b in self.layers:
            if b.attn.span is not None:
                b.attn.span.clamp_()

    def attention_keys(self, t: int, mem_len: int | None = None) -> list[int]:
        """Keys per layer for a segment of ``t`` queries after a full memory (spans trimmed)."""
        mem_len = self.cfg.mem_len if mem_len is None else mem_len
        extra = self.cfg.n_persistent
        return [t + b.attn.memory_needed(mem_len) + extra for b in self.layers]


def _init(module: nn.Module) -> None:
    """Normal(0, 0.02) weights and zero biases for linear layers and embeddings."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, nn.Linear) and module.bias is not None:
        nn.init.zeros_(module.bias)


def xl_arch(preset: str, arch: dict, vocab_size: int) -> TransformerXLConfig:
    """The validated config of a preset ("" = the class defaults) plus ``arch`` overrides.

    ``n_positions`` (the context the "lm" recipe passes to every family) is ignored: relative
    positions have no table and no length limit. ``attn_impl``, the name ``attention_path`` had
    in configs saved before, is read as ``attention_path`` (its values keep their meaning).
    """
    if preset and preset not in PRESETS:
        raise unknown("transformer-xl preset", preset, PRESETS)
    arch = {RENAMED.get(k, k): v for k, v in arch.items() if k != "n_positions"}
    return from_dict(TransformerXLConfig, {**PRESETS.get(preset, {}), **arch,
                                           "vocab_size": vocab_size}, prefix="arch.")
