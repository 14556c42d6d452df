"""What the language-model recipes ("lm", "finetune-lm", "xl-lm") share: data, samples, report.

A run reads documents (a text file, JSONL through a template, or a folder), holds out the last
part, trains a decoder-only model on random windows of the token stream with :func:`fit`,
evaluates the held-out text (loss, perplexity, bits per character), prints samples at every
evaluation, keeps the best checkpoint by validation loss, and ends with ``results.json``.
The recipes themselves are :mod:`attnkit.recipes.lm_scratch` ("lm"),
:mod:`attnkit.recipes.finetune_lm` and :mod:`attnkit.recipes.xl_lm`.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from attnkit.data.lm import (
    LMData,
    LMWindows,
    encode_documents,
    eval_windows,
    logits_of,
    n_characters,
    read_documents,
    score,
    split_documents,
    truncate_documents,
)
from attnkit.errors import ConfigError, UserError
from attnkit.generation import GenerationConfig, generate
from attnkit.loading import load
from attnkit.losses import token_nll
from attnkit.models import names
from attnkit.rundir import RESULTS, SAMPLES, write_json_atomic
from attnkit.tokenizers import Tokenizer
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig, fit

SHAKESPEARE = Path("data/text/tinyshakespeare.txt")  # inside the shared data folder
METRICS = ("val_loss", "val_ppl", "val_bpc")


@dataclass(frozen=True)
class LMEvalConfig:
    batch_size: int = 32     # windows per evaluation batch
    max_chars: int = 0       # evaluations during training read the first max_chars (0 = all)
    stride: int = 0          # > 0: the final report adds a sliding-window evaluation

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.max_chars < 0 or self.stride < 0:
            raise ConfigError("eval.batch_size must be >= 1, eval.max_chars and eval.stride "
                              ">= 0")


@dataclass(frozen=True)
class SampleConfig:
    prompt: str = "\n"       # "" = start of a document (the EOS separator)
    n: int = 1               # samples printed at each evaluation and in the report (0 = none)
    max_new_tokens: int = 200
    temperature: float = 0.8  # 0 = greedy
    top_k: int = 0           # 0 = off
    top_p: float = 1.0       # 1 = off
    seed: int = 1337         # samples use their own generator: training randomness is untouched

    def __post_init__(self) -> None:
        if self.n < 0 or self.max_new_tokens < 1 or self.temperature < 0 or self.top_k < 0:
            raise ConfigError("sample.n >= 0, sample.max_new_tokens >= 1, sample.temperature "
                              ">= 0 and sample.top_k >= 0 are required")
        if not 0.0 < self.top_p <= 1.0:
            raise ConfigError(f"sample.top_p must be in (0, 1], got {self.top_p}")


@dataclass(frozen=True)
class LMRunConfig:
    """What both language-model recipes have."""

    data: LMData = field(default_factory=LMData)
    arch: dict = field(default_factory=dict)   # model overrides (lm: of the preset)
    block_size: int = 64     # training context (tokens per window)
    batch_size: int = 12     # windows per optimiser step (x train.accum_steps)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: LMEvalConfig = field(default_factory=LMEvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run_dir: str = ""        # default: runs/<recipe>-<time>; an existing run resumes

    def __post_init__(self) -> None:
        if self.block_size < 1 or self.batch_size < 1:
            raise ConfigError("block_size and batch_size must be >= 1")
        self.train.check_best_metric(METRICS)


# ---- data --------------------------------------------------------------------------------------
def default_train_path() -> str:
    """tinyshakespeare from the shared data folder beside the repository, if it is there."""
    repo = Path(__file__).resolve().parents[3]
    for shared in (Path("../shared"), repo.parent / "shared"):
        if (shared / SHAKESPEARE).is_file():
            return str((shared / SHAKESPEARE).resolve())
    return ""


def with_data_default(cfg: Any) -> Any:
    """``cfg`` with data.train set to the default text when it is empty (or a UserError)."""
    if cfg.data.train:
        return cfg
    path = default_train_path()
    if not path:
        raise UserError("set data.train=FILE (a text file, a .jsonl file or a folder of "
                        "documents)")
    return replace(cfg, data=replace(cfg.data, train=path))


def load_corpus(data: LMData) -> tuple[list[str], list[str]]:
    """Training and held-out documents."""
    if not data.train:
        raise UserError("set data.train=FILE (a text file, a .jsonl file or a folder)")
    docs = read_documents(data.train, data.pattern, data.template)
    if data.valid:
        return docs, read_documents(data.valid, data.pattern, data.template)
    return split_documents(docs, data.val_fraction)


# ---- sampling ----------------------------------------------------------------------------------
def _prompt_ids(tok: Tokenizer, prompt: str) -> list[int]:
    return tok.encode(prompt) if prompt else [tok.eos_id]


def _generation_config(cfg: SampleConfig, eos: int | None, seed: int) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=cfg.temperature > 0,
                            temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                            eos_id=eos, seed=seed)


def sample_texts(model: nn.Module, tok: Tokenizer, cfg: SampleConfig) -> list[str]:
    """``cfg.n`` continuations of ``cfg.prompt`` (prompt included), sample i seeded seed + i,
    by :func:`attnkit.generation.generate` (past a GPT-2's context the window slides; a
    Transformer-XL reads one token at a time after its memory)."""
    if not cfg.n:
        return []
    prompt = _prompt_ids(tok, cfg.prompt)
    rows = generate(model, [prompt] * cfg.n, _generation_config(cfg, tok.eos_id, cfg.seed))
    return [cfg.prompt + tok.decode([t for t in new if t != tok.eos_id]) for new in rows]


def show_samples(texts: list[str], run_dir: Path, step: int | None) -> None:
    """Print samples (above the progress bar) and append them to samples.txt."""
    from tqdm import tqdm

    head = f"---- samples at step {step}" if step is not None else "---- samples"
    body = "\n".join(f"{head} ({i + 1}/{len(texts)}) ----\n{t}" for i, t in enumerate(texts))
    tqdm.write(body)
    with open(run_dir / SAMPLES, "a", encoding="utf-8") as f:
        f.write(body + "\n")


# ---- training ----------------------------------------------------------------------------------
def loss_fn(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
    """Summed next-token NLL of an LMBatch and its number of targets."""
    return token_nll(logits_of(model, batch.ids), batch.targets)


def make_evaluate(tok: Tokenizer, val_docs: list[str], cfg: LMRunConfig, run_dir: Path,
                  windows: LMWindows) -> Callable[[nn.Module], dict[str, float]]:
    """Held-out loss / perplexity / bpc (the first eval.max_chars) and samples."""
    docs = truncate_documents(val_docs, cfg.eval.max_chars)
    batches = eval_windows(encode_documents(tok, docs), cfg.block_size, cfg.eval.batch_size)
    chars = n_characters(docs)

    def evaluate(model: nn.Module) -> dict[str, float]:
        model = dist.unwrap(model)
        result = score(model, batches, chars)
        if cfg.sample.n:
            step = windows.index // max(1, cfg.train.accum_steps)
            show_samples(sample_texts(model, tok, cfg.sample), run_dir, step)
        return {"val_loss": result.loss, "val_ppl": result.ppl, "val_bpc": result.bpc}
    return evaluate


def training_windows(cfg: LMRunConfig, tok: Tokenizer, train_docs: list[str]) -> LMWindows:
    """The training stream's random windows (a UserError, before any file is written, when the
    text is too short for one window)."""
    stream = encode_documents(tok, train_docs)
    return LMWindows(stream, cfg.block_size, cfg.batch_size, seed=cfg.train.seed)


def train_lm(run_dir: Path, cfg: LMRunConfig, tok: Tokenizer, model: nn.Module,
             windows: LMWindows, val_docs: list[str]) -> None:
    """Train ``model`` on ``windows`` with :func:`fit` (resumes an interrupted run)."""
    if dist.is_main():
        print(f"training tokens: {windows.n_tokens:,}; vocabulary {tok.vocab_size}; "
              f"parameters {sum(p.numel() for p in model.parameters()):,}", file=sys.stderr)
    fit(model, loss_fn, windows, cfg.train, run_dir,
        evaluate=make_evaluate(tok, val_docs, cfg, run_dir, windows))


def final_report(run_dir: Path, cfg: LMRunConfig, which: Literal["best", "latest"] = "best"
                 ) -> dict:
    """Score the whole held-out text with the best checkpoint, sample, write results.json."""
    run = load(run_dir, which, families=names("lm"), device=cfg.train.device)
    model, tok = run.model, run.require_tokenizer(run_dir)
    _, val_docs = load_corpus(cfg.data)
    stream, chars = encode_documents(tok, val_docs), n_characters(val_docs)
    start = time.perf_counter()
    results: dict[str, Any] = {"val": score(model, eval_windows(
        stream, cfg.block_size, cfg.eval.batch_size), chars).as_dict()}
    results["val"]["seconds"] = round(time.perf_counter() - start, 2)
    if cfg.eval.stride and cfg.eval.stride < cfg.block_size:
        results["val_sliding"] = {**score(model, eval_windows(
            stream, cfg.block_size, cfg.eval.batch_size, cfg.eval.stride), chars).as_dict(),
            "stride": cfg.eval.stride}
    if cfg.sample.n:
        results["samples"] = sample_texts(model, tok, cfg.sample)
        show_samples(results["samples"], run_dir, None)
    write_json_atomic(run_dir / RESULTS, results)
    for name in ("val", "val_sliding"):
        if name in results:
            r = results[name]
            print(f"{name}: loss {r['loss']:.4f}, perplexity {r['ppl']:.3f}, "
                  f"{r['bpc']:.4f} bits per character ({r['tokens']:,} tokens, "
                  f"{r['chars']:,} characters)")
    print(f"run directory: {run_dir}")
    return results
