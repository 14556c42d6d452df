"""``attnkit energy estimate`` and ``attnkit energy report`` (argument parsing in attnkit.cli)."""

from __future__ import annotations

import argparse

from attnkit.config import unknown
from attnkit.energy.config import REGIONS, EnergyConfig
from attnkit.energy.estimate import (
    HARDWARE,
    UTILISATION,
    Estimate,
    from_flops,
    from_power,
    get_hardware,
    preset_params,
)
from attnkit.energy.strubell import COMPARISONS_LBS, TABLE3, comparisons, kg_to_lbs, reproduce
from attnkit.errors import UserError


def add_arguments(sub: argparse._SubParsersAction) -> None:
    """The ``energy`` command and its two subcommands."""
    e = sub.add_parser("energy", help="estimate or compare training energy, CO2e and cost")
    esub = e.add_subparsers(dest="energy_command", required=True, metavar="SUBCOMMAND")
    est = esub.add_parser("estimate", help="time, kWh, CO2e and cost before training")
    size = est.add_mutually_exclusive_group()
    size.add_argument("--preset", help="model preset (tiny, small, base, big)")
    size.add_argument("--params", type=float, help="parameter count, e.g. 6.5e7")
    est.add_argument("--vocab", type=int, default=37_000, help="vocabulary size for --preset")
    est.add_argument("--tokens", type=float, help="training tokens (source + target)")
    est.add_argument("--hardware", help=f"one of {', '.join(HARDWARE)}")
    est.add_argument("--devices", type=int, default=1, help="number of devices")
    est.add_argument("--utilisation", type=float, default=UTILISATION,
                     help=f"fraction of peak FLOP/s reached (default {UTILISATION})")
    est.add_argument("--host-watts", type=float, default=0.0, help="CPU + DRAM power (W)")
    est.add_argument("--hours", type=float, help="measured: training hours (with --watts)")
    est.add_argument("--watts", type=float, help="measured: total average power p_c+p_r+g*p_g")
    est.add_argument("--paper", action="store_true",
                     help="reproduce Strubell et al. (2019) Table 3 from its inputs")
    est.add_argument("--pue", type=float, default=EnergyConfig.pue)
    est.add_argument("--region", default=EnergyConfig.region, help=", ".join(REGIONS))
    est.add_argument("--carbon-intensity", type=float, default=0.0, help="kg CO2e per kWh")
    est.add_argument("--price-per-kwh", type=float, default=EnergyConfig.price_per_kwh)
    est.add_argument("--price-per-hour", type=float, default=None,
                     help="USD per device-hour (default: the hardware table's, if known)")
    rep = esub.add_parser("report", help="compare runs by energy, CO2e and quality reached")
    rep.add_argument("runs", nargs="+", metavar="RUN", help="run directories")
    rep.add_argument("--plot", metavar="FILE.png", help="also draw a bar chart")


def _config(args: argparse.Namespace) -> EnergyConfig:
    if args.region not in REGIONS:
        raise unknown("region", args.region, REGIONS)
    return EnergyConfig(pue=args.pue, region=args.region, carbon_intensity=args.carbon_intensity,
                        price_per_kwh=args.price_per_kwh)


def _describe(est: Estimate) -> list[str]:
    lines = [f"time: {est.hours:,.4g} h at {est.watts:,.6g} W",
             f"energy: {est.kwh_pue:,.6g} kWh (PUE included)",
             f"CO2e: {est.co2e_kg:,.6g} kg = {est.co2e_lbs:,.6g} lbs",
             f"cost: ${est.cost_usd:,.4g}", "compared with (Strubell et al. 2019, Table 1):"]
    return lines + [f"  {c}" for c in comparisons(est.co2e_lbs)]


def _paper(cfg: EnergyConfig) -> list[str]:
    lines = [f"{'model':<17} {'hardware':<8} {'hours':>8} {'power W':>10} {'kWh-PUE':>10} "
             f"{'CO2e lbs':>10}  (paper's CO2e)"]
    for row in TABLE3:
        kwh, lbs = reproduce(row, cfg.pue, kg_to_lbs(cfg.kg_per_kwh))
        lines.append(f"{row.model:<17} {row.hardware:<8} {row.hours:>8,.0f} {row.watts:>10,.2f} "
                     f"{kwh:>10,.0f} {lbs:>10,.0f}  ({row.co2e_lbs:,.0f})")
    lines.append("BERT base: 79 h is rounded in the paper, so 1,434 lbs here vs 1,438 printed.")
    lines.append("everyday CO2e (Table 1): " + "; ".join(
        f"{name} {lbs:,.0f} lbs" for name, lbs in COMPARISONS_LBS.items()))
    return lines


def estimate(args: argparse.Namespace) -> list[str]:
    """The lines ``attnkit energy estimate`` prints."""
    cfg = _config(args)
    if args.paper:
        return _paper(cfg)
    if args.hours is not None or args.watts is not None:
        if args.hours is None or args.watts is None:
            raise UserError("--hours and --watts go together (the paper's inputs)")
        return _describe(from_power(args.hours, args.watts, cfg))
    missing = [f"--{n}" for n in ("tokens", "hardware") if getattr(args, n) is None]
    if args.preset is None and args.params is None:
        missing.insert(0, "--preset or --params")
    if missing:
        raise UserError(f"energy estimate needs {', '.join(missing)} (or --hours and --watts, "
                        "or --paper)")
    hw = get_hardware(args.hardware)
    params = args.params if args.params is not None else preset_params(args.preset, args.vocab)
    est = from_flops(params, args.tokens, args.hardware, args.devices, cfg, args.utilisation,
                     args.host_watts, args.price_per_hour)
    head = [f"{params:,.0f} parameters x {args.tokens:,.4g} tokens x 6 = {est.flops:.3e} FLOPs "
            f"on {args.devices} x {args.hardware} at {args.utilisation:g} of "
            f"{hw.peak_flops:.3g} FLOP/s"]
    return head + _describe(est)


def report(args: argparse.Namespace) -> list[str]:
    """The lines ``attnkit energy report`` prints (and the plot it draws)."""
    from attnkit.energy.report import load_run, plot, table

    runs = [load_run(r) for r in args.runs]
    lines = table(runs).splitlines()
    if args.plot:
        lines.append(f"plot: {plot(runs, args.plot)}")
    return lines


def main(args: argparse.Namespace) -> None:
    lines = estimate(args) if args.energy_command == "estimate" else report(args)
    print("\n".join(lines))
