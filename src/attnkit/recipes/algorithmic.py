"""What the recipes on generated tensor data share (pointer-sort, ntm-copy, act-parity).

Their data are drawn afresh from a seeded generator (:mod:`attnkit.data.algorithmic`), their
models take a model config (not a tokenizer), and they report task figures per input length.
The run directory is every recipe's (:mod:`attnkit.recipes.run`):
config.json with the recipe, its config and the resolved model config, checkpoints,
metrics.jsonl, results.json.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.config import from_dict, to_dict
from attnkit.data.algorithmic import GeneratedBatches, TensorBatch, fixed_batches
from attnkit.errors import ConfigError
from attnkit.evaluation import eval_loop
from attnkit.recipes import run
from attnkit.rundir import RESULTS, write_json_atomic
from attnkit.train import distributed as dist
from attnkit.train.loop import LossFn, fit

Build = Callable[[Any], nn.Module]  # model config -> model


def model_config(cls: type, arch: dict, fixed: dict) -> Any:
    """The model config: ``arch`` overrides plus what the data fixes (which ``arch`` must not
    set); unknown keys get a suggestion."""
    clash = sorted(set(arch) & set(fixed))
    if clash:
        raise ConfigError(f"arch.{clash[0]} follows from the data settings; do not set it")
    return from_dict(cls, {**arch, **fixed}, prefix="arch.")


def arch_defaults(cls: type, fixed: tuple[str, ...], **changes: Any) -> dict:
    """A model config's defaults (with ``changes``) as an ``arch`` section, minus the fields
    the data fix, so that ``attnkit recipes --show`` lists every setting."""
    return {k: v for k, v in to_dict(cls(**changes)).items() if k not in fixed}


def setup_run(recipe: str, cfg: Any, model_cfg: Any, build: Build) -> tuple[Path, nn.Module]:
    """Run directory (rank 0 creates it, others follow) and the freshly initialised model,
    whose family and resolved config go into config.json under ``model``."""
    run_dir, _, model = run.setup_run(recipe, cfg, lambda _: (None, build(model_cfg)))
    return run_dir, model


Example = Callable[[torch.Generator, int, int], TensorBatch]  # (generator, batch, length)
Measure = Callable[[nn.Module, TensorBatch], dict[str, float]]  # model, batch -> figures


def draw(example: Example, d: Any, batch: int, length: int | None = None
         ) -> Callable[[torch.Generator], TensorBatch]:
    """``batch`` examples of one length: ``length``, or drawn uniformly from
    ``d.min_len..d.max_len`` (every training batch holds one length)."""
    def make(gen: torch.Generator) -> TensorBatch:
        n = length or int(torch.randint(d.min_len, d.max_len + 1, (1,), generator=gen))
        return example(gen, batch, n)
    return make


def eval_set(example: Example, d: Any, length: int) -> TensorBatch:
    """``d.eval_size`` examples of ``length`` (fixed by ``d.seed`` and the length)."""
    return fixed_batches(draw(example, d, d.eval_size, length),
                         d.seed + 1_000_003 * length + 1, 1)[0]


def eval_sets(example: Example, d: Any, lengths: Iterable[int]) -> dict[int, TensorBatch]:
    """The evaluation set of each length."""
    return {n: eval_set(example, d, n) for n in lengths}


@torch.no_grad()
def measure_sets(model: nn.Module, measure: Measure, sets: dict[int, TensorBatch]
                 ) -> dict[int, dict[str, float]]:
    """``measure`` on each length's set (a progress bar on a terminal when it is slow)."""
    return {n: measure(model, sets[n]) for n in eval_loop(list(sets), desc="lengths")}


def make_evaluate(measure: Measure, example: Example, d: Any, names: dict[str, str]
                  ) -> Callable[[nn.Module], dict[str, float]]:
    """Evaluation during training: the mean figures over the training lengths, reported as
    ``{name: figure}`` for each item of ``names``."""
    sets = eval_sets(example, d, range(d.min_len, d.max_len + 1))

    def evaluate(model: nn.Module) -> dict[str, float]:
        seen = mean_of(list(measure_sets(dist.unwrap(model), measure, sets).values()))
        return {name: seen[key] for name, key in names.items()}
    return evaluate


def train_by_length(recipe: str, cfg: Any, model_cfg: Any, build: Build, example: Example,
                    loss_fn: LossFn, measure: Measure, names: dict[str, str]) -> Path:
    """Set up the run and train on ``cfg.batch_size`` examples a batch, each batch of one
    length drawn from ``cfg.data``; evaluation during training is :func:`make_evaluate`'s."""
    run_dir, model = setup_run(recipe, cfg, model_cfg, build)
    batches = GeneratedBatches(draw(example, cfg.data, cfg.batch_size), seed=cfg.data.seed)
    fit(model, loss_fn, batches, cfg.train, run_dir,
        evaluate=make_evaluate(measure, example, cfg.data, names))
    return run_dir


def mean_of(groups: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of figures measured on equally sized groups."""
    return {k: sum(g[k] for g in groups) / len(groups) for k in groups[0]}


def _line(figures: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in figures.items())


def write_report(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Save results.json and print one line per evaluation set."""
    write_json_atomic(run_dir / RESULTS, results)
    for name, figures in results.items():
        if isinstance(figures, dict) and figures and all(isinstance(v, dict)
                                                         for v in figures.values()):
            for sub, inner in figures.items():
                print(f"{name} {sub}: " + _line(inner))
        else:
            print(f"{name}: " + (_line(figures) if isinstance(figures, dict) else str(figures)))
    print(f"run directory: {run_dir}")
    return results
