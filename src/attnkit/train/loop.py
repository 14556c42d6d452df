"""The one training loop every model family uses: :func:`fit`.

Per optimiser step it draws ``accum_steps`` micro-batches from a resumable stream, runs each
through ``loss_fn`` (which returns the *sum* of token losses and the token count), and divides
the accumulated gradient by the total token count over all micro-batches and all ranks, so the
update is the same whether a batch is split into micro-batches, data-parallel shards, or
neither. Then: gradient clipping by global norm, the optimiser and scheduler steps, logging,
evaluation and checkpoints. Resuming from a checkpoint restores weights, optimiser, schedule,
RNG states and the data position, so a resumed run ends bitwise equal to an uninterrupted one;
a newest checkpoint that is damaged is skipped (with a note) for the newest whole one.

SIGINT or SIGTERM (Ctrl-C) finishes the current step, writes a checkpoint and raises
:class:`attnkit.errors.Interrupted`. A non-finite loss or gradient norm stops training with a
one-line :class:`UserError` before the update, so no diverged weights are ever saved.
"""

from __future__ import annotations

import contextlib
import math
import random
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from attnkit.config import to_dict
from attnkit.energy.account import RunEnergy
from attnkit.energy.config import EnergyConfig
from attnkit.errors import ConfigError, Interrupted, UserError
from attnkit.train import distributed as dist
from attnkit.train.checkpoint import latest_checkpoint, load_latest, load_tensors, save_checkpoint
from attnkit.train.log import Progress, RunLog, plot_loss
from attnkit.train.optim import OptimConfig, build_optimizer, build_scheduler

LossFn = Callable[[nn.Module, Any], tuple[torch.Tensor, int]]
EvalFn = Callable[[nn.Module], dict[str, float]]


@dataclass(frozen=True)
class TrainConfig:
    """What :func:`fit` does; periods are in optimiser steps, 0 disables a period."""

    steps: int = 1000  # optimiser steps
    accum_steps: int = 1  # micro-batches per optimiser step
    clip_norm: float = 1.0  # global gradient-norm clip; 0 disables
    eval_every: int = 500  # 0 disables periodic evaluation (it still runs at the end)
    log_every: int = 50
    save_every: int = 500  # checkpoint period (0 disables); a checkpoint is also written at the end
    keep_last: int = 2
    seed: int = 0
    threads: int = 0  # torch.set_num_threads; 0 = leave as is
    device: str = "auto"  # auto (CUDA, then MPS, then CPU), cpu, cuda, cuda:N, mps
    optim: OptimConfig = field(default_factory=OptimConfig)
    best_metric: str = ""  # e.g. "val_loss" or "bleu"; "" = no best checkpoint
    best_mode: Literal["min", "max"] = "min"
    energy: EnergyConfig = field(default_factory=EnergyConfig)  # energy.json (docs/energy.md)

    def __post_init__(self) -> None:
        for name in ("steps", "accum_steps", "log_every", "keep_last"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("eval_every", "save_every", "threads", "clip_norm"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"train.seed must be in [0, 2**32), got {self.seed}")
        if self.best_mode not in ("min", "max"):
            raise ConfigError(f"train.best_mode must be 'min' or 'max', got {self.best_mode!r}")

    def check_best_metric(self, names: Iterable[str]) -> None:
        """Refuse a ``best_metric`` the recipe's evaluation does not report (with a suggestion)."""
        if self.best_metric and self.best_metric not in names:
            from attnkit.config import unknown
            raise unknown("train.best_metric", self.best_metric, names)


@dataclass
class TrainResult:
    """Where a run ended: last step, last metrics (train ``loss`` plus evaluation), totals."""

    step: int
    metrics: dict[str, float]
    run_dir: Path
    wall_time: float  # seconds of training, summed over resumed segments
    tokens: int  # tokens seen (batch.n_tokens summed over all micro-batches)
    energy: dict = field(default_factory=dict)  # energy.json's figures (rank 0)


# ---- RNG states as plain data (torch.load(weights_only=True) accepts them) -------------------

def rng_state() -> dict[str, Any]:
    """Python, NumPy, torch (and CUDA) generator states as tensors, numbers and strings."""
    version, internal, gauss = random.getstate()
    key, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"key": key, "state": torch.from_numpy(mt.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached": cached},
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`rng_state`."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["key"], npy["state"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _check_plain(obj: Any, where: str = "state") -> None:
    """Fail at save time (not at resume) if the state holds what weights_only cannot load."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    elif not isinstance(obj, (torch.Tensor, int, float, str, bool, type(None))):
        raise TypeError(f"{where} is a {type(obj).__name__}: checkpoint state may hold only "
                        "tensors, numbers, strings, lists and dicts")


# ---- the run ----------------------------------------------------------------------------------

@dataclass
class _Run:
    """Everything one call of :func:`fit` carries between steps."""

    model: nn.Module  # DDP wrapper or the model itself
    raw: nn.Module  # the unwrapped model (saved, evaluated)
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    cfg: TrainConfig
    run_dir: Path
    batches: Any
    rank: int
    world: int
    step: int = 0
    tokens: int = 0
    elapsed: float = 0.0
    best: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    last_eval: int = -1
    last_save: int = -1
    energy: RunEnergy | None = None
    checkpoint_energy: dict | None = None  # the energy totals a resumed checkpoint holds
    signal: int = 0  # the first SIGINT / SIGTERM received on this rank (0: none)
    stop: bool = False  # some rank received one: every rank stops after this step

    def state(self, rngs: list, data: list | None = None) -> dict[str, Any]:
        """The resumable state; ``data``: every rank's stream state when they differ (a
        Transformer-XL memory is per rank), else rank 0's alone."""
        state = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                 "best": self.best, "metrics": dict(self.metrics), "rng": rngs,
                 "energy": self.energy.state() if self.energy is not None else {},
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "data": self.batches.state_dict(), "config": to_dict(self.cfg)}
        if data and len(data) > 1:
            state["data_per_rank"] = data
        _check_plain(state)
        return state


def _restore(run: _Run, resume: bool) -> str | None:
    """Load the newest complete checkpoint into ``run``; return its path (None: fresh start)."""
    if latest_checkpoint(run.run_dir) is None:
        return None
    if not resume:
        raise UserError(f"{run.run_dir} already holds checkpoints; resume, or use a new run "
                        "directory")
    found = load_latest(run.run_dir)
    if found is None:
        return None
    path, state, tensors, skipped = found
    if run.rank == 0:
        for line in skipped:  # a newer checkpoint is damaged: resume from the newest whole one
            print(f"attnkit: {line}", file=sys.stderr, flush=True)
    load_tensors(run.raw, tensors, path)
    try:
        run.optimizer.load_state_dict(state["optimizer"])
        run.scheduler.load_state_dict(state["scheduler"])
        per_rank = state.get("data_per_rank") or []
        run.batches.load_state_dict(per_rank[run.rank] if len(per_rank) == run.world
                                    else state["data"])
        rngs = state["rng"]
        set_rng_state(rngs[run.rank] if len(rngs) == run.world else rngs[0])
        run.step, run.tokens, run.elapsed = state["step"], state["tokens"], state["elapsed"]
        run.best, run.metrics = state["best"], dict(state["metrics"])
        run.checkpoint_energy = state.get("energy")
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} does not fit this run: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                        ) from None
    run.last_eval = run.last_save = run.step
    return str(path)


def _device(model: nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _train_step(run: _Run, loss_fn: LossFn, it: Iterator) -> tuple[float, float, int, float]:
    """One optimiser step; returns (global loss sum, global token count, tokens seen, grad norm).

    Gradients of the summed losses are accumulated (DDP all-reduces, i.e. averages, only on the
    last micro-batch), then scaled by world / total tokens: the token-normalised gradient.
    """
    micro = [next(it) for _ in range(run.cfg.accum_steps)]
    seen = sum(int(b.n_tokens) for b in micro)
    device = _device(run.raw)
    local = torch.zeros(3, dtype=torch.float64)  # (loss sum, token count, signal) on this rank
    for i, batch in enumerate(micro):
        if run.world > 1:
            batch = batch.shard(run.rank, run.world)
        batch = batch.to(device)
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or run.world == 1 else run.model.no_sync()
        with sync:
            loss_sum, n = loss_fn(run.model, batch)
            loss_sum.backward()
        local[:2] += torch.tensor([loss_sum.detach().double().item(), float(n)],
                                  dtype=torch.float64)
    local[2] = float(run.signal > 0)
    total = dist.all_reduce_sum(local)
    run.stop = run.stop or total[2].item() > 0
    if not math.isfinite(total[0].item()):
        raise _diverged(run, "loss", total[0].item())
    scale = run.world / max(total[1].item(), 1.0)
    params = [p for p in run.raw.parameters() if p.grad is not None]
    for p in params:
        p.grad.mul_(scale)
    clip = run.cfg.clip_norm if run.cfg.clip_norm > 0 else math.inf  # inf: norm only, grads x1
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item() if params else 0.0
    if not math.isfinite(grad_norm):
        raise _diverged(run, "gradient norm", grad_norm)
    run.optimizer.step()
    run.optimizer.zero_grad(set_to_none=True)
    return total[0].item(), total[1].item(), seen, grad_norm


def _diverged(run: _Run, what: str, value: float) -> UserError:
    """The one-line stop for a non-finite loss or gradient (raised before the update, so the
    diverged weights are never saved)."""
    cfg = run.cfg
    clip = (f"lower train.clip_norm (now {cfg.clip_norm:g})" if cfg.clip_norm > 0
            else "enable clipping (train.clip_norm=1)")
    kept = (f"its last good checkpoint (step {run.last_save}) is kept" if run.last_save > 0
            else "no checkpoint was written")
    return UserError(f"training diverged: the {what} at step {run.step + 1} is {value}; lower "
                     f"train.optim.lr (now {cfg.optim.lr:g}) or {clip} in a new run_dir; "
                     f"{kept}")


@contextlib.contextmanager
def _stop_on_signals(run: _Run) -> Iterator[None]:
    """While training, SIGINT and SIGTERM ask for a stop after the current step (so a second
    Ctrl-C cannot break into the checkpoint being written); outside the main thread Python
    cannot handle signals, and they keep their handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def note(signum: int, frame: object) -> None:
        run.signal = run.signal or signum

    previous = {sig: signal.signal(sig, note) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)


def _evaluate(run: _Run, evaluate: EvalFn, log: RunLog) -> None:
    """Rank 0: evaluate in eval mode without gradients, RNG untouched; track the best."""
    run.last_eval = run.step
    if run.rank != 0:
        return
    saved = rng_state()  # evaluation (e.g. sampling) must not change the training randomness
    run.raw.eval()
    with torch.no_grad():
        metrics = {k: float(v) for k, v in evaluate(run.raw).items()}
    run.raw.train()
    set_rng_state(saved)
    run.metrics.update(metrics)
    log.write({"step": run.step, "eval": metrics})
    key = run.cfg.best_metric
    if not key:
        return
    if key not in metrics:
        raise UserError(f"best_metric '{key}' is not among the evaluation metrics "
                        f"{sorted(metrics)}")
    value = metrics[key]
    better = run.best is None or (value < run.best if run.cfg.best_mode == "min"
                                  else value > run.best)
    if better:
        run.best = value
        save_checkpoint(run.run_dir, run.step, run.raw, run.state([rng_state()]),
                        run.cfg.keep_last, tag="best")


def _save(run: _Run) -> None:
    """Every rank contributes its RNG state and, when it keeps one of its own (memory), its
    stream state; rank 0 writes the checkpoint."""
    rngs = dist.all_gather_object(rng_state())
    data = (dist.all_gather_object(run.batches.state_dict())
            if getattr(run.batches, "per_rank_state", False) and run.world > 1 else None)
    run.energy.update(run.step, run.tokens, run.metrics)  # energy.json, then the checkpoint
    if run.rank == 0:
        save_checkpoint(run.run_dir, run.step, run.raw, run.state(rngs, data),
                        run.cfg.keep_last)
    run.last_save = run.step


def _loop(run: _Run, loss_fn: LossFn, evaluate: EvalFn | None, log: RunLog,
          bar: Progress) -> None:
    """Optimiser steps from ``run.step + 1`` to ``cfg.steps`` with logs, evals and saves."""
    cfg = run.cfg
    it = iter(run.batches)
    start = time.perf_counter() - run.elapsed
    window = [0.0, 0.0, 0, time.perf_counter()]  # loss sum, count, tokens seen, start time
    while run.step < cfg.steps:
        lr = run.optimizer.param_groups[0]["lr"]
        loss_sum, count, seen, grad_norm = _train_step(run, loss_fn, it)
        run.scheduler.step()
        run.step += 1
        run.tokens += seen
        run.elapsed = time.perf_counter() - start
        window = [window[0] + loss_sum, window[1] + count, window[2] + seen, window[3]]
        now = time.perf_counter()
        bar.update(loss_sum / max(count, 1.0), lr, window[2] / max(now - window[3], 1e-9))
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            loss = window[0] / max(window[1], 1.0)
            run.metrics["loss"] = loss
            log.write({"step": run.step, "loss": loss, "lr": lr,
                       "tokens_per_s": window[2] / max(now - window[3], 1e-9),
                       "grad_norm": grad_norm, "elapsed": run.elapsed})
            window = [0.0, 0.0, 0, now]
            run.energy.tick(run.step, run.tokens, run.metrics)
        if evaluate is not None and (
                (cfg.eval_every and run.step % cfg.eval_every == 0) or run.step == cfg.steps):
            _evaluate(run, evaluate, log)
        if (cfg.save_every and run.step % cfg.save_every == 0) or run.step == cfg.steps:
            _save(run)
        if run.stop or (run.world == 1 and run.signal):  # one process needs no agreement
            if run.last_save != run.step:
                _save(run)
            raise Interrupted(str(run.run_dir), run.step, run.signal or signal.SIGTERM)


def fit(model: nn.Module, loss_fn: LossFn, batches: Any, cfg: TrainConfig,
        run_dir: str | Path, evaluate: EvalFn | None = None, resume: bool = True,
        progress: bool = True) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps; see the module docstring.

    ``loss_fn(model, batch) -> (sum of token losses, token count)`` for one micro-batch.
    ``batches`` is an endless iterable of batches (``.to(device)``, ``.shard(rank, world)``,
    ``.n_tokens``) with ``state_dict()`` / ``load_state_dict()``: its state must name the next
    batch ``iter(batches)`` yields, and hold only tensors, numbers, strings, lists and dicts.
    Under torchrun every rank reads the whole stream and trains on its shard of each batch; a
    stream whose state differs between ranks (``per_rank_state = True``, e.g. a segment memory)
    has every rank's state saved and restored.
    ``evaluate(model) -> metrics`` runs on rank 0 in eval mode under ``torch.no_grad()``.
    """
    if cfg.best_metric and evaluate is None:
        raise ConfigError("train.best_metric needs an evaluate function")
    if not (hasattr(batches, "state_dict") and hasattr(batches, "load_state_dict")):
        raise TypeError("fit needs a resumable batch stream (state_dict / load_state_dict), got "
                        f"{type(batches).__name__}")
    rank, world = dist.init_distributed()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    raw = dist.unwrap(model)
    optimizer = build_optimizer(raw, cfg.optim)
    run = _Run(model, raw, optimizer, build_scheduler(optimizer, cfg.optim, cfg.steps), cfg,
               Path(run_dir), batches, rank, world)
    seed_everything(cfg.seed + rank)
    resumed = _restore(run, resume)
    log = RunLog(run.run_dir, enabled=rank == 0)
    log.truncate_after(run.step)
    if resumed and rank == 0:
        print(f"resuming from {resumed} (step {run.step})", file=sys.stderr, flush=True)
    bar = Progress(cfg.steps, run.step, enabled=progress and rank == 0)
    run.model = dist.wrap_ddp(raw)
    raw.train()
    run.energy = RunEnergy(cfg.energy, run.run_dir, rank, dist.all_gather_object,
                           run.checkpoint_energy)
    with _stop_on_signals(run):
        try:
            _loop(run, loss_fn, evaluate, log, bar)
            bar.close()
            energy = run.energy.finish(run.step, run.tokens, run.metrics)
        finally:
            bar.close()
            log.close()
            run.energy.abort(run.step, run.tokens, world)  # after a failure only
    if rank == 0:
        plot_loss(run.run_dir)
    dist.barrier()
    return TrainResult(run.step, dict(run.metrics), run.run_dir, run.elapsed, run.tokens,
                       energy)
