"""Proof that a run resumed rather than started afresh, for every "resume is exact" test.

Equal final weights cannot tell a resume from a fresh start with the same seed: both end on
the same weights. What only a resume produces: ``fit`` names the checkpoint and its step; the
records the interrupted run logged up to that step are kept as they were (a fresh start would
drop and rewrite them); every later step is logged once, by the resumed process.

    before = mark_log(run_dir)          # after the interruption, before the resume
    ...resume...
    assert_resumed(run_dir, step, stderr, before)
"""

from __future__ import annotations

import json
from pathlib import Path

MARK = "written_before_resume"  # an extra key the tests put on the interrupted run's records


def _records(run_dir: Path) -> list[dict]:
    """The records of metrics.jsonl; a line torn by a kill is left out."""
    records = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def mark_log(run_dir: str | Path) -> list[dict]:
    """Tag every record of ``run_dir/metrics.jsonl``; returns the tagged records."""
    records = [{**r, MARK: True} for r in _records(Path(run_dir))]
    (Path(run_dir) / "metrics.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return records


def assert_resumed(run_dir: str | Path, step: int, stderr: str, before: list[dict]) -> None:
    """The run in ``run_dir`` resumed from its step-``step`` checkpoint (see the module doc);
    ``stderr``: what the resumed process printed; ``before``: what :func:`mark_log` returned."""
    said = [line for line in stderr.splitlines() if line.startswith("resuming from")]
    assert len(said) == 1, f"no single 'resuming from' line in: {stderr[-2000:]}"
    assert f"step-{step:06d}.safetensors (step {step})" in said[0], said[0]
    records = _records(Path(run_dir))
    kept = [r for r in records if r["step"] <= step]
    new = [r for r in records if r["step"] > step]
    assert kept and kept == [r for r in before if r["step"] <= step], \
        "records up to the checkpoint were dropped or rewritten"
    assert new and not any(MARK in r for r in new), "steps after the checkpoint were not rerun"
    for kind in ("loss", "eval"):  # each step logged once: nothing was redone twice
        steps = [r["step"] for r in records if kind in r]
        assert steps == sorted(set(steps)), f"{kind} records out of order or twice: {steps}"
