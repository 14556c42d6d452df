"""What the BERT-family runs share: the pre-training config and model config, the training
examples and loss (:mod:`attnkit.recipes.bert_pretrain` is the pre-training recipe itself; a
trained encoder, run or Hugging Face directory, is read by :func:`attnkit.load`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from attnkit.data.mlm import (
    IGNORE,
    Example,
    MaskConfig,
    MLMBatch,
    MLMEvalConfig,
    PretrainData,
    make_examples,
)
from attnkit.errors import ConfigError
from attnkit.losses import mlm_nsp_loss
from attnkit.models.bert import BertConfig, bert_config
from attnkit.tokenizers import Tokenizer, TokenizerConfig
from attnkit.train.loop import TrainConfig

METRICS = ("val_mlm_loss", "val_mlm_ppl", "val_mlm_acc", "val_nsp_acc")


@dataclass(frozen=True)
class PretrainConfig:
    variant: Literal["bert", "roberta"] = "bert"
    data: PretrainData = field(default_factory=PretrainData)
    preset: str = "bert-tiny"     # attnkit.models.bert.PRESETS
    arch: dict = field(default_factory=dict)   # overrides of the preset (e.g. n_layers)
    tokenizer: TokenizerConfig = field(default_factory=lambda: TokenizerConfig(
        kind="wordpiece", vocab_size=8000))
    max_len: int = 128            # tokens per sequence, specials included
    batch_size: int = 32          # sequences per micro-batch (x train.accum_steps per step)
    masking: MaskConfig = field(default_factory=MaskConfig)
    nsp: bool = True              # next-sentence prediction (BERT only)
    short_seq_prob: float = 0.1   # BERT: share of shorter pairs
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: MLMEvalConfig = field(default_factory=MLMEvalConfig)
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.variant not in ("bert", "roberta"):
            raise ConfigError(f"variant must be 'bert' or 'roberta', got {self.variant!r}")
        if self.variant == "roberta" and self.nsp:
            raise ConfigError("RoBERTa has no next-sentence prediction: set nsp=false")
        if self.max_len < 5 or self.batch_size < 1:
            raise ConfigError("max_len must be >= 5 and batch_size >= 1")
        if not 0.0 <= self.short_seq_prob <= 1.0:
            raise ConfigError("short_seq_prob must be in [0, 1]")
        self.train.check_best_metric(METRICS)
        model_config(self, vocab_size=100, pad_id=0)  # validates preset and arch


def model_config(cfg: PretrainConfig, vocab_size: int, pad_id: int) -> BertConfig:
    """The model's config: preset + arch, sized for the tokenizer and ``max_len``."""
    offset = pad_id + 1 if cfg.variant == "roberta" else 0
    base = dict(vocab_size=vocab_size, pad_id=pad_id, variant=cfg.variant,
                max_len=cfg.max_len + offset, heads="mlm_nsp" if cfg.nsp else "mlm",
                pooler=cfg.nsp)  # as transformers' *ForMaskedLM: a pooler only for NSP
    if cfg.variant == "roberta":
        base.update(type_vocab_size=1)
    try:
        model_cfg = bert_config(cfg.preset, **{**base, **cfg.arch})
    except TypeError as err:
        raise ConfigError(f"arch: {err}") from None
    if model_cfg.max_tokens < cfg.max_len:
        raise ConfigError(f"max_len {cfg.max_len} exceeds the model's {model_cfg.max_tokens}")
    return model_cfg


# ---- data --------------------------------------------------------------------------------------
def examples_of(cfg: PretrainConfig, tok: Tokenizer, texts: list[str], seed: int
                ) -> list[Example]:
    """:func:`make_examples` with the recipe's settings."""
    return make_examples(tok, texts, max_len=cfg.max_len, nsp=cfg.nsp,
                         doc_lines=cfg.data.doc_lines, seed=seed,
                         short_seq_prob=cfg.short_seq_prob)


# ---- loss and evaluation -----------------------------------------------------------------------
def pretrain_loss(model: nn.Module, batch: MLMBatch) -> tuple[torch.Tensor, int]:
    """(MLM loss sum + n * mean NSP loss, n masked tokens) (:func:`attnkit.losses.mlm_nsp_loss`):
    after fit divides by n, the objective is BERT's mean MLM loss + mean NSP loss."""
    selected = batch.labels != IGNORE
    out = model(batch.ids, attention_mask=batch.attention_mask,
                token_type_ids=batch.token_types, mlm_mask=selected)
    return mlm_nsp_loss(out.logits, batch.labels[selected], out.seq_relationship_logits,
                        batch.nsp)
