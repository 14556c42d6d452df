"""A training run's energy account: ``energy.json``, the one-line summary, and resume.

``fit`` keeps one :class:`RunEnergy`. It meters this segment of the run, adds the segments
before it (read from ``energy.json``, or from the checkpoint's copy when that file is gone),
and writes ``energy.json`` atomically at every checkpoint, at most once a minute at logging
steps, when a single-process run fails, and at the end, when rank 0 also prints
:func:`summary_line`. Energy spent on work a crash threw away is still counted.

Conversion (Strubell et al. 2019, eq. 1-2, with the configured constants):
``kWh_PUE = PUE * (E_cpu + E_dram + E_gpu) / 3.6e6`` (joules; the same as
``PUE * t * (p_c + p_r + g * p_g) / 1000`` for average powers over ``t`` hours) and
``CO2e = intensity * kWh_PUE``; cost = ``kWh_PUE * price_per_kwh + hours * price_per_hour``.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from attnkit.energy.config import REGIONS, EnergyConfig
from attnkit.energy.meter import EnergyMeter, Reading, add, combine
from attnkit.energy.strubell import J_PER_KWH, kg_to_lbs
from attnkit.rundir import ENERGY, write_json_atomic

VERSION = 1
WRITE_EVERY_S = 60.0  # energy.json refresh period at logging steps

METHOD_NOTES = {
    "rapl": "RAPL counters (CPU packages, DRAM)",
    "nvml": "NVML GPU energy",
    "model": "model: CPU time x W/core + memory x W/GB",
}


def account(reading: Reading, cfg: EnergyConfig) -> dict[str, Any]:
    """The ``energy.json`` figures for a cumulative reading under ``cfg``."""
    kwh = reading.joules / J_PER_KWH
    kwh_pue = cfg.pue * kwh
    co2e_kg = cfg.kg_per_kwh * kwh_pue
    hours = reading.wall_s / 3600.0
    model_kwh = (reading.model_cpu_j + reading.model_dram_j) / J_PER_KWH
    return {
        "version": VERSION, "method": reading.method, "segments": reading.segments,
        "wall_s": reading.wall_s, "cpu_s": reading.cpu_s, "n_gpus": reading.n_gpus,
        "joules": {"cpu": reading.cpu_j, "dram": reading.dram_j, "gpu": reading.gpu_j},
        "avg_watts": reading.joules / reading.wall_s if reading.wall_s > 0 else 0.0,
        "kwh": kwh, "pue": cfg.pue, "kwh_pue": kwh_pue,
        "carbon_intensity_kg_per_kwh": cfg.kg_per_kwh,
        "carbon_intensity_source": (REGIONS[cfg.region].source if not cfg.carbon_intensity
                                    else "train.energy.carbon_intensity"),
        "region": cfg.region if not cfg.carbon_intensity else "custom",
        "co2e_kg": co2e_kg, "co2e_lbs": kg_to_lbs(co2e_kg),
        "cost_usd": {"electricity": kwh_pue * cfg.price_per_kwh,
                     "machine_hours": hours * cfg.price_per_hour,
                     "total": kwh_pue * cfg.price_per_kwh + hours * cfg.price_per_hour},
        "model_estimate": {"kwh": model_kwh, "cpu_watts_per_core": cfg.cpu_watts_per_core,
                           "dram_watts_per_gb": cfg.dram_watts_per_gb},
        "reading": reading.to_dict(),
    }


def _duration(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _mass(kg: float) -> str:
    return f"{kg * 1000:.3g} g" if kg < 1 else f"{kg:,.3g} kg"


def summary_line(record: dict[str, Any]) -> str:
    """``energy: 0:01:05 wall, 118 s CPU, 2.4e-04 kWh (model: ...), ...`` (one line)."""
    methods = "+".join(p for m in record["method"].split(", ") for p in m.split("+"))
    how = "; ".join(METHOD_NOTES.get(m, m) for m in dict.fromkeys(methods.split("+")))
    cost = record["cost_usd"]["total"]
    return (f"energy: {_duration(record['wall_s'])} wall, {record['cpu_s']:.0f} s CPU, "
            f"{record['kwh']:.3g} kWh ({how}), {record['kwh_pue']:.3g} kWh x PUE "
            f"{record['pue']:g}, {_mass(record['co2e_kg'])} CO2e "
            f"({record['carbon_intensity_kg_per_kwh']:.3g} kg/kWh, {record['region']}), "
            f"cost ${cost:.2g}" + (f", {record['segments']} segments"
                                   if record["segments"] > 1 else ""))


def read_energy(run_dir: str | Path) -> dict[str, Any] | None:
    """A run's ``energy.json`` (None when absent or unreadable)."""
    path = Path(run_dir) / ENERGY
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
        Reading.from_dict(record["reading"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return record if isinstance(record, dict) else None


class RunEnergy:
    """The energy account of one :func:`attnkit.train.fit` call (see the module docstring).

    ``gather(obj) -> list`` is the data-parallel all-gather (every rank must call
    :meth:`update` and :meth:`finish` at the same points); only rank 0 writes and prints.
    """

    def __init__(self, cfg: EnergyConfig, run_dir: str | Path, rank: int,
                 gather: Callable[[Any], list], checkpoint_energy: dict | None = None,
                 meter: EnergyMeter | None = None):
        self.cfg, self.run_dir, self.rank, self.gather = cfg, Path(run_dir), rank, gather
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.prior = self._earlier_segments(checkpoint_energy)
        self.meter = meter if meter is not None else EnergyMeter(cfg)
        self.total: Reading = self.prior or Reading(method=self.meter.method, segments=0)
        self.last_write = time.monotonic()
        self.stopped = False

    def _earlier_segments(self, checkpoint_energy: dict | None) -> Reading | None:
        """The larger of energy.json (written last) and the checkpoint's copy."""
        found = []
        record = read_energy(self.run_dir)
        if record is not None:
            found.append(Reading.from_dict(record["reading"]))
        if checkpoint_energy:
            try:
                found.append(Reading.from_dict(checkpoint_energy))
            except TypeError:
                pass
        return max(found, key=lambda r: r.wall_s) if found else None

    def state(self) -> dict[str, Any]:
        """The totals at the last update, as plain data for the checkpoint."""
        return self.total.to_dict()

    def update(self, step: int, tokens: int, metrics: dict | None = None,
               write: bool = True, final: bool = False) -> dict[str, Any] | None:
        """Collective: gather every rank's segment reading, add earlier segments, write."""
        local = self.meter.stop() if final else self.meter.reading()
        readings = self.gather((self.local_rank, local.to_dict()))
        segment = combine([(lr, Reading.from_dict(d)) for lr, d in readings])
        self.total = add(self.prior, segment) if self.prior is not None else segment
        if self.rank != 0 or not write:
            return None
        return self._write(step, tokens, metrics)

    def _write(self, step: int, tokens: int, metrics: dict | None) -> dict[str, Any]:
        record = account(self.total, self.cfg)
        record.update(step=step, tokens=tokens, metrics=dict(metrics or {}))
        write_json_atomic(self.run_dir / ENERGY, record)
        self.last_write = time.monotonic()
        return record

    def tick(self, step: int, tokens: int, metrics: dict | None = None) -> None:
        """At logging steps: refresh energy.json when the last write is a minute old."""
        due = time.monotonic() - self.last_write >= WRITE_EVERY_S
        self.update(step, tokens, metrics, write=due)  # rank 0's clock decides; all gather

    def finish(self, step: int, tokens: int, metrics: dict | None = None) -> dict[str, Any]:
        """Collective, at the end: final energy.json and the summary line (rank 0)."""
        self.stopped = True
        record = self.update(step, tokens, metrics, final=True)
        if record is None:
            return {}
        print(summary_line(record), file=sys.stderr, flush=True)
        return record

    def abort(self, step: int, tokens: int, world: int) -> None:
        """After a failure: stop metering; a single process records what it spent."""
        if self.stopped:
            return
        self.stopped = True
        with contextlib.suppress(Exception):  # never mask the failure being raised
            if world == 1:
                self.update(step, tokens, final=True)
            else:
                self.meter.stop()
