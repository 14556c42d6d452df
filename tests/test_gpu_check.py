"""bench/gpu_check.py, the prepared script for a CUDA machine, run here at tiny shapes on the
CPU: it prints one table, writes the same rows as JSON, and its checks hold against
`transformers` (same weights: equal logits, equal greedy tokens)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_tiny_on_cpu(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1",
           "OUT": str(tmp_path / "out")}
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--tiny",
                           "--device", "cpu"], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    rows = {r["check"]: r for r in result["rows"]}
    assert list(rows) == [
        "parity GPT-2 logits fp32 (max abs diff)", "parity BERT hidden fp32 (max abs diff)",
        "GPT-2 train step bf16", "GPT-2 train MFU (measured bf16 matmul peak)",
        "generate greedy batch 1", "generate greedy batch 8", "BERT-base inference"]
    table = [line for line in proc.stdout.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(rows)  # header + one line per check
    assert [line.split(" | ")[0][2:] for line in table[1:]] == list(rows)
    # same weights as transformers: the outputs agree to float rounding
    for name in ("parity GPT-2 logits fp32 (max abs diff)",
                 "parity BERT hidden fp32 (max abs diff)"):
        assert rows[name]["attnkit vs transformers"] < 1e-4, rows[name]
        assert rows[name]["attnkit"] == 0.0  # cpu against cpu: the same computation
    for batch in (1, 8):
        assert rows[f"generate greedy batch {batch}"]["same_tokens"] is True
    train = rows["GPT-2 train step bf16"]
    # nanoGPT's count by hand for the tiny GPT-2 (V 97, L 2, C 32, T 32): per layer
    # 12 C^2 + 13 C, the final LayerNorm 2 C, the tied embedding V C (positions only looked
    # up): N = 28,576; 6 N + 12 L C T = 196,032 FLOPs a token
    n = 2 * (12 * 32 * 32 + 13 * 32) + 2 * 32 + 97 * 32
    per_token = 6 * n + 12 * 2 * 32 * 32
    assert (n, per_token) == (28_576, 196_032)
    assert "0.196 MFLOP/token" in train["note"]
    mfu = rows["GPT-2 train MFU (measured bf16 matmul peak)"]
    for lib in ("attnkit", "transformers"):
        assert train[lib] > 0
        assert 0 < mfu[lib] < 1
        assert abs(mfu[lib] - train[lib] * per_token / result["matmul_peak_flops"]) < 1e-9
    ratio = train["attnkit"] / train["transformers"]
    assert abs(train["attnkit vs transformers"] - ratio) < 1e-9
    assert result["datasheet_peak_flops"] is None  # a CPU has no datasheet row
