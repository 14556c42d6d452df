"""Data parallel (2 CPU processes, gloo) equals a single process on the same global batches."""

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
from safetensors.torch import load_file

from _resume import assert_resumed, mark_log
from attnkit.train import distributed as dist
from attnkit.train import latest_checkpoint, load_state

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "_train_script.py"


def test_single_process_fallbacks(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert dist.init_distributed() == (0, 1)
    assert dist.is_main() and dist.world_size() == 1
    model = torch.nn.Linear(2, 2)
    assert dist.wrap_ddp(model) is model and dist.unwrap(model) is model
    x = torch.ones(3)
    assert dist.all_reduce_sum(x) is x and dist.all_reduce_sum(2.5) == 2.5
    assert dist.all_gather_object({"a": 1}) == [{"a": 1}]


def test_two_process_ddp_equals_single_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    # rows 6 split 3/3 over ranks, 2 micro-batches per step, unequal tokens everywhere
    common = ["--steps", "6", "--accum", "2", "--rows", "6", "--dropout", "0",
              "--save-every", "3"]
    ddp = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
         str(SCRIPT), *common, "--run-dir", str(tmp_path / "ddp"), "--out",
         str(tmp_path / "ddp.st")],
        env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    single = subprocess.run(
        [sys.executable, str(SCRIPT), *common, "--run-dir", str(tmp_path / "one"), "--out",
         str(tmp_path / "one.st")],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120)
    out, err = ddp.communicate(timeout=120)
    assert ddp.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    assert out.count("done step 6") == 1  # only rank 0 reports and writes
    assert out.strip() == single.stdout.strip()  # same tokens seen
    a, b = load_file(tmp_path / "ddp.st"), load_file(tmp_path / "one.st")
    saved = load_file(tmp_path / "ddp" / "checkpoints" / "step-000006.safetensors")
    assert set(saved) == set(a) and not any(k.startswith("module.") for k in saved)
    logs = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")]
            for run in ("ddp", "one")]
    for field in ("loss", "grad_norm", "lr"):  # gradient scale and token normalisation
        assert [r[field] for r in logs[0]] == pytest.approx([r[field] for r in logs[1]],
                                                            rel=1e-5)
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=0, msg=key)
        assert torch.equal(saved[key], a[key])


@pytest.mark.slow
def test_ddp_resume_after_sigkill_is_bitwise_identical(tmp_path):
    """Dropout on: each rank's RNG state must be saved and restored separately."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT / "src")}
    base = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
            "--standalone", str(SCRIPT), "--steps", "12", "--accum", "2", "--rows", "6"]
    ref = subprocess.run([*base, "--run-dir", str(tmp_path / "ref"), "--out",
                          str(tmp_path / "ref.st")], env=env, capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr[-3000:]
    victim = subprocess.Popen([*base, "--delay", "0.3", "--run-dir", str(tmp_path / "run"),
                               "--out", str(tmp_path / "x.st")], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    mark = tmp_path / "run" / "checkpoints" / "step-000004.safetensors"
    end = time.monotonic() + 120
    while not mark.exists():
        assert victim.poll() is None and time.monotonic() < end
        time.sleep(0.02)
    time.sleep(0.3)
    workers = subprocess.run(["ps", "-o", "pid=", "--ppid", str(victim.pid)],
                             capture_output=True, text=True).stdout.split()
    assert len(workers) == 2
    for pid in [*map(int, workers), victim.pid]:
        os.kill(pid, signal.SIGKILL)
    victim.wait()
    assert not (tmp_path / "x.st").exists()
    killed_at = load_state(latest_checkpoint(tmp_path / "run"))["step"]
    before = mark_log(tmp_path / "run")
    res = subprocess.run([*base, "--run-dir", str(tmp_path / "run"), "--out",
                          str(tmp_path / "res.st")], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "resuming from" in res.stderr
    assert_resumed(tmp_path / "run", killed_at, res.stderr, before)
    a, b = load_file(tmp_path / "ref.st"), load_file(tmp_path / "res.st")
    for key in a:
        assert torch.equal(a[key], b[key]), key
