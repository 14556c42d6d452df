"""Peak memory of the attention variants that claim O(T) memory, at T = 4096 (8 heads x 64,
fp32, forward), measured in a fresh subprocess: a warm-up call (at T = 64; at T = 4096 for flex,
which compiles per shape), reset of the peak resident memory (/proc/self/clear_refs), one call,
VmHWM - VmRSS. The bound (64 MiB) is far below the 512 MiB
of a single (H, T, S) float32 score matrix, which the explicit path exceeds (checked too, so the
measurement can fail). Also: the flex_attention path equals SDPA with a band mask."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from attnkit.errors import ConfigError
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.flex import (
    band_mask,
    flex_band_attention,
    relative_bias,
    relative_bias_mod,
)

T, HEADS, D = 4096, 8, 64
SCORE_MATRIX_MIB = HEADS * T * T * 4 / 2**20  # 512 MiB
BOUND_MIB = 64

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from attnkit.nn.attention.core import attention
    from attnkit.nn.attention.flex import flex_band_attention, relative_bias_mod
    from attnkit.nn.attention.scores import build_score

    def status(key):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(key + ":"))

    T = {t}
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 8, T, 64, generator=g) for _ in range(3))
    cosine = build_score("cosine", 64, 64)
    calls = {{
        "fused": lambda: attention(q, k, v),
        "causal": lambda: attention(q, k, v, causal=True),
        "cosine": lambda: attention(q, k, v, score_fn=cosine),
        "flex window": lambda: attention(q, k, v, window=128, path="flex"),
        "flex causal window": lambda: attention(q, k, v, window=128, causal=True, path="flex"),
        "flex relative bias": lambda: flex_band_attention(
            q, k, v, None, score_mod=relative_bias_mod(torch.randn(8, 129), 0)),
        "explicit": lambda: attention(q, k, v, need_weights=True),
    }}
    peaks = {{}}
    with torch.no_grad():
        for name in sys.argv[1:]:
            if name.startswith("flex"):
                calls[name]()  # warm-up: compiles flex for this shape, caches the block mask
            else:
                attention(q[:, :, :64], k[:, :, :64], v[:, :, :64], need_weights=True)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # VmHWM := VmRSS
            before = status("VmRSS")
            calls[name]()
            peaks[name] = (status("VmHWM") - before) / 1024
    print(json.dumps(peaks))
""")


def _peaks(*names: str) -> dict[str, float]:
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(t=T), *names], text=True,
                         capture_output=True, check=True,
                         env={**os.environ, "PYTHONPATH": src})  # inductor needs the C compiler
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_fused_variants_keep_o_t_memory():
    peaks = _peaks("fused", "causal", "cosine", "explicit")
    assert peaks["explicit"] > SCORE_MATRIX_MIB, peaks  # the measurement sees a T x S matrix
    for name in ("fused", "causal", "cosine"):
        assert peaks[name] < BOUND_MIB, (name, peaks)


@pytest.mark.slow  # compiling flex_attention for T = 4096 takes 5-25 s on 2 loaded cores
def test_flex_window_keeps_o_t_memory():
    peaks = _peaks("flex window", "flex causal window", "flex relative bias")
    for name, peak in peaks.items():
        assert peak < BOUND_MIB, (name, peaks)


def test_flex_window_equals_sdpa_band_small():
    """The default run's one flex check (one compilation, forward only: flex has no CPU
    backward): a causal window over two key tiles, the second partial; the slow test below
    adds the non-causal window and the relative bias."""
    torch.manual_seed(1)
    t = 150  # one full 128 tile and a partial one
    q, k, v = (torch.randn(1, 2, t, 8) for _ in range(3))
    with torch.no_grad():
        ref = attention(q, k, v, mask=band_mask(t, t, 5, True))
        got = attention(q, k, v, window=5, causal=True, path="flex")
    torch.testing.assert_close(got.out, ref.out, rtol=1e-5, atol=1e-5)


@pytest.mark.slow  # four flex_attention compilations: 20-160 s on 2 loaded cores
@pytest.mark.parametrize("causal", [False, True])
def test_flex_path_equals_sdpa_band_and_relative_bias(causal):
    torch.manual_seed(0)
    t = 300  # not a multiple of the 128 tile: partial tiles are exercised
    q, k, v = (torch.randn(1, 2, t, 16) for _ in range(3))
    with torch.no_grad():
        ref = attention(q, k, v, mask=band_mask(t, t, 40, causal))
        got = attention(q, k, v, window=40, causal=causal, path="flex")
        torch.testing.assert_close(got.out, ref.out, rtol=1e-5, atol=1e-5)
        table = torch.randn(2, 2 * 20 + 1)
        got_rel = flex_band_attention(q, k, v, 40, causal, score_mod=relative_bias_mod(table, 0))
        ref_rel = attention(q, k, v, mask=band_mask(t, t, 40, causal),
                            bias=relative_bias(table, t, t))
        torch.testing.assert_close(got_rel, ref_rel.out, rtol=1e-5, atol=1e-5)


def test_flex_path_refuses_what_it_cannot_do():
    q = torch.randn(1, 1, 8, 4, requires_grad=True)
    with pytest.raises(ConfigError, match="gradients"):
        attention(q, q, q, window=2, path="flex")
    with pytest.raises(ConfigError, match="no window"):
        attention(q.detach(), q.detach(), q.detach(), path="flex")
    with pytest.raises(ConfigError, match="weights were requested"):
        attention(q, q, q, window=2, path="flex", need_weights=True)
