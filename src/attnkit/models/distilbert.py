"""DistilBERT (Sanh et al. 2019): BERT with half the layers, no token types and no pooler.

Notation: B batch, S sequence length, C = d_model, V vocabulary, L layers.

    x_0 = LayerNorm(E_token[ids] + E_pos[positions])     (eps 1e-12, as BERT)
    x_l = EncoderBlock(x_{l-1})                           post-norm, GELU feed-forward
    MLM logits = LayerNorm(GELU(x_L W_t + b_t)) E^T + b   (vocab_transform, vocab_layer_norm,
                                                           vocab_projector in the reference code)

The network is :class:`attnkit.models.bert.BertModel` built from the equivalent BERT config
(``type_vocab_size=0``, ``pooler=False``), so a student can be initialised from every second
layer of a BERT teacher by copying state-dict entries (section 3 of the paper).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

from torch import nn

from attnkit.config import unknown
from attnkit.errors import ConfigError
from attnkit.models.bert import BertConfig, BertForPreTraining, BertModel
from attnkit.nn.ffn import ACTIVATIONS


@dataclass(frozen=True)
class DistilBertConfig:
    """Sizes and options of DistilBERT (defaults = distilbert-base: 6 x 768, 12 heads)."""

    vocab_size: int = 30522
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 6
    d_ff: int = 3072
    max_len: int = 512
    dropout: float = 0.1
    attention_dropout: float = 0.1
    activation: str = "gelu"
    pad_id: int = 0
    init_std: float = 0.02
    heads: Literal["none", "mlm"] = "none"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise unknown("activation", self.activation, ACTIVATIONS)
        if self.heads not in ("none", "mlm"):
            raise unknown("DistilBERT heads", self.heads, ("none", "mlm"))
        self.bert()  # the shared checks (sizes, dropout, pad id)

    def bert(self) -> BertConfig:
        """The BERT config of the same network (no token types, no pooler, eps 1e-12)."""
        try:
            return BertConfig(
                vocab_size=self.vocab_size, d_model=self.d_model, n_heads=self.n_heads,
                n_layers=self.n_layers, d_ff=self.d_ff, max_len=self.max_len, type_vocab_size=0,
                dropout=self.dropout, attention_dropout=self.attention_dropout,
                activation=self.activation, eps=1e-12, pad_id=self.pad_id,
                init_std=self.init_std, pooler=False, heads=self.heads)
        except ConfigError as err:
            raise ConfigError(str(err)) from None


PRESETS: dict[str, dict] = {
    "distilbert-base": dict(d_model=768, n_heads=12, n_layers=6, d_ff=3072),  # 66,362,880
    "distilbert-tiny": dict(d_model=128, n_heads=2, n_layers=2, d_ff=512),
}


def distilbert_config(preset: str = "distilbert-base", **overrides) -> DistilBertConfig:
    """A preset's config with ``overrides`` applied."""
    if preset not in PRESETS:
        raise unknown("DistilBERT preset", preset, PRESETS)
    return DistilBertConfig(**{**PRESETS[preset], **overrides})


class DistilBertModel(BertModel):
    """The DistilBERT encoder; ``forward`` as :meth:`BertModel.forward` (no token types)."""

    def __init__(self, cfg: DistilBertConfig) -> None:
        super().__init__(cfg.bert())
        self.cfg = cfg


class DistilBertForMaskedLM(BertForPreTraining):
    """The encoder (``.bert``) with DistilBERT's masked-LM head (``.mlm``); ``nsp`` is None."""

    def __init__(self, cfg: DistilBertConfig) -> None:
        if cfg.heads != "mlm":
            raise ConfigError("DistilBertForMaskedLM needs heads='mlm'")
        super().__init__(cfg.bert(), DistilBertModel(replace(cfg, heads="none")))
        self.cfg = cfg


def build_distilbert(cfg: DistilBertConfig) -> nn.Module:
    """The encoder alone (``heads='none'``) or with the masked-LM head."""
    return DistilBertModel(cfg) if cfg.heads == "none" else DistilBertForMaskedLM(cfg)
