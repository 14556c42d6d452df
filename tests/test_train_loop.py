"""fit(): token-normalised accumulation, exact resume after SIGKILL, logs, eval and best."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _resume import assert_resumed, mark_log
from _train_script import Batch, HalfBatches, RandomBatches, TinyModel, loss_fn, make_batch
from attnkit.errors import UserError
from attnkit.train import OptimConfig, TrainConfig, fit, latest_checkpoint, load_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_train_script.py"
OPT = OptimConfig(name="adamw", lr=1e-2, weight_decay=0.1, schedule="cosine", warmup_steps=2)


def _cfg(**kw) -> TrainConfig:
    base = dict(steps=6, save_every=2, log_every=1, eval_every=0, seed=3, optim=OPT)
    return TrainConfig(**{**base, **kw})


def _model(dropout: float = 0.1) -> TinyModel:
    torch.manual_seed(0)
    return TinyModel(dropout)


def _run(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    return subprocess.Popen([sys.executable, str(SCRIPT), *args], env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def test_accumulation_equals_one_big_batch_with_unequal_tokens(tmp_path):
    torch.set_num_threads(1)
    full = _model(0.0)
    fit(full, loss_fn, RandomBatches(seed=5, rows=8), _cfg(steps=3), tmp_path / "a",
        progress=False)
    split = _model(0.0)
    halves = HalfBatches(seed=5, rows=8, split=3)
    first, second = make_batch(5, 0, 8).rows(0, 3), make_batch(5, 0, 8).rows(3, 8)
    assert first.n_tokens != second.n_tokens  # unequal rows (3, 5) and tokens
    fit(split, loss_fn, halves, _cfg(steps=3, accum_steps=2), tmp_path / "b", progress=False)
    for (k, a), b in zip(full.state_dict().items(), split.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=k)
    logs = [list(map(json.loads, open(tmp_path / run / "metrics.jsonl"))) for run in "ab"]
    for field in ("loss", "grad_norm", "lr"):
        assert [r[field] for r in logs[0]] == pytest.approx([r[field] for r in logs[1]],
                                                            abs=1e-6)


def test_one_step_matches_explicit_token_mean_update(tmp_path):
    torch.set_num_threads(1)
    model = _model(0.0)
    ref = _model(0.0)
    opt = OptimConfig(name="adam", lr=0.05, schedule="constant", warmup_steps=0)
    cfg = TrainConfig(steps=1, clip_norm=0.0, log_every=1, eval_every=0, optim=opt)
    fit(model, loss_fn, RandomBatches(seed=1, rows=6), cfg, tmp_path, progress=False)
    batch = make_batch(1, 0, 6)
    logits = ref(batch.x).double()
    nll = F.cross_entropy(logits.transpose(1, 2), batch.y, reduction="none")
    (nll[batch.mask].sum() / batch.mask.sum()).backward()  # token mean over the whole batch
    torch.optim.Adam(ref.parameters(), lr=0.05, betas=(0.9, 0.98), eps=1e-9).step()
    for a, b in zip(model.parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)
    record = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert record["loss"] == pytest.approx(nll[batch.mask].mean().item(), abs=1e-6)


def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < end, "no checkpoint appeared"
        time.sleep(0.02)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    steps = ["--steps", "12", "--save-every", "2"]
    ref = _run([*steps, "--run-dir", str(tmp_path / "ref"), "--out", str(tmp_path / "ref.st")])
    victim = _run([*steps, "--delay", "0.1", "--run-dir", str(tmp_path / "run"),
                   "--out", str(tmp_path / "killed.st")])
    _wait_for(tmp_path / "run" / "checkpoints" / "step-000004.safetensors", victim)
    time.sleep(0.15)  # now mid-way through step 5 or 6
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    assert not (tmp_path / "killed.st").exists()
    killed_at = load_state(latest_checkpoint(tmp_path / "run"))["step"]
    assert 4 <= killed_at < 12
    before = mark_log(tmp_path / "run")
    resumed = _run([*steps, "--run-dir", str(tmp_path / "run"), "--out", str(tmp_path / "res.st")])
    out, err = resumed.communicate(timeout=120)
    assert resumed.returncode == 0, err
    assert f"resuming from {tmp_path / 'run' / 'checkpoints'}" in err
    assert_resumed(tmp_path / "run", killed_at, err, before)
    out_ref, err_ref = ref.communicate(timeout=120)
    assert ref.returncode == 0, err_ref
    assert out.strip() == out_ref.strip()  # same final step and token count
    a, b = load_file(tmp_path / "ref.st"), load_file(tmp_path / "res.st")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps_logged = [r["step"] for r in map(json.loads, open(tmp_path / "run" / "metrics.jsonl"))]
    assert steps_logged == list(range(1, 13))  # records after the checkpoint were rewritten


class Crash(Exception):
    pass


def test_in_process_resume_with_dropout_is_bitwise_identical(tmp_path, capsys):
    torch.set_num_threads(1)
    ref = _model()
    fit(ref, loss_fn, RandomBatches(seed=2), _cfg(steps=7, accum_steps=2), tmp_path / "ref",
        progress=False)
    calls = {"n": 0}

    def crashing(m, b: Batch):
        calls["n"] += 1
        if calls["n"] == 11:  # step 6, first micro-batch: after the step-4 checkpoint
            raise Crash
        return loss_fn(m, b)

    with pytest.raises(Crash):
        fit(_model(), crashing, RandomBatches(seed=2), _cfg(steps=7, accum_steps=2),
            tmp_path / "run", progress=False)
    before = mark_log(tmp_path / "run")
    capsys.readouterr()
    torch.manual_seed(123)  # the resumed process's RNG state differs: fit must restore it
    again = _model()
    seen: list[Batch] = []
    result = fit(again, lambda m, b: seen.append(b) or loss_fn(m, b), RandomBatches(seed=2),
                 _cfg(steps=7, accum_steps=2), tmp_path / "run", progress=False)
    assert result.step == 7
    assert_resumed(tmp_path / "run", 4, capsys.readouterr().err, before)
    assert len(seen) == (7 - 4) * 2  # steps 5 to 7 only, two micro-batches each
    assert torch.equal(seen[0].x, make_batch(2, 8, 8).x)  # the stream restored to batch 4 x 2
    for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_logs_eval_best_plot_and_result(tmp_path):
    torch.set_num_threads(1)
    values = iter([3.0, 1.0, 2.0])
    seen_modes = []

    def evaluate(m):
        seen_modes.append((m.training, torch.is_grad_enabled()))
        return {"val_loss": next(values), "acc": 0.5}

    cfg = _cfg(steps=6, eval_every=2, log_every=3, save_every=3, keep_last=1,
               best_metric="val_loss")
    result = fit(_model(), loss_fn, RandomBatches(), cfg, tmp_path, evaluate=evaluate,
                 progress=False)
    assert seen_modes == [(False, False)] * 3
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    train = [r for r in records if "loss" in r]
    assert [r["step"] for r in train] == [3, 6]
    assert set(train[1]) == {"step", "loss", "lr", "tokens_per_s", "grad_norm", "elapsed",
                              "peak_memory_gib"}
    assert set(train[0]) == set(train[1]) | {"device", "precision", "attention_kernels"}
    assert [(r["step"], r["eval"]["val_loss"]) for r in records if "eval" in r] == \
        [(2, 3.0), (4, 1.0), (6, 2.0)]
    assert load_state(tmp_path / "checkpoints" / "best.state.pt")["step"] == 4
    assert sorted(p.name for p in (tmp_path / "checkpoints").glob("step-*")) == \
        ["step-000006.safetensors", "step-000006.state.pt"]
    assert (tmp_path / "plots" / "loss.png").stat().st_size > 1000
    assert result.step == 6 and result.metrics["val_loss"] == 2.0 and "loss" in result.metrics
    assert result.tokens == sum(make_batch(0, i, 8).n_tokens for i in range(6))
    again = fit(_model(), loss_fn, RandomBatches(), cfg, tmp_path, evaluate=evaluate,
                progress=False)  # already finished: nothing to do
    assert again.step == 6 and again.tokens == result.tokens


def test_resume_refusals(tmp_path):
    torch.set_num_threads(1)
    fit(_model(), loss_fn, RandomBatches(), _cfg(steps=2), tmp_path, progress=False)
    with pytest.raises(UserError, match="already holds checkpoints"):
        fit(_model(), loss_fn, RandomBatches(), _cfg(steps=4), tmp_path, resume=False,
            progress=False)

    class Wider(TinyModel):
        def __init__(self):
            super().__init__()
            self.out = torch.nn.Linear(16, 9)

    with pytest.raises(UserError, match="shape"):
        fit(Wider(), loss_fn, RandomBatches(), _cfg(steps=4), tmp_path, progress=False)
