"""The run directory every recipe writes: creation (or resumption), config.json, the model record.

``config.json`` holds ``{"recipe", "config", "model": {"family", "config"}}``; a run directory
that exists must hold the same recipe and config (it is then resumed).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.config import from_dict, to_dict
from attnkit.errors import ConfigError, UserError
from attnkit.runlock import lock_run
from attnkit.train import distributed as dist
from attnkit.train.checkpoint import write_json_atomic


# ---- run directory -----------------------------------------------------------------------------
def prepare_run_dir(recipe: str, cfg: Any) -> Path:
    """Create the run directory and its config.json (``cfg`` is a recipe config with a
    ``run_dir``); an existing run must have the same recipe and config."""
    run_dir = Path(cfg.run_dir or f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    record = {"recipe": recipe, "config": to_dict(cfg)}
    path = run_dir / "config.json"
    if path.exists():
        old = read_run(run_dir)
        # where the run lives is not part of what it is (a moved run resumes too), and settings
        # added to attnkit since the run started take their defaults
        try:
            old_config = to_dict(from_dict(type(cfg), old["config"]))
        except ConfigError:
            old_config = old["config"]
        same = old["recipe"] == recipe and {**old_config, "run_dir": ""} == {
            **record["config"], "run_dir": ""}
        if not same:
            raise UserError(f"{run_dir} holds a run with another recipe or config; choose "
                            "another run_dir (or repeat that run's settings to resume it)")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not an attnkit run; choose another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return run_dir


def read_run(run_dir: str | Path) -> dict:
    """A run directory's config.json (recipe, config, model) with one-line errors."""
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise UserError(f"{run_dir} is not an attnkit run directory (no config.json)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt: {err}") from None
    if not (isinstance(record, dict) and isinstance(record.get("recipe"), str)
            and isinstance(record.get("config"), dict)):
        raise UserError(f"{path} is not an attnkit run config (no recipe and config)")
    return record


def record_model(run_dir: Path, family: str, resolved: dict) -> None:
    """Write the built model's family and resolved config into config.json (rank 0)."""
    record = read_run(run_dir)
    spec = {"family": family, "config": resolved}
    if record.get("model") != spec:
        record["model"] = spec
        write_json_atomic(run_dir / "config.json", record)


def setup_run(recipe: str, cfg: Any, create: Callable[[Path], tuple[Any, nn.Module]]
              ) -> tuple[Path, Any, nn.Module]:
    """Run directory, then ``create(run_dir) -> (tokenizer, model)`` with the torch RNG seeded
    by ``cfg.train.seed``; under torchrun rank 0 creates first and the others read what it
    wrote."""
    rank, _ = dist.init_distributed()
    run_dir: Path | None = None
    if rank == 0:
        run_dir = prepare_run_dir(recipe, cfg)
        lock_run(run_dir)  # one training per run directory, held until the process ends
        print(f"run directory: {run_dir}", file=sys.stderr)
    run_dir = Path(dist.all_gather_object(str(run_dir))[0])
    for turn in (0, 1):
        if (rank == 0) == (turn == 0):
            torch.manual_seed(cfg.train.seed)
            tok, model = create(run_dir)
        dist.barrier()
    return run_dir, tok, model
