"""pointer-sort: a pointer network (Vinyals et al. 2015) learns to sort lists of numbers.

Lists of ``data.min_len``..``data.max_len`` floats in [0, 1) (as in Vinyals, Bengio & Kudlur
2016, sec. 4.3) or integers in [0, data.max_value); every batch holds lists of one length drawn
uniformly. The target is the input positions in sorted order; the loss is the negative
log-likelihood of each pointer. Reported per length, from ``min_len`` to ``longest_eval``
(default twice ``max_len``): exact-sort accuracy (the whole list right) and per-position
accuracy, with greedy decoding that never points twice at one position and, for comparison,
unconstrained greedy decoding (``*_free``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn

from attnkit.data.algorithmic import TensorBatch, sort_examples
from attnkit.errors import ConfigError
from attnkit.loading import load
from attnkit.models.pointer import (
    PointerConfig,
    PointerNet,
    pointer_loss,
    sort_accuracy,
)
from attnkit.recipes.algorithmic import (
    Example,
    arch_defaults,
    eval_sets,
    mean_of,
    measure_sets,
    model_config,
    train_by_length,
    write_report,
)
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig
from attnkit.train.optim import OptimConfig

METRICS = ("val_loss", "seen_exact", "seen_per_position")
FIXED = ("input_kind", "n_values")  # model settings that follow from the data
NAMES = {"val_loss": "loss", "seen_exact": "exact", "seen_per_position": "per_position"}


@dataclass(frozen=True)
class SortData:
    kind: Literal["float", "int"] = "float"
    max_value: int = 100          # integers are drawn from [0, max_value)
    min_len: int = 5              # training lengths: min_len..max_len
    max_len: int = 10
    longest_eval: int = 0         # evaluated lengths: min_len..longest_eval; 0 = 2 * max_len
    eval_size: int = 500          # lists per evaluated length
    seed: int = 0

    def __post_init__(self) -> None:
        if self.kind not in ("float", "int"):
            raise ConfigError(f"data.kind must be 'float' or 'int', got {self.kind!r}")
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError("data.min_len must be in [1, data.max_len]")
        if self.longest_eval and self.longest_eval < self.max_len:
            raise ConfigError("data.longest_eval must be 0 or >= data.max_len")
        if self.eval_size < 1 or self.max_value < 1:
            raise ConfigError("data.eval_size and data.max_value must be >= 1")

    @property
    def longest(self) -> int:
        return self.longest_eval or 2 * self.max_len


@dataclass(frozen=True)
class PointerSortConfig:
    arch: dict = field(default_factory=dict)  # PointerConfig fields (not input_kind, n_values)
    data: SortData = field(default_factory=SortData)
    batch_size: int = 128         # lists per batch
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        pointer_config(self)
        self.train.check_best_metric(METRICS)


def pointer_config(cfg: PointerSortConfig) -> PointerConfig:
    d = cfg.data
    fixed = {"input_kind": d.kind, "n_values": d.max_value if d.kind == "int" else 0}
    return model_config(PointerConfig, cfg.arch, fixed)


def _example(d: SortData) -> Example:
    return lambda gen, batch, n: sort_examples(gen, batch, n, d.kind, d.max_value)


def loss_fn(model: nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, int]:
    return pointer_loss(model(batch.inputs, batch.targets), batch.targets)


def measure(model: PointerNet, batch: TensorBatch) -> dict[str, float]:
    """Exact and per-position accuracy, constrained and free greedy decoding, and the loss."""
    batch = batch.to(next(model.parameters()).device)
    loss, n = pointer_loss(model(batch.inputs, batch.targets), batch.targets)
    masked = sort_accuracy(batch.inputs, model.greedy(batch.inputs, mask_chosen=True))
    free = sort_accuracy(batch.inputs, model.greedy(batch.inputs, mask_chosen=False))
    return {**masked, **{f"{k}_free": v for k, v in free.items()}, "loss": loss.item() / n}


def main(cfg: PointerSortConfig, recipe: str = "pointer-sort") -> dict:
    run_dir = train_by_length(recipe, cfg, pointer_config(cfg), PointerNet, _example(cfg.data),
                              loss_fn, measure, NAMES)
    return evaluate(run_dir, cfg) if dist.is_main() else {}


def evaluate(run_dir: Path, cfg: PointerSortConfig) -> dict:
    """Accuracy per length, then over the training lengths and over the longer ones."""
    model = load(run_dir, families=["pointer"], device=cfg.train.device).model
    d = cfg.data
    by_length = measure_sets(model, measure,
                             eval_sets(_example(d), d, range(d.min_len, d.longest + 1)))
    longer = [by_length[n] for n in by_length if n > d.max_len]
    results = {"seen_lengths": mean_of([by_length[n] for n in by_length if n <= d.max_len])}
    if longer:
        results["longer"] = mean_of(longer)
    results["by_length"] = {str(n): v for n, v in by_length.items()}
    return write_report(run_dir, results)


def defaults() -> PointerSortConfig:
    return PointerSortConfig(
        arch=arch_defaults(PointerConfig, FIXED, d_model=128), batch_size=128,
        train=TrainConfig(steps=2000, eval_every=500, save_every=500, clip_norm=2.0,
                          best_metric="val_loss",
                          optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="cosine")))
