"""Language-model data: documents -> one token stream, random training windows, held-out scoring.

Documents come from a text file, a JSONL file filled into a prompt template, or a folder of
such files. They become one stream ``EOS d1 EOS d2 EOS ... dn``: every document starts after
an EOS (the "document separator" GPT-2 uses, ``<|endoftext|>``), so the first token of the
held-out text is predicted too and a sampled continuation of ``EOS`` starts a new document.

- Training: :class:`LMWindows` draws ``batch_size`` random contiguous windows of
  ``block_size + 1`` tokens (inputs are the first ``block_size``, targets the last), as nanoGPT
  does; batch ``k`` is a pure function of ``(seed, k)``, so the stream resumes bitwise from its
  :meth:`LMWindows.state_dict`.
- Evaluation: :func:`eval_windows` covers the held-out stream once, in non-overlapping windows
  or in sliding windows with a stride (every target scored exactly once, with at least
  ``block_size - stride`` tokens of context after the first window); :func:`score` sums the
  negative log-likelihood and gives per-token loss, perplexity ``exp(loss)`` and bits per
  character ``total nats / (ln 2 * characters)``, which is comparable across tokenizers
  (char, BPE) because it counts the characters of the held-out text, not its tokens.

Nothing here knows a model family: :func:`score` takes any ``forward(ids) -> logits``.
"""

from __future__ import annotations

import json
import string
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from attnkit.data.stream import BatchStream, RowBatch
from attnkit.data.text import read_text
from attnkit.errors import ConfigError, UserError
from attnkit.evaluation import NLLScore, eval_loop
from attnkit.losses import IGNORE, token_nll

# ---- documents ---------------------------------------------------------------------------------

def check_template(template: str) -> list[str]:
    """The field names of a ``str.format`` template (``"Question: {question}"``)."""
    try:
        names = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as err:
        raise UserError(f"invalid template {template!r}: {err}") from None
    if any(not n.isidentifier() for n in names):
        raise UserError(f"template fields must be plain names like {{question}}: {template!r}")
    return names


def _render(value: Any) -> str:
    """A JSON value as template text: lists become ``(A) x (B) y``, mappings ``(k) v``."""
    if isinstance(value, list):
        value = {chr(ord("A") + i): v for i, v in enumerate(value)}
    if isinstance(value, dict):
        return " ".join(f"({k}) {_render(v)}" for k, v in value.items())
    return str(value)


@dataclass(frozen=True)
class LMData:
    train: str = ""          # a text file, a .jsonl file or a folder of documents
    valid: str = ""          # held-out text (same forms); "" = the last val_fraction of train
    val_fraction: float = 0.1
    pattern: str = "*.txt"   # the files of a folder that are documents (e.g. "*.jsonl")
    template: str = ""       # JSONL records -> text, e.g. "Question: {question}\nAnswer: {answer}"

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"data.val_fraction must be in (0, 1), got {self.val_fraction}")
        if self.template:
            try:
                check_template(self.template)
            except UserError as err:
                raise ConfigError(f"data.template: {err}") from None


def read_jsonl(path: str | Path, template: str) -> list[str]:
    """One document per JSON line of ``path``: ``template`` filled from the record's fields."""
    if not template:
        raise UserError(f"{path} is JSONL: set data.template (e.g. "
                        "'Question: {question}\\nAnswer: {answer}') to turn records into text")
    names = check_template(template)
    docs = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise UserError(f"{path} line {n} is not valid JSON: {err.msg}") from None
        if not isinstance(record, dict):
            raise UserError(f"{path} line {n} is not a JSON object")
        missing = [k for k in names if k not in record]
        if missing:
            raise UserError(f"{path} line {n} has no field '{missing[0]}' for the template "
                            f"(fields: {', '.join(record) or 'none'})")
        docs.append(template.format_map({k: _render(record[k]) for k in names}))
    if not docs:
        raise UserError(f"{path} holds no records")
    return docs


def read_documents(path: str | Path, pattern: str = "*.txt", template: str = "") -> list[str]:
    """The documents of a text file (one), a ``.jsonl`` file (one per record through
    ``template``) or a folder (its files matching ``pattern``, recursively, in sorted order)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"file or folder not found: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob(pattern)
                       if p.is_file() and not any(part.startswith(".") for part in p.parts))
        if not files:
            raise UserError(f"no files matching '{pattern}' in {path} (set data.pattern)")
        return [doc for f in files for doc in read_documents(f, pattern, template)]
    if path.name.endswith((".jsonl", ".jsonl.gz")):
        return read_jsonl(path, template)
    return [read_text(path)]


def split_documents(docs: Sequence[str], fraction: float) -> tuple[list[str], list[str]]:
    """Hold out the last ``fraction``: of the characters of a single document (nanoGPT's cut),
    or of the documents (at least one, and at least one left for training)."""
    if not 0.0 < fraction < 1.0:
        raise UserError(f"the held-out fraction must be in (0, 1), got {fraction}")
    docs = list(docs)
    if len(docs) == 1:
        text = docs[0]
        cut = int(len(text) * (1.0 - fraction))
        if cut < 1 or cut >= len(text):
            raise UserError(f"the text ({len(text)} characters) is too short to hold out "
                            f"{fraction:g} of it")
        return [text[:cut]], [text[cut:]]
    k = min(len(docs) - 1, max(1, round(len(docs) * fraction)))
    return docs[:-k], docs[-k:]


def truncate_documents(docs: Sequence[str], max_chars: int) -> list[str]:
    """The leading documents holding at most ``max_chars`` characters (0 = all), the last cut."""
    if max_chars <= 0:
        return list(docs)
    out, left = [], max_chars
    for doc in docs:
        if left <= 0:
            break
        out.append(doc[:left])
        left -= len(doc) + 1  # + the separator
    return out


def n_characters(docs: Sequence[str]) -> int:
    """Characters the stream of ``docs`` stands for: the texts plus one per separator between
    documents (each predicted EOS stands for one character, like a newline)."""
    return sum(len(d) for d in docs) + max(0, len(docs) - 1)


def encode_documents(tok: Any, docs: Sequence[str]) -> Tensor:
    """The stream ``EOS d1 EOS d2 ... dn`` as a 1-D int64 tensor (``tok`` is a Tokenizer)."""
    eos = tok.eos_id
    if eos is None:
        raise UserError("the tokenizer has no end-of-text token to separate documents")
    encoded = tok.encode_batch(list(docs)) if len(docs) > 1 else [tok.encode(docs[0])]
    out: list[int] = []
    for ids in encoded:
        out.append(eos)
        out.extend(ids)
    return torch.tensor(out, dtype=torch.int64)


def text_chunks(docs: Sequence[str], size: int = 1 << 16) -> Iterator[str]:
    """Documents cut into pieces of at most ``size`` characters (newlines kept), for training
    a tokenizer on large text without one huge string."""
    for doc in docs:
        for start in range(0, len(doc), size):
            yield doc[start: start + size]


# ---- batches -----------------------------------------------------------------------------------

@dataclass
class LMBatch(RowBatch):
    """Inputs and next-token targets; targets equal to :data:`IGNORE` are not scored."""

    ids: Tensor  # (B, T) int64
    targets: Tensor  # (B, T) int64

    @property
    def n_tokens(self) -> int:
        """Number of scored targets (the loss normaliser)."""
        return int((self.targets != IGNORE).sum())


class LMWindows(BatchStream):
    """Endless stream of :class:`LMBatch` of ``batch_size`` random windows of the token stream.

    Window offsets of batch ``k`` are drawn uniformly from ``[0, N - block_size - 1]`` by a
    generator seeded with ``(seed, k)``; the state is just ``k``
    (:class:`attnkit.data.stream.BatchStream`), so a fresh object after
    :meth:`load_state_dict` continues bitwise where the saved one stopped.
    """

    def __init__(self, stream: Tensor, block_size: int, batch_size: int, seed: int = 0) -> None:
        super().__init__()
        if block_size < 1 or batch_size < 1:
            raise UserError(f"block_size and batch_size must be >= 1, got {block_size} and "
                            f"{batch_size}")
        if stream.ndim != 1 or len(stream) < block_size + 1:
            raise UserError(f"the training text has {len(stream)} tokens; a window needs "
                            f"block_size + 1 = {block_size + 1} (lower block_size)")
        self.stream = stream.to(torch.int32 if int(stream.max()) < 2**31 else torch.int64)
        self.block_size, self.batch_size, self.seed = block_size, batch_size, seed
        self._span = torch.arange(block_size + 1)

    @property
    def n_tokens(self) -> int:
        """Length of the token stream."""
        return len(self.stream)

    def batch(self, k: int) -> LMBatch:
        """Batch number ``k`` (deterministic)."""
        rng = np.random.default_rng([self.seed, k])
        starts = rng.integers(0, len(self.stream) - self.block_size, size=self.batch_size)
        windows = self.stream[torch.from_numpy(starts)[:, None] + self._span].long()
        return LMBatch(windows[:, :-1].contiguous(), windows[:, 1:].contiguous())

    def fingerprint(self) -> dict:
        return {"seed": self.seed, "n_tokens": self.n_tokens, "block_size": self.block_size,
                "batch_size": self.batch_size}


def eval_windows(stream: Tensor, block_size: int, batch_size: int, stride: int = 0,
                 pad_id: int = 0) -> list[LMBatch]:
    """Batches of windows covering targets ``stream[1:]`` exactly once, in order.

    ``stride`` 0 (or >= ``block_size``): non-overlapping windows. Otherwise windows start every
    ``stride`` tokens and score only the targets the previous window did not, so each target
    after the first window sees at least ``block_size - stride`` tokens of context (the
    sliding-window evaluation of e.g. Hugging Face's perplexity guide). Rows shorter than the
    batch's longest are padded on the right (inputs ``pad_id``, targets :data:`IGNORE`).
    """
    if block_size < 1 or batch_size < 1 or stride < 0:
        raise UserError("block_size and batch_size must be >= 1 and stride >= 0")
    n = len(stream)
    if n < 2:
        raise UserError("the held-out text is empty")
    step = block_size if stride == 0 or stride >= block_size else stride
    rows: list[tuple[Tensor, Tensor]] = []
    scored, begin = 0, 0  # scored: targets up to this token index are done
    while scored < n - 1:
        end = min(begin + block_size, n - 1)
        targets = stream[begin + 1: end + 1].clone()
        targets[: max(0, scored - begin)] = IGNORE
        rows.append((stream[begin:end], targets))
        scored, begin = end, begin + step
    batches = []
    for i in range(0, len(rows), batch_size):
        part = rows[i: i + batch_size]
        width = max(len(x) for x, _ in part)
        ids = torch.full((len(part), width), pad_id, dtype=torch.int64)
        tgt = torch.full((len(part), width), IGNORE, dtype=torch.int64)
        for r, (x, y) in enumerate(part):
            ids[r, : len(x)], tgt[r, : len(y)] = x, y
        batches.append(LMBatch(ids, tgt))
    return batches


# ---- scoring -----------------------------------------------------------------------------------

def logits_of(model: nn.Module, ids: Tensor) -> Tensor:
    """``model(ids)`` as logits (B, T, V): a tensor, or an output object with ``.logits``."""
    out = model(ids)
    return out if isinstance(out, Tensor) else out.logits


def score(forward: Callable[[Tensor], Tensor] | nn.Module, batches: Sequence[LMBatch],
          n_chars: int, device: torch.device | str | None = None) -> NLLScore:
    """Sum the NLL of every scored target of ``batches`` (from :func:`eval_windows`).

    ``forward(ids) -> logits (B, T, V)``; a module is called through :func:`logits_of`. The sum
    is accumulated in float64. No gradients are kept; modes (eval/train) are the caller's.
    """
    fn = (lambda ids: logits_of(forward, ids)) if isinstance(forward, nn.Module) else forward
    if device is None and isinstance(forward, nn.Module):
        device = next((p.device for p in forward.parameters()), None)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in eval_loop(batches, device):
            loss, n = token_nll(fn(batch.ids), batch.targets)
            total, count = total + float(loss), count + n  # a Python float sum: MPS has no float64
    return NLLScore(total, count, n_chars)
