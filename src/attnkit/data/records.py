"""Labelled records (CSV / JSONL) -> encoded task items -> padded batches, for fine-tuning an
encoder on classification, token tagging or extractive question answering.

Devlin et al. 2019, section 4: inputs are ``[CLS] text [SEP] (text_pair [SEP])`` (classify),
words cut into sub-tokens with a word's tag on its first sub-token (tokens: the others are not
scored, as in Hugging Face's token-classification example), or ``[CLS] question [SEP] context
[SEP]`` with the answer as a token span inside the context (qa, SQuAD's layouts; the context
cut to fit, no sliding windows). :class:`ItemBatches` is the epoch-shuffled training stream
(:class:`attnkit.data.stream.EpochBatches`).
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from attnkit.data.stream import EpochBatches, RowBatch
from attnkit.data.text import read_text
from attnkit.errors import ConfigError, UserError
from attnkit.losses import IGNORE

TASKS = ("classify", "tokens", "qa")


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


def _single(tok: Any, text: str, pair: str | None, max_len: int) -> tuple[list, list]:
    if pair is not None:
        return tok.encode_pair(text, pair, max_len)
    ids = [tok.bos_id, *tok.encode(text)[: max_len - 2], tok.eos_id]
    return ids, [0] * len(ids)


def _indices(index: dict[str, int], values: list[str], at: str, what: str) -> list[int]:
    """The label indices of ``values``; one the training data lack is an error."""
    unknown = [v for v in values if v not in index]
    if unknown:
        raise UserError(f"{at}: {what} '{unknown[0]}' does not occur in the training data")
    return [index[v] for v in values]


def _classify_item(tok: Any, r: dict, names: FinetuneData, index: dict[str, int],
                   max_len: int, at: str) -> Item:
    label, = _indices(index, [str(_field(r, names.label, at))], at, "label")
    pair = r.get(names.text_pair) or None
    ids, types = _single(tok, str(_field(r, names.text, at)),
                         None if pair is None else str(pair), max_len)
    return Item(ids, types, label)


def _tokens_item(tok: Any, r: dict, names: FinetuneData, index: dict[str, int],
                 max_len: int, at: str) -> Item:
    """Each word's tag on its first piece; the other pieces and the specials are not scored."""
    words = _words(_field(r, names.tokens, at))
    tags = _words(_field(r, names.tags, at))
    if len(words) != len(tags) or not words:
        raise UserError(f"{at}: {len(words)} tokens but {len(tags)} tags")
    tag_ids = _indices(index, tags, at, "tag")
    enc = tok.backend.encode(words, is_pretokenized=True, add_special_tokens=False)
    ids, word_ids = enc.ids[: max_len - 2], enc.word_ids[: max_len - 2]
    target = [IGNORE] + [tag_ids[w] if w is not None and (j == 0 or word_ids[j - 1] != w)
                         else IGNORE for j, w in enumerate(word_ids)] + [IGNORE]
    return Item([tok.bos_id, *ids, tok.eos_id], [0] * (len(ids) + 2), target)


def _qa_item(tok: Any, r: dict, names: FinetuneData, index: dict[str, int], max_len: int,
             at: str) -> Item:
    """Question then context; the target is the first answer's token span (None when the
    context is cut before it ends)."""
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
    return Item(ids, types, span, {"offsets": offsets, "base": base, "context": context,
                                   "answers": [a for a, _ in answers]})


_ENCODERS = {"classify": _classify_item, "tokens": _tokens_item, "qa": _qa_item}


def label_names(task: str, records: list[dict], names: FinetuneData) -> list[str]:
    """The label (or tag) set of the training records, sorted."""
    if task == "classify":
        return sorted({str(_field(r, names.label, "training record")) for r in records})
    if task == "tokens":
        return sorted({t for r in records for t in _words(_field(r, names.tags,
                                                                 "training record"))})
    return []


def encode(task: str, tok: Any, records: list[dict], names: FinetuneData, labels: list[str],
           max_len: int, where: str) -> list[Item]:
    """The task's items of ``records`` (``tok`` is a Tokenizer; ``labels`` the label or tag
    set, unused for qa); errors name ``where`` and the record's number."""
    index = {name: i for i, name in enumerate(labels)}
    return [_ENCODERS[task](tok, r, names, index, max_len, f"{where} record {n}")
            for n, r in enumerate(records, 1)]


@dataclass
class TaskBatch(RowBatch):
    ids: Tensor              # (B, S)
    attention_mask: Tensor   # (B, S)
    types: Tensor            # (B, S)
    target: Tensor           # (B,) classes | (B, S) token labels | (B, 2) spans

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())

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


class ItemBatches(EpochBatches):
    """Endless shuffled batches of items (epoch e in a permutation seeded by (seed, e), the
    last partial batch dropped); the state is the batch number."""

    def __init__(self, items: Sequence[Item], batch_size: int, pad_id: int, seed: int) -> None:
        super().__init__(len(items), batch_size, seed)
        self.items, self.pad_id = list(items), pad_id

    def batch(self, k: int) -> TaskBatch:
        return collate_items([self.items[i] for i in self.rows(k)], self.pad_id)


def answer_texts(starts: Tensor, ends: Tensor, items: Sequence[Item]) -> list[str]:
    """The context text of each item's token span ``starts[r]..ends[r]`` (qa items)."""
    out = []
    for r, it in enumerate(items):
        off, base = it.extra["offsets"], it.extra["base"]
        if not off:
            out.append("")
            continue
        out.append(it.extra["context"][off[int(starts[r]) - base][0]: off[int(ends[r]) - base][1]])
    return out
