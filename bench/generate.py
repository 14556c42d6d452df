"""Benchmark: attnkit's generate against transformers' generate, tokens per second.

The same weights (a randomly initialised GPT-2 "mini": 6 layers x 384, 6 heads, vocabulary
50257, copied from transformers' GPT2LMHeadModel through attnkit.convert), the same prompts,
the same thread count (pinned: torch threads and CPU affinity), in one process, interleaved
(attnkit, transformers, transformers, attnkit, ...), medians of the repeats. Greedy decoding of
exactly ``--new-tokens`` tokens (min = max new tokens on both sides, so EOS cannot end a run
early); the tokens of the two libraries are compared too. Background load: the machine's busy
CPUs from /proc/stat during each run minus this process's own CPU time.

``--variant`` adds columns for proposed model changes (see docs/generation.md):
``transposed-head`` computes the output projection as ``x @ W^T`` with W^T stored contiguous
(C, V); ``transposed-all`` does so for every linear layer (Hugging Face's Conv1D layout).

    PYTHONPATH=src .venv/bin/python bench/generate.py [--batches 1 8] [--new-tokens 256]
        [--threads 1] [--repeats 3] [--prompt-len 16] [--variant transposed-head]
        [--variant transposed-all]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from attnkit.convert.gpt2 import build, config_from_hf, state_from_hf
from attnkit.generation import GenerationConfig, generate

EOS = 50256


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def timed(fn: Callable[[], list[list[int]]]) -> tuple[float, float, list[list[int]]]:
    """(seconds, CPUs busy with other processes meanwhile, fn's result)."""
    hz = os.sysconf("SC_CLK_TCK")
    busy0, _ = cpu_jiffies()
    cpu0, start = time.process_time(), time.perf_counter()
    out = fn()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu0
    busy1, _ = cpu_jiffies()
    return wall, max(0.0, ((busy1 - busy0) / hz - cpu) / wall), out


class TransposedLinear(nn.Module):
    """y = x @ W^T + b with W^T kept contiguous (in, out): the proposed decoding layout."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        self.register_buffer("weight_t", linear.weight.detach().t().contiguous())
        self.bias = None if linear.bias is None else linear.bias.detach()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.size(-1))  # (B*T, in)
        y = flat @ self.weight_t if self.bias is None else torch.addmm(self.bias, flat,
                                                                        self.weight_t)
        return y.view(*x.shape[:-1], -1)


def transpose_linears(model: nn.Module, head_only: bool) -> None:
    """Swap the output projection (or every nn.Linear) for a TransposedLinear."""
    if head_only:
        model.lm_head = TransposedLinear(model.lm_head)
        return
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, TransposedLinear(child))


def models(variants: list[str]) -> tuple[nn.Module, dict[str, nn.Module]]:
    """transformers' GPT2LMHeadModel (mini, random init) and ours with the same weights."""
    import transformers

    torch.manual_seed(0)
    hc = transformers.GPT2Config(n_embd=384, n_layer=6, n_head=6, vocab_size=50257,
                                 n_positions=1024)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    cfg = config_from_hf(hc.to_dict())
    ours: dict[str, nn.Module] = {}
    for name in ["attnkit", *variants]:
        model = build(cfg)
        model.load_state_dict(state_from_hf(hf.state_dict(), cfg))
        if name != "attnkit":
            transpose_linears(model, head_only=name == "transposed-head")
        ours[name] = model.eval()
    return hf, ours


def runners(hf: nn.Module, ours: dict[str, nn.Module], prompts: torch.Tensor, new: int
            ) -> dict[str, Callable[[], list[list[int]]]]:
    cfg = GenerationConfig(max_new_tokens=new, min_new_tokens=new, eos_id=EOS)
    width = prompts.size(1)

    def run_hf() -> list[list[int]]:
        out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                          max_new_tokens=new, min_new_tokens=new, pad_token_id=EOS)
        return out[:, width:].tolist()

    fns = {name: (lambda m=m: generate(m, prompts.tolist(), cfg)) for name, m in ours.items()}
    return {**fns, "transformers": run_hf}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--prompt-len", type=int, default=16)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--variant", action="append", default=[],
                   choices=["transposed-head", "transposed-all"])
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[: args.threads])
    import transformers

    hf, ours = models(args.variant)
    print(f"# generate, GPT-2 mini (6 x 384, 6 heads, V 50257), greedy, {args.new_tokens} new "
          f"tokens, prompt {args.prompt_len} tokens, {args.threads} thread(s) pinned, medians "
          f"of {args.repeats} interleaved repeats")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}, load average {os.getloadavg()[0]:.2f}")
    names = [*ours, "transformers"]
    print("| batch | " + " | ".join(f"{n} tok/s" for n in names)
          + " | attnkit / transformers | " + "".join(f"{v} / transformers | "
                                                   for v in args.variant)
          + "same tokens | background CPUs busy |")
    print("|---" * (len(names) + len(args.variant) + 4) + "|")
    for batch in args.batches:
        g = torch.Generator().manual_seed(batch)
        prompts = torch.randint(0, EOS, (batch, args.prompt_len), generator=g)
        fns = runners(hf, ours, prompts, args.new_tokens)
        for fn in runners(hf, ours, prompts[:, :4], 4).values():
            fn()  # warm-up
        times: dict[str, list[float]] = {n: [] for n in names}
        loads, outs = [], {}
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                wall, load, outs[name] = timed(fns[name])
                times[name].append(wall)
                loads.append(load)
        rate = {n: batch * args.new_tokens / statistics.median(ts) for n, ts in times.items()}
        same = all(outs[n] == outs["transformers"] for n in ours)
        print(f"| {batch} | " + " | ".join(f"{rate[n]:.1f}" for n in names)
              + f" | {rate['attnkit'] / rate['transformers']:.2f} | "
              + "".join(f"{rate[v] / rate['transformers']:.2f} | " for v in args.variant)
              + f"{'yes' if same else 'NO'} | {statistics.mean(loads):.2f} |")


if __name__ == "__main__":
    main()
