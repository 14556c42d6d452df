"""Synthetic string tasks (copy, reverse, sort): the smallest check that a model can align."""

from __future__ import annotations

from dataclasses import dataclass, field

from attnkit.data.synthetic import synthetic_pairs
from attnkit.errors import ConfigError
from attnkit.recipes.seq2seq import (
    DecodeConfig,
    Seq2SeqConfig,
    Task,
    entry_points,
)
from attnkit.tokenizers import TokenizerConfig
from attnkit.train.loop import TrainConfig
from attnkit.train.optim import OptimConfig


@dataclass(frozen=True)
class CopyData:
    task: str = "copy"            # copy / reverse / sort
    train_size: int = 20_000
    eval_size: int = 500
    min_len: int = 1
    max_len: int = 20             # training lengths; "longer" tests max_len+1 .. 2*max_len
    alphabet: str = "0123456789"
    seed: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError("data.min_len must be in [1, data.max_len]")


@dataclass(frozen=True)
class CopyConfig(Seq2SeqConfig):
    data: CopyData = field(default_factory=CopyData)


def task(d: CopyData) -> Task:
    pairs = lambda n, lo, hi, seed: synthetic_pairs(d.task, n, lo, hi, seed, d.alphabet)
    return Task(pairs(d.train_size, d.min_len, d.max_len, d.seed),
                {"seen_lengths": pairs(d.eval_size, d.min_len, d.max_len, d.seed + 1),
                 "longer": pairs(d.eval_size, d.max_len + 1, 2 * d.max_len, d.seed + 2)},
                "exact_match")


main, evaluate = entry_points("copy", task)


def defaults() -> CopyConfig:
    return CopyConfig(
        preset="tiny", arch={"dropout": 0.0, "max_len": 128},
        tokenizer=TokenizerConfig(kind="char"), batch_tokens=2048, label_smoothing=0.0,
        eval_examples=100,
        train=TrainConfig(steps=1500, eval_every=500, save_every=500,
                          optim=OptimConfig(lr=1e-3, warmup_steps=200)),
        decode=DecodeConfig(beam_size=1, alpha=0.0, max_len_a=1.0, max_len_b=2))
