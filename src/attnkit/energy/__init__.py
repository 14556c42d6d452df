"""Energy and carbon accounting after Strubell, Ganesh & McCallum (2019); see docs/energy.md.

- :mod:`attnkit.energy.strubell`: the paper's formula, Table 3 inputs, Table 1 comparisons;
- :mod:`attnkit.energy.config`: :class:`EnergyConfig` (``train.energy``) and carbon intensities;
- :mod:`attnkit.energy.meter`: RAPL, NVML and the CPU-time model;
- :mod:`attnkit.energy.account`: a run's ``energy.json`` and one-line summary;
- :mod:`attnkit.energy.estimate`: time, energy, CO2e and cost before training (6 N D FLOPs);
- :mod:`attnkit.energy.report`: runs compared by energy, CO2e and quality reached.
"""

from attnkit.energy.account import RunEnergy, account, read_energy, summary_line
from attnkit.energy.config import REGIONS, EnergyConfig
from attnkit.energy.meter import EnergyMeter, Reading
from attnkit.energy.strubell import co2e_lbs, energy_kwh

__all__ = ["REGIONS", "EnergyConfig", "EnergyMeter", "Reading", "RunEnergy",
           "account", "co2e_lbs", "energy_kwh", "read_energy", "summary_line"]
