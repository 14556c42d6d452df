"""Is building batches a bottleneck of training? Time spent in the data stream vs the step.

For the ``lm`` recipe (tiny Shakespeare, character tokenizer, random windows: its defaults) and
the ``translate`` recipe (Multi30k de-en, BPE 8000, batches by token count: its defaults), at
the ``tiny`` and ``small`` presets, on the CPU with a pinned number of threads, it times, step
by step, what :func:`attnkit.train.loop.fit` does on its thread:

- **data**: ``next(stream)`` plus ``batch.n_tokens`` (the batch built on the host);
- **step**: forward, loss, backward and AdamW update on that batch (the loop's fp32 path).

Setups are interleaved (the order alternates each round) and each figure is the median over
rounds of the per-step mean. Data preparation would be worth moving to a background thread if
it took a noticeable share of the step.

    PYTHONPATH=src python bench/data_prep.py --threads 1 --steps 5 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from attnkit.data.batching import TokenBatches
from attnkit.data.lm import LMWindows, encode_documents, read_documents
from attnkit.models import build_lm, build_seq2seq
from attnkit.recipes import lm, lm_scratch, seq2seq, translate
from attnkit.tokenizers import Tokenizer
from attnkit.train.loop import seed_everything

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # --data sets another


def lm_setup(preset: str, data: Path) -> tuple[Any, torch.nn.Module, Callable]:
    """The lm recipe's defaults (character tokenizer, block 64, batch 12) at ``preset``."""
    cfg = lm_scratch.defaults()
    docs = read_documents(str(data / "text" / "tinyshakespeare.txt"))
    tok = Tokenizer.train("char", docs, vocab_size=cfg.tokenizer.vocab_size)
    stream = LMWindows(encode_documents(tok, docs), cfg.block_size, cfg.batch_size)
    arch = cfg.model_arch if preset == "tiny" else {}  # small: GPT-2 small
    model, _ = build_lm(cfg.model, preset, arch, tok.vocab_size)
    return stream, model, lm.loss_fn


def translate_setup(preset: str, data: Path) -> tuple[Any, torch.nn.Module, Callable]:
    """The translate recipe's defaults (BPE 8000, 4096 tokens a batch) at ``preset``."""
    cfg = translate.defaults()
    pairs_text = translate.task(translate.TranslateData(dir=str(data / "multi30k"))).train
    tok = Tokenizer.train("bpe", [x for p in pairs_text for x in p],
                          vocab_size=cfg.tokenizer.vocab_size)
    model, _ = build_seq2seq(cfg.model, preset, cfg.arch, tok.vocab_size)
    pairs, _ = seq2seq.encode_pairs(tok, pairs_text, model.cfg.max_len)
    stream = TokenBatches(pairs, cfg.batch_tokens)
    return stream, model, seq2seq.loss_fn(cfg.label_smoothing)


def measure(setup: tuple[Any, torch.nn.Module, Callable], it: Any, opt: torch.optim.Optimizer,
            steps: int) -> tuple[float, float]:
    """Mean seconds per step in the data stream and in the training step."""
    _, model, loss_fn = setup
    data = step = 0.0
    for _ in range(steps):
        t0 = time.perf_counter()
        batch = next(it)
        n = int(batch.n_tokens)
        t1 = time.perf_counter()
        loss, count = loss_fn(model, batch)
        (loss / max(count, n, 1)).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        data, step = data + t1 - t0, step + time.perf_counter() - t1
    return data / steps, step / steps


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=5, help="steps per setup and round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--presets", default="tiny,small")
    p.add_argument("--json", help="also write the figures here")
    p.add_argument("--data", default=str(DATA), help="folder with text/ and multi30k/")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    seed_everything(0)
    data = Path(args.data)
    setups = {f"{name} {preset}": make(preset, data) for preset in args.presets.split(",")
              for name, make in (("lm", lm_setup), ("translate", translate_setup))}
    iters = {k: iter(s[0]) for k, s in setups.items()}
    opts = {k: torch.optim.AdamW(s[1].parameters(), lr=1e-4) for k, s in setups.items()}
    for k, s in setups.items():  # warm-up: first-call costs (allocations, epoch order)
        s[1].train()
        measure(s, iters[k], opts[k], 1)
    times: dict[str, list[tuple[float, float]]] = {k: [] for k in setups}
    names = list(setups)
    for r in range(args.rounds):
        for k in names if r % 2 == 0 else names[::-1]:
            times[k].append(measure(setups[k], iters[k], opts[k], args.steps))
    rows = {}
    print(f"# data preparation vs training step, CPU, {args.threads} thread(s), medians of "
          f"{args.rounds} rounds x {args.steps} steps")
    print("| recipe preset | data ms/step | step ms/step | data share |")
    print("|---|---:|---:|---:|")
    for k, pairs in times.items():
        data = statistics.median(d for d, _ in pairs)
        step = statistics.median(s for _, s in pairs)
        rows[k] = {"data_s": data, "step_s": step, "share": data / (data + step)}
        print(f"| {k} | {data * 1e3:.3f} | {step * 1e3:.1f} | {rows[k]['share']:.2%} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
