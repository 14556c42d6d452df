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
accuracy), at every evaluation and in ``results.json``. What the
BERT-family recipes share (config, loss, loaders) is in :mod:`attnkit.recipes.pretrain`.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

from torch import nn

from attnkit.data.lm import text_chunks
from attnkit.data.mlm import MaskConfig, Masker, MLMBatches, held_out
from attnkit.evaluation import mlm_scores
from attnkit.loading import load
from attnkit.models import ENCODERS
from attnkit.models.bert import build_bert
from attnkit.recipes.lm import load_corpus, with_data_default
from attnkit.recipes.pretrain import (
    PretrainConfig,
    examples_of,
    model_config,
    pretrain_loss,
)
from attnkit.recipes.run import setup_run
from attnkit.rundir import RESULTS, TOKENIZER, write_json_atomic
from attnkit.tokenizers import Tokenizer, TokenizerConfig, resolve_tokenizer
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig, fit
from attnkit.train.optim import OptimConfig


def report(run_dir: Path, scores: dict[str, float], extra: dict[str, Any] | None = None) -> dict:
    """Print the held-out scores and write results.json."""
    results = {"val": scores, **(extra or {})}
    write_json_atomic(run_dir / RESULTS, results)
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
        if dist.is_main() and not (run_dir / TOKENIZER).exists():
            tok.save(run_dir / TOKENIZER)
        return tok, build_bert(model_config(cfg, tok.vocab_size, tok.pad_id))

    run_dir, tok, model = setup_run(recipe, cfg, create)
    if dist.is_main():
        print(f"{len(examples):,} training sequences ({sum(len(e.ids) for e in examples):,} "
              f"tokens); vocabulary {tok.vocab_size}; parameters "
              f"{sum(p.numel() for p in model.parameters()):,}", file=sys.stderr)
    fit(model, pretrain_loss, batches, cfg.train, run_dir, evaluate=lambda m: mlm_scores(m, val))
    if not dist.is_main():
        return {}
    best = load(run_dir, families=ENCODERS, device=cfg.train.device).model
    return report(run_dir, mlm_scores(best, val))


def evaluate(run_dir: Path, cfg: PretrainConfig) -> dict:
    """`attnkit eval RUN`: held-out MLM scores of the best checkpoint."""
    run = load(run_dir, families=ENCODERS, device=cfg.train.device)
    model, tok = run.model, run.require_tokenizer(run_dir)
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
