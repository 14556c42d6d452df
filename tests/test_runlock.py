"""One training per run directory: a second process is refused with the PID of the first, and a
killed run leaves no stale lock (real processes, the real `attnkit train`)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from _runs import SRC, complete_records, one_error_line, start_cli, train_args, wait_for_steps
from attnkit import runlock
from attnkit.errors import UserError


def test_a_second_training_into_a_locked_run_is_refused_and_a_kill_frees_it(tmp_path):
    run = tmp_path / "run"
    first = start_cli(train_args(run, 100000), tmp_path)
    second = None
    try:
        wait_for_steps(run, first, 2)
        second = start_cli(train_args(run, 100000), tmp_path)
        _, err = second.communicate(timeout=120)
        assert second.returncode == 2, err
        line = one_error_line(err)
        assert f"PID {first.pid}" in line and str(run) in line, line
        assert first.poll() is None  # the first run goes on undisturbed
        # the second process appended nothing: every logged step is the first's, once
        time.sleep(0.2)
        steps = [r["step"] for r in complete_records(run / "metrics.jsonl")]
        assert steps == list(range(1, len(steps) + 1))
    finally:
        for proc in (first, second):
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.communicate()
    assert first.returncode == -signal.SIGKILL
    assert (run / runlock.LOCK).read_bytes() == b""  # the file stays, empty ...
    runlock.lock_run(run)  # ... but the kill released the lock: no stale lock
    runlock.release(run)


def test_lock_is_per_process_and_reentrant(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    runlock.lock_run(run)
    runlock.lock_run(run)  # this process holds it already: nothing to do
    try:
        probe = subprocess.run(
            [sys.executable, "-c", "import sys; from attnkit import runlock; "
             "runlock.lock_run(sys.argv[1])", str(run)],
            env={**os.environ, "PYTHONPATH": str(SRC)}, capture_output=True, text=True,
            timeout=120)
        assert probe.returncode != 0
        assert f"PID {os.getpid()}" in probe.stderr.strip().splitlines()[-1]
    finally:
        runlock.release(run)
    with pytest.raises(UserError, match="cannot create the lock file"):
        runlock.lock_run(tmp_path / "missing")
