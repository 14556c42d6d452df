"""BERT / RoBERTa pre-training: the "bert-pretrain" and "roberta-pretrain" recipes.

One recipe with a ``variant`` switch (the two registry entries differ only in defaults):

- ``bert`` (Devlin et al. 2019): WordPiece, sentence pairs ``[CLS] A [SEP] B [SEP]`` with
  token types, masked LM (15%, 80/10/10, optionally whole words) + next-sentence prediction,
  static masks (drawn once per sequence, as BERT's ``create_pretraining_data.py``).
- ``roberta`` (Liu et al. 2019): byte-level BPE, FULL-SENTENCES packing across documents,
  masked LM only, dynamic masking, large batches through ``train.accum_steps``.

Text comes from any text file, JSONL file or folder (default: tiny Shakespeare from the shared
data folder); one sentence per line, blank lines between documents (BERT's input format).
Held-out text gives MLM loss, perplexity exp(loss) and accuracy over masked tokens (and NSP
accuracy), at every evaluation and in ``results.json``. :func:`load_bert` reads the result
(or a Hugging Face directory) for the "distil" and "finetune" recipes.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from attnkit.config import from_dict, to_dict
from attnkit.data.lm import text_chunks
from attnkit.data.mlm import (
    IGNORE,
    Example,
    MaskConfig,
    Masker,
    MLMBatch,
    MLMBatches,
    MLMEvalConfig,
    PretrainData,
    held_out,
    make_examples,
)
from attnkit.errors import ConfigError, UserError
from attnkit.evaluation import mlm_scores
from attnkit.losses import mlm_nsp_loss
from attnkit.models.bert import BertConfig, bert_config, build_bert
from attnkit.models.distilbert import DistilBertConfig, build_distilbert
from attnkit.recipes.lm import load_corpus, with_data_default
from attnkit.recipes.run import read_run, record_model, setup_run
from attnkit.tokenizers import Tokenizer, TokenizerConfig, resolve_tokenizer
from attnkit.train import distributed as dist
from attnkit.train.checkpoint import (
    load_run_weights,
    write_json_atomic,
)
from attnkit.train.loop import TrainConfig, fit
from attnkit.train.optim import OptimConfig

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
    return mlm_nsp_loss(out.mlm_logits, batch.labels[selected], out.nsp_logits, batch.nsp)


# ---- loading trained models --------------------------------------------------------------------
def build_family(family: str, config: dict) -> nn.Module:
    """Rebuild a recorded BERT-family model ("bert" or "distilbert") from its config dict."""
    if family == "bert":
        return build_bert(from_dict(BertConfig, config))
    if family == "distilbert":
        return build_distilbert(from_dict(DistilBertConfig, config))
    raise UserError(f"expected a BERT, RoBERTa or DistilBERT run, got a '{family}' model")


def load_run_model(run_dir: str | Path, which: Literal["best", "latest"] = "best"
                   ) -> tuple[nn.Module, Tokenizer]:
    """A pre-training or distillation run's model (best checkpoint if any), in eval mode."""
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    if "model" not in record or not (run_dir / "tokenizer.json").is_file():
        raise UserError(f"{run_dir} has no trained model yet")
    model = build_family(record["model"]["family"], record["model"]["config"])
    load_run_weights(run_dir, model, which)
    return model.eval(), Tokenizer.load(run_dir / "tokenizer.json")


def load_bert(path: str | Path) -> tuple[nn.Module, Tokenizer]:
    """A BERT-family model and its tokenizer from an attnkit run directory (pre-training or
    distillation) or a Hugging Face directory (``config.json`` with a ``model_type``)."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"no such directory: {path} (expected an attnkit run or a Hugging Face "
                        "model directory)")
    try:
        record = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and "recipe" in record:
        return load_run_model(path)
    from attnkit.convert.hf import from_pretrained

    pre = from_pretrained(path)
    if pre.model_type not in ("bert", "roberta", "distilbert"):
        raise UserError(f"{path} holds a '{pre.model_type}' model, not BERT/RoBERTa/DistilBERT")
    if pre.tokenizer is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.json or vocab.txt)")
    return pre.model, pre.tokenizer


def family_name(model: nn.Module) -> str:
    """"distilbert" or "bert" (RoBERTa included) for config.json."""
    return "distilbert" if isinstance(model.cfg, DistilBertConfig) else "bert"


# ---- the recipe --------------------------------------------------------------------------------
def report(run_dir: Path, scores: dict[str, float], extra: dict[str, Any] | None = None) -> dict:
    """Print the held-out scores and write results.json."""
    results = {"val": scores, **(extra or {})}
    write_json_atomic(run_dir / "results.json", results)
    line = (f"held-out MLM: loss {scores['val_mlm_loss']:.4f}, perplexity "
            f"{scores['val_mlm_ppl']:.2f}, accuracy {scores['val_mlm_acc']:.4f} "
            f"({int(scores['val_masked']):,} masked tokens)")
    if "val_nsp_acc" in scores:
        line += f"; NSP accuracy {scores['val_nsp_acc']:.4f}"
    print(line)
    print(f"run directory: {run_dir}")
    return results


def main(cfg: PretrainConfig, recipe: str = "bert-pretrain") -> dict:
    """Pre-train a BERT or RoBERTa on ``cfg.data``, then report held-out MLM scores."""
    cfg = with_data_default(cfg)
    train_texts, val_texts = load_corpus(cfg.data)
    tok = resolve_tokenizer(cfg.tokenizer, lambda: text_chunks(train_texts), cfg.run_dir,
                            ("mask", "pad", "bos", "eos"))
    masker = Masker.for_tokenizer(cfg.masking, tok)
    examples = examples_of(cfg, tok, train_texts, seed=cfg.train.seed)
    batches = MLMBatches(examples, cfg.batch_size, masker, tok.pad_id, seed=cfg.train.seed)
    val = held_out(examples_of(cfg, tok, val_texts, cfg.train.seed + 1), cfg.eval, masker,
                   tok.pad_id)

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        if dist.is_main() and not (run_dir / "tokenizer.json").exists():
            tok.save(run_dir / "tokenizer.json")
        model_cfg = model_config(cfg, tok.vocab_size, tok.pad_id)
        if dist.is_main():
            record_model(run_dir, "bert", to_dict(model_cfg))
        return tok, build_bert(model_cfg)

    run_dir, tok, model = setup_run(recipe, cfg, create)
    if dist.is_main():
        print(f"{len(examples):,} training sequences ({sum(len(e.ids) for e in examples):,} "
              f"tokens); vocabulary {tok.vocab_size}; parameters "
              f"{sum(p.numel() for p in model.parameters()):,}", file=sys.stderr)
    fit(model, pretrain_loss, batches, cfg.train, run_dir, evaluate=lambda m: mlm_scores(m, val))
    if not dist.is_main():
        return {}
    best, _ = load_run_model(run_dir)
    return report(run_dir, mlm_scores(best, val))


def evaluate(run_dir: Path, cfg: PretrainConfig) -> dict:
    """`attnkit eval RUN`: held-out MLM scores of the best checkpoint."""
    model, tok = load_run_model(run_dir)
    cfg = with_data_default(cfg)
    _, val_texts = load_corpus(cfg.data)
    val = held_out(examples_of(cfg, tok, val_texts, cfg.train.seed + 1), cfg.eval,
                   Masker.for_tokenizer(cfg.masking, tok), tok.pad_id)
    return report(run_dir, mlm_scores(model, val))


def _optim(lr: float, warmup: int) -> OptimConfig:
    """AdamW, betas (0.9, 0.999) for BERT / (0.9, 0.98) for RoBERTa, weight decay 0.01."""
    return OptimConfig(name="adamw", lr=lr, betas=(0.9, 0.999), eps=1e-6, weight_decay=0.01,
                       schedule="cosine", warmup_steps=warmup, min_lr_ratio=0.1)


def bert_defaults() -> PretrainConfig:
    """BERT-tiny (2 x 128) on tiny Shakespeare: 128-token pairs, MLM + NSP, static masks."""
    return PretrainConfig(
        variant="bert", preset="bert-tiny", max_len=128, batch_size=32, nsp=True,
        masking=MaskConfig(dynamic=False),
        train=TrainConfig(steps=2000, eval_every=250, save_every=250, log_every=50,
                          best_metric="val_mlm_loss", optim=_optim(1e-3, 100)))


def roberta_defaults() -> PretrainConfig:
    """RoBERTa-tiny: byte-level BPE, full sentences, dynamic masks, 4 x 32 sequences a step."""
    optim = replace(_optim(1e-3, 100), betas=(0.9, 0.98))
    return PretrainConfig(
        variant="roberta", preset="roberta-tiny", max_len=128, batch_size=32, nsp=False,
        tokenizer=TokenizerConfig(kind="bytelevel", vocab_size=8000),
        masking=MaskConfig(dynamic=True),
        train=TrainConfig(steps=1000, accum_steps=4, eval_every=125, save_every=125,
                          log_every=25, best_metric="val_mlm_loss", optim=optim))
