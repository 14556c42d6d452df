"""ntm-copy: a neural Turing machine on the copy task (Graves, Wayne & Danihelka 2014, sec. 4.1).

Sequences of ``data.min_len``..``data.max_len`` random ``data.width``-bit vectors, then a
delimiter, then blank steps while the machine writes the sequence back out; every batch holds
sequences of one length drawn uniformly. The loss is the binary cross-entropy of the output
bits. Reported: bit errors per sequence (outputs thresholded at 0.5) and the share of
sequences copied without error, per length, over the training lengths and at twice the
longest training length (the paper's generalisation test, fig. 4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from attnkit.data.algorithmic import TensorBatch, copy_examples
from attnkit.errors import ConfigError
from attnkit.loading import load
from attnkit.models.ntm import NTM, NTMConfig, bit_errors, copy_loss
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

METRICS = ("val_loss", "seen_bit_errors", "seen_exact")
FIXED = ("input_size", "output_size")  # model settings that follow from the data
NAMES = {"val_loss": "loss", "seen_bit_errors": "bit_errors", "seen_exact": "exact"}


@dataclass(frozen=True)
class CopyBitsData:
    width: int = 8                # bits per vector (the delimiter is one more input channel)
    min_len: int = 1              # training lengths: min_len..max_len (the paper: 1..20)
    max_len: int = 20
    eval_lengths: tuple[int, ...] = ()  # lengths reported beyond training; () = (2 * max_len,)
    eval_size: int = 100          # sequences per evaluated length
    seed: int = 0

    def __post_init__(self) -> None:
        if self.width < 1:
            raise ConfigError(f"data.width must be >= 1, got {self.width}")
        if not 1 <= self.min_len <= self.max_len:
            raise ConfigError("data.min_len must be in [1, data.max_len]")
        if any(n < 1 for n in self.eval_lengths) or self.eval_size < 1:
            raise ConfigError("data.eval_lengths and data.eval_size must be >= 1")

    @property
    def longer(self) -> tuple[int, ...]:
        return self.eval_lengths or (2 * self.max_len,)


@dataclass(frozen=True)
class NTMCopyConfig:
    arch: dict = field(default_factory=dict)  # NTMConfig fields (not input/output_size)
    data: CopyBitsData = field(default_factory=CopyBitsData)
    batch_size: int = 16          # sequences per batch
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch_size must be >= 1, got {self.batch_size}")
        ntm_config(self)
        self.train.check_best_metric(METRICS)


def ntm_config(cfg: NTMCopyConfig) -> NTMConfig:
    fixed = {"input_size": cfg.data.width + 1, "output_size": cfg.data.width}
    return model_config(NTMConfig, cfg.arch, fixed)


def _example(d: CopyBitsData) -> Example:
    return lambda gen, batch, n: copy_examples(gen, batch, n, d.width)


def loss_fn(model: nn.Module, batch: TensorBatch) -> tuple[torch.Tensor, int]:
    return copy_loss(model(batch.inputs).logits, batch.targets)


def measure(model: NTM, batch: TensorBatch) -> dict[str, float]:
    """Bit errors per sequence, share copied exactly, loss per bit."""
    batch = batch.to(next(model.parameters()).device)
    logits = model(batch.inputs).logits
    errors = bit_errors(logits, batch.targets).float()
    loss, n = copy_loss(logits, batch.targets)
    return {"bit_errors": errors.mean().item(), "exact": (errors == 0).float().mean().item(),
            "loss": loss.item() / n}


def main(cfg: NTMCopyConfig, recipe: str = "ntm-copy") -> dict:
    run_dir = train_by_length(recipe, cfg, ntm_config(cfg), NTM, _example(cfg.data), loss_fn,
                              measure, NAMES)
    return evaluate(run_dir, cfg) if dist.is_main() else {}


def evaluate(run_dir: Path, cfg: NTMCopyConfig) -> dict:
    """Bit errors per length over the training lengths and at the longer lengths."""
    model = load(run_dir, families=["ntm"], device=cfg.train.device).model
    d = cfg.data
    seen = range(d.min_len, d.max_len + 1)
    by_length = measure_sets(model, measure, eval_sets(_example(d), d, (*seen, *d.longer)))
    results = {"seen_lengths": mean_of([by_length[n] for n in seen])}
    results.update({f"length_{n}": by_length[n] for n in d.longer})
    results["by_length"] = {str(n): v for n, v in by_length.items()}
    return write_report(run_dir, results)


def defaults() -> NTMCopyConfig:
    return NTMCopyConfig(
        arch=arch_defaults(NTMConfig, FIXED), batch_size=16,
        train=TrainConfig(steps=3000, eval_every=500, save_every=500, clip_norm=10.0,
                          best_metric="val_loss",
                          optim=OptimConfig(lr=1e-3, warmup_steps=100, schedule="constant")))
