"""Strubell, Ganesh & McCallum (2019), "Energy and Policy Considerations for Deep Learning in NLP".

The paper's accounting (section 3): the average power drawn by CPU (``p_c``), DRAM (``p_r``)
and each of ``g`` GPUs (``p_g``), in watts, over ``t`` hours of training, times the data-centre
power usage effectiveness (PUE 1.58, the 2018 global average of the Uptime Institute):

    p_t = 1.58 * t * (p_c + p_r + g * p_g) / 1000          kWh
    CO2e = 0.954 * p_t                                      lbs (US average, EPA 2018)

Table 3's rows are reproduced from its published inputs by :func:`table3`, and Table 1's
everyday comparisons are in :data:`COMPARISONS_LBS`.
"""

from __future__ import annotations

from dataclasses import dataclass

PUE = 1.58  # Uptime Institute 2018 global average data-centre PUE, as used by the paper
LBS_PER_KWH_US = 0.954  # the paper's US average CO2e per kWh consumed (EPA 2018)
KG_PER_LB = 0.45359237  # exact, by definition of the avoirdupois pound
J_PER_KWH = 3.6e6

# Table 1: "Estimated CO2 emissions from training common NLP models, compared to familiar
# consumption" (lbs CO2e).
COMPARISONS_LBS: dict[str, float] = {
    "air travel, 1 passenger, New York <-> San Francisco": 1_984.0,
    "human life, average, 1 year": 11_023.0,
    "American life, average, 1 year": 36_156.0,
    "car, average incl. fuel, 1 lifetime": 126_000.0,
}


def energy_kwh(hours: float, cpu_watts: float, dram_watts: float, gpu_watts: float = 0.0,
               n_gpus: int = 0, pue: float = PUE) -> float:
    """The paper's p_t = PUE * t * (p_c + p_r + g * p_g) / 1000, in kWh."""
    return pue * hours * (cpu_watts + dram_watts + n_gpus * gpu_watts) / 1000.0


def co2e_lbs(kwh: float, lbs_per_kwh: float = LBS_PER_KWH_US) -> float:
    """CO2e = 0.954 * p_t (lbs) with the paper's US-average intensity, or another one."""
    return lbs_per_kwh * kwh


def lbs_to_kg(lbs: float) -> float:
    return lbs * KG_PER_LB


def kg_to_lbs(kg: float) -> float:
    return kg / KG_PER_LB


@dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 3: hardware, hours, the measured total power and results."""

    model: str
    hardware: str
    hours: float
    watts: float  # p_c + p_r + g * p_g as published (column "Power")
    kwh_pue: float  # published column "kWh-PUE"
    co2e_lbs: float  # published column "CO2e"


# Inputs and published outputs of Table 3 (the rows whose inputs the paper gives in full).
TABLE3: tuple[PaperRow, ...] = (
    PaperRow("Transformer base", "P100x8", 12, 1_415.78, 27, 26),
    PaperRow("Transformer big", "P100x8", 84, 1_515.43, 201, 192),
    PaperRow("ELMo", "P100x3", 336, 517.66, 275, 262),
    PaperRow("BERT base", "V100x64", 79, 12_041.51, 1_507, 1_438),
    PaperRow("NAS", "P100x8", 274_120, 1_515.43, 656_347, 626_155),
)


def reproduce(row: PaperRow, pue: float = PUE, lbs_per_kwh: float = LBS_PER_KWH_US
              ) -> tuple[float, float]:
    """(kWh with PUE, lbs CO2e) recomputed from a Table 3 row's hours and power."""
    kwh = energy_kwh(row.hours, row.watts, 0.0, pue=pue)  # the published power is the sum
    return kwh, co2e_lbs(kwh, lbs_per_kwh)


def comparisons(lbs: float) -> list[str]:
    """``lbs`` CO2e as multiples of the paper's Table 1 everyday emissions."""
    return [f"{lbs / ref:.3g} x {name} ({ref:,.0f} lbs)" for name, ref in COMPARISONS_LBS.items()]
