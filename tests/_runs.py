"""Helpers for tests that drive tiny `attnkit train copy` runs in real subprocesses."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
TINY = ["arch.d_model=32", "arch.d_ff=64", "arch.n_heads=2", "arch.n_encoder_layers=1",
        "arch.n_decoder_layers=1", "arch.max_len=64", "data.train_size=300",
        "data.eval_size=20", "eval_examples=10", "batch_tokens=256", "train.threads=1",
        "train.log_every=1", "train.eval_every=0", "train.save_every=100000"]


def train_args(run_dir: Path, steps: int) -> list[str]:
    """A tiny `attnkit train copy` command line (about 10 ms a step)."""
    sets = [*TINY, f"train.steps={steps}", f"run_dir={run_dir}"]
    return ["train", "copy", *[arg for item in sets for arg in ("--set", item)]]


def start_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC), "ATTNKIT_CACHE": str(cwd / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "attnkit", *map(str, args)], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def complete_records(metrics: Path) -> list[dict]:
    """The records of a metrics.jsonl another process is appending to (whole lines only)."""
    text = metrics.read_text() if metrics.exists() else ""
    return [json.loads(line) for line in text[: text.rfind("\n") + 1].splitlines()]


def wait_for_steps(run_dir: Path, proc: subprocess.Popen, n: int, timeout: float = 120.0
                   ) -> None:
    """Until ``proc`` has logged ``n`` training steps to run_dir/metrics.jsonl."""
    end = time.monotonic() + timeout
    while len(complete_records(run_dir / "metrics.jsonl")) < n:
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < end, "the run logged no steps"
        time.sleep(0.01)


def one_error_line(err: str) -> str:
    """The stderr of a refused command: exactly one `attnkit: error:` line, the last one."""
    assert "Traceback" not in err, err
    lines = [line for line in err.strip().splitlines() if line.startswith("attnkit: error:")]
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err
    return lines[0]
