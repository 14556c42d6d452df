"""What a result cost: runs compared by energy, CO2e and the quality they reached.

Each run directory gives its ``energy.json`` (required), its final metrics from
``results.json`` (every test set; e.g. ``exact_match`` or ``bleu``) and the last
training and validation loss from ``metrics.jsonl``. Quality per kWh divides a metric by
the PUE-adjusted energy.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from attnkit.energy.account import read_energy
from attnkit.errors import UserError
from attnkit.rundir import RESULTS, atomic_path, read_metrics


@dataclass
class RunCost:
    name: str
    kwh_pue: float
    co2e_kg: float
    cost_usd: float
    wall_s: float
    method: str
    steps: int
    loss: float | None = None  # last training loss
    val_loss: float | None = None
    quality: dict[str, float] = field(default_factory=dict)  # e.g. {"val/bleu": 12.3}

    def per_kwh(self, value: float) -> float:
        return value / self.kwh_pue if self.kwh_pue > 0 else float("inf")


def _results(run: Path) -> dict[str, float]:
    """Numeric scores of every set in results.json (not counts or timings), "set/metric"."""
    try:
        data = json.loads((run / RESULTS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {f"{name}/{k}": float(v) for name, scores in data.items() if isinstance(scores, dict)
            for k, v in scores.items()
            if isinstance(v, (int, float)) and k not in ("examples", "decode_seconds")}


def _losses(run: Path) -> tuple[float | None, float | None]:
    loss = val = None
    for record in read_metrics(run):
        if isinstance(record.get("loss"), (int, float)):
            loss = float(record["loss"])
        if isinstance(record.get("eval"), dict) and "val_loss" in record["eval"]:
            val = float(record["eval"]["val_loss"])
    return loss, val


def load_run(run_dir: str | Path) -> RunCost:
    """A run's energy and quality; a one-line error when it has no usable energy.json."""
    run = Path(run_dir)
    if not run.is_dir():
        raise UserError(f"run directory not found: {run}")
    record = read_energy(run)
    if record is None:
        raise UserError(f"{run} has no readable energy.json (runs trained before energy "
                        "accounting have none)")
    loss, val = _losses(run)
    return RunCost(run.name or str(run), float(record["kwh_pue"]), float(record["co2e_kg"]),
                   float(record["cost_usd"]["total"]), float(record["wall_s"]),
                   str(record["method"]), int(record.get("step", 0)), loss, val, _results(run))


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def table(runs: list[RunCost]) -> str:
    """A fixed-width text table, one row per run."""
    head = ["run", "steps", "wall", "kWh(PUE)", "CO2e kg", "cost $", "method", "loss",
            "val_loss", "quality", "quality/kWh"]
    rows = []
    for r in runs:
        quality = "; ".join(f"{k} {v:.4g}" for k, v in r.quality.items()) or "-"
        per = "; ".join(f"{r.per_kwh(v):.4g}" for v in r.quality.values()) or "-"
        rows.append([r.name, str(r.steps), f"{r.wall_s / 60:.1f} min", f"{r.kwh_pue:.4g}",
                     f"{r.co2e_kg:.4g}", f"{r.cost_usd:.3g}", r.method, _fmt(r.loss),
                     _fmt(r.val_loss), quality, per])
    widths = [max(len(x) for x in col) for col in zip(head, *rows, strict=True)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(row, widths, strict=True)).rstrip()
             for row in (head, *rows)]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def plot(runs: list[RunCost], path: str | Path) -> Path:
    """Bar charts of kWh and CO2e per run, each bar labelled with the run's quality."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r.name for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * len(runs), 4))
    for ax, values, label in ((axes[0], [r.kwh_pue for r in runs], "energy (kWh, PUE)"),
                              (axes[1], [r.co2e_kg * 1000 for r in runs], "CO2e (g)")):
        bars = ax.bar(names, values, color="tab:green")
        ax.set_title(label)
        ax.tick_params(axis="x", rotation=30)
        for bar, r in zip(bars, runs, strict=True):
            text = next((f"{k} {v:.3g}" for k, v in r.quality.items()),
                        f"loss {_fmt(r.loss)}")
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                        ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path
