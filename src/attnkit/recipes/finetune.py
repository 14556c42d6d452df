"""Fine-tuning runs: a pre-trained encoder plus a task head, trained on CSV/JSONL files.

Devlin et al. 2019, section 4: every weight is fine-tuned together with a fresh output layer.
``init`` is an attnkit run ("bert-pretrain", "roberta-pretrain", "distil") or a Hugging Face
directory (e.g. all-MiniLM-L6-v2); the run keeps that model's tokenizer. Three tasks:

- ``classify``: records with ``text`` [, ``text_pair``], ``label`` (a CSV with a header row, or
  JSONL); inputs ``[CLS] text [SEP] (text_pair [SEP])``; accuracy and macro F1.
- ``tokens``: JSONL records with ``tokens`` (words) and ``tags`` (one per word), or CSV columns
  holding them space-separated; a word's label sits on its first sub-token (the others are not
  scored, as in Hugging Face's token-classification example); accuracy and macro F1 over the
  words that fit ``max_len``.
- ``qa``: ``question``, ``context`` and ``answers`` (SQuAD's ``{"text": [...],
  "answer_start": [...]}`` or a list of ``{"text", "answer_start"}``); inputs
  ``[CLS] question [SEP] context [SEP]`` (the context cut to fit, no sliding windows); the best
  span of at most ``max_answer_len`` tokens inside the context; SQuAD exact match and F1.

The "finetune" recipe (:mod:`attnkit.recipes.finetune_bert`) and the "distil" recipe's
downstream comparison both run :func:`train_and_report`. Records, encoding and batches are in
:mod:`attnkit.data.records`, metrics in :mod:`attnkit.evaluation`, losses in
:mod:`attnkit.losses`, heads in :mod:`attnkit.models.heads`.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor, nn

from attnkit.data.records import (
    TASKS,
    FinetuneData,
    Item,
    ItemBatches,
    TaskBatch,
    answer_texts,
    collate_items,
    encode,
    label_names,
    read_records,
)
from attnkit.errors import ConfigError, UserError
from attnkit.evaluation import accuracy, eval_loop, macro_f1, squad_scores
from attnkit.loading import load
from attnkit.losses import IGNORE, TASK_LOSSES
from attnkit.models import ENCODERS
from attnkit.models.bert import encoder_of
from attnkit.models.heads import POOLINGS, best_spans, task_head
from attnkit.recipes.run import setup_run
from attnkit.rundir import RESULTS, TOKENIZER, write_json_atomic
from attnkit.tokenizers import Tokenizer
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig, fit


# ---- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneConfig:
    init: str = ""           # an attnkit BERT-family run or a Hugging Face directory
    task: Literal["classify", "tokens", "qa"] = "classify"
    data: FinetuneData = field(default_factory=FinetuneData)
    pooling: Literal["pooler", "cls", "mean"] = "pooler"  # classify; no pooler -> "cls"
    max_len: int = 128       # tokens per input, specials included
    batch_size: int = 16
    max_answer_len: int = 30  # qa: tokens
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.pooling not in POOLINGS:
            raise ConfigError(f"pooling must be one of {', '.join(POOLINGS)}")
        if self.max_len < 8 or self.batch_size < 1 or self.max_answer_len < 1:
            raise ConfigError("max_len >= 8, batch_size >= 1 and max_answer_len >= 1 required")


# ---- model, loss, evaluation -------------------------------------------------------------------
def _forward(model: nn.Module, batch: TaskBatch) -> Tensor:
    return model(batch.ids, attention_mask=batch.attention_mask,
                 token_type_ids=batch.types).logits


def task_loss(task: str):
    """``loss_fn`` for :func:`fit`: the task's loss (:data:`attnkit.losses.TASK_LOSSES`):
    summed cross-entropy and its count, per sequence (classify), per labelled token (tokens),
    or the mean of the start and end losses per question (qa)."""
    def compute(model: nn.Module, batch: TaskBatch) -> tuple[Tensor, int]:
        return TASK_LOSSES[task](_forward(model, batch), batch.target)
    return compute


def _spans(logits: Tensor, part: list[Item], max_answer_len: int) -> list[str]:
    """The best answer text of each question of ``part``."""
    allowed = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    for r, it in enumerate(part):
        allowed[r, it.extra["base"]: it.extra["base"] + len(it.extra["offsets"])] = True
    s, e, _ = best_spans(logits[..., 0], logits[..., 1], allowed, max_answer_len)
    return answer_texts(s, e, part)


@torch.no_grad()
def score_items(model: nn.Module, cfg: FinetuneConfig, items: list[Item], pad_id: int
                ) -> dict[str, float]:
    """The task's metrics on ``items``: loss, accuracy and macro F1 (classify, tokens) or
    SQuAD exact match and F1 (qa). Eval mode is the caller's business."""
    preds, golds, loss, count = [], [], 0.0, 0
    parts = [items[i: i + cfg.batch_size] for i in range(0, len(items), cfg.batch_size)]
    device = next(model.parameters()).device
    for part in eval_loop(parts):
        batch = collate_items(part, pad_id).to(device)
        logits = _forward(model, batch).float()
        if cfg.task == "qa":
            preds += _spans(logits, part, cfg.max_answer_len)
            golds += [it.extra["answers"] for it in part]
            continue
        if cfg.task == "classify" or bool((batch.target != IGNORE).any()):
            part_loss, n = TASK_LOSSES[cfg.task](logits, batch.target)
            loss, count = loss + float(part_loss), count + n
        keep = batch.target != IGNORE
        preds += logits.argmax(-1)[keep].tolist()
        golds += batch.target[keep].tolist()
    if cfg.task == "qa":
        return squad_scores(preds, golds)
    return {"loss": loss / max(1, count), "accuracy": accuracy(preds, golds),
            "f1": macro_f1(preds, golds)}


def _encode(cfg: FinetuneConfig, tok: Tokenizer, records: list[dict], labels: list[str],
            where: str) -> list[Item]:
    return encode(cfg.task, tok, records, cfg.data, labels, cfg.max_len, where)


# ---- the recipe --------------------------------------------------------------------------------
def load_split(cfg: FinetuneConfig) -> tuple[list[dict], list[dict]]:
    """Training and validation records (validation: data.valid, or the last val_fraction)."""
    if not cfg.data.train:
        raise UserError("set data.train=FILE (.csv or .jsonl)")
    records = read_records(cfg.data.train)
    if cfg.data.valid:
        return records, read_records(cfg.data.valid)
    k = max(1, round(len(records) * cfg.data.val_fraction))
    if k >= len(records):
        raise UserError(f"{cfg.data.train} has too few records to hold some out")
    order = np.random.default_rng(cfg.train.seed).permutation(len(records))
    return ([records[i] for i in order[k:]], [records[i] for i in order[:k]])


def train_and_report(cfg: FinetuneConfig, recipe: str = "finetune") -> dict:
    """Fine-tune ``cfg.init`` with a ``cfg.task`` head on ``cfg.data``, then report (the
    "finetune" recipe, and the downstream comparison of the "distil" recipe)."""
    if not cfg.init:
        raise UserError("set init=DIR: an attnkit bert-pretrain/distil run or a Hugging Face "
                        "BERT/RoBERTa/DistilBERT directory")
    loaded = load(cfg.init, families=ENCODERS)
    encoder, tok = encoder_of(loaded.model), loaded.require_tokenizer(cfg.init)
    if cfg.max_len > encoder.arch.max_tokens:
        raise UserError(f"max_len {cfg.max_len} exceeds the model's {encoder.arch.max_tokens}")
    train_records, val_records = load_split(cfg)
    labels = label_names(cfg.task, train_records, cfg.data)
    train_items = [it for it in _encode(cfg, tok, train_records, labels, cfg.data.train)
                   if cfg.task != "qa" or it.target is not None]
    val_items = _encode(cfg, tok, val_records, labels, cfg.data.valid or cfg.data.train)
    pad = tok.pad_id if tok.pad_id is not None else 0

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        if dist.is_main() and not (run_dir / TOKENIZER).exists():
            tok.save(run_dir / TOKENIZER)
        return tok, task_head(cfg.task, encoder, max(1, len(labels)), cfg.pooling)

    def head(model: nn.Module) -> dict:  # recorded with the encoder: attnkit.load rebuilds it
        return {"head": {"task": cfg.task, "labels": labels,
                         "pooling": getattr(model, "pooling", cfg.pooling)}}

    run_dir, tok, model = setup_run(recipe, cfg, create, head)
    if dist.is_main():
        print(f"{len(train_items)} training and {len(val_items)} validation examples; "
              f"labels: {', '.join(labels) or 'spans'}", file=sys.stderr)
    batches = ItemBatches(train_items, cfg.batch_size, pad, cfg.train.seed)
    fit(model, task_loss(cfg.task), batches, cfg.train, run_dir,
        evaluate=lambda m: {f"val_{k}": v for k, v in
                            score_items(m, cfg, val_items, pad).items()})
    return final_report(run_dir, cfg, val_items) if dist.is_main() else {}


def final_report(run_dir: Path, cfg: FinetuneConfig, val_items: list[Item] | None = None
                 ) -> dict:
    """Score the validation (and test) files with the best checkpoint; results.json."""
    run = load(run_dir, families=ENCODERS, device=cfg.train.device)
    model, tok = run.model, run.require_tokenizer(run_dir)
    labels = run.record["model"]["head"]["labels"]
    pad = tok.pad_id if tok.pad_id is not None else 0
    if val_items is None:
        val_items = _encode(cfg, tok, load_split(cfg)[1], labels, cfg.data.valid or "data")
    results = {"valid": score_items(model, cfg, val_items, pad)}
    if cfg.data.test:
        test = _encode(cfg, tok, read_records(cfg.data.test), labels, cfg.data.test)
        results["test"] = score_items(model, cfg, test, pad)
    write_json_atomic(run_dir / RESULTS, results)
    for name, scores in results.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print(f"run directory: {run_dir}")
    return results


def evaluate(run_dir: Path, cfg: FinetuneConfig) -> dict:
    """`attnkit eval RUN`: validation (and test) scores of the best checkpoint."""
    return final_report(run_dir, cfg)
