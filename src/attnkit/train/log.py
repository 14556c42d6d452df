"""Training logs: JSON lines, optional TensorBoard, a tqdm progress bar and the loss plot.

``run_dir/metrics.jsonl`` holds one JSON object per line: a training record
``{"step", "loss", "lr", "tokens_per_s", "peak_memory_gib", "grad_norm", "elapsed"}`` (plus
``"mfu"`` where the device's peak FLOP/s is known, ``"loss_scale"`` and ``"skipped_steps"`` in
fp16, and in the first record of a run segment, a run or each resumed part of it, where it
ran: ``"device"``, ``"precision"`` and ``"attention_kernels"``, the attention calls of the
segment's first step by kernel, e.g. ``{"flash": 4}``: SDPA's flash, efficient, cudnn or math,
flex, explicit; empty when compiled) or an evaluation record ``{"step", "eval": {...}}``.
Only rank 0 writes. Every line is standard JSON: a non-finite number (NaN,
infinity) is written as ``null``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from attnkit.progress import progress_bar
from attnkit.rundir import METRICS, PLOTS, TENSORBOARD, atomic_path, read_metrics, write_text_atomic


def _standard(obj: Any) -> Any:
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or Infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _standard(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_standard(v) for v in obj]
    return obj


def _json_line(record: dict[str, Any]) -> str:
    """One metrics record as a line of standard JSON."""
    return json.dumps(_standard(record), allow_nan=False) + "\n"



class RunLog:
    """Appends records to metrics.jsonl and mirrors scalars to TensorBoard when installed."""

    def __init__(self, run_dir: str | Path, enabled: bool = True, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._file = None
        self._tb = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is an optional extra
                SummaryWriter = None
            if SummaryWriter is not None:
                self._tb = SummaryWriter(str(self.run_dir / TENSORBOARD))

    def truncate_after(self, step: int) -> None:
        """Drop records newer than ``step`` (written after the checkpoint a resume starts from)."""
        if not self.enabled:
            return
        kept = [r for r in read_metrics(self.run_dir) if r.get("step", 0) <= step]
        write_text_atomic(self.run_dir / METRICS, "".join(map(_json_line, kept)))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (flushed at once, so a kill loses at most the line being written)."""
        if not self.enabled:
            return
        if self._file is None:
            self._file = open(self.run_dir / METRICS, "a", encoding="utf-8")  # noqa: SIM115
        self._file.write(_json_line(record))
        self._file.flush()
        if self._tb is not None:
            step = record["step"]
            scalars = record.get("eval", {k: v for k, v in record.items() if k != "step"})
            prefix = "eval/" if "eval" in record else "train/"
            for key, value in scalars.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(prefix + key, value, step)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


class Progress:
    """A tqdm bar over optimiser steps showing loss, lr, tokens/s, peak memory and MFU (silent
    when disabled)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = progress_bar(total=total, initial=initial, disable=not enabled, unit="step")

    def update(self, loss: float, lr: float, speed: dict[str, float]) -> None:
        """``speed``: ``tokens_per_s``, ``peak_memory_gib`` and maybe ``mfu``."""
        extra = {"mfu": f"{speed['mfu']:.2f}"} if "mfu" in speed else {}
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}",
                             tok_s=f"{speed['tokens_per_s']:.0f}",
                             mem=f"{speed['peak_memory_gib']:.2f}G", **extra, refresh=False)
        self.bar.update(1)

    def describe(self, text: str) -> None:
        """Where the run trains, left of the bar (e.g. ``cpu fp32 attn:flash``)."""
        self.bar.set_description(text, refresh=False)

    def write(self, message: str) -> None:
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()


def plot_loss(run_dir: str | Path) -> Path | None:
    """Draw training loss (and evaluation metrics) against step into ``plots/loss.png``."""
    records = read_metrics(run_dir)
    train = [(r["step"], r["loss"]) for r in records
             if "loss" in r and isinstance(r["loss"], (int, float)) and math.isfinite(r["loss"])]
    if not train:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure  # no pyplot: no global backend, no GUI

    evals = [(r["step"], {k: v for k, v in r["eval"].items() if isinstance(v, (int, float))})
             for r in records if isinstance(r.get("eval"), dict)]  # null: not finite
    keys = sorted({k for _, e in evals for k in e})
    fig = Figure(figsize=(6.4, 4.0 if not keys else 6.4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(2 if keys else 1, 1, 1)
    ax.plot(*zip(*train, strict=True), label="train loss (per token)")
    if "val_loss" in keys:
        ax.plot(*zip(*[(s, e["val_loss"]) for s, e in evals if "val_loss" in e], strict=True),
                "o-", label="val_loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    if keys:
        ax2 = fig.add_subplot(2, 1, 2)
        for key in keys:
            points = [(s, e[key]) for s, e in evals if key in e]
            ax2.plot(*zip(*points, strict=True), "o-", label=key)
        ax2.set_xlabel("step")
        ax2.set_ylabel("evaluation")
        ax2.legend()
    fig.tight_layout()
    path = Path(run_dir) / PLOTS / "loss.png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path
