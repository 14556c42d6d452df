"""Energy accounting: the paper's formula and Table 3, RAPL/NVML/model meters."""

from __future__ import annotations

import sys
import types
from pathlib import Path

import pytest

from attnkit.energy.account import account, summary_line
from attnkit.energy.config import REGIONS, EnergyConfig
from attnkit.energy.meter import EnergyMeter, Rapl, Reading, Unavailable, add, combine
from attnkit.energy.strubell import TABLE3, co2e_lbs, energy_kwh, reproduce
from attnkit.errors import ConfigError, UserError

NO_POWERCAP = "/nonexistent/powercap"


# ---- Strubell et al. (2019) ------------------------------------------------------------------
@pytest.mark.parametrize("row", TABLE3, ids=lambda r: r.model)
def test_table3_rows_from_published_inputs(row):
    kwh, lbs = reproduce(row)
    if row.model == "BERT base":
        # The paper prints 79 h, rounded; 1.58 * 79 * 12,041.51 W gives 1,433.9 lbs where it
        # prints 1,438 (and 1,503 kWh for 1,507): the unrounded hours were ~79.2.
        assert lbs == pytest.approx(row.co2e_lbs, rel=0.005)
        assert kwh == pytest.approx(row.kwh_pue, rel=0.005)
        assert round(lbs) != row.co2e_lbs  # so the tolerance is needed, and only here
    else:
        assert round(lbs) == row.co2e_lbs
        assert round(kwh) == row.kwh_pue


def test_named_table3_values():
    rows = {r.model: reproduce(r)[1] for r in TABLE3}
    assert round(rows["Transformer base"]) == 26
    assert round(rows["Transformer big"]) == 192
    assert round(rows["ELMo"]) == 262
    assert round(rows["NAS"]) == 626_155


def test_formula_against_hand_computed_values():
    # 2 h, p_c = 100 W, p_r = 20 W, 4 GPUs at 250 W: 1.58 * 2 * 1120 / 1000 = 3.5392 kWh
    assert energy_kwh(2.0, 100.0, 20.0, 250.0, 4) == pytest.approx(3.5392, abs=1e-12)
    assert co2e_lbs(3.5392) == pytest.approx(3.3763968, abs=1e-12)  # 0.954 * 3.5392
    assert energy_kwh(1.0, 50.0, 0.0, pue=1.1) == pytest.approx(0.055, abs=1e-12)


def test_account_applies_the_formula_to_joules():
    # the same powers as energy over 7,200 s: the account must give the formula's numbers
    reading = Reading(wall_s=7200.0, cpu_s=1.0, cpu_j=100 * 7200.0, dram_j=20 * 7200.0,
                      gpu_j=4 * 250 * 7200.0, n_gpus=4)
    record = account(reading, EnergyConfig(price_per_kwh=0.1, price_per_hour=3.0))
    assert record["kwh_pue"] == pytest.approx(3.5392, rel=1e-12)
    assert record["co2e_lbs"] == pytest.approx(3.3763968, rel=1e-12)
    assert record["cost_usd"]["total"] == pytest.approx(3.5392 * 0.1 + 2 * 3.0, rel=1e-12)
    custom = account(reading, EnergyConfig(pue=1.0, carbon_intensity=0.5))
    assert custom["kwh"] == pytest.approx(2.24) and custom["co2e_kg"] == pytest.approx(1.12)
    line = summary_line(record)
    assert "\n" not in line and "3.54 kWh x PUE 1.58" in line and "CO2e" in line


def test_config_validation_and_regions():
    assert EnergyConfig().kg_per_kwh == pytest.approx(0.954 * 0.45359237)
    assert EnergyConfig(region="france").kg_per_kwh == REGIONS["france"].kg_per_kwh
    with pytest.raises(ConfigError, match="did you mean 'france'"):
        EnergyConfig(region="frace")
    with pytest.raises(ConfigError, match="pue"):
        EnergyConfig(pue=0.9)
    with pytest.raises(ConfigError, match="method"):
        EnergyConfig(method="watts")


def test_train_energy_is_a_config_section():
    from attnkit.recipes import get_recipe, resolve_config

    cfg = resolve_config(get_recipe("copy"), None, ["train.energy.pue=1.1",
                                                    "train.energy.region=norway"])
    assert cfg.train.energy.pue == 1.1 and cfg.train.energy.region == "norway"
    with pytest.raises(ConfigError, match="train.energy.pue"):
        resolve_config(get_recipe("copy"), None, ["train.energy.pu=1.1"])


# ---- RAPL ----------------------------------------------------------------------------------
def _zone(root: Path, name: str, label: str, energy: int, max_range: int) -> Path:
    zone = root / name
    zone.mkdir(parents=True)
    (zone / "name").write_text(label + "\n")
    (zone / "energy_uj").write_text(f"{energy}\n")
    (zone / "max_energy_range_uj").write_text(f"{max_range}\n")
    return zone


def _set(zone: Path, energy: int) -> None:
    (zone / "energy_uj").write_text(f"{energy}\n")


def test_rapl_sums_packages_and_dram_across_wrap_around(tmp_path):
    p0 = _zone(tmp_path, "intel-rapl:0", "package-0", 900_000, 1_000_000)
    core = _zone(tmp_path, "intel-rapl:0:0", "core", 10, 1_000_000)
    dram = _zone(tmp_path, "intel-rapl:0:1", "dram", 5_000, 2_000_000)
    p1 = _zone(tmp_path, "intel-rapl:1", "package-1", 10_000, 1_000_000)
    _zone(tmp_path, "intel-rapl-mmio:0", "package-0", 0, 1_000_000)  # a second view: ignored
    rapl = Rapl(tmp_path)
    assert len(rapl.cpu) == 2 and len(rapl.dram) == 1
    _set(p0, 100_000)  # wrapped: 900,000 -> 1,000,000 -> 0 -> 100,000 = +200,000 uJ
    _set(p1, 60_000)  # +50,000
    _set(dram, 25_000)  # +20,000
    _set(core, 999_999)  # inside the package: never added
    assert rapl.joules() == pytest.approx((0.25, 0.02), abs=1e-12)
    _set(p0, 400_000)  # +300,000, no wrap
    _set(p1, 5_000)  # wrapped: +945,000
    assert rapl.joules() == pytest.approx((0.25 + 0.3 + 0.945, 0.02), abs=1e-12)


def test_rapl_unavailable_and_meter_choice(tmp_path):
    with pytest.raises(Unavailable):
        Rapl(tmp_path / "missing")
    _zone(tmp_path / "dram-only", "intel-rapl:0:1", "dram", 0, 100)
    with pytest.raises(Unavailable, match="package"):
        Rapl(tmp_path / "dram-only")
    with pytest.raises(UserError, match="method=rapl"):
        EnergyMeter(EnergyConfig(method="rapl", powercap_root=str(tmp_path / "missing")))
    p0 = _zone(tmp_path / "ok", "intel-rapl:0", "package-0", 0, 10**9)
    clock = iter(range(0, 10**6, 100)).__next__
    meter = EnergyMeter(EnergyConfig(method="auto", powercap_root=str(tmp_path / "ok")),
                        clock=lambda: float(clock()), cpu_clock=lambda: 0.0,
                        rss_gb=lambda: 1.0)
    assert meter.method == "rapl" or meter.method == "rapl+nvml"
    _set(p0, 3_000_000)
    final = meter.stop()
    assert final.cpu_j == pytest.approx(3.0) and final.cpu_scope == "node"
    assert final.dram_j == pytest.approx(final.model_dram_j)  # no DRAM zone: the model's


# ---- NVML (mocked) ---------------------------------------------------------------------------
def _fake_nvml(energy_mj: list[int], watts: list[float]) -> types.ModuleType:
    """Device 0 has the total-energy counter; device 1 only a power reading."""
    nv = types.ModuleType("pynvml")
    nv.nvmlInit = lambda: None
    nv.nvmlShutdown = lambda: None
    nv.nvmlDeviceGetCount = lambda: 2
    nv.nvmlDeviceGetHandleByIndex = lambda i: i

    def total_energy(handle):
        if handle == 1:
            raise RuntimeError("NVML_ERROR_NOT_SUPPORTED")
        return energy_mj[0]

    nv.nvmlDeviceGetTotalEnergyConsumption = total_energy
    nv.nvmlDeviceGetPowerUsage = lambda handle: int(watts[0] * 1000)  # mW
    return nv


def test_nvml_counter_and_power_integration(monkeypatch):
    energy_mj, watts, now = [1_000_000], [100.0], [0.0]
    monkeypatch.setitem(sys.modules, "pynvml", _fake_nvml(energy_mj, watts))
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    meter = EnergyMeter(EnergyConfig(method="nvml", powercap_root=NO_POWERCAP),
                        clock=lambda: now[0], cpu_clock=lambda: 0.0, rss_gb=lambda: 0.0)
    assert meter.method == "model+nvml"
    now[0], watts[0] = 10.0, 200.0
    meter.poll()  # device 1: (100 + 200) / 2 W x 10 s = 1,500 J
    now[0], energy_mj[0] = 20.0, 1_250_000  # device 0: +250,000 mJ = 250 J
    reading = meter.stop()  # device 1: + 200 W x 10 s = 2,000 J
    assert reading.gpu_j == pytest.approx(250 + 1500 + 2000)
    assert reading.n_gpus == 2 and reading.wall_s == 20.0


def test_nvml_absent(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import fails
    with pytest.raises(UserError, match="NVML"):
        EnergyMeter(EnergyConfig(method="nvml", powercap_root=NO_POWERCAP))


# ---- the CPU-time model ----------------------------------------------------------------------
def test_cpu_time_model(monkeypatch):
    times = {"wall": 100.0, "cpu": 5.0}
    meter = EnergyMeter(EnergyConfig(method="model", cpu_watts_per_core=10.0,
                                     dram_watts_per_gb=0.5),
                        clock=lambda: times["wall"], cpu_clock=lambda: times["cpu"],
                        rss_gb=lambda: 4.0)
    times.update(wall=160.0, cpu=125.0)  # 60 s wall, 120 CPU-seconds (2 busy cores)
    r = meter.stop()
    assert r.method == "model" and (r.wall_s, r.cpu_s) == (60.0, 120.0)
    assert r.cpu_j == pytest.approx(120 * 10.0)  # CPU seconds x W per core
    assert r.dram_j == pytest.approx(60 * 4.0 * 0.5)  # wall x GB x W per GB
    assert r.model_cpu_j == r.cpu_j


def test_without_counters_auto_is_the_model_and_codecarbon_is_no_method(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)
    assert EnergyMeter(EnergyConfig(powercap_root=NO_POWERCAP)).method == "model"
    with pytest.raises(UserError, match="train.energy.method") as err:  # backend removed
        EnergyConfig(method="codecarbon")
    assert "\n" not in str(err.value)


# ---- ranks and segments --------------------------------------------------------------------------
def test_combine_ranks_and_add_segments():
    proc = Reading(wall_s=10, cpu_s=8, cpu_j=80, dram_j=1, model_cpu_j=80, model_dram_j=1)
    node = Reading(wall_s=12, cpu_s=9, cpu_j=500, dram_j=50, gpu_j=900, n_gpus=2,
                   method="rapl+nvml", cpu_scope="node", gpu_scope="node")
    both = combine([(0, proc), (1, proc)])  # process readings add over ranks
    assert (both.cpu_j, both.cpu_s, both.wall_s) == (160, 16, 10)
    nodes = combine([(0, node), (1, node), (0, node)])  # 2 nodes, 3 ranks: local 0 counts
    assert (nodes.cpu_j, nodes.gpu_j, nodes.n_gpus, nodes.cpu_s) == (1000, 1800, 4, 27)
    total = add(both, nodes)
    assert total.segments == 2 and total.wall_s == 22 and total.cpu_j == 1160
    assert total.method == "model, rapl+nvml"
    assert Reading.from_dict({**total.to_dict(), "unknown": 1}) == total
