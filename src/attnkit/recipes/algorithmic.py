"""What the recipes on generated tensor data share (pointer-sort, ntm-copy, act-parity).

Their data are drawn afresh from a seeded generator (:mod:`attnkit.data.algorithmic`), their
models take a model config (not a tokenizer), and they report task figures per input length.
The run directory is every recipe's (:mod:`attnkit.recipes.run`):
config.json with the recipe, its config and the resolved model config, checkpoints,
metrics.jsonl, results.json.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

from torch import nn

from attnkit.config import from_dict, to_dict
from attnkit.errors import ConfigError, UserError
from attnkit.recipes import run
from attnkit.recipes.run import read_run, record_model
from attnkit.train import distributed as dist
from attnkit.train.checkpoint import (
    load_run_weights,
    write_json_atomic,
)

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


def setup_run(recipe: str, cfg: Any, family: str, model_cfg: Any, build: Build
              ) -> tuple[Path, nn.Module]:
    """Run directory (rank 0 creates it, others follow) and the freshly initialised model,
    whose resolved config goes into config.json under ``model``."""

    def create(run_dir: Path) -> tuple[None, nn.Module]:
        if dist.is_main():
            record_model(run_dir, family, to_dict(model_cfg))
        return None, build(model_cfg)

    run_dir, _, model = run.setup_run(recipe, cfg, create)
    return run_dir, model


def load_trained(run_dir: str | Path, family: str, cls: type, build: Build,
                 which: Literal["best", "latest"] = "best") -> nn.Module:
    """A run's trained model (its best checkpoint when it has one) in eval mode."""
    run_dir = Path(run_dir)
    spec = read_run(run_dir).get("model")
    if not isinstance(spec, dict) or spec.get("family") != family:
        raise UserError(f"{run_dir} holds no trained {family} model")
    model = build(from_dict(cls, spec["config"]))
    load_run_weights(run_dir, model, which)
    return model.eval()


def mean_of(groups: list[dict[str, float]]) -> dict[str, float]:
    """Key-wise mean of figures measured on equally sized groups."""
    return {k: sum(g[k] for g in groups) / len(groups) for k in groups[0]}


def _line(figures: dict) -> str:
    return ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                     for k, v in figures.items())


def write_report(run_dir: Path, results: dict[str, Any]) -> dict[str, Any]:
    """Save results.json and print one line per evaluation set."""
    write_json_atomic(run_dir / "results.json", results)
    for name, figures in results.items():
        if isinstance(figures, dict) and figures and all(isinstance(v, dict)
                                                         for v in figures.values()):
            for sub, inner in figures.items():
                print(f"{name} {sub}: " + _line(inner))
        else:
            print(f"{name}: " + (_line(figures) if isinstance(figures, dict) else str(figures)))
    print(f"run directory: {run_dir}")
    return results
