"""Energy-accounting settings (:class:`EnergyConfig`) and the carbon-intensity table.

Defaults follow Strubell et al. (2019): PUE 1.58 and the US average of 0.954 lbs CO2e per kWh.
Other regions are Ember's 2023 yearly figures (lifecycle gCO2e per kWh generated, as published
by Our World in Data, "Carbon intensity of electricity generation"); grids change every year,
so set ``carbon_intensity`` for your own supply when you know it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from attnkit.config import unknown
from attnkit.energy.strubell import KG_PER_LB, LBS_PER_KWH_US, PUE
from attnkit.errors import ConfigError

METHODS = ("auto", "rapl", "nvml", "model")


@dataclass(frozen=True)
class Region:
    kg_per_kwh: float  # kg CO2e per kWh
    source: str


_EMBER = "Ember 2023 via Our World in Data"
REGIONS: dict[str, Region] = {
    "us-2019": Region(LBS_PER_KWH_US * KG_PER_LB,
                      "Strubell et al. 2019: US average 0.954 lbs/kWh (EPA 2018)"),
    "world": Region(0.481, "Ember, Global Electricity Review 2024: world average 2023"),
    "china": Region(0.582, _EMBER),
    "india": Region(0.713, _EMBER),
    "germany": Region(0.381, _EMBER),
    "france": Region(0.056, _EMBER),
    "canada": Region(0.170, _EMBER),
    "australia": Region(0.549, _EMBER),
    "brazil": Region(0.098, _EMBER),
    "norway": Region(0.030, "Ember 2023 (Statista, 'emission intensity ... 2023')"),
}


@dataclass(frozen=True)
class EnergyConfig:
    """How a run's energy is measured and converted (``--set train.energy.KEY=VALUE``).

    ``method``: ``auto`` takes RAPL counters for CPU and DRAM when readable and NVML for NVIDIA
    GPUs, else the CPU-time model: CPU seconds x ``cpu_watts_per_core`` + wall hours x resident
    memory x ``dram_watts_per_gb``. A named method that is unavailable is an error.
    """

    method: Literal["auto", "rapl", "nvml", "model"] = "auto"
    pue: float = PUE  # data-centre power usage effectiveness (Strubell et al.: 1.58)
    region: str = "us-2019"  # a key of REGIONS
    carbon_intensity: float = 0.0  # kg CO2e per kWh; > 0 overrides the region
    price_per_kwh: float = 0.13  # USD; about the 2023 US average retail price (EIA)
    price_per_hour: float = 0.0  # USD per wall-clock hour of the machine (cloud instance)
    cpu_watts_per_core: float = 7.5  # a busy core: e.g. Xeon Platinum 8280, 205 W / 28 cores
    dram_watts_per_gb: float = 0.375  # 3 W per 8 GB of resident memory
    powercap_root: str = "/sys/class/powercap"  # where the RAPL counters live

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise unknown("train.energy.method", self.method, METHODS)
        if self.region not in REGIONS:
            raise unknown("train.energy.region", self.region, REGIONS)
        if self.pue < 1.0:
            raise ConfigError(f"train.energy.pue must be >= 1, got {self.pue}")
        for name in ("carbon_intensity", "price_per_kwh", "price_per_hour",
                     "cpu_watts_per_core", "dram_watts_per_gb"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.energy.{name} must be >= 0, got {getattr(self, name)}")

    @property
    def kg_per_kwh(self) -> float:
        """The carbon intensity in use: ``carbon_intensity`` if set, else the region's."""
        return self.carbon_intensity or REGIONS[self.region].kg_per_kwh

    @property
    def intensity_source(self) -> str:
        return "carbon_intensity setting" if self.carbon_intensity else self.region
