"""Mathematics problems (Saxton et al. 2019, DeepMind's `mathematics-dataset`) as sequence to
sequence: the question's characters in, the answer's characters out, scored by exact match on
the interpolation and extrapolation test sets.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attnkit.data.math import extrapolate_names, math_problems
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
class MathData:
    modules: tuple[str, ...] = ("arithmetic__add_or_sub",)
    train_size: int = 200_000     # training problems per module
    eval_size: int = 1000         # problems per module in each test set
    difficulty: str = "mixed"     # easy / medium / hard / mixed training problems
    seed: int = 0
    cache_dir: str = ""           # default $ATTNKIT_CACHE or ~/.cache/attnkit

    def __post_init__(self) -> None:
        if not self.modules:
            raise ConfigError("data.modules must name at least one module")
        if self.train_size < 1 or self.eval_size < 1:
            raise ConfigError("data.train_size and data.eval_size must be >= 1")


@dataclass(frozen=True)
class MathConfig(Seq2SeqConfig):
    data: MathData = field(default_factory=MathData)


def task(data: MathData) -> Task:
    """Training problems and the interpolate/extrapolate test sets of every module."""
    cache = Path(data.cache_dir) if data.cache_dir else None
    train_pairs: list[tuple[str, str]] = []
    interpolate: list[tuple[str, str]] = []
    extrapolate: list[tuple[str, str]] = []
    for i, module in enumerate(data.modules):
        seed = data.seed + 1000 * i
        train_pairs += math_problems(module, "train", data.train_size, seed, data.difficulty,
                                     cache)
        interpolate += math_problems(module, "interpolate", data.eval_size, seed + 1,
                                     cache_dir=cache)
        if extrapolate_names(module):
            extrapolate += math_problems(module, "extrapolate", data.eval_size, seed + 2,
                                         cache_dir=cache)
    evals = {"interpolate": interpolate}
    if extrapolate:
        evals["extrapolate"] = extrapolate
    return Task(train_pairs, evals, "exact_match")


main, evaluate = entry_points("math", task)


def defaults() -> MathConfig:
    return MathConfig(tokenizer=TokenizerConfig(kind="char"),
                      decode=DecodeConfig(beam_size=1, alpha=0.0, max_len_a=0.0, max_len_b=32))


def demo_defaults() -> MathConfig:
    """`make demo`: add_or_sub on 2 CPU cores in about five minutes (BENCHMARKS.md)."""
    return MathConfig(
        preset="tiny",
        arch={"d_model": 128, "n_heads": 4, "n_encoder_layers": 2, "n_decoder_layers": 2,
              "d_ff": 512, "dropout": 0.0, "norm_first": True, "max_len": 256},
        tokenizer=TokenizerConfig(kind="char"),
        data=MathData(train_size=60_000, eval_size=500),
        batch_tokens=2048, label_smoothing=0.0, eval_examples=200,
        train=TrainConfig(steps=2400, eval_every=600, save_every=600, log_every=50,
                          optim=OptimConfig(lr=2e-3, warmup_steps=200,
                                            schedule="cosine")),
        decode=DecodeConfig(beam_size=1, alpha=0.0, max_len_a=0.0, max_len_b=32))
