"""Starting a run: the run directory (created or resumed), the model built and recorded.

The directory itself (file names, config.json, atomic writes) is :mod:`attnkit.rundir`'s; this
module adds what only a training recipe does: seeding, building under torchrun, and recording
the built model in config.json so that :func:`attnkit.load` can rebuild it.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.models import model_record
from attnkit.rundir import prepare_run_dir, record_model
from attnkit.runlock import lock_run
from attnkit.train import distributed as dist


def setup_run(recipe: str, cfg: Any, create: Callable[[Path], tuple[Any, nn.Module]],
              extra: Callable[[nn.Module], dict] | None = None
              ) -> tuple[Path, Any, nn.Module]:
    """Run directory, then ``create(run_dir) -> (tokenizer, model)`` with the torch RNG seeded
    by ``cfg.train.seed``; rank 0 records the model (its family and config, plus
    ``extra(model)``) in config.json. Under torchrun rank 0 creates first and the others read
    what it wrote."""
    rank, _ = dist.init_distributed(cfg.train.device)  # a missing device fails here, first
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
            if rank == 0:
                record_model(run_dir, {**model_record(model), **(extra(model) if extra else {})})
        dist.barrier()
    return run_dir, tok, model
