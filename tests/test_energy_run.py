"""energy.json from fit() (surviving resume) and the `attnkit energy` commands."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from _resume import assert_resumed, mark_log
from _train_script import RandomBatches, TinyModel, loss_fn
from attnkit.cli import main
from attnkit.energy.account import account, read_energy
from attnkit.energy.config import EnergyConfig
from attnkit.energy.estimate import from_flops, preset_params
from attnkit.energy.meter import Reading
from attnkit.train import OptimConfig, TrainConfig, fit, latest_checkpoint, load_state

MODEL_ONLY = EnergyConfig(method="model", powercap_root="/nonexistent")


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, save_every=2, log_every=1, eval_every=0, seed=3, energy=MODEL_ONLY,
                optim=OptimConfig(name="adamw", lr=1e-2, schedule="cosine", warmup_steps=2))
    return TrainConfig(**{**base, **kw})


def _model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(0.1)


class Crash(Exception):
    pass


def test_fit_writes_energy_json_and_prints_one_line(tmp_path, capsys):
    torch.set_num_threads(1)
    result = fit(_model(), loss_fn, RandomBatches(seed=2), _cfg(), tmp_path, progress=False)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("energy: ")]
    assert len(lines) == 1 and "kWh" in lines[0] and "CO2e" in lines[0] and "cost $" in lines[0]
    record = read_energy(tmp_path)
    assert record == result.energy
    assert record["method"] == "model" and record["segments"] == 1
    assert record["step"] == 6 and record["tokens"] == result.tokens
    assert record["cpu_s"] > 0 and record["wall_s"] > 0
    joules = sum(record["joules"].values())
    assert record["kwh"] == pytest.approx(joules / 3.6e6)
    assert record["kwh_pue"] == pytest.approx(1.58 * record["kwh"])
    assert record["co2e_lbs"] == pytest.approx(0.954 * record["kwh_pue"])
    assert record["joules"]["cpu"] == pytest.approx(record["cpu_s"] * 7.5)
    state = load_state(latest_checkpoint(tmp_path))
    assert Reading.from_dict(state["energy"]).segments == 1  # plain data in the checkpoint


def test_energy_survives_a_crash_and_resume_stays_bitwise(tmp_path, capsys):
    torch.set_num_threads(1)
    ref = _model()
    fit(ref, loss_fn, RandomBatches(seed=2), _cfg(steps=7), tmp_path / "ref", progress=False)
    calls = {"n": 0}

    def crashing(m, b):
        calls["n"] += 1
        if calls["n"] == 6:  # step 6, after the step-4 checkpoint
            raise Crash
        return loss_fn(m, b)

    with pytest.raises(Crash):
        fit(_model(), crashing, RandomBatches(seed=2), _cfg(steps=7), tmp_path / "run",
            progress=False)
    first = read_energy(tmp_path / "run")  # written on the way out: the lost step counts
    assert first["segments"] == 1 and first["step"] == 5
    state = load_state(latest_checkpoint(tmp_path / "run"))
    assert state["step"] == 4 and state["energy"]["wall_s"] <= first["wall_s"]
    before = mark_log(tmp_path / "run")
    capsys.readouterr()
    torch.manual_seed(123)
    again = _model()
    fit(again, loss_fn, RandomBatches(seed=2), _cfg(steps=7), tmp_path / "run", progress=False)
    assert_resumed(tmp_path / "run", 4, capsys.readouterr().err, before)
    for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    final = read_energy(tmp_path / "run")
    assert final["segments"] == 2 and final["step"] == 7
    assert final["wall_s"] > first["wall_s"] and final["cpu_s"] > first["cpu_s"]
    (tmp_path / "run" / "energy.json").unlink()  # gone: the checkpoint's copy is the fallback
    fit(_model(), loss_fn, RandomBatches(seed=2), _cfg(steps=7), tmp_path / "run",
        progress=False)
    assert read_energy(tmp_path / "run")["segments"] == 3


# ---- attnkit energy estimate -----------------------------------------------------------------
def test_estimate_paper_table(capsys):
    assert main(["energy", "estimate", "--paper"]) == 0
    out = capsys.readouterr().out
    rows = {line.split("  ")[0]: line for line in out.splitlines()}
    assert rows["Transformer big"].split()[-2] == "192"
    assert rows["Transformer base"].split()[-2] == "26"
    assert "626,155  (626,155)" in out and "1,984 lbs" in out


def test_gpu_peaks_are_the_datasheets_dense_tensor_figures():
    """The estimator's GPUs read the one peak table (attnkit.accel.PEAK_TFLOPS); the figures
    typed here are the vendors' datasheets' dense (no sparsity) bf16, or fp16 without bf16."""
    from attnkit.energy.estimate import HARDWARE

    published = {"p100": 18.7, "v100": 125, "t4": 65, "a100": 312, "h100": 989, "l4": 121,
                 "rtx4090": 165.2}
    assert {k: h.peak_flops / 1e12 for k, h in HARDWARE.items() if h.kind == "gpu"} == \
        pytest.approx(published)


def test_estimate_from_flops_against_hand_computed_values(capsys):
    # 6 x 1e8 x 1e9 = 6e17 FLOPs on 2 V100 (125 TFLOP/s) at 0.5: 4,800 s = 4/3 h at 600 W;
    # 1.58 x 4/3 x 0.6 = 1.264 kWh; x 0.954 = 1.205856 lbs; 8/3 device-h x $2.48 + $0.13/kWh
    est = from_flops(1e8, 1e9, "v100", 2, EnergyConfig(), utilisation=0.5)
    assert est.hours == pytest.approx(4 / 3) and est.watts == 600
    assert est.kwh_pue == pytest.approx(1.264) and est.co2e_lbs == pytest.approx(1.205856)
    assert est.cost_usd == pytest.approx(8 / 3 * 2.48 + 1.264 * 0.13)
    assert main(["energy", "estimate", "--params", "1e8", "--tokens", "1e9", "--hardware",
                 "v100", "--devices", "2", "--utilisation", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "energy: 1.264 kWh" in out and "1.20586 lbs" in out and "New York" in out


def test_estimate_from_measured_power_and_preset(capsys):
    assert main(["energy", "estimate", "--hours", "84", "--watts", "1515.43"]) == 0
    assert "191.876 lbs" in capsys.readouterr().out  # Table 3: Transformer big, 192
    assert preset_params("base") == 63_082_496  # README: 63.1M with a 37k vocabulary
    assert main(["energy", "estimate", "--preset", "base", "--tokens", "1e9", "--hardware",
                 "cpu-core"]) == 0
    assert "63,082,496 parameters" in capsys.readouterr().out


# ---- attnkit energy report -------------------------------------------------------------------
def _fake_run(root: Path, name: str, joules: float, bleu: float) -> Path:
    run = root / name
    run.mkdir()
    record = account(Reading(wall_s=600.0, cpu_s=900.0, cpu_j=joules), EnergyConfig())
    record.update(step=100, tokens=1000, metrics={})
    (run / "energy.json").write_text(json.dumps(record))
    (run / "results.json").write_text(json.dumps(
        {"test": {"bleu": bleu, "examples": 5, "decode_seconds": 1.0}}))
    (run / "metrics.jsonl").write_text(
        '{"step": 50, "loss": 3.0}\n{"step": 100, "loss": 2.5}\n'
        '{"step": 100, "eval": {"val_loss": 2.75}}\n')
    return run


def test_report_table_and_plot(tmp_path, capsys):
    a = _fake_run(tmp_path, "run-a", 3.6e6 / 1.58, 20.0)  # exactly 1 kWh with PUE
    b = _fake_run(tmp_path, "run-b", 2 * 3.6e6 / 1.58, 30.0)
    png = tmp_path / "cost.png"
    assert main(["energy", "report", str(a), str(b), "--plot", str(png)]) == 0
    lines = capsys.readouterr().out.splitlines()
    row_a = next(line for line in lines if line.startswith("run-a"))
    row_b = next(line for line in lines if line.startswith("run-b"))
    assert "test/bleu 20" in row_a and row_a.split()[-1] == "20"  # BLEU per kWh
    assert row_b.split()[-1] == "15" and " 2 " in row_b  # 30 BLEU / 2 kWh
    assert "2.5" in row_a and "2.75" in row_a  # last train and validation loss
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- bad input: one line, exit 2 ---------------------------------------------------------------
@pytest.mark.parametrize("args, fragment", [
    (["energy", "estimate"], "needs --preset or --params"),
    (["energy", "estimate", "--hours", "3"], "--hours and --watts go together"),
    (["energy", "estimate", "--hours", "-1", "--watts", "10"], "must be positive"),
    (["energy", "estimate", "--params", "1e6", "--tokens", "1e6", "--hardware", "v10"],
     "did you mean 'v100'"),
    (["energy", "estimate", "--params", "1e6", "--tokens", "1e6", "--hardware", "v100",
      "--utilisation", "0"], "utilisation"),
    (["energy", "estimate", "--paper", "--region", "mars"], "unknown region"),
    (["energy", "estimate", "--paper", "--pue", "0.5"], "pue"),
])
def test_estimate_bad_input(args, fragment, capsys):
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error:") and "\n" not in err and fragment in err, err


def test_report_bad_input(tmp_path, capsys):
    (tmp_path / "old").mkdir()
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "energy.json").write_text("{not json")
    for run, fragment in (("old", "no readable energy.json"), ("missing", "not found"),
                          ("broken", "no readable energy.json")):
        capsys.readouterr()
        assert main(["energy", "report", str(tmp_path / run)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("attnkit: error:") and "\n" not in err and fragment in err, err
