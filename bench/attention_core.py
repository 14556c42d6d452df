"""Benchmark: the attention core's fused path against its explicit path.

For 8 heads x 64 (fp32, forward, batch 1) at several lengths T, reports the median time of
interleaved repeats (fused, explicit, fused, explicit, ...) in one process, and the peak extra
memory of each path measured in a fresh subprocess (growth of its peak resident memory), with
the thread count pinned and the machine's background load recorded.

    .venv/bin/python bench/attention_core.py [--lengths 1024 4096 8192] [--threads 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

from attnkit.nn.attention.core import attention

HEADS, HEAD_DIM = 8, 64


def _inputs(t: int) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(1, HEADS, t, HEAD_DIM, generator=g) for _ in range(3))


def _run(path: str, q, k, v) -> None:
    with torch.no_grad():
        attention(q, k, v, need_weights=path == "explicit")


def peak_rss_kib() -> int:
    """This process's peak resident memory (KiB) from /proc/self/status."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def peak_memory_mib(path: str, t: int, threads: int) -> float:
    """Extra resident memory (MiB) of one forward call, measured in a fresh process."""
    # VmHWM (peak resident memory) belongs to the process image; ru_maxrss would inherit the
    # parent's peak across fork + exec.
    code = (
        "import torch, sys\n"
        f"torch.set_num_threads({threads})\n"
        "sys.path.insert(0, %r)\n" % os.path.dirname(os.path.abspath(__file__))
        + "from attention_core import _inputs, _run, peak_rss_kib\n"
        f"q, k, v = _inputs({t}); _run('{path}', q[:, :, :8], k[:, :, :8], v[:, :, :8])\n"
        "before = peak_rss_kib()\n"
        f"_run('{path}', q, k, v)\n"
        "print((peak_rss_kib() - before) / 1024)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    return float(out.stdout.strip())


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096, 8192])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"# attention core, {HEADS} heads x {HEAD_DIM}, fp32 forward, batch 1")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, load average before: {load_average()}")
    print("| T | fused ms | explicit ms | explicit / fused | fused GFLOP/s | explicit GFLOP/s "
          "| fused peak MiB | explicit peak MiB |")
    print("|---|---|---|---|---|---|---|---|")
    for t in args.lengths:
        q, k, v = _inputs(t)
        times: dict[str, list[float]] = {"fused": [], "explicit": []}
        for _ in range(args.repeats):
            for path in times:
                start = time.perf_counter()
                _run(path, q, k, v)
                times[path].append(time.perf_counter() - start)
        med = {path: statistics.median(ts) for path, ts in times.items()}
        flops = 4 * HEADS * t * t * HEAD_DIM  # two (T x D) @ (D x T)-sized products
        mem = {path: peak_memory_mib(path, t, args.threads) for path in times}
        print(f"| {t} | {med['fused'] * 1e3:.0f} | {med['explicit'] * 1e3:.0f} | "
              f"{med['explicit'] / med['fused']:.2f} | {flops / med['fused'] / 1e9:.0f} | "
              f"{flops / med['explicit'] / 1e9:.0f} | {mem['fused']:.0f} | "
              f"{mem['explicit']:.0f} |")
    print(f"# load average after: {load_average()}")


if __name__ == "__main__":
    main()
