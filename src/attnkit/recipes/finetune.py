"""The "finetune" recipe: a pre-trained encoder plus a task head, trained on CSV/JSONL files.

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
"""

from __future__ import annotations

import collections
import csv
import io
import json
import re
import string
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.config import to_dict
from attnkit.data.text import read_text
from attnkit.errors import ConfigError, UserError
from attnkit.losses import IGNORE, token_nll
from attnkit.models.bert import encoder_of
from attnkit.models.heads import (
    POOLINGS,
    SequenceClassifier,
    SpanExtractor,
    TokenClassifier,
    best_spans,
)
from attnkit.recipes.pretrain import build_family, family_name, load_bert
from attnkit.recipes.run import read_run, setup_run
from attnkit.tokenizers import Tokenizer
from attnkit.train import distributed as dist
from attnkit.train.checkpoint import (
    load_run_weights,
    write_json_atomic,
)
from attnkit.train.loop import TrainConfig, fit
from attnkit.train.optim import OptimConfig

TASKS = ("classify", "tokens", "qa")


# ---- metrics -----------------------------------------------------------------------------------
def accuracy(preds: Sequence, golds: Sequence) -> float:
    """Share of predictions equal to their gold label."""
    if len(preds) != len(golds):
        raise ValueError(f"{len(preds)} predictions for {len(golds)} labels")
    return sum(p == g for p, g in zip(preds, golds, strict=True)) / max(1, len(golds))


def macro_f1(preds: Sequence, golds: Sequence) -> float:
    """Unweighted mean over the gold labels' classes of F1 = 2 TP / (2 TP + FP + FN)."""
    classes = sorted(set(golds), key=str)
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in zip(preds, golds, strict=True))
        fp = sum(p == c and g != c for p, g in zip(preds, golds, strict=True))
        fn = sum(p != c and g == c for p, g in zip(preds, golds, strict=True))
        scores.append(2 * tp / max(1, 2 * tp + fp + fn))
    return sum(scores) / max(1, len(scores))


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation: lower case, no punctuation, no articles, single spaces."""
    text = "".join(ch for ch in text.lower() if ch not in set(string.punctuation))
    return " ".join(re.sub(r"\b(a|an|the)\b", " ", text).split())


def span_f1(pred: str, gold: str) -> float:
    """SQuAD token F1 between two answers after :func:`normalize_answer`."""
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    if not p or not g:
        return float(p == g)
    same = sum((collections.Counter(p) & collections.Counter(g)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(p), same / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(preds: Sequence[str], golds: Sequence[Sequence[str]]) -> dict[str, float]:
    """Exact match and F1 (each the best over a question's gold answers), averaged."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs)
          for p, gs in zip(preds, golds, strict=True)]
    f1 = [max(span_f1(p, g) for g in gs) for p, gs in zip(preds, golds, strict=True)]
    return {"exact_match": sum(em) / max(1, len(em)), "f1": sum(f1) / max(1, len(f1))}


# ---- config ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class FinetuneData:
    train: str = ""          # a .csv / .tsv / .jsonl file
    valid: str = ""          # "" = the last val_fraction of train
    test: str = ""           # optional, scored in the final report
    val_fraction: float = 0.2
    text: str = "text"       # field names (classify)
    text_pair: str = "text_pair"
    label: str = "label"
    tokens: str = "tokens"   # (tokens)
    tags: str = "tags"
    question: str = "question"  # (qa)
    context: str = "context"
    answers: str = "answers"

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")


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


# ---- reading and encoding ----------------------------------------------------------------------
def read_records(path: str | Path) -> list[dict]:
    """Records of a .jsonl file (one JSON object a line) or a .csv / .tsv file with a header."""
    path = Path(path)
    text = read_text(path)
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        records = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise UserError(f"{path} line {n} is not valid JSON: {err.msg}") from None
                if not isinstance(records[-1], dict):
                    raise UserError(f"{path} line {n} is not a JSON object")
        return records
    if path.name.endswith((".csv", ".tsv", ".csv.gz", ".tsv.gz")):
        delimiter = "\t" if ".tsv" in path.name else ","
        return [dict(r) for r in csv.DictReader(io.StringIO(text), delimiter=delimiter)]
    raise UserError(f"{path}: expected a .csv, .tsv or .jsonl file")


def _field(record: dict, name: str, where: str) -> Any:
    if name not in record or record[name] is None:
        raise UserError(f"{where} has no field '{name}' (fields: {', '.join(record) or 'none'})")
    return record[name]


def _words(value: Any) -> list[str]:
    return [str(v) for v in value] if isinstance(value, list) else str(value).split()


def _answers(value: Any, where: str) -> list[tuple[str, int]]:
    """(text, character start) of each gold answer, from SQuAD's layouts."""
    if isinstance(value, dict):
        value = [{"text": t, "answer_start": s}
                 for t, s in zip(value.get("text", []), value.get("answer_start", []),
                                 strict=False)]
    if not isinstance(value, list) or not value or not all(
            isinstance(a, dict) and "text" in a and "answer_start" in a for a in value):
        raise UserError(f"{where}: answers must be {{'text': [...], 'answer_start': [...]}}")
    return [(str(a["text"]), int(a["answer_start"])) for a in value]


@dataclass
class Item:
    """One encoded input: ids and token types (specials included) and its target."""

    ids: list[int]
    types: list[int]
    target: Any                       # class index | per-token labels | (start, end) or None
    extra: dict = field(default_factory=dict)  # qa: offsets, context, gold answers


def _single(tok: Tokenizer, text: str, pair: str | None, max_len: int) -> tuple[list, list]:
    if pair is not None:
        return tok.encode_pair(text, pair, max_len)
    ids = [tok.bos_id, *tok.encode(text)[: max_len - 2], tok.eos_id]
    return ids, [0] * len(ids)


def encode_classify(tok: Tokenizer, records: list[dict], names: FinetuneData, labels: list[str],
                    max_len: int, where: str) -> list[Item]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for n, r in enumerate(records, 1):
        label = str(_field(r, names.label, f"{where} record {n}"))
        if label not in index:
            raise UserError(f"{where} record {n}: label '{label}' does not occur in the "
                            "training data")
        pair = r.get(names.text_pair) or None
        ids, types = _single(tok, str(_field(r, names.text, f"{where} record {n}")),
                             None if pair is None else str(pair), max_len)
        out.append(Item(ids, types, index[label]))
    return out


def encode_tokens(tok: Tokenizer, records: list[dict], names: FinetuneData, labels: list[str],
                  max_len: int, where: str) -> list[Item]:
    index = {name: i for i, name in enumerate(labels)}
    out = []
    for n, r in enumerate(records, 1):
        words = _words(_field(r, names.tokens, f"{where} record {n}"))
        tags = _words(_field(r, names.tags, f"{where} record {n}"))
        if len(words) != len(tags) or not words:
            raise UserError(f"{where} record {n}: {len(words)} tokens but {len(tags)} tags")
        unknown_tags = [t for t in tags if t not in index]
        if unknown_tags:
            raise UserError(f"{where} record {n}: tag '{unknown_tags[0]}' does not occur in the "
                            "training data")
        enc = tok.backend.encode(words, is_pretokenized=True, add_special_tokens=False)
        ids, word_ids = enc.ids[: max_len - 2], enc.word_ids[: max_len - 2]
        target = [IGNORE] + [index[tags[w]] if w is not None and (j == 0 or word_ids[j - 1] != w)
                             else IGNORE for j, w in enumerate(word_ids)] + [IGNORE]
        out.append(Item([tok.bos_id, *ids, tok.eos_id], [0] * (len(ids) + 2), target))
    return out


def encode_qa(tok: Tokenizer, records: list[dict], names: FinetuneData, max_len: int,
              where: str) -> list[Item]:
    out = []
    for n, r in enumerate(records, 1):
        at = f"{where} record {n}"
        question = tok.encode(str(_field(r, names.question, at)))[: max(1, max_len // 4)]
        context = str(_field(r, names.context, at))
        answers = _answers(_field(r, names.answers, at), at)
        c_ids, offsets = tok.encode_with_offsets(context)
        room = max_len - len(question) - 3
        c_ids, offsets = c_ids[:room], offsets[:room]
        base = len(question) + 2
        ids = [tok.bos_id, *question, tok.eos_id, *c_ids, tok.eos_id]
        types = [0] * base + [1] * (len(c_ids) + 1)
        text, start = answers[0]
        first = [j for j, (a, b) in enumerate(offsets) if b > start]
        last = [j for j, (a, b) in enumerate(offsets) if a < start + len(text)]
        span = None
        if first and last and first[0] <= last[-1] and offsets[-1][1] >= start + len(text):
            span = (base + first[0], base + last[-1])
        out.append(Item(ids, types, span, {"offsets": offsets, "base": base, "context": context,
                                           "answers": [a for a, _ in answers]}))
    return out


def label_names(task: str, records: list[dict], names: FinetuneData) -> list[str]:
    """The label (or tag) set of the training records, sorted."""
    if task == "classify":
        return sorted({str(_field(r, names.label, "training record")) for r in records})
    if task == "tokens":
        return sorted({t for r in records for t in _words(_field(r, names.tags,
                                                                 "training record"))})
    return []


def encode(cfg: FinetuneConfig, tok: Tokenizer, records: list[dict], labels: list[str],
           where: str) -> list[Item]:
    """The task's items of ``records``."""
    if cfg.task == "classify":
        return encode_classify(tok, records, cfg.data, labels, cfg.max_len, where)
    if cfg.task == "tokens":
        return encode_tokens(tok, records, cfg.data, labels, cfg.max_len, where)
    return encode_qa(tok, records, cfg.data, cfg.max_len, where)


# ---- batches -----------------------------------------------------------------------------------
@dataclass
class TaskBatch:
    ids: Tensor              # (B, S)
    attention_mask: Tensor   # (B, S)
    types: Tensor            # (B, S)
    target: Tensor           # (B,) classes | (B, S) token labels | (B, 2) spans

    def to(self, device: torch.device | str) -> TaskBatch:
        return TaskBatch(*(t.to(device) for t in (self.ids, self.attention_mask, self.types,
                                                  self.target)))

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

    def shard(self, rank: int, world: int) -> TaskBatch:
        return TaskBatch(*(t[rank::world] for t in (self.ids, self.attention_mask, self.types,
                                                    self.target)))


def collate_items(items: Sequence[Item], pad_id: int) -> TaskBatch:
    width = max(len(it.ids) for it in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask, types = torch.zeros_like(ids), torch.zeros_like(ids)
    first = items[0].target
    if isinstance(first, list):
        target = torch.full((len(items), width), IGNORE, dtype=torch.long)
    else:
        target = torch.zeros(len(items), *((2,) if first is None or isinstance(first, tuple)
                                          else ()), dtype=torch.long)
    for r, it in enumerate(items):
        n = len(it.ids)
        ids[r, :n], mask[r, :n], types[r, :n] = torch.tensor(it.ids), 1, torch.tensor(it.types)
        if isinstance(it.target, list):
            target[r, :n] = torch.tensor(it.target)
        elif it.target is not None:
            target[r] = torch.tensor(it.target)
    return TaskBatch(ids, mask, types, target)


class ItemBatches:
    """Endless shuffled batches (epoch e in a permutation seeded by (seed, e)); state = k."""

    def __init__(self, items: Sequence[Item], batch_size: int, pad_id: int, seed: int) -> None:
        if not items:
            raise UserError("no training examples")
        self.items, self.pad_id, self.seed = list(items), pad_id, seed
        self.batch_size = min(batch_size, len(self.items))
        self.per_epoch, self.index = len(self.items) // self.batch_size, 0

    def __iter__(self) -> Iterator[TaskBatch]:
        while True:
            epoch, j = divmod(self.index, self.per_epoch)
            self.index += 1
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
            rows = order[j * self.batch_size: (j + 1) * self.batch_size]
            yield collate_items([self.items[i] for i in rows], self.pad_id)

    def state_dict(self) -> dict:
        return {"index": self.index, "n_items": len(self.items), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        if state.get("n_items") != len(self.items) or state.get("seed") != self.seed:
            raise UserError("the data stream state does not fit this data (other files?)")
        self.index = int(state["index"])


# ---- model, loss, evaluation -------------------------------------------------------------------
def make_head(cfg: FinetuneConfig, encoder: nn.Module, n_labels: int) -> nn.Module:
    """The task's head around ``encoder`` (pooling 'pooler' falls back to 'cls' without one)."""
    if cfg.task == "classify":
        pooling = cfg.pooling if getattr(encoder, "pooler", None) is not None else (
            "cls" if cfg.pooling == "pooler" else cfg.pooling)
        return SequenceClassifier(encoder, n_labels, pooling)
    if cfg.task == "tokens":
        return TokenClassifier(encoder, n_labels)
    return SpanExtractor(encoder)


def _forward(model: nn.Module, batch: TaskBatch) -> Tensor:
    return model(batch.ids, attention_mask=batch.attention_mask,
                 token_type_ids=batch.types).logits


def task_loss(task: str):
    """``loss_fn`` for :func:`fit`: summed cross-entropy and its count, per sequence
    (classify), per labelled token (tokens), or the mean of the start and end losses per
    question (qa, Devlin et al. 2019 section 4.2)."""
    def compute(model: nn.Module, batch: TaskBatch) -> tuple[Tensor, int]:
        return logits_loss(task, _forward(model, batch), batch.target)
    return compute


def logits_loss(task: str, logits: Tensor, target: Tensor) -> tuple[Tensor, int]:
    """See :func:`task_loss`."""
    logits = logits.float()
    if task == "classify":
        return F.cross_entropy(logits, target, reduction="sum"), len(target)
    if task == "tokens":
        return token_nll(logits, target)
    loss = (F.cross_entropy(logits[..., 0], target[:, 0], reduction="sum")
            + F.cross_entropy(logits[..., 1], target[:, 1], reduction="sum")) / 2
    return loss, len(target)


def _spans(logits: Tensor, part: list[Item], max_answer_len: int) -> list[str]:
    """The best answer text of each question of ``part``."""
    allowed = torch.zeros(logits.shape[:2], dtype=torch.bool, device=logits.device)
    for r, it in enumerate(part):
        allowed[r, it.extra["base"]: it.extra["base"] + len(it.extra["offsets"])] = True
    s, e, _ = best_spans(logits[..., 0], logits[..., 1], allowed, max_answer_len)
    out = []
    for r, it in enumerate(part):
        off, base = it.extra["offsets"], it.extra["base"]
        if not off:
            out.append("")
            continue
        out.append(it.extra["context"][off[int(s[r]) - base][0]: off[int(e[r]) - base][1]])
    return out


@torch.no_grad()
def score_items(model: nn.Module, cfg: FinetuneConfig, items: list[Item], pad_id: int
                ) -> dict[str, float]:
    """The task's metrics on ``items``: loss, accuracy and macro F1 (classify, tokens) or
    SQuAD exact match and F1 (qa). Eval mode is the caller's business."""
    preds, golds, loss, count = [], [], 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, len(items), cfg.batch_size):
        part = items[start: start + cfg.batch_size]
        batch = collate_items(part, pad_id).to(device)
        logits = _forward(model, batch).float()
        if cfg.task == "qa":
            preds += _spans(logits, part, cfg.max_answer_len)
            golds += [it.extra["answers"] for it in part]
            continue
        if cfg.task == "classify" or bool((batch.target != IGNORE).any()):
            part_loss, n = logits_loss(cfg.task, logits, batch.target)
            loss, count = loss + float(part_loss), count + n
        keep = batch.target != IGNORE
        preds += logits.argmax(-1)[keep].tolist()
        golds += batch.target[keep].tolist()
    if cfg.task == "qa":
        return squad_scores(preds, golds)
    return {"loss": loss / max(1, count), "accuracy": accuracy(preds, golds),
            "f1": macro_f1(preds, golds)}


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


def load_finetuned(run_dir: str | Path) -> tuple[nn.Module, Tokenizer, dict]:
    """A fine-tuned run's model (best checkpoint, eval mode), tokenizer and config record."""
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    if "model" not in record or "head" not in record:
        raise UserError(f"{run_dir} has no fine-tuned model yet")
    cfg = FinetuneConfig(task=record["head"]["task"], pooling=record["head"]["pooling"])
    encoder = build_family(record["model"]["family"], record["model"]["config"])
    model = make_head(cfg, encoder, max(1, len(record["head"]["labels"])))
    load_run_weights(run_dir, model)
    return model.eval(), Tokenizer.load(run_dir / "tokenizer.json"), record


def main(cfg: FinetuneConfig, recipe: str = "finetune") -> dict:
    """Fine-tune ``cfg.init`` with a ``cfg.task`` head on ``cfg.data``, then report."""
    if not cfg.init:
        raise UserError("set init=DIR: an attnkit bert-pretrain/distil run or a Hugging Face "
                        "BERT/RoBERTa/DistilBERT directory")
    pre, tok = load_bert(cfg.init)
    encoder = encoder_of(pre)
    if cfg.max_len > encoder.arch.max_tokens:
        raise UserError(f"max_len {cfg.max_len} exceeds the model's {encoder.arch.max_tokens}")
    train_records, val_records = load_split(cfg)
    labels = label_names(cfg.task, train_records, cfg.data)
    train_items = [it for it in encode(cfg, tok, train_records, labels, cfg.data.train)
                   if cfg.task != "qa" or it.target is not None]
    val_items = encode(cfg, tok, val_records, labels, cfg.data.valid or cfg.data.train)
    pad = tok.pad_id if tok.pad_id is not None else 0

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        model = make_head(cfg, encoder, max(1, len(labels)))
        if dist.is_main():
            if not (run_dir / "tokenizer.json").exists():
                tok.save(run_dir / "tokenizer.json")
            record = read_run(run_dir)
            record["model"] = {"family": family_name(encoder), "config": to_dict(encoder.cfg)}
            record["head"] = {"task": cfg.task, "labels": labels,
                              "pooling": getattr(model, "pooling", cfg.pooling)}
            write_json_atomic(run_dir / "config.json", record)
        return tok, model

    run_dir, tok, model = setup_run(recipe, cfg, create)
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
    model, tok, record = load_finetuned(run_dir)
    labels, pad = record["head"]["labels"], tok.pad_id if tok.pad_id is not None else 0
    if val_items is None:
        val_items = encode(cfg, tok, load_split(cfg)[1], labels, cfg.data.valid or "data")
    results = {"valid": score_items(model, cfg, val_items, pad)}
    if cfg.data.test:
        test = encode(cfg, tok, read_records(cfg.data.test), labels, cfg.data.test)
        results["test"] = score_items(model, cfg, test, pad)
    write_json_atomic(run_dir / "results.json", results)
    for name, scores in results.items():
        print(f"{name}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
    print(f"run directory: {run_dir}")
    return results


def evaluate(run_dir: Path, cfg: FinetuneConfig) -> dict:
    """`attnkit eval RUN`: validation (and test) scores of the best checkpoint."""
    return final_report(run_dir, cfg)


def defaults() -> FinetuneConfig:
    """BERT's fine-tuning settings (section 4, appendix A.3) shortened for a CPU: AdamW 5e-5
    (2e-5..5e-5 in the paper), linear decay after 10% warm-up, batch 16."""
    return FinetuneConfig(train=TrainConfig(
        steps=300, eval_every=50, save_every=50, log_every=10, best_metric="val_f1",
        best_mode="max", optim=OptimConfig(name="adamw", lr=5e-5, betas=(0.9, 0.999), eps=1e-8,
                                           weight_decay=0.01, schedule="linear",
                                           warmup_steps=30)))
