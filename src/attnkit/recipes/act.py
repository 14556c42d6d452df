"""act-parity: adaptive computation time on the parity task (Graves 2016, sec. 3.1).

Each example is one vector of ``data.size`` entries, 1..size of them set to +1 or -1; the
target is whether the number of +1 entries is odd. A tanh RNN cell (``hidden_size`` units)
ponders over the single input with ACT; a logistic output unit reads the mean-field state. The
loss is the binary cross-entropy plus ``tau`` times the ponder cost N + R. ``max_steps=1`` is
the network without ACT (one step, p = 1). Reported: accuracy, sequence error rate, and the
mean and largest number of ponder steps, on ``data.eval_size`` fixed examples.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.accel import device_of
from attnkit.data.algorithmic import GeneratedBatches, TensorBatch, fixed_batches, parity_examples
from attnkit.errors import ConfigError
from attnkit.loading import load
from attnkit.models.act import ParityACT, ParityModelConfig
from attnkit.nn.act import ponder_loss
from attnkit.recipes.algorithmic import setup_run, write_report
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig, fit
from attnkit.train.optim import OptimConfig

METRICS = ("val_loss", "accuracy", "ponder_steps")


@dataclass(frozen=True)
class ParityData:
    size: int = 64                # entries per vector
    eval_size: int = 2000         # fixed evaluation examples
    seed: int = 0

    def __post_init__(self) -> None:
        if self.size < 1 or self.eval_size < 1:
            raise ConfigError("data.size and data.eval_size must be >= 1")


@dataclass(frozen=True)
class ACTParityConfig:
    hidden_size: int = 128
    eps: float = 0.01
    max_steps: int = 100          # 1 = no ACT
    halt_bias: float = 1.0
    tau: float = 1e-3             # time penalty on the ponder cost
    data: ParityData = field(default_factory=ParityData)
    batch_size: int = 128
    train: TrainConfig = field(default_factory=TrainConfig)
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.batch_size < 1 or self.tau < 0:
            raise ConfigError("batch_size must be >= 1 and tau >= 0")
        model_cfg(self)
        self.train.check_best_metric(METRICS)


def model_cfg(cfg: ACTParityConfig) -> ParityModelConfig:
    return ParityModelConfig(cfg.data.size, cfg.hidden_size, cfg.eps, cfg.max_steps,
                             cfg.halt_bias)


def loss_fn(tau: float) -> Callable[[nn.Module, TensorBatch], tuple[Tensor, int]]:
    def compute(model: nn.Module, batch: TensorBatch) -> tuple[Tensor, int]:
        logits, cost, _ = model(batch.inputs)
        bce = F.binary_cross_entropy_with_logits(logits, batch.targets, reduction="sum")
        return bce + ponder_loss(cost, tau), len(batch)
    return compute


def measure(model: nn.Module, batch: TensorBatch) -> dict[str, float]:
    batch = batch.to(next(model.parameters()).device)
    logits, _, steps = model(batch.inputs)
    right = ((logits > 0).float() == batch.targets).float()
    loss = F.binary_cross_entropy_with_logits(logits, batch.targets)
    return {"val_loss": loss.item(), "accuracy": right.mean().item(),
            "ponder_steps": steps.mean().item(), "max_ponder_steps": steps.max().item()}


def _eval_batch(d: ParityData) -> TensorBatch:
    return fixed_batches(lambda g: parity_examples(g, d.eval_size, d.size), d.seed + 1, 1)[0]


def main(cfg: ACTParityConfig, recipe: str = "act-parity") -> dict:
    run_dir, model = setup_run(recipe, cfg, model_cfg(cfg), ParityACT)
    batches = GeneratedBatches(lambda g: parity_examples(g, cfg.batch_size, cfg.data.size),
                               seed=cfg.data.seed)
    held_out = _eval_batch(cfg.data)
    fit(model, loss_fn(cfg.tau), batches, cfg.train, run_dir,
        evaluate=lambda m: measure(dist.unwrap(m), held_out))
    return evaluate(run_dir, cfg) if dist.is_main() else {}


def evaluate(run_dir: Path, cfg: ACTParityConfig) -> dict:
    model = load(run_dir, families=["parity-act"], device=cfg.train.device).model
    with torch.no_grad():
        figures = measure(model, _eval_batch(cfg.data).to(device_of(model)))
    figures["sequence_error_rate"] = 1 - figures["accuracy"]
    return write_report(run_dir, {"held_out": figures})


def defaults() -> ACTParityConfig:
    return ACTParityConfig(
        train=TrainConfig(steps=5000, eval_every=1000, save_every=1000, clip_norm=1.0,
                          best_metric="val_loss",
                          optim=OptimConfig(lr=3e-3, warmup_steps=100, schedule="constant")))
