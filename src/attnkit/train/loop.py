"""The one training loop every model family uses: :func:`fit`.

Per optimiser step it draws ``accum_steps`` micro-batches from a resumable stream, runs each
through ``loss_fn`` (which returns the *sum* of token losses and the token count), and divides
the accumulated gradient by the total token count over all micro-batches and all ranks, so the
update is the same whether a batch is split into micro-batches, data-parallel shards, or
neither. Then: gradient clipping by global norm, the optimiser and scheduler steps, logging,
evaluation and checkpoints. Resuming from a checkpoint restores weights, optimiser, schedule,
RNG states (the device's too), the fp16 loss scale and the data position, so a resumed run
ends bitwise equal to an uninterrupted one; a newest checkpoint that is damaged is skipped (with
a note) for the newest whole one.

Devices and precision (:mod:`attnkit.accel`): the model moves to ``cfg.device`` and stays fp32
(so do the optimiser state and the checkpoints); every batch follows it (pinned, non-blocking
on CUDA; on a GPU a stream builds them ahead on a background thread,
:meth:`~attnkit.data.stream.BatchStream.place`); forward passes (training and evaluation) run
under autocast in ``cfg.precision``, losses in fp32; fp16 scales the loss
(``torch.amp.GradScaler``) and skips the update of a step whose gradients overflowed, halving
the scale.

SIGINT or SIGTERM (Ctrl-C) finishes the current step, writes a checkpoint and raises
:class:`attnkit.errors.Interrupted`. A non-finite loss or gradient norm stops training with a
one-line :class:`UserError` before the update, so no diverged weights are ever saved.
"""

from __future__ import annotations

import contextlib
import math
import random
import re
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

from attnkit import accel
from attnkit.config import to_dict
from attnkit.energy.account import RunEnergy
from attnkit.energy.config import EnergyConfig
from attnkit.errors import ConfigError, Interrupted, UserError
from attnkit.nn.attention.kernels import record_kernels
from attnkit.nn.checkpointing import set_gradient_checkpointing
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
    optim: OptimConfig = field(default_factory=OptimConfig)
    best_metric: str = ""  # e.g. "val_loss" or "bleu"; "" = no best checkpoint
    best_mode: Literal["min", "max"] = "min"
    energy: EnergyConfig = field(default_factory=EnergyConfig)  # energy.json (docs/energy.md)
    device: str = "auto"  # auto (CUDA, then MPS, then CPU) | cpu | cuda | cuda:N | mps
    precision: str = "auto"  # auto (bf16 on GPUs with it, else fp32) | fp32 | bf16 | fp16
    compile: bool = False  # torch.compile the model (torchtune's name; no gain on small CPUs)
    gradient_checkpointing: bool = False  # recompute block activations in backward (transformers)

    def __post_init__(self) -> None:
        device = str(self.device).lower()
        if not re.fullmatch(r"auto|cpu|mps|cuda(:\d+)?", device):
            raise ConfigError(f"train.device must be auto, cpu, cuda, cuda:N or mps, got "
                              f"{self.device!r}")
        if self.precision not in ("auto", *accel.PRECISIONS):
            from attnkit.config import unknown
            raise unknown("train.precision", self.precision, ("auto", *accel.PRECISIONS))
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


# The settings `attnkit resume RUN --set` may change: where and how long a run trains, not what
# it learns (a GPU run resumes on a CPU; more steps: the schedule then follows the new total).
RESUMABLE = ("device", "precision", "compile", "gradient_checkpointing", "threads", "steps",
             "eval_every", "log_every", "save_every", "keep_last")


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

def rng_state(device: torch.device | None = None) -> dict[str, Any]:
    """Python, NumPy, torch and (for a CUDA or MPS ``device``) that device's generator states
    as tensors, numbers and strings."""
    version, internal, gauss = random.getstate()
    key, mt, pos, has_gauss, cached = np.random.get_state()
    state = {"python": {"version": version, "state": torch.tensor(internal, dtype=torch.int64),
                        "gauss": gauss},
             "numpy": {"key": key, "state": torch.from_numpy(mt.astype(np.int64)), "pos": pos,
                       "has_gauss": has_gauss, "cached": cached},
             "torch": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    elif device is not None and device.type == "mps":
        state["mps"] = torch.mps.get_rng_state()
    return state


def set_rng_state(state: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`rng_state` (a device state is restored onto ``device``)."""
    py = state["python"]
    random.setstate((py["version"], tuple(py["state"].tolist()), py["gauss"]))
    npy = state["numpy"]
    np.random.set_state((npy["key"], npy["state"].numpy().astype(np.uint32), npy["pos"],
                         npy["has_gauss"], npy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)
    if "mps" in state and device is not None and device.type == "mps":
        torch.mps.set_rng_state(state["mps"])


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
    device: torch.device
    precision: str  # fp32 | bf16 | fp16 (resolved)
    scaler: torch.amp.GradScaler  # enabled for fp16 only
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
    flops: float = 0.0  # training FLOPs per token (accel.flops_per_token), from the first batch
    skipped: int = 0  # fp16 steps whose update the scaler skipped (overflow), this segment
    where: dict | None = None  # device, precision, first step's attention kernels; {}: logged

    def state(self, rngs: list, data: list | None = None) -> dict[str, Any]:
        """The resumable state; ``data``: every rank's stream state when they differ (a
        Transformer-XL memory is per rank), else rank 0's alone."""
        state = {"step": self.step, "tokens": self.tokens, "elapsed": self.elapsed,
                 "best": self.best, "metrics": dict(self.metrics), "rng": rngs,
                 "energy": self.energy.state() if self.energy is not None else {},
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(), "scaler": self.scaler.state_dict(),
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
        if state.get("scaler"):
            run.scaler.load_state_dict(state["scaler"])
        rngs = state["rng"]
        set_rng_state(rngs[run.rank] if len(rngs) == run.world else rngs[0], run.device)
        run.step, run.tokens, run.elapsed = state["step"], state["tokens"], state["elapsed"]
        run.best, run.metrics = state["best"], dict(state["metrics"])
        run.checkpoint_energy = state.get("energy")
    except (KeyError, ValueError, TypeError, RuntimeError) as err:
        raise UserError(f"checkpoint {path} does not fit this run: "
                        f"{str(err).splitlines()[0] if str(err) else type(err).__name__}"
                        ) from None
    run.last_eval = run.last_save = run.step
    return str(path)


def _train_step(run: _Run, loss_fn: LossFn, it: Iterator) -> tuple[float, float, int, float]:
    """One optimiser step; returns (global loss sum, global token count, tokens seen, grad norm).

    Gradients of the summed losses are accumulated (DDP all-reduces, i.e. averages, only on the
    last micro-batch), then scaled by world / total tokens: the token-normalised gradient.
    """
    micro = [next(it) for _ in range(run.cfg.accum_steps)]
    seen = sum(int(b.n_tokens) for b in micro)
    if not run.flops:
        run.flops = _flops_per_token(run.raw, micro[0])
    local = torch.zeros(3, dtype=torch.float64)  # (loss sum, token count, signal) on this rank
    for i, batch in enumerate(micro):
        if run.world > 1:
            batch = batch.shard(run.rank, run.world)
        batch = accel.to_device(batch, run.device)
        last = i == len(micro) - 1
        sync = contextlib.nullcontext() if last or run.world == 1 else run.model.no_sync()
        with sync:
            with accel.autocast(run.device, run.precision):
                loss_sum, n = loss_fn(run.model, batch)
            run.scaler.scale(loss_sum).backward()
        local[:2] += torch.tensor([loss_sum.detach().double().item(), float(n)],
                                  dtype=torch.float64)
    local[2] = float(run.signal > 0)
    total = dist.all_reduce_sum(local)
    run.stop = run.stop or total[2].item() > 0
    if not math.isfinite(total[0].item()):
        raise _diverged(run, "loss", total[0].item())
    run.scaler.unscale_(run.optimizer)  # fp16: true gradients (inf/NaN where they overflowed)
    scale = run.world / max(total[1].item(), 1.0)
    params = [p for p in run.raw.parameters() if p.grad is not None]
    for p in params:
        p.grad.mul_(scale)
    clip = run.cfg.clip_norm if run.cfg.clip_norm > 0 else math.inf  # inf: norm only, grads x1
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item() if params else 0.0
    if not math.isfinite(grad_norm):
        if not run.scaler.is_enabled():
            raise _diverged(run, "gradient norm", grad_norm)
        run.skipped += 1  # fp16 overflow: the scaler skips this update and halves its scale
    run.scaler.step(run.optimizer)  # optimizer.step() unless fp16 gradients overflowed
    run.scaler.update()
    run.optimizer.zero_grad(set_to_none=True)
    return total[0].item(), total[1].item(), seen, grad_norm


def _flops_per_token(model: nn.Module, batch: Any) -> float:
    """Training FLOPs per token (:func:`attnkit.accel.flops_per_token`) with T the longest
    sequence dimension (dim 1) of the batch's 2-D tensors."""
    fields = vars(batch).values() if hasattr(batch, "__dict__") else (
        batch.values() if isinstance(batch, dict) else ())
    seq = max((t.size(1) for t in fields if isinstance(t, torch.Tensor) and t.dim() >= 2),
              default=0)
    layers, width = accel.attention_layers(model)
    return accel.flops_per_token(accel.matmul_params(model), layers, width // max(layers, 1),
                                 seq)


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
    saved = rng_state(run.device)  # evaluation (e.g. sampling) must not change training's RNG
    run.raw.eval()
    with torch.no_grad(), accel.autocast(run.device, run.precision):
        metrics = {k: float(v) for k, v in evaluate(run.raw).items()}
    run.raw.train()
    set_rng_state(saved, run.device)
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
        save_checkpoint(run.run_dir, run.step, run.raw, run.state([rng_state(run.device)]),
                        run.cfg.keep_last, tag="best")


def _save(run: _Run) -> None:
    """Every rank contributes its RNG state and, when it keeps one of its own (memory), its
    stream state; rank 0 writes the checkpoint."""
    rngs = dist.all_gather_object(rng_state(run.device))
    data = (dist.all_gather_object(run.batches.state_dict())
            if getattr(run.batches, "per_rank_state", False) and run.world > 1 else None)
    run.energy.update(run.step, run.tokens, run.metrics)  # energy.json, then the checkpoint
    if run.rank == 0:
        save_checkpoint(run.run_dir, run.step, run.raw, run.state(rngs, data),
                        run.cfg.keep_last)
    run.last_save = run.step


def _speed(run: _Run, tokens_per_s: float) -> dict[str, float]:
    """tokens/s (all ranks), this device's peak memory (GiB; CPU: the process's maximum RSS)
    and, where the device's peak FLOP/s is known (:data:`attnkit.accel.PEAK_TFLOPS`), MFU."""
    out = {"tokens_per_s": tokens_per_s,
           "peak_memory_gib": accel.peak_memory(run.device) / 2**30}
    peak = accel.peak_flops(run.device, run.precision)
    if peak and run.flops:
        out["mfu"] = accel.mfu(run.flops, tokens_per_s / run.world, peak)
    return out


def _scaler_record(run: _Run) -> dict[str, float]:
    """fp16 only: the loss scale and the updates skipped for overflow in this segment."""
    if not run.scaler.is_enabled():
        return {}
    return {"loss_scale": float(run.scaler.get_scale()), "skipped_steps": run.skipped}


@contextlib.contextmanager
def _first_step_kernels(run: _Run, bar: Progress) -> Iterator[None]:
    """Around the first step of a segment (a run or a resumed part of it): count the attention
    kernels it takes (:func:`attnkit.nn.attention.kernels.record_kernels`), keep them with the
    device and precision for the segment's first training record, show them on the bar."""
    if run.where is not None:
        yield
        return
    with record_kernels() as taken:
        yield
    run.where = {"device": str(run.device), "precision": run.precision,
                 "attention_kernels": dict(sorted(taken.items()))}
    names = "+".join(run.where["attention_kernels"]) or ("compiled" if run.cfg.compile
                                                         else "none")
    bar.describe(f"{run.device.type} {run.precision} attn:{names}")


def _loop(run: _Run, loss_fn: LossFn, evaluate: EvalFn | None, log: RunLog,
          bar: Progress) -> None:
    """Optimiser steps from ``run.step + 1`` to ``cfg.steps`` with logs, evals and saves."""
    cfg = run.cfg
    it = iter(run.batches)
    start = time.perf_counter() - run.elapsed
    window = [0.0, 0.0, 0, time.perf_counter()]  # loss sum, count, tokens seen, start time
    while run.step < cfg.steps:
        lr = run.optimizer.param_groups[0]["lr"]
        with _first_step_kernels(run, bar):
            loss_sum, count, seen, grad_norm = _train_step(run, loss_fn, it)
        run.scheduler.step()
        run.step += 1
        run.tokens += seen
        run.elapsed = time.perf_counter() - start
        window = [window[0] + loss_sum, window[1] + count, window[2] + seen, window[3]]
        now = time.perf_counter()
        speed = _speed(run, window[2] / max(now - window[3], 1e-9))
        bar.update(loss_sum / max(count, 1.0), lr, speed)
        if run.step % cfg.log_every == 0 or run.step == cfg.steps:
            loss = window[0] / max(window[1], 1.0)
            run.metrics["loss"] = loss
            log.write({"step": run.step, "loss": loss, "lr": lr, **speed,
                       "grad_norm": grad_norm, "elapsed": run.elapsed, **_scaler_record(run),
                       **(run.where or {})})
            run.where = {}  # in the segment's first record only
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


def _place(model: nn.Module, device: torch.device, cfg: TrainConfig) -> nn.Module:
    """``model`` on ``device``, half-precision parameters made fp32 (the master weights the
    optimiser updates and checkpoints keep), activation checkpointing switched on if asked."""
    model.to(device)
    for p in model.parameters():
        if p.dtype in (torch.float16, torch.bfloat16):
            p.data = p.data.float()
    if cfg.gradient_checkpointing and not set_gradient_checkpointing(model):
        raise ConfigError(f"train.gradient_checkpointing: {type(model).__name__} has no blocks "
                          "that can be checkpointed (attnkit's encoder and decoder blocks)")
    return model


def fit(model: nn.Module, loss_fn: LossFn, batches: Any, cfg: TrainConfig,
        run_dir: str | Path, evaluate: EvalFn | None = None, resume: bool = True,
        progress: bool = True) -> TrainResult:
    """Train ``model`` for ``cfg.steps`` optimiser steps; see the module docstring.

    ``loss_fn(model, batch) -> (sum of token losses, token count)`` for one micro-batch.
    ``batches`` is an endless iterable of batches (moved by :func:`attnkit.accel.to_device`,
    with ``.shard(rank, world)`` and ``.n_tokens``) with ``state_dict()`` /
    ``load_state_dict()``: its state must name the next batch ``iter(batches)`` yields, and
    hold only tensors, numbers, strings, lists and dicts.
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
    rank, world = dist.init_distributed(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = accel.resolve_device(cfg.device)
    precision = accel.resolve_precision(cfg.precision, device)
    raw = _place(dist.unwrap(model), device, cfg)
    if hasattr(batches, "place"):  # a BatchStream: built ahead and pinned on a GPU
        batches.place(device)
    optimizer = build_optimizer(raw, cfg.optim)  # after the move: fused kernels per device
    run = _Run(model, raw, optimizer, build_scheduler(optimizer, cfg.optim, cfg.steps), cfg,
               Path(run_dir), batches, rank, world, device, precision,
               accel.grad_scaler(device, precision))
    seed_everything(cfg.seed + rank)
    resumed = _restore(run, resume)
    log = RunLog(run.run_dir, enabled=rank == 0)
    log.truncate_after(run.step)
    if resumed and rank == 0:
        print(f"resuming from {resumed} (step {run.step})", file=sys.stderr, flush=True)
    bar = Progress(cfg.steps, run.step, enabled=progress and rank == 0)
    run.model = dist.wrap_ddp(raw)
    if cfg.compile:
        run.model = torch.compile(run.model)
    raw.train()
    accel.reset_peak_memory(device)
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
