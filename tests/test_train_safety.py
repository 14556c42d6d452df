"""Nothing lost, nothing half-said: Ctrl-C saves and `attnkit resume` continues exactly, a
damaged newest checkpoint is skipped, divergence stops with one line, metrics are standard JSON,
a binary corpus is refused.

References: an uninterrupted run of the same configuration (bitwise), Python's strict JSON
parser, and the files on disk.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from _runs import SRC, one_error_line, start_cli, train_args, wait_for_steps
from _train_script import RandomBatches, TinyModel, loss_fn
from attnkit.cli import main
from attnkit.errors import Interrupted, UserError
from attnkit.train import OptimConfig, TrainConfig, checkpoint, fit, latest_checkpoint, load_state

OPT = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, schedule="cosine", warmup_steps=2)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, save_every=2, log_every=1, eval_every=0, seed=3, optim=OPT)
    return TrainConfig(**{**base, **kw})


def _model() -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(0.1)  # dropout: a resume must restore the RNG too


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def _strict_records(path: Path) -> list[dict]:
    """metrics.jsonl read with a parser that refuses NaN and Infinity (not JSON)."""
    def refuse(name: str) -> None:
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


# ---- Ctrl-C / SIGTERM ------------------------------------------------------------------------
def test_ctrl_c_saves_the_step_reached_and_resume_ends_bitwise_equal(tmp_path):
    steps = 600  # about 10 ms each: the signal lands mid-run
    run, ref_dir = tmp_path / "run", tmp_path / "ref"
    ref = start_cli(train_args(ref_dir, steps), tmp_path)
    victim = start_cli(train_args(run, steps), tmp_path)
    wait_for_steps(run, victim, 3)
    victim.send_signal(signal.SIGINT)
    victim.send_signal(signal.SIGINT)  # impatient second Ctrl-C: the save must still complete
    _, err = victim.communicate(timeout=120)
    assert victim.returncode == 130, err
    assert "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    step = int(last.split("after step ")[1].split(";")[0])
    assert last == (f"attnkit: stopped by SIGINT after step {step}; checkpoint saved in {run}; "
                    f"continue with: attnkit resume {run}")
    assert 3 <= step < steps
    saved = latest_checkpoint(run)
    assert saved.name == f"step-{step:06d}.safetensors"  # the step it reached, not an older one
    assert load_state(saved)["step"] == step
    logged = [r["step"] for r in _strict_records(run / "metrics.jsonl")]
    assert logged == list(range(1, step + 1))

    env = {**os.environ, "PYTHONPATH": str(SRC), "ATTNKIT_CACHE": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1"}
    resumed = subprocess.run([sys.executable, "-m", "attnkit", "resume", str(run)], cwd=tmp_path,
                             env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"resuming from {saved} (step {step})" in resumed.stderr
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err
    final = f"checkpoints/step-{steps:06d}.safetensors"
    _assert_same_weights(load_file(ref_dir / final), load_file(run / final))
    logged = [r["step"] for r in _strict_records(run / "metrics.jsonl")]
    assert logged[:steps] == list(range(1, steps + 1))


@pytest.mark.parametrize("first", [signal.SIGINT, signal.SIGTERM])
def test_a_second_ctrl_c_during_the_save_changes_nothing(first, tmp_path, monkeypatch, capsys):
    torch.set_num_threads(1)
    ref = _model()
    fit(ref, loss_fn, RandomBatches(seed=2), _cfg(steps=7, save_every=5), tmp_path / "ref",
        progress=False)
    calls = {"n": 0}

    def interrupted_loss(m, b):
        calls["n"] += 1
        if calls["n"] == 3:  # Ctrl-C (or a SIGTERM) during step 3
            os.kill(os.getpid(), first)
        return loss_fn(m, b)

    real_save_weights = checkpoint.save_weights

    def save_weights(*args, **kw):  # Ctrl-C again between the state file and the weights
        os.kill(os.getpid(), signal.SIGINT)
        return real_save_weights(*args, **kw)

    monkeypatch.setattr(checkpoint, "save_weights", save_weights)
    handler, term_handler = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        fit(_model(), interrupted_loss, RandomBatches(seed=2), _cfg(steps=7, save_every=5),
            tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert (info.value.step, info.value.signum) == (3, first)
    assert signal.getsignal(signal.SIGINT) is handler  # the caller's handlers are back
    assert signal.getsignal(signal.SIGTERM) is term_handler
    saved = latest_checkpoint(tmp_path / "run")
    assert saved.name == "step-000003.safetensors" and load_state(saved)["step"] == 3
    capsys.readouterr()
    torch.manual_seed(123)  # fit must restore the RNG state
    again = _model()
    result = fit(again, loss_fn, RandomBatches(seed=2), _cfg(steps=7, save_every=5),
                 tmp_path / "run", progress=False)
    assert f"resuming from {saved} (step 3)" in capsys.readouterr().err
    assert result.step == 7
    _assert_same_weights(ref.state_dict(), again.state_dict())


# ---- a damaged newest checkpoint ---------------------------------------------------------------
@pytest.mark.parametrize("damaged", [".safetensors", ".state.pt"])
def test_resume_skips_a_truncated_newest_checkpoint(damaged, tmp_path, capsys):
    torch.set_num_threads(1)
    run = tmp_path / "run"
    first = _model()
    fit(first, loss_fn, RandomBatches(seed=4), _cfg(), run, progress=False)
    newest = run / "checkpoints" / f"step-000006{damaged}"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])
    capsys.readouterr()
    torch.manual_seed(99)
    again = _model()
    result = fit(again, loss_fn, RandomBatches(seed=4), _cfg(), run, progress=False)
    err = capsys.readouterr().err.splitlines()
    skipped = [line for line in err if line.startswith("attnkit: skipping")]
    assert len(skipped) == 1 and f"corrupt or truncated checkpoint {newest}" in skipped[0]
    older = run / "checkpoints" / "step-000004.safetensors"
    assert f"resuming from {older} (step 4)" in "\n".join(err)
    assert result.step == 6
    _assert_same_weights(first.state_dict(), again.state_dict())
    assert [r["step"] for r in _strict_records(run / "metrics.jsonl")] == list(range(1, 7))
    load_state(newest)  # rewritten whole


def test_resume_refuses_when_every_checkpoint_is_damaged(tmp_path):
    run = tmp_path / "run"
    fit(_model(), loss_fn, RandomBatches(seed=4), _cfg(), run, progress=False)
    for p in (run / "checkpoints").glob("*.safetensors"):
        p.write_bytes(p.read_bytes()[:100])
    before = {p: p.read_bytes() for p in (run / "checkpoints").iterdir()}
    with pytest.raises(UserError, match="corrupt or truncated checkpoint .*step-000006"):
        fit(_model(), loss_fn, RandomBatches(seed=4), _cfg(), run, progress=False)
    assert {p: p.read_bytes() for p in (run / "checkpoints").iterdir()} == before


# ---- divergence ------------------------------------------------------------------------------
@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_divergence_stops_and_keeps_the_last_good_checkpoint(what, tmp_path):
    torch.set_num_threads(1)
    cfg = _cfg(steps=8, keep_last=10)
    fit(_model(), loss_fn, RandomBatches(seed=6), cfg, tmp_path / "ref", progress=False)
    calls = {"n": 0}

    def poisoned(m, b):
        calls["n"] += 1
        loss, n = loss_fn(m, b)
        if calls["n"] == 5 and what == "loss":
            return loss * math.nan, n
        if calls["n"] == 5:  # a finite loss whose gradient overflows
            loss.register_hook(lambda g: g * math.inf)
        return loss, n

    run = tmp_path / "run"
    with pytest.raises(UserError) as info:
        fit(_model(), poisoned, RandomBatches(seed=6), cfg, run, progress=False)
    message = str(info.value)
    assert "\n" not in message
    for fragment in (f"the {what} at step 5 is", "train.optim.lr (now 0.01)",
                     "train.clip_norm (now 1)", "checkpoint (step 4) is kept"):
        assert fragment in message, message
    names = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert names[-1] == "step-000004.state.pt" and not any("000005" in n for n in names)
    _assert_same_weights(load_file(tmp_path / "ref/checkpoints/step-000004.safetensors"),
                         load_file(run / "checkpoints/step-000004.safetensors"))
    assert [r["step"] for r in _strict_records(run / "metrics.jsonl")] == [1, 2, 3, 4]


def test_divergence_through_the_cli_is_one_line_exit_2(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    run = tmp_path / "run"
    args = train_args(run, 50)
    args += ["--set", "train.optim.lr=1e30", "--set", "train.clip_norm=0"]
    capsys.readouterr()
    assert main(args) == 2
    line = one_error_line(capsys.readouterr().err)
    assert "training diverged" in line and "enable clipping" in line, line
    _strict_records(run / "metrics.jsonl")


def test_metrics_are_standard_json_with_null_for_non_finite_values(tmp_path):
    def evaluate(model):
        return {"ppl": math.inf, "val_loss": math.nan, "acc": 0.5}

    fit(_model(), loss_fn, RandomBatches(seed=1), _cfg(steps=2, eval_every=1), tmp_path,
        evaluate=evaluate, progress=False)
    evals = [r["eval"] for r in _strict_records(tmp_path / "metrics.jsonl") if "eval" in r]
    assert evals == [{"ppl": None, "val_loss": None, "acc": 0.5}] * 2


# ---- a binary corpus -------------------------------------------------------------------------
def test_a_binary_corpus_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "zeros.bin"
    corpus.write_bytes(bytes(10_000))
    capsys.readouterr()
    assert main(["train", "lm", "--set", f"data.train={corpus}", "--set",
                 f"run_dir={tmp_path / 'run'}"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert f"{corpus} looks binary" in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_ranks_agree_on_the_stop_and_resume_bitwise(tmp_path):
    """SIGINT to rank 1 alone: both ranks stop after the same step and save it together."""
    script = Path(__file__).resolve().parent / "_train_script.py"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(SRC)}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone", str(script), "--steps", "12", "--accum", "2", "--rows", "6",
            "--save-every", "100"]
    ref = subprocess.Popen([*base, "--run-dir", str(tmp_path / "ref"), "--out",
                            str(tmp_path / "ref.st")], env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    run = tmp_path / "run"
    victim = subprocess.Popen([*base, "--delay", "0.2", "--run-dir", str(run), "--out",
                               str(tmp_path / "x.st")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)
    wait_for_steps(run, victim, 3)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(victim.pid)],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    ranks = {}
    for pid in workers:
        environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        ranks[int(next(e for e in environ if e.startswith(b"RANK="))[5:])] = int(pid)
    assert sorted(ranks) == [0, 1]
    os.kill(ranks[1], signal.SIGINT)
    _, err = victim.communicate(timeout=300)
    assert victim.returncode != 0 and not (tmp_path / "x.st").exists()
    assert "Interrupted: stopped by SIGINT" in err, err[-3000:]
    saved = latest_checkpoint(run)
    state = load_state(saved)
    step = state["step"]
    assert 3 <= step < 12 and saved.name == f"step-{step:06d}.safetensors"
    assert len(state["rng"]) == 2  # both ranks took part in the save
    res = subprocess.run([*base, "--run-dir", str(run), "--out", str(tmp_path / "res.st")],
                         env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert f"resuming from {saved} (step {step})" in res.stderr
    _, ref_err = ref.communicate(timeout=300)
    assert ref.returncode == 0, ref_err[-3000:]
    _assert_same_weights(load_file(tmp_path / "ref.st"), load_file(tmp_path / "res.st"))
