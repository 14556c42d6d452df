"""Energy, CO2e and cost of a training run before it starts.

Training compute is ``6 * N * D`` FLOPs for ``N`` parameters and ``D`` tokens (2 for the
forward pass and 4 for the backward pass per parameter and token; Kaplan et al. 2020, as in
nanoGPT's MFU estimate: :func:`attnkit.accel.flops_per_token` without its attention term).
GPU peaks come from :data:`attnkit.accel.PEAK_TFLOPS`. Time = FLOPs / (devices x peak FLOP/s
x utilisation); energy = Strubell et al.'s ``PUE * t * (p_c + p_r + g * p_g) / 1000`` with
each device drawing its rated power (TDP: an upper bound at full load). Or, with the paper's
own inputs, hours and measured total power directly (:func:`from_power`).
"""

from __future__ import annotations

from dataclasses import dataclass

from attnkit.accel import PEAK_TFLOPS, flops_per_token
from attnkit.config import unknown
from attnkit.energy.config import EnergyConfig
from attnkit.energy.strubell import kg_to_lbs
from attnkit.errors import UserError


@dataclass(frozen=True)
class Hardware:
    kind: str  # "gpu" or "cpu"
    watts: float  # rated board power / TDP per device
    peak_flops: float  # dense peak per device (tensor-core fp16/bf16 for GPUs, fp32 for CPUs)
    price_per_hour: float  # USD per device-hour (0 = not known)
    source: str


def _gpu(name: str, watts: float, price: float, source: str) -> Hardware:
    """A GPU of :data:`attnkit.accel.PEAK_TFLOPS` (the one peak table): its dense tensor-core
    peak, bf16 or (without bf16) fp16."""
    bf16, fp16, _ = PEAK_TFLOPS[name]
    peak = bf16 or fp16
    kind = "bf16" if bf16 else "fp16"
    return Hardware("gpu", watts, peak * 1e12, price,
                    f"{source}; {peak:g} TFLOP/s {kind} dense (attnkit.accel.PEAK_TFLOPS)")


_GCP_2019 = "; price: GCP on-demand 2019 as used by Strubell et al."
HARDWARE: dict[str, Hardware] = {
    "p100": _gpu("P100", 250, 1.46, "NVIDIA Tesla P100 PCIe datasheet: 250 W" + _GCP_2019),
    "v100": _gpu("V100", 300, 2.48, "NVIDIA V100 SXM2 datasheet: 300 W" + _GCP_2019),
    "t4": _gpu("T4", 70, 0.0, "NVIDIA T4 datasheet: 70 W"),
    "a100": _gpu("A100", 400, 0.0, "NVIDIA A100 SXM4 datasheet: 400 W"),
    "h100": _gpu("H100", 700, 0.0, "NVIDIA H100 SXM5 datasheet: 700 W"),
    "l4": _gpu("L4", 72, 0.0, "NVIDIA L4 datasheet: 72 W"),
    "rtx4090": _gpu("RTX 4090", 450, 0.0, "NVIDIA Ada whitepaper: 450 W"),
    "xeon-8280": Hardware("cpu", 205, 28 * 2.7e9 * 64, 0.0, "Intel Xeon Platinum 8280: 205 W "
                          "TDP, 28 cores x 2.7 GHz x 64 fp32 FLOP/cycle (2 AVX-512 FMA)"),
    "epyc-7763": Hardware("cpu", 280, 64 * 2.45e9 * 32, 0.0, "AMD EPYC 7763: 280 W TDP, "
                          "64 cores x 2.45 GHz x 32 fp32 FLOP/cycle (2 AVX2 FMA)"),
    "cpu-core": Hardware("cpu", 7.5, 3.0e9 * 32, 0.0, "one busy x86 core: 7.5 W (attnkit's "
                         "model default), 3 GHz x 32 fp32 FLOP/cycle (2 AVX2 FMA)"),
}
UTILISATION = 0.4  # model-FLOPs utilisation; large GPU runs reach 0.3-0.5 (PaLM: 0.46)


@dataclass(frozen=True)
class Estimate:
    """What a training run will cost (or, for :func:`from_power`, what it cost)."""

    hours: float
    watts: float  # p_c + p_r + g * p_g
    kwh_pue: float
    co2e_kg: float
    cost_usd: float  # device-hours x price + kWh x price per kWh
    flops: float = 0.0

    @property
    def co2e_lbs(self) -> float:
        return kg_to_lbs(self.co2e_kg)


def get_hardware(name: str) -> Hardware:
    if name not in HARDWARE:
        raise unknown("hardware", name, HARDWARE)
    return HARDWARE[name]


def from_power(hours: float, watts: float, cfg: EnergyConfig, device_hours: float = 0.0,
               price_per_device_hour: float = 0.0) -> Estimate:
    """The paper's inputs: ``hours`` of training at ``watts`` total average power."""
    if hours <= 0 or watts <= 0:
        raise UserError(f"hours and watts must be positive, got {hours:g} and {watts:g}")
    kwh_pue = cfg.pue * hours * watts / 1000.0
    cost = (kwh_pue * cfg.price_per_kwh + device_hours * price_per_device_hour
            + hours * cfg.price_per_hour)
    return Estimate(hours, watts, kwh_pue, cfg.kg_per_kwh * kwh_pue, cost)


def from_flops(params: float, tokens: float, hardware: str, devices: int, cfg: EnergyConfig,
               utilisation: float = UTILISATION, host_watts: float = 0.0,
               price_per_device_hour: float | None = None) -> Estimate:
    """Time and energy of ``6 N D`` FLOPs on ``devices`` x ``hardware`` at ``utilisation``.

    The cost uses ``price_per_device_hour`` (default: the hardware table's price, 0 if unknown).
    """
    if params <= 0 or tokens <= 0:
        raise UserError(f"parameters and tokens must be positive, got {params:g} and "
                        f"{tokens:g}")
    if devices < 1:
        raise UserError(f"devices must be >= 1, got {devices}")
    if not 0 < utilisation <= 1:
        raise UserError(f"utilisation must be in (0, 1], got {utilisation:g}")
    hw = get_hardware(hardware)
    flops = flops_per_token(params, 0, 0, 0) * tokens  # 6 N D (no sequence length known)
    hours = flops / (devices * hw.peak_flops * utilisation) / 3600.0
    price = hw.price_per_hour if price_per_device_hour is None else price_per_device_hour
    est = from_power(hours, devices * hw.watts + host_watts, cfg, devices * hours, price)
    return Estimate(est.hours, est.watts, est.kwh_pue, est.co2e_kg, est.cost_usd, flops)


def preset_params(preset: str, vocab: int = 37_000, model: str = "transformer") -> int:
    """Parameter count of a model preset (built on the meta device: no memory, no time)."""
    import torch

    from attnkit.models import build_seq2seq

    with torch.device("meta"):
        net, _ = build_seq2seq(model, preset, {}, vocab)
    return sum(p.numel() for p in net.parameters())
