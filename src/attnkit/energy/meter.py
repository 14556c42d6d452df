"""Measuring the energy of one process's work: RAPL, NVML, or the CPU-time model.

Sources, best first (``EnergyConfig.method="auto"``):

- **RAPL** (Intel, and AMD Zen through the same powercap driver): cumulative microjoule
  counters ``/sys/class/powercap/intel-rapl:N/energy_uj`` per CPU package, with ``dram``
  sub-zones. A counter wraps to 0 after ``max_energy_range_uj``; a poller reads it every few
  seconds, so at most one wrap happens between reads and ``now + range - last`` recovers it.
  Package sub-zones ``core``/``uncore`` are inside the package and are not added again.
- **NVML** (``pynvml``/``nvidia-ml-py``) for NVIDIA GPUs: the total-energy counter (mJ, Volta
  and newer), else the power reading (mW) integrated by the trapezoid rule.
- **The CPU-time model** otherwise: CPU seconds (user + system, children included) x
  ``cpu_watts_per_core`` for the CPU, and wall seconds x peak resident memory (GB) x
  ``dram_watts_per_gb`` for DRAM. It is always computed too, as a cross-check.

Readings are cumulative joules per component since the meter started. Nothing here touches a
random number generator.
"""

from __future__ import annotations

import importlib
import os
import resource
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from attnkit.energy.config import EnergyConfig
from attnkit.errors import UserError


class Unavailable(Exception):
    """A measuring source cannot be used on this machine (the message says why)."""


# ---- readings ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Reading:
    """Cumulative energy and time; plain numbers and strings only (it goes into checkpoints).

    ``cpu_scope``/``gpu_scope`` say whether a component measures this process (``process``)
    or the whole node (``node``): data-parallel ranks add process readings, and node readings
    only from one rank per node.
    """

    wall_s: float = 0.0
    cpu_s: float = 0.0
    cpu_j: float = 0.0
    dram_j: float = 0.0
    gpu_j: float = 0.0
    n_gpus: int = 0
    model_cpu_j: float = 0.0  # the CPU-time model's figures, kept for comparison
    model_dram_j: float = 0.0
    method: str = "model"
    cpu_scope: str = "process"
    gpu_scope: str = "node"
    segments: int = 1

    @property
    def joules(self) -> float:
        return self.cpu_j + self.dram_j + self.gpu_j

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Reading:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


_SUMMED = ("wall_s", "cpu_s", "cpu_j", "dram_j", "gpu_j", "model_cpu_j", "model_dram_j",
           "segments")


def _join_methods(a: str, b: str) -> str:
    parts = [*a.split(", "), *b.split(", ")]
    return ", ".join(dict.fromkeys(p for p in parts if p))


def add(earlier: Reading, later: Reading) -> Reading:
    """Two consecutive segments of one run (a resumed run): totals add up."""
    summed = {k: getattr(earlier, k) + getattr(later, k) for k in _SUMMED}
    return Reading(**summed, n_gpus=max(earlier.n_gpus, later.n_gpus),
                   method=_join_methods(earlier.method, later.method),
                   cpu_scope=later.cpu_scope, gpu_scope=later.gpu_scope)


def combine(per_rank: list[tuple[int, Reading]]) -> Reading:
    """One segment measured by every data-parallel rank: ``(local rank, reading)`` pairs.

    Process-scope components add over all ranks; node-scope ones over local rank 0 only
    (one reader per node). Wall time is the longest rank's.
    """
    first = per_rank[0][1]

    def total(name: str, scope: str) -> float:
        return sum(getattr(r, name) for local, r in per_rank if scope == "process" or local == 0)

    node_gpus = sum(r.n_gpus for local, r in per_rank if local == 0)
    return Reading(wall_s=max(r.wall_s for _, r in per_rank),
                   cpu_s=sum(r.cpu_s for _, r in per_rank),
                   cpu_j=total("cpu_j", first.cpu_scope), dram_j=total("dram_j", first.cpu_scope),
                   gpu_j=total("gpu_j", first.gpu_scope), n_gpus=node_gpus,
                   model_cpu_j=total("model_cpu_j", "process"),
                   model_dram_j=total("model_dram_j", "process"), method=first.method,
                   cpu_scope=first.cpu_scope, gpu_scope=first.gpu_scope, segments=1)


# ---- the CPU-time model -----------------------------------------------------------------------

def cpu_seconds() -> float:
    """User + system CPU time of this process and its waited-for children."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def peak_rss_gb() -> float:
    """Peak resident memory of this process in GB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def model_joules(cpu_s: float, wall_s: float, rss_gb: float, cfg: EnergyConfig
                 ) -> tuple[float, float]:
    """(CPU, DRAM) joules of the CPU-time model: p_c = busy cores x W/core, p_r = GB x W/GB."""
    return cpu_s * cfg.cpu_watts_per_core, wall_s * rss_gb * cfg.dram_watts_per_gb


# ---- RAPL --------------------------------------------------------------------------------------

def _read_int(path: Path) -> int:
    return int(path.read_text().strip())


@dataclass
class _Counter:
    path: Path  # .../energy_uj
    max_range: int  # max_energy_range_uj: the counter wraps to 0 past it
    last: int
    total_uj: int = 0

    def poll(self) -> None:
        now = _read_int(self.path)
        delta = now - self.last if now >= self.last else now + self.max_range - self.last
        self.total_uj += delta
        self.last = now


class Rapl:
    """Package and DRAM counters under a powercap root (``/sys/class/powercap``)."""

    def __init__(self, root: str | Path = "/sys/class/powercap"):
        root = Path(root)
        self.cpu: list[_Counter] = []
        self.dram: list[_Counter] = []
        if not root.is_dir():
            raise Unavailable(f"no RAPL counters: {root} does not exist")
        for zone in sorted(root.glob("intel-rapl:*")):
            try:
                name = (zone / "name").read_text().strip()
                counter = _Counter(zone / "energy_uj", _read_int(zone / "max_energy_range_uj"),
                                   _read_int(zone / "energy_uj"))
            except (OSError, ValueError):  # unreadable (root-only since CVE-2020-8694)
                continue
            if name.startswith("package"):
                self.cpu.append(counter)
            elif name == "dram":
                self.dram.append(counter)
        if not self.cpu:
            raise Unavailable(f"no readable RAPL package counter under {root} "
                              "(energy_uj is often readable by root only)")

    def poll(self) -> None:
        for c in (*self.cpu, *self.dram):
            c.poll()

    def joules(self) -> tuple[float, float]:
        """(package, DRAM) joules since the counters were opened."""
        self.poll()
        return (sum(c.total_uj for c in self.cpu) / 1e6,
                sum(c.total_uj for c in self.dram) / 1e6)


# ---- NVML --------------------------------------------------------------------------------------

def _visible_gpus(count: int) -> list[int]:
    env = os.environ.get("CUDA_VISIBLE_DEVICES")
    if env is None:
        return list(range(count))
    ids = [s.strip() for s in env.split(",") if s.strip()]
    return [int(s) for s in ids if s.isdigit() and int(s) < count]


class Nvml:
    """Energy of the visible NVIDIA GPUs through NVML (``pynvml``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        try:
            self.nv = importlib.import_module("pynvml")
            self.nv.nvmlInit()
            count = self.nv.nvmlDeviceGetCount()
        except Exception as err:  # not installed, no driver, no device: all mean "not here"
            raise Unavailable(f"NVML unavailable: {err}") from None
        self.handles = [self.nv.nvmlDeviceGetHandleByIndex(i) for i in _visible_gpus(count)]
        if not self.handles:
            raise Unavailable("NVML found no GPU")
        self.clock = clock
        self.start_mj: list[int | None] = []
        for h in self.handles:
            try:
                self.start_mj.append(int(self.nv.nvmlDeviceGetTotalEnergyConsumption(h)))
            except Exception:  # older than Volta: integrate the power reading instead
                self.start_mj.append(None)
        self.integrated_j = [0.0] * len(self.handles)
        self.last_t = clock()
        self.last_w = [self._watts(h) if s is None else 0.0
                       for h, s in zip(self.handles, self.start_mj, strict=True)]

    def _watts(self, handle: Any) -> float:
        return self.nv.nvmlDeviceGetPowerUsage(handle) / 1000.0  # mW -> W

    def poll(self) -> None:
        """Integrate the power of counter-less GPUs since the last poll (trapezoid rule)."""
        now = self.clock()
        for i, (h, start) in enumerate(zip(self.handles, self.start_mj, strict=True)):
            if start is None:
                w = self._watts(h)
                self.integrated_j[i] += (w + self.last_w[i]) / 2 * (now - self.last_t)
                self.last_w[i] = w
        self.last_t = now

    def joules(self) -> float:
        self.poll()
        total = sum(self.integrated_j)
        for h, start in zip(self.handles, self.start_mj, strict=True):
            if start is not None:
                total += (int(self.nv.nvmlDeviceGetTotalEnergyConsumption(h)) - start) / 1000.0
        return total

    def close(self) -> None:
        try:
            self.nv.nvmlShutdown()
        except Exception:  # shutting down twice or after a driver error is harmless
            pass


# ---- the meter ---------------------------------------------------------------------------------

def _try(make: Callable[[], Any], required: bool, method: str) -> Any:
    try:
        return make()
    except Unavailable as err:
        if required:
            raise UserError(f"train.energy.method={method}: {err}") from None
        return None


@dataclass
class EnergyMeter:
    """Measures from construction on; :meth:`reading` gives cumulative totals; :meth:`stop`."""

    cfg: EnergyConfig
    clock: Callable[[], float] = time.monotonic
    cpu_clock: Callable[[], float] = cpu_seconds
    rss_gb: Callable[[], float] = peak_rss_gb
    poll_seconds: float = 5.0
    rapl: Rapl | None = field(init=False, default=None)
    nvml: Nvml | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        m = self.cfg.method
        if m in ("auto", "rapl", "nvml"):
            self.rapl = _try(lambda: Rapl(self.cfg.powercap_root), m == "rapl", m)
            self.nvml = _try(lambda: Nvml(self.clock), m == "nvml", m)
        self.start_wall, self.start_cpu = self.clock(), self.cpu_clock()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._thread = None
        if self.rapl is not None or self.nvml is not None:
            self._thread = threading.Thread(target=self._poll_loop, daemon=True,
                                            name="attnkit-energy")
            self._thread.start()

    @property
    def method(self) -> str:
        cpu = "rapl" if self.rapl is not None else "model"
        return cpu + ("+nvml" if self.nvml is not None else "")

    def _poll_loop(self) -> None:
        while not self._stop.wait(self.poll_seconds):
            self.poll()

    def poll(self) -> None:
        """Read the counters now (the poller does it every ``poll_seconds``)."""
        with self._lock:
            for source in (self.rapl, self.nvml):
                if source is not None:
                    source.poll()

    def reading(self) -> Reading:
        """Totals since the meter started."""
        with self._lock:
            wall = self.clock() - self.start_wall
            cpu_s = self.cpu_clock() - self.start_cpu
            model_cpu, model_dram = model_joules(cpu_s, wall, self.rss_gb(), self.cfg)
            cpu_j, dram_j, gpu_j, scope = model_cpu, model_dram, 0.0, "process"
            if self.rapl is not None:
                (cpu_j, dram_j), scope = self.rapl.joules(), "node"
                dram_j = dram_j if self.rapl.dram else model_dram  # no DRAM zone: the model
            if self.nvml is not None:
                gpu_j = self.nvml.joules()
            gpus = len(self.nvml.handles) if self.nvml is not None else 0
        return Reading(wall_s=wall, cpu_s=cpu_s, cpu_j=cpu_j, dram_j=dram_j, gpu_j=gpu_j,
                       n_gpus=gpus, model_cpu_j=model_cpu, model_dram_j=model_dram,
                       method=self.method, cpu_scope=scope)

    def stop(self) -> Reading:
        """The final reading; stops the poller and NVML."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.poll_seconds + 1)
        final = self.reading()
        if self.nvml is not None:
            self.nvml.close()
        return final
