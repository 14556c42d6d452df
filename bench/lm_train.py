"""Training-step throughput of GPT models of one shape: attnkit vs transformers vs x-transformers.

One step = forward, cross-entropy, backward and an AdamW step (fused where PyTorch has it), on
random tokens, dropout 0. Everything runs in ONE process, the models interleaved (A B C A B C ...)
so that a change in background load hits them alike; we report medians of the repeated steps.

Model FLOPs per token (Kaplan et al. 2020; PaLM appendix B; nanoGPT's estimate_mfu):

    6 N + 12 L T C

with N the parameters except the position embeddings (the tied token embedding is counted once:
it is the LM head's matmul), L layers, T the sequence length, C the width. MFU divides
FLOPs/token x tokens/s by this machine's fp32 matmul peak, measured in the same run
(``torch.mm`` of two 4096 x 4096 matrices at the same thread count, before and after the models;
the better median is used; also by process CPU time, which discounts the time the process
spends descheduled on a busy machine). Background load: the whole machine's busy CPU from
/proc/stat during the run, minus our own process's CPU time.

    PYTHONPATH=src .venv/bin/python bench/lm_train.py --threads 1 2 --steps 10
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from attnkit.models.gpt2 import GPT2, gpt2_config


def build_models(args: argparse.Namespace) -> dict[str, Callable[[], nn.Module]]:
    """name -> constructor of a model of the benchmark shape (constructed lazily)."""
    v, t, c, layers, heads = args.vocab, args.seq, args.width, args.layers, args.heads

    def attnkit() -> nn.Module:
        return GPT2(gpt2_config("mini", vocab_size=v, n_positions=t, d_model=c, n_layers=layers,
                                n_heads=heads, dropout=0.0, attention_dropout=0.0))

    def hf() -> nn.Module:
        import transformers
        cfg = transformers.GPT2Config(vocab_size=v, n_positions=t, n_embd=c, n_layer=layers,
                                      n_head=heads, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0,
                                      attn_implementation="sdpa")
        return transformers.GPT2LMHeadModel(cfg)

    def xt() -> nn.Module:
        from x_transformers import Decoder, TransformerWrapper
        return TransformerWrapper(num_tokens=v, max_seq_len=t, tie_embedding=True,
                                  attn_layers=Decoder(dim=c, depth=layers, heads=heads,
                                                      attn_flash=True))

    def compiled() -> nn.Module:  # the first steps compile (tens of seconds): use --warmup 3
        return torch.compile(attnkit())

    return {"attnkit": attnkit, "transformers": hf, "x-transformers": xt,
            "attnkit-compiled": compiled}


def logits_of(name: str, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


def make_step(name: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor
              ) -> Callable[[], float]:
    """One training step (returns the loss) with a fused AdamW when available."""
    try:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)
    except (RuntimeError, TypeError, ValueError):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)
    model.train()

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        logits = logits_of(name, model, x)  # (B, T, V)
        loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), y.reshape(-1))
        loss.backward()
        opt.step()
        return loss.item()

    return step


def model_flops_per_token(model: GPT2) -> int:
    """6 N + 12 L T C, N without the position embeddings."""
    cfg = model.config
    n = sum(p.numel() for p in model.parameters()) - model.positions.embedding.weight.numel()
    return 6 * n + 12 * cfg.n_layers * cfg.n_positions * cfg.d_model


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call."""
    w0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w0, time.process_time() - c0


def matmul_peak(repeats: int = 3, size: int = 4096) -> tuple[float, float]:
    """Median GFLOP/s of torch.mm on two size x size fp32 matrices: (by wall, by CPU time)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)  # warm-up
    runs = [timed(lambda: torch.mm(a, b)) for _ in range(repeats)]
    flops = 2 * size ** 3 / 1e9
    return (flops / statistics.median(w for w, _ in runs),
            flops * torch.get_num_threads() / statistics.median(c for _, c in runs))


def cpu_times() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine, from the first line of /proc/stat."""
    with open("/proc/stat") as f:
        fields = [float(v) for v in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # idle + iowait
    return sum(fields) - idle, sum(fields)


def own_cpu() -> float:
    t = os.times()
    return t.user + t.system


def run_threads(threads: int, args: argparse.Namespace) -> dict:
    """Peak, then the interleaved steps of every model, then the peak again."""
    torch.set_num_threads(threads)
    peaks = [matmul_peak()]
    torch.manual_seed(0)
    x = torch.randint(0, args.vocab, (args.batch, args.seq))
    y = torch.randint(0, args.vocab, (args.batch, args.seq))
    ctors = build_models(args)
    models, steps, times = {}, {}, {}
    for name in args.models:
        torch.manual_seed(0)
        models[name] = ctors[name]()
        steps[name] = make_step(name, models[name], x, y)
        times[name] = []
    busy0, total0, own0, wall0 = *cpu_times(), own_cpu(), time.perf_counter()
    for _ in range(args.warmup):
        for name in args.models:
            steps[name]()
    for _ in range(args.steps):
        for name in args.models:
            times[name].append(timed(steps[name]))
    busy1, total1, own1, wall1 = *cpu_times(), own_cpu(), time.perf_counter()
    peaks.append(matmul_peak())
    ncpu = os.cpu_count() or 1
    machine = ncpu * (busy1 - busy0) / max(total1 - total0, 1.0)  # busy cores, on average
    ours = (own1 - own0) / (wall1 - wall0)
    return {"threads": threads, "peaks": peaks, "times": times,
            "params": {n: sum(p.numel() for p in m.parameters()) for n, m in models.items()},
            "flops": model_flops_per_token(ctors["attnkit"]()),
            "others_load": max(machine - ours, 0.0), "own_load": ours}


def report(result: dict, args: argparse.Namespace) -> str:
    """A markdown table. MFU by wall time is the figure; MFU by CPU time (process CPU seconds /
    threads, against the peak measured the same way) discounts time spent descheduled."""
    tokens, threads = args.batch * args.seq, result["threads"]
    peak = max(w for w, _ in result["peaks"])
    peak_cpu = max(c for _, c in result["peaks"])
    lines = [f"\n### {threads} thread(s)\n",
             f"fp32 matmul peak {peak:.1f} GFLOP/s (torch.mm 4096^2, before/after: "
             + ", ".join(f"{w:.1f}" for w, _ in result["peaks"]) + f"; by CPU time {peak_cpu:.1f})"
             f"; model FLOPs/token {result['flops'] / 1e6:.1f} M; background load from other "
             f"processes {result['others_load']:.2f} cores (ours {result['own_load']:.2f})\n",
             "| model | parameters | step (median) | tokens/s | MFU | MFU by CPU time "
             "| vs transformers |", "|---|---:|---:|---:|---:|---:|---:|"]
    wall = {n: statistics.median(w for w, _ in t) for n, t in result["times"].items()}
    cpu = {n: statistics.median(c for _, c in t) / threads for n, t in result["times"].items()}
    for name, m in wall.items():
        mfu = result["flops"] * tokens / m / (peak * 1e9)
        mfu_cpu = result["flops"] * tokens / cpu[name] / (peak_cpu * 1e9)
        ratio = f"{wall['transformers'] / m:.2f}x" if "transformers" in wall else "-"
        lines.append(f"| {name} | {result['params'][name]:,} | {m * 1e3:.0f} ms | "
                     f"{tokens / m:,.0f} | {mfu:.2f} | {mfu_cpu:.2f} | {ratio} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--steps", type=int, default=10, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=65, help="65 = tiny Shakespeare characters")
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--width", type=int, default=384)
    p.add_argument("--heads", type=int, default=6)
    p.add_argument("--models", nargs="+", default=["attnkit", "transformers", "x-transformers"],
                   choices=["attnkit", "transformers", "x-transformers", "attnkit-compiled"])
    args = p.parse_args(argv)
    print(f"# GPT training step: {args.layers} layers x {args.width} wide, {args.heads} heads, "
          f"T={args.seq}, B={args.batch}, vocab {args.vocab}, dropout 0, AdamW (fused), fp32; "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs; {args.steps} timed steps per "
          f"model after {args.warmup} warm-up, interleaved")
    for threads in args.threads:
        print(report(run_threads(threads, args), args))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
