"""What every sequence-to-sequence recipe (math, translate, copy) shares, in one tested place.

A recipe supplies string pairs for training and named evaluation sets plus a metric; this
module turns them into a run: the run directory, the tokenizer, the model, the loss, the
trainer, decoding and the final report. Recipes stay short and cannot drift apart.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from attnkit.data.batching import TokenBatches, eval_batches
from attnkit.decoding import beam_search, greedy_search
from attnkit.errors import ConfigError, UserError
from attnkit.evaluation import METRICS, eval_loop, perplexity
from attnkit.loading import load
from attnkit.losses import label_smoothed_nll
from attnkit.models import build_seq2seq, check_seq2seq
from attnkit.recipes.run import setup_run
from attnkit.rundir import RESULTS, TOKENIZER, write_json_atomic
from attnkit.tokenizers import (
    Tokenizer,
    TokenizerConfig,
    check_specials,
    load_tokenizer_path,
    resolve_tokenizer,
)
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig, fit

Pairs = list[tuple[str, str]]
NEEDS = ("standard",)  # batching pads with id 0 and adds BOS 1 / EOS 2 (data.batching)


@dataclass(frozen=True)
class DecodeConfig:
    method: Literal["beam", "greedy"] = "beam"
    beam_size: int = 4
    alpha: float = 0.6            # GNMT length penalty (Wu et al. 2016); 0 = none
    max_len_a: float = 1.5        # output length limit = a * source length + b tokens
    max_len_b: int = 10
    batch_tokens: int = 8000      # source tokens per decoding batch

    def __post_init__(self) -> None:
        if self.beam_size < 1:
            raise ConfigError(f"decode.beam_size must be >= 1, got {self.beam_size}")
        if self.alpha < 0:
            raise ConfigError(f"decode.alpha must be >= 0, got {self.alpha}")


@dataclass(frozen=True)
class Seq2SeqConfig:
    """The fields every sequence-to-sequence recipe has; recipes add a ``data`` section."""

    model: str = "transformer"    # model family
    preset: str = "small"         # the family's preset
    arch: dict = field(default_factory=dict)   # overrides of the preset (e.g. d_model)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    batch_tokens: int = 4096      # padded target/source positions per batch
    label_smoothing: float = 0.1  # Vaswani et al. 2017, section 5.4
    train: TrainConfig = field(default_factory=TrainConfig)
    decode: DecodeConfig = field(default_factory=DecodeConfig)
    eval_examples: int = 500      # examples decoded (greedy) at each evaluation; 0 = loss only
    run_dir: str = ""             # default: runs/<recipe>-<time>; an existing run resumes

    def __post_init__(self) -> None:
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("label_smoothing must be in [0, 1)")
        if self.batch_tokens < 1:
            raise ConfigError(f"batch_tokens must be >= 1, got {self.batch_tokens}")
        if self.eval_examples < 0:
            raise ConfigError(f"eval_examples must be >= 0, got {self.eval_examples}")
        check_seq2seq(self.model, self.preset, self.arch)


@dataclass
class Task:
    """A recipe's data: training pairs, named evaluation sets (the first one is watched during
    training) and the metric's name in :data:`attnkit.evaluation.METRICS`."""

    train: Pairs
    evals: dict[str, Pairs]
    metric: str


# ---- training ----------------------------------------------------------------------------------
def encode_pairs(tok: Tokenizer, pairs: Pairs, max_len: int) -> tuple[list, int]:
    """Token-id pairs, dropping those that do not fit the model (count returned)."""
    src, tgt = tok.encode_batch([s for s, _ in pairs]), tok.encode_batch([t for _, t in pairs])
    kept = [(s, t) for s, t in zip(src, tgt, strict=True)
            if 0 < len(s) <= max_len and len(t) + 1 <= max_len]
    return kept, len(pairs) - len(kept)


def loss_fn(epsilon: float) -> Callable:
    """Label-smoothed token loss of a Seq2SeqBatch: (sum, number of target tokens)."""
    def compute(model: nn.Module, batch) -> tuple[torch.Tensor, int]:
        return label_smoothed_nll(model(batch.src, batch.tgt_in).logits, batch.tgt_out, epsilon)
    return compute


def decode_texts(model: nn.Module, tok: Tokenizer, sources: Sequence[str], cfg: DecodeConfig,
                 method: str | None = None) -> list[str]:
    """Decode ``sources`` in length-sorted batches; outputs in the input order."""
    ids = tok.encode_batch(list(sources))
    limit = model.cfg.max_len
    too_long = [i for i, s in enumerate(ids) if len(s) > limit]
    if too_long:
        raise UserError(f"input {too_long[0] + 1} has {len(ids[too_long[0]])} tokens; the "
                        f"model's maximum is {limit}")
    outputs: list[str] = [""] * len(ids)
    pairs = [(s if s else [tok.unk_id], []) for s in ids]
    device = next(model.parameters()).device
    for batch in eval_loop(eval_batches(pairs, cfg.batch_tokens), device, desc="decoding"):
        src_lens = (batch.src != tok.pad_id).sum(1).tolist()
        max_len = [min(limit, int(cfg.max_len_a * n + cfg.max_len_b)) for n in src_lens]
        if (method or cfg.method) == "greedy":
            hyps = greedy_search(model, batch.src, max_len)
        else:
            hyps = [h[0].tokens for h in beam_search(model, batch.src, max_len, cfg.beam_size,
                                                     cfg.alpha)]
        for row, out in zip(batch.index.tolist(), hyps, strict=True):
            outputs[row] = tok.decode(out)
    return outputs


def make_evaluate(tok: Tokenizer, task: Task, cfg: Seq2SeqConfig, max_len: int) -> Callable:
    """Validation loss and perplexity on the first eval set, and its metric on a sample."""
    name, pairs = next(iter(task.evals.items()))
    encoded, _ = encode_pairs(tok, pairs, max_len)
    batches = eval_batches(encoded, cfg.batch_tokens)
    sample = pairs[: cfg.eval_examples]

    def evaluate(model: nn.Module) -> dict[str, float]:
        model = dist.unwrap(model)
        total, n = 0.0, 0
        for batch in eval_loop(batches, next(model.parameters()).device):
            loss, count = label_smoothed_nll(model(batch.src, batch.tgt_in).logits,
                                             batch.tgt_out, 0.0)
            total, n = total + loss.item(), n + count
        metrics = {"val_loss": total / max(1, n), "val_ppl": perplexity(total, n)}
        if sample:
            hyps = decode_texts(model, tok, [s for s, _ in sample], cfg.decode, "greedy")
            metrics.update({f"{name}_{k}": v for k, v in
                            METRICS[task.metric](hyps, [t for _, t in sample]).items()})
        return metrics
    return evaluate


def metric_names(cfg: Seq2SeqConfig, task: Task) -> list[str]:
    """The names :func:`make_evaluate` reports (candidates for ``train.best_metric``)."""
    names = ["val_loss", "val_ppl"]
    if cfg.eval_examples:
        first = next(iter(task.evals))
        names += [f"{first}_{k}" for k in METRICS[task.metric](["x"], ["x"])]
    return names


def check_before_run(cfg: Seq2SeqConfig, task: Task) -> None:
    """Refuse settings that would fail later, before the run directory exists."""
    if not task.evals or not next(iter(task.evals.values())):
        raise UserError("the recipe produced no evaluation examples")
    names = metric_names(cfg, task)
    cfg.train.check_best_metric(names)
    if cfg.tokenizer.path:
        check_specials(load_tokenizer_path(cfg.tokenizer.path), NEEDS, cfg.tokenizer.path)


def _setup(recipe: str, cfg: Seq2SeqConfig, task: Task) -> tuple[Path, Tokenizer, nn.Module]:
    """Run directory, tokenizer and model; under torchrun rank 0 creates, the others read."""
    check_before_run(cfg, task)

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        tok = resolve_tokenizer(cfg.tokenizer, lambda: [x for p in task.train for x in p],
                                run_dir, NEEDS)
        if not (run_dir / TOKENIZER).exists():
            tok.save(run_dir / TOKENIZER)
        return tok, build_seq2seq(cfg.model, cfg.preset, cfg.arch, tok.vocab_size)[0]

    return setup_run(recipe, cfg, create)


def train(recipe: str, cfg: Seq2SeqConfig, task: Task) -> Path:
    """Train a model on ``task``; returns the run directory (resumes an interrupted run)."""
    run_dir, tok, model = _setup(recipe, cfg, task)
    max_len = model.cfg.max_len
    pairs, dropped = encode_pairs(tok, task.train, max_len)
    if not pairs:
        raise UserError("no training pair fits the model (empty or too long)")
    if dropped and dist.is_main():
        print(f"skipped {dropped} training pairs that are empty or longer than {max_len} "
              "tokens", file=sys.stderr)
    batches = TokenBatches(pairs, cfg.batch_tokens, seed=cfg.train.seed)
    fit(model, loss_fn(cfg.label_smoothing), batches, cfg.train, run_dir,
        evaluate=make_evaluate(tok, task, cfg, max_len))
    return run_dir


def train_and_report(recipe: str, cfg: Seq2SeqConfig, task: Task) -> dict:
    """What a recipe's main does: train, then decode the test sets (on rank 0)."""
    run_dir = train(recipe, cfg, task)
    return final_report(run_dir, cfg, task) if dist.is_main() else {}


def entry_points(name: str, task: Callable[[Any], Task]
                 ) -> tuple[Callable[..., dict], Callable[[Path, Any], dict]]:
    """A seq2seq recipe's ``main(cfg, recipe)`` and ``evaluate(run_dir, cfg)``, given how it
    builds its :class:`Task` from ``cfg.data``."""
    def main(cfg: Seq2SeqConfig, recipe: str = name) -> dict:
        return train_and_report(recipe, cfg, task(cfg.data))

    def evaluate(run_dir: Path, cfg: Seq2SeqConfig) -> dict:
        return final_report(run_dir, cfg, task(cfg.data))
    return main, evaluate


def final_report(run_dir: Path, cfg: Seq2SeqConfig, task: Task, samples: int = 5) -> dict:
    """Decode every evaluation set with the configured search, print and save the results."""
    run = load(run_dir, families=[cfg.model])
    model, tok = run.model, run.require_tokenizer(run_dir)
    results, lines = {}, []
    for name, pairs in task.evals.items():
        start = time.perf_counter()
        hyps = decode_texts(model, tok, [s for s, _ in pairs], cfg.decode)
        scores = METRICS[task.metric](hyps, [t for _, t in pairs])
        results[name] = {**scores, "examples": len(pairs),
                         "decode_seconds": round(time.perf_counter() - start, 2)}
        lines.append(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in scores.items())
                     + f" ({len(pairs)} examples)")
        for (src, ref), hyp in list(zip(pairs, hyps, strict=True))[:samples]:
            lines.append(f"  input: {src}\n  reference: {ref}\n  output: {hyp}"
                         + ("" if hyp.strip() == ref.strip() else "   (wrong)"))
    write_json_atomic(run_dir / RESULTS, results)
    print("\n".join(lines))
    print(f"run directory: {run_dir}")
    return results
