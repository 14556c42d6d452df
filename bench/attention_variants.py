"""Benchmark: time and peak memory of every attention variant of the core (docs/attention.md).

8 heads x 64, fp32, forward only (no gradients), batch 1, at T = S = 1k / 4k / 8k. Each
(variant, T) runs in a fresh subprocess: inputs are built, one warm-up call runs (it compiles
flex_attention for that shape), the peak resident memory is reset (``/proc/self/clear_refs``),
then ``--repeats`` calls are timed; "peak MiB" is VmHWM minus VmRSS before the timed calls. The
thread count is pinned and the machine's load average is printed: the lead re-runs this on a
quiet machine. Variants that need more than ``--max-gib`` of scores are skipped (``-``).

    .venv/bin/python bench/attention_variants.py [--lengths 1024 4096 8192] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from attnkit.nn.attention.core import attention
from attnkit.nn.attention.flex import flex_band_attention, relative_bias, relative_bias_mod
from attnkit.nn.attention.hard import HardAttention
from attnkit.nn.attention.scores import build_score

HEADS, HEAD_DIM, WINDOW, REL = 8, 64, 128, 64

# name -> (what it runs, bytes of (T, S) float matrices it materialises per head-score, or 0)
VARIANTS: dict[str, tuple[str, int]] = {
    "explicit (weights asked)": ("core, need_weights=True", 3),
    "scaled_dot fused": ("core -> SDPA", 0),
    "causal fused": ("core causal=True -> SDPA is_causal", 0),
    "cosine score fused": ("core score_fn=cosine -> dot_form -> SDPA", 0),
    "general score fused": ("core score_fn=general -> dot_form -> SDPA", 0),
    "window 128, SDPA band mask": ("core window=128 path='fused'", 0),
    "window 128, flex": ("core window=128 -> flex block mask", 0),
    "causal window 128, flex": ("core window=128 causal -> flex", 0),
    "relative bias, SDPA bias tensor": ("core bias=(H, T, S) tensor", 1),
    "relative bias, flex score_mod": ("flex_band_attention(score_mod=relative_bias_mod)", 0),
    "hard (REINFORCE sample)": ("HardAttention, explicit", 3),
}


def _inputs(t: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, HEADS, t, HEAD_DIM, generator=g) for _ in range(3))


def make_call(name: str, t: int) -> Callable[[], object]:
    """A no-argument function running one forward call of ``name`` at length ``t``."""
    q, k, v = _inputs(t)
    table = torch.randn(HEADS, 2 * REL + 1) * 0.1
    calls = {
        "explicit (weights asked)": lambda: attention(q, k, v, need_weights=True),
        "scaled_dot fused": lambda: attention(q, k, v),
        "causal fused": lambda: attention(q, k, v, causal=True),
        "window 128, SDPA band mask": lambda: attention(q, k, v, window=WINDOW, path="fused"),
        "window 128, flex": lambda: attention(q, k, v, window=WINDOW, path="flex"),
        "causal window 128, flex": lambda: attention(q, k, v, window=WINDOW, causal=True,
                                                     path="flex"),
        "relative bias, flex score_mod": lambda: flex_band_attention(
            q, k, v, None, score_mod=relative_bias_mod(table, 0)),
    }
    if name in ("cosine score fused", "general score fused"):
        score = build_score(name.split()[0], HEAD_DIM, HEAD_DIM)
        return lambda: attention(q, k, v, score_fn=score)
    if name == "relative bias, SDPA bias tensor":
        # the (1, H, T, S) bias is built inside the call: it exists for every forward pass
        return lambda: attention(q, k, v, bias=relative_bias(table, t, t)[None])
    if name == "hard (REINFORCE sample)":
        hard = HardAttention(HEAD_DIM, HEAD_DIM).train()
        return lambda: hard(q, k, v)
    return calls[name]


def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def measure(name: str, t: int, repeats: int) -> dict[str, float]:
    """Run in the subprocess: median seconds and peak extra MiB of one call."""
    call = make_call(name, t)
    with torch.no_grad():
        call()  # warm-up (compiles flex for this shape, builds cached block masks)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current resident size
        before = _status("VmRSS")
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(time.perf_counter() - start)
    peak = (_status("VmHWM") - before) / 1024
    return {"s": sorted(times)[len(times) // 2], "mib": peak}


def run_fresh(name: str, t: int, threads: int, repeats: int) -> dict[str, float]:
    code = (f"import sys, json, torch; torch.set_num_threads({threads}); "
            f"sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r}); "
            "from attention_variants import measure; "
            f"print(json.dumps(measure({name!r}, {t}, {repeats})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--max-gib", type=float, default=3.0)
    args = p.parse_args()
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"# {HEADS} heads x {HEAD_DIM}, fp32 forward, batch 1, torch {torch.__version__}, "
          f"{args.threads} threads, load average before: {load}")
    print("| variant | runs | " + " | ".join(f"T={t} ms | T={t} peak MiB" for t in args.lengths)
          + " |")
    print("|---|---|" + "---|---|" * len(args.lengths))
    for name in args.variants:
        what, mats = VARIANTS[name]
        cells = []
        for t in args.lengths:
            if mats * HEADS * t * t * 4 / 2**30 > args.max_gib:
                cells += ["-", "-"]
                continue
            r = run_fresh(name, t, args.threads, args.repeats)
            cells += [f"{r['s'] * 1e3:.0f}", f"{r['mib']:.0f}"]
        print(f"| {name} | {what} | " + " | ".join(cells) + " |", flush=True)
    print(f"# load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
