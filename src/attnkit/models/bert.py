"""BERT (Devlin et al. 2019) and RoBERTa (Liu et al. 2019): bidirectional post-norm encoders.

Notation: B batch, S sequence length, C = d_model, H heads, V vocabulary, L layers.

    x_0 = LayerNorm(E_token[ids] + E_type[token types] + E_pos[positions])    (BERT, section 3)
    x_l = EncoderBlock(x_{l-1})      post-norm, GELU feed-forward, LayerNorm eps 1e-12
    pooled = tanh(W_p x_L[:, 0] + b_p)                    the [CLS] summary used by NSP

Heads attach to the encoder's output: the masked-LM head (dense + GELU + LayerNorm, then a
decoder tied to the token embedding plus its own bias) and, for BERT, the next-sentence head
(a 2-way linear layer on ``pooled``). RoBERTa is the same network with positions counted from
``pad_id + 1`` over non-padding tokens (fairseq's ``make_positions``), one token type and no NSP.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.config import unknown
from attnkit.errors import ConfigError, UserError
from attnkit.losses import mean_token_nll
from attnkit.models.outputs import EncoderPassThrough, per_layer
from attnkit.nn.attention.multihead import MultiHeadAttention, Packing
from attnkit.nn.blocks import EncoderBlock
from attnkit.nn.ffn import ACTIVATIONS, FeedForward
from attnkit.nn.positional import LearnedPositions

HEADS = ("none", "mlm", "mlm_nsp")


@dataclass(frozen=True)
class BertConfig:
    """Sizes and options of BERT / RoBERTa (defaults = BERT-base, Devlin et al. 2019, 3)."""

    vocab_size: int = 30522
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    d_ff: int = 3072
    max_len: int = 512               # rows of the position table
    type_vocab_size: int = 2         # segments A/B; 0 = no token-type embedding (DistilBERT)
    dropout: float = 0.1             # embeddings and residual branches
    attention_dropout: float = 0.1   # on the attention weights
    activation: str = "gelu"
    eps: float = 1e-12               # LayerNorm epsilon
    pad_id: int = 0
    init_std: float = 0.02           # N(0, 0.02) weights (BERT's initializer_range)
    variant: Literal["bert", "roberta"] = "bert"  # roberta: padding-offset positions
    pooler: bool = True              # tanh pooler over the first token
    heads: Literal["none", "mlm", "mlm_nsp"] = "none"  # which pre-training heads build() adds

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_heads", "n_layers", "d_ff", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"model.{name} must be positive, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(f"model.d_model ({self.d_model}) must be divisible by "
                              f"model.n_heads ({self.n_heads})")
        if self.activation not in ACTIVATIONS:
            raise unknown("activation", self.activation, ACTIVATIONS)
        if self.heads not in HEADS:
            raise unknown("heads", self.heads, HEADS)
        if not 0.0 <= self.dropout < 1.0 or not 0.0 <= self.attention_dropout < 1.0:
            raise ConfigError("model.dropout and model.attention_dropout must be in [0, 1)")
        if self.type_vocab_size < 0 or self.eps <= 0 or self.init_std <= 0:
            raise ConfigError("model.type_vocab_size must be >= 0, eps and init_std positive")
        if not 0 <= self.pad_id < self.vocab_size:
            raise ConfigError(f"model.pad_id {self.pad_id} is outside the vocabulary")
        if self.heads == "mlm_nsp" and (self.variant == "roberta" or not self.pooler):
            raise ConfigError("the NSP head needs BERT with a pooler (RoBERTa has no NSP)")
        if self.variant == "roberta" and self.max_len <= self.pad_id + 1:
            raise ConfigError("RoBERTa positions start at pad_id + 1: raise model.max_len")

    @property
    def max_tokens(self) -> int:
        """The longest sequence the position table allows."""
        return self.max_len - self.pad_id - 1 if self.variant == "roberta" else self.max_len


_ROBERTA = dict(variant="roberta", vocab_size=50265, max_len=514, type_vocab_size=1, pad_id=1,
                eps=1e-5)
PRESETS: dict[str, dict] = {
    # Devlin et al. 2019, section 3: BERT-base 110M, BERT-large 340M
    "bert-base": dict(d_model=768, n_heads=12, n_layers=12, d_ff=3072),
    "bert-large": dict(d_model=1024, n_heads=16, n_layers=24, d_ff=4096),
    # Liu et al. 2019 (the published roberta-base / roberta-large configs)
    "roberta-base": dict(**_ROBERTA, d_model=768, n_heads=12, n_layers=12, d_ff=3072),
    "roberta-large": dict(**_ROBERTA, d_model=1024, n_heads=16, n_layers=24, d_ff=4096),
    # the compact BERTs of Turc et al. 2019 (sizes that train on a CPU)
    "bert-tiny": dict(d_model=128, n_heads=2, n_layers=2, d_ff=512),
    "bert-mini": dict(d_model=256, n_heads=4, n_layers=4, d_ff=1024),
    "bert-small": dict(d_model=512, n_heads=8, n_layers=4, d_ff=2048),
    "roberta-tiny": dict(**_ROBERTA, d_model=128, n_heads=2, n_layers=2, d_ff=512),
}


def bert_config(preset: str = "bert-base", **overrides) -> BertConfig:
    """A preset's config with ``overrides`` applied (e.g. ``vocab_size``, ``heads``)."""
    if preset not in PRESETS:
        raise unknown("BERT preset", preset, PRESETS)
    return BertConfig(**{**PRESETS[preset], **overrides})


@dataclass
class BertOutput:
    """What an encoder returns, named as ``transformers``' ``BaseModelOutputWithPooling``;
    per-layer tuples only when asked for (``output_hidden_states``, ``output_attentions``)."""

    last_hidden_state: Tensor                         # (B, S, C)
    pooler_output: Tensor | None = None               # (B, C), tanh pooler over the first token
    hidden_states: tuple[Tensor, ...] | None = None   # L + 1 x (B, S, C): embeddings, each layer
    attentions: tuple[Tensor, ...] | None = None      # L x (B, H, S, S)

    def __post_init__(self) -> None:
        self.hidden_states = per_layer(self.hidden_states)
        self.attentions = per_layer(self.attentions)


def roberta_position_ids(ids: Tensor, pad_id: int) -> Tensor:
    """(B, S) positions pad_id + 1, pad_id + 2, ... over real tokens; pad_id on padding."""
    real = (ids != pad_id).long()
    return torch.cumsum(real, dim=1) * real + pad_id


def key_padding_mask(attention_mask: Tensor | None) -> Tensor | None:
    """(B, S) 1 = real -> (B, 1, 1, S) boolean keys, or None when nothing is padding.

    Returning None lets the fused kernel run unmasked (its fastest path) on full batches.
    """
    if attention_mask is None:
        return None
    keep = attention_mask.bool()
    return None if bool(keep.all()) else keep[:, None, None, :]


class BertModel(nn.Module):
    """The BERT / RoBERTa encoder (and DistilBERT's, given a config without token types)."""

    def __init__(self, cfg: BertConfig) -> None:
        super().__init__()
        self.cfg = cfg   # the family's config (DistilBertConfig for DistilBERT)
        self.arch = cfg  # the BertConfig this module is built from
        c = cfg.d_model
        self.tokens = nn.Embedding(cfg.vocab_size, c, padding_idx=cfg.pad_id)
        self.positions = LearnedPositions(cfg.max_len, c)
        self.token_types = nn.Embedding(cfg.type_vocab_size, c) if cfg.type_vocab_size else None
        self.embed_norm = nn.LayerNorm(c, eps=cfg.eps)
        self.embed_dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(
            EncoderBlock(MultiHeadAttention(c, cfg.n_heads, cfg.attention_dropout),
                         FeedForward(c, cfg.d_ff, 0.0, cfg.activation),  # dropout after fc2
                         c, cfg.dropout, norm_first=False, eps=cfg.eps)
            for _ in range(cfg.n_layers))
        self.pooler = nn.Linear(c, c) if cfg.pooler else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """BERT's initialisation: N(0, init_std) weights, zero biases, unit LayerNorms."""
        init_bert_(self, self.arch.init_std)

    def embed(self, ids: Tensor, token_type_ids: Tensor | None = None) -> Tensor:
        """(B, S) ids -> LayerNorm(token + type + position) with dropout, (B, S, C)."""
        if ids.dim() != 2:
            raise UserError(f"token ids must be (batch, length), got shape {tuple(ids.shape)}")
        s, cfg = ids.size(1), self.arch
        if s > cfg.max_tokens:
            raise UserError(f"sequence of {s} tokens exceeds the model's maximum {cfg.max_tokens}")
        x = self.tokens(ids)
        if self.token_types is not None:
            x = x + (self.token_types.weight[0] if token_type_ids is None
                     else self.token_types(token_type_ids))
        elif token_type_ids is not None:
            raise UserError("this model has no token types: pass token_type_ids=None")
        if cfg.variant == "roberta":
            x = x + self.positions.embedding(roberta_position_ids(ids, cfg.pad_id))
        else:
            x = x + self.positions(s)
        return self.embed_dropout(self.embed_norm(x))

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, *, output_attentions: bool = False,
                output_hidden_states: bool = False) -> BertOutput:
        """Encode ``input_ids`` (B, S); ``attention_mask`` (B, S) is 1 for real tokens, 0 for
        padding; ``token_type_ids`` (B, S) the segments (BERT only).

        As in ``transformers``, padding is not inferred from ``pad_id``: pass the mask.
        Asked for weights or hidden states, every position is computed by the encoder blocks,
        as ``transformers`` does. Otherwise the blocks run on packed tokens (the fast path:
        all B * S, or the N real ones of a padded batch, as one (N, C) matrix, see
        :class:`Packing`), so a padded batch's padding positions come out as zeros.
        """
        if input_ids is None:
            raise UserError("the encoder needs input_ids")
        mask = key_padding_mask(attention_mask)
        x = self.embed(input_ids, token_type_ids)
        packing = None
        if not (output_attentions or output_hidden_states):
            packing = Packing.of(mask, *input_ids.shape)
            x, mask = packing.pack(x), None  # (N, C); the packing masks the keys
        states = [x] if output_hidden_states else None
        weights = [] if output_attentions else None
        for layer in self.layers:
            out = layer(x, mask=mask, need_weights=output_attentions, packing=packing)
            x = out.hidden
            if states is not None:
                states.append(x)
            if weights is not None:
                weights.append(out.self_weights)
        if packing is not None:
            x = packing.unpack(x)  # (B, S, C)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return BertOutput(x, pooled, states, weights)


def init_bert_(module: nn.Module, std: float) -> None:
    """N(0, std) for linear and embedding weights (padding rows zero), zero biases."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, std=std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Embedding):
            nn.init.normal_(m.weight, std=std)
            if m.padding_idx is not None:
                with torch.no_grad():
                    m.weight[m.padding_idx].zero_()
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class MLMHead(nn.Module):
    """Masked-LM head: LayerNorm(act(x W + b)) E^T + bias, E the tied token embedding."""

    def __init__(self, embedding: nn.Embedding, activation: str = "gelu",
                 eps: float = 1e-12) -> None:
        super().__init__()
        v, c = embedding.weight.shape
        self.dense = nn.Linear(c, c)
        self.act = ACTIVATIONS[activation]
        self.norm = nn.LayerNorm(c, eps=eps)
        self.decoder = nn.Linear(c, v)
        self.decoder.weight = embedding.weight  # tied (BERT, appendix A; Press & Wolf 2017)

    def forward(self, hidden: Tensor) -> Tensor:
        """(..., C) -> (..., V) logits; pass only the masked positions to save the V-wide GEMM."""
        return self.decoder(self.norm(self.act(self.dense(hidden))))


@dataclass
class PreTrainingOutput(EncoderPassThrough):
    """Named as ``transformers``' ``MaskedLMOutput`` (+ ``seq_relationship_logits`` of
    ``BertForPreTrainingOutput``); the encoder's own output stays in ``encoder``."""

    logits: Tensor                           # (B, S, V), or (N, V) for the ``mlm_mask`` positions
    seq_relationship_logits: Tensor | None   # (B, 2): 0 = "B follows A", 1 = "B is random"
    encoder: BertOutput
    loss: Tensor | None = None               # () MLM (+ NSP) cross-entropy, given labels


class BertForPreTraining(nn.Module):
    """The encoder (``.bert``) with the masked-LM head (``.mlm``) and, for BERT, NSP (``.nsp``)."""

    def __init__(self, cfg: BertConfig, encoder: BertModel | None = None) -> None:
        super().__init__()
        if cfg.heads == "none":
            raise ConfigError("BertForPreTraining needs heads 'mlm' or 'mlm_nsp'")
        self.cfg = self.arch = cfg
        # the encoder's own config says "no heads", so it can be saved or reused on its own
        self.bert = BertModel(replace(cfg, heads="none")) if encoder is None else encoder
        act = "gelu" if cfg.variant == "roberta" else cfg.activation  # RoBERTa's head: GELU
        self.mlm = MLMHead(self.bert.tokens, act, cfg.eps)
        self.nsp = nn.Linear(cfg.d_model, 2) if cfg.heads == "mlm_nsp" else None
        self._init_heads()  # the encoder initialised itself

    def reset_parameters(self) -> None:
        """The encoder's initialisation, then the heads' (the tied decoder keeps the embedding)."""
        self.bert.reset_parameters()
        self._init_heads()

    def _init_heads(self) -> None:
        std = self.arch.init_std
        for lin in (self.mlm.dense, self.nsp):
            if lin is not None:
                nn.init.normal_(lin.weight, std=std)
                nn.init.zeros_(lin.bias)
        nn.init.ones_(self.mlm.norm.weight)
        nn.init.zeros_(self.mlm.norm.bias)
        nn.init.zeros_(self.mlm.decoder.bias)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, *, labels: Tensor | None = None,
                next_sentence_label: Tensor | None = None, mlm_mask: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False
                ) -> PreTrainingOutput:
        """MLM logits for every position, or only where ``mlm_mask`` (B, S) is True.

        ``labels`` (B, S) with -100 where not scored (or (N,) for the ``mlm_mask`` positions)
        give ``loss``, the mean MLM cross-entropy, plus NSP's given ``next_sentence_label``
        (B,), as ``transformers``' ``BertForPreTraining`` / ``BertForMaskedLM``.
        """
        enc = self.bert(input_ids, attention_mask, token_type_ids,
                        output_attentions=output_attentions,
                        output_hidden_states=output_hidden_states)
        hidden = (enc.last_hidden_state if mlm_mask is None
                  else enc.last_hidden_state[mlm_mask])
        nsp = self.nsp(enc.pooler_output) if self.nsp is not None else None
        out = PreTrainingOutput(self.mlm(hidden), nsp, enc)
        if labels is not None:
            if mlm_mask is not None and labels.shape == mlm_mask.shape:
                labels = labels[mlm_mask]
            out.loss = mean_token_nll(out.logits, labels)
            if next_sentence_label is not None and nsp is not None:
                out.loss = out.loss + mean_token_nll(nsp, next_sentence_label)
        return out


def build_bert(cfg: BertConfig) -> nn.Module:
    """The encoder alone (``heads='none'``) or with its pre-training heads."""
    return BertModel(cfg) if cfg.heads == "none" else BertForPreTraining(cfg)


def encoder_of(model: nn.Module) -> nn.Module:
    """The bare encoder inside a model with heads (``.bert``), or the model itself."""
    return getattr(model, "bert", model)


@torch.no_grad()
def sentence_embeddings(model: nn.Module, tokenizer, texts: Sequence[str], *,
                        batch_size: int = 32, max_len: int | None = None,
                        normalize: bool = True) -> Tensor:
    """(N, C) sentence vectors: mean of the last hidden states over real tokens, L2-normalised.

    This is Sentence-BERT's mean pooling (Reimers & Gurevych 2019) as all-MiniLM-L6-v2 uses it.
    Each text becomes [CLS] text [SEP] (``tokenizer.bos_id`` / ``eos_id``), truncated to
    ``max_len`` tokens (default: the model's maximum; all-MiniLM-L6-v2 uses 256).
    """
    enc = encoder_of(model)
    if tokenizer.bos_id is None or tokenizer.eos_id is None:
        raise UserError("sentence_embeddings needs a tokenizer with [CLS]/[SEP] (BOS/EOS) ids")
    limit = min(max_len or enc.arch.max_tokens, enc.arch.max_tokens)
    if limit < 2 or batch_size < 1:
        raise UserError("sentence_embeddings needs max_len >= 2 and batch_size >= 1")
    rows = [[tokenizer.bos_id, *tokenizer.encode(t)[: limit - 2], tokenizer.eos_id]
            for t in texts]
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))  # batches of similar length
    device = next(enc.parameters()).device
    out = torch.empty(len(rows), enc.arch.d_model, device=device)
    was_training = enc.training
    enc.eval()
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else 0
    for start in range(0, len(order), batch_size):
        chunk = order[start: start + batch_size]
        width = len(rows[chunk[0]])
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        real = torch.zeros(len(chunk), width, dtype=torch.long)
        for j, i in enumerate(chunk):
            ids[j, : len(rows[i])] = torch.tensor(rows[i])
            real[j, : len(rows[i])] = 1
        ids, real = ids.to(device), real.to(device)
        hidden = enc(ids, attention_mask=real).last_hidden_state  # (b, S, C)
        w = real[..., None].to(hidden.dtype)
        emb = (hidden * w).sum(1) / w.sum(1).clamp(min=1e-9)
        out[torch.tensor(chunk, device=device)] = F.normalize(emb, dim=-1) if normalize else emb
    enc.train(was_training)
    return out
