"""Benchmark: long context. Transformer-XL, adaptive span and all-attention against a vanilla
decoder (GPT-2 family), and the flex relative-attention path against the T x S bias one.

    .venv/bin/python bench/long_context.py all --tiny            # seconds: proves it runs
    .venv/bin/python bench/long_context.py all --out runs/bench-long-context   # the real run

Parts (subcommands; ``all`` runs the three):

- ``attention``: one relative-attention layer (8 heads x 64, memory = segment length), forward
  without gradients, path "fused" (the T x S position bias through SDPA) vs path "flex"
  (flex_attention, no T x S matrix), with and without an adaptive span:
  median time of interleaved repeats and peak extra memory (VmHWM of a child process, reset
  after the warm-up call so that compilation is not counted).
- ``lm``: the four models at about equal parameter count trained for equal wall-clock time on
  character-level tiny Shakespeare, round-robin in short slices (A B C D A B C D ...) so that
  background load hits all alike; held-out bits per character, tokens/s, training peak memory
  (child process), the learned spans (plot) and the attention FLOPs they save.
- ``eval-cost``: cost per predicted token against context length L: the vanilla model
  re-encodes its L-token window for every prediction (Al-Rfou et al. 2019's evaluation), the
  XL model reads segments after a memory of L (Dai et al. 2019, section 4.5).

Thread count pinned, machine load recorded; results as Markdown on stdout and JSON (+ plots)
in ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from attnkit.data.lm import LMWindows, eval_windows, score
from attnkit.data.segments import SegmentStream, score_segments
from attnkit.losses import token_nll
from attnkit.models.gpt2 import GPT2, GPT2Config
from attnkit.models.transformer_xl import TransformerXL, xl_arch
from attnkit.nn.attention.adaptive_span import AdaptiveSpan, attention_flops, span_penalty
from attnkit.nn.attention.relative import RelativeMultiHeadAttention, relative_table
from attnkit.train.optim import param_groups

HERE = Path(__file__).resolve().parent


# ---- measuring -----------------------------------------------------------------------------------
def _status(key: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(key + ":"))


def reset_peak() -> int:
    """Reset VmHWM to the current resident size (Linux clear_refs 5); returns it in KiB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status("VmRSS")


def child_peak_mib(task: dict, threads: int) -> float:
    """Run ``task`` in a fresh process (this file, ``_probe``) and read its extra peak MiB."""
    out = subprocess.run([sys.executable, str(Path(__file__).resolve()), "_probe",
                          json.dumps(task), "--threads", str(threads)],
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def median_times(fns: dict, repeats: int) -> dict[str, float]:
    """Median seconds of each function, called interleaved (A B A B ...)."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# ---- part 1: T x S bias (fused) vs flex relative attention ---------------------------------------
def attention_layer(t: int, span: bool, path: str) -> tuple:
    torch.manual_seed(0)
    c = 512
    ad = AdaptiveSpan(8, max_span=t, ramp=32, init=0.25) if span else None
    attn = RelativeMultiHeadAttention(c, 8, span=ad, path=path).eval()
    x, mem = torch.randn(1, t, c), torch.randn(1, t, c)
    return attn, x, mem, relative_table(2 * t, c)


def run_attention(attn, x, mem, table) -> None:
    with torch.no_grad():
        attn(x, mem, table)


def part_attention(lengths: list[int], repeats: int, threads: int) -> list[dict]:
    rows = []
    print("\n## Relative attention forward, 8 heads x 64, memory = T, batch 1\n")
    print("| T | span | bias ms | flex ms | bias / flex | bias MiB | flex MiB |")
    print("|---|---|---|---|---|---|---|")
    for t in lengths:
        for span in (False, True):
            layers = {p: attention_layer(t, span, p) for p in ("fused", "flex")}
            for args in layers.values():
                run_attention(*args)  # warm-up (compiles the flex kernel)
            med = median_times({k: (lambda a=a: run_attention(*a)) for k, a in layers.items()},
                               repeats)
            mem = {k: child_peak_mib({"part": "attention", "t": t, "span": span, "path": k},
                                     threads) for k in layers}
            row = {"t": t, "span": span, **{f"{k}_ms": v * 1e3 for k, v in med.items()},
                   **{f"{k}_mib": v for k, v in mem.items()}}
            rows.append(row)
            print(f"| {t} | {'adaptive' if span else '-'} | {row['fused_ms']:.0f} | "
                  f"{row['flex_ms']:.0f} | {med['fused'] / med['flex']:.2f} | "
                  f"{mem['fused']:.0f} | {mem['flex']:.0f} |")
    return rows


# ---- part 2: equal parameters, equal training time ---------------------------------------------
def shakespeare() -> tuple[torch.Tensor, torch.Tensor, int]:
    """Character ids of tiny Shakespeare: train (first 90%), held out (last 10%), vocabulary."""
    from attnkit.recipes.lm import default_train_path
    path = default_train_path()
    if not path:
        sys.exit("tiny Shakespeare not found (../shared/data/text/tinyshakespeare.txt)")
    text = Path(path).read_text(encoding="utf-8")
    vocab = {ch: i for i, ch in enumerate(sorted(set(text)))}
    ids = torch.tensor([vocab[ch] for ch in text], dtype=torch.long)
    cut = int(len(ids) * 0.9)
    return ids[:cut], ids[cut:], len(vocab)


def build_models(vocab: int, size: dict) -> dict[str, torch.nn.Module]:
    """The four contenders at about equal parameter count (the FFN's 8C^2 per layer become
    2NC persistent parameters with N = d_ff for all-attention)."""
    c, layers, mem, ctx = size["d_model"], size["layers"], size["mem_len"], size["context"]
    common = dict(d_model=c, n_heads=4, n_layers=layers, dropout=0.1,
                  attention_path="fused")
    torch.manual_seed(0)
    return {
        "vanilla (GPT-2)": GPT2(GPT2Config(vocab_size=vocab, n_positions=ctx, d_model=c,
                                           n_heads=4, n_layers=layers, dropout=0.1,
                                           attention_dropout=0.0)),
        "Transformer-XL": TransformerXL(xl_arch("tiny", {**common, "d_ff": 4 * c,
                                                         "mem_len": mem}, vocab)),
        "adaptive span": TransformerXL(xl_arch("tiny-span", {
            **common, "d_ff": 4 * c, "mem_len": 2 * mem, "span_ramp": 16}, vocab)),
        "all-attention": TransformerXL(xl_arch("tiny-all-attention", {
            **common, "d_ff": 0, "n_persistent": 4 * c, "mem_len": 2 * mem, "span_ramp": 16},
            vocab)),
    }


class Trainer:
    """One contender: its model, optimiser, batches and the loss of one step."""

    def __init__(self, model, train_ids, size: dict, seed: int = 0) -> None:
        self.model, self.xl = model, isinstance(model, TransformerXL)
        # the recipes' rule: no decay for span fractions, norms, biases, embeddings
        self.opt = torch.optim.AdamW(param_groups(model, 0.1), lr=size["lr"], betas=(0.9, 0.99))
        if self.xl:
            self.batches = iter(SegmentStream(train_ids, size["batch"], size["seg_len"]))
        else:
            self.batches = iter(LMWindows(train_ids, size["context"], size["batch"], seed))
        self.steps, self.tokens, self.seconds, self.warmup = 0, 0, 0.0, 50
        self.lr = size["lr"]

    def step(self) -> float:
        batch = next(self.batches)
        for group in self.opt.param_groups:
            group["lr"] = self.lr * min(1.0, (self.steps + 1) / self.warmup)
        if self.xl:
            self.model.clamp_spans_()
            out = self.model(batch.ids, None if batch.reset else batch.carry.mems)
            batch.carry.mems = out.mems
            loss, n = token_nll(out.logits, batch.targets)
            loss = loss + span_penalty(self.model.spans(), self.model.cfg.span_loss) * n
        else:
            loss, n = token_nll(self.model(batch.ids).logits, batch.targets)
        (loss / n).backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.steps, self.tokens = self.steps + 1, self.tokens + n
        return loss.item() / n


def train_equal_time(trainers: dict[str, Trainer], seconds: float, slice_s: float) -> None:
    """Round-robin slices of ``slice_s`` seconds until each trainer had ``seconds``."""
    for tr in trainers.values():
        tr.model.train()
    while any(tr.seconds < seconds for tr in trainers.values()):
        for tr in trainers.values():
            start = time.perf_counter()
            while time.perf_counter() - start < slice_s and tr.seconds < seconds:
                t0 = time.perf_counter()
                tr.step()
                tr.seconds += time.perf_counter() - t0


def held_out_bpc(name: str, model, val_ids: torch.Tensor, size: dict) -> dict:
    model.eval()
    start = time.perf_counter()
    if isinstance(model, TransformerXL):
        def forward(ids, mems):
            out = model(ids, mems)
            return out.logits, out.mems
        r = score_segments(forward, val_ids, size["seg_len"])
        result = {"bpc": r.bpc}
    else:
        ctx = size["context"]
        plain = score(model, eval_windows(val_ids, ctx, 16), len(val_ids) - 1)
        slide = score(model, eval_windows(val_ids, ctx, 16, stride=ctx // 2), len(val_ids) - 1)
        result = {"bpc": slide.bpc, "bpc_non_overlapping": plain.bpc}
    return {**result, "eval_seconds": time.perf_counter() - start}


def plot_spans(spans: list[list[float]], path: Path, max_span: int) -> None:
    from attnkit.recipes.xl_lm import plot_spans as plot
    plot(spans, path, max_span)


def part_lm(size: dict, threads: int, out: Path) -> dict:
    train_ids, val_ids, vocab = shakespeare()
    val_ids = val_ids[: size["eval_chars"]]
    models = build_models(vocab, size)
    trainers = {k: Trainer(m, train_ids, size) for k, m in models.items()}
    train_equal_time(trainers, size["seconds"], size["slice"])
    print(f"\n## Equal parameters, equal training time ({size['seconds']:.0f} s each), "
          f"tiny Shakespeare, held-out first {len(val_ids):,} characters\n")
    print("| model | parameters | steps | tokens/s | held-out bpc | training peak MiB |")
    print("|---|---|---|---|---|---|")
    results = {}
    for name, tr in trainers.items():
        params = sum(p.numel() for p in tr.model.parameters())
        ev = held_out_bpc(name, tr.model, val_ids, size)
        mib = child_peak_mib({"part": "lm", "model": name, "size": size, "vocab": vocab}, threads)
        results[name] = {"parameters": params, "steps": tr.steps,
                         "tokens_per_s": tr.tokens / max(tr.seconds, 1e-9), **ev,
                         "train_peak_mib": mib}
        extra = (f" (non-overlapping windows: {ev['bpc_non_overlapping']:.3f})"
                 if "bpc_non_overlapping" in ev else "")
        print(f"| {name} | {params:,} | {tr.steps} | {results[name]['tokens_per_s']:.0f} | "
              f"{ev['bpc']:.3f}{extra} | {mib:.0f} |")
    span_model = trainers["adaptive span"].model
    keys = span_model.attention_keys(size["seg_len"])
    fixed = [size["seg_len"] + span_model.cfg.mem_len] * len(keys)
    saved = 1 - attention_flops(size["seg_len"], keys, size["d_model"]) / attention_flops(
        size["seg_len"], fixed, size["d_model"])
    spans = [z.detach().tolist() for z in span_model.spans()]
    results["adaptive span"].update(spans=spans, keys_per_layer=keys, flops_saved=saved)
    plot_spans(spans, out / "spans.png", span_model.cfg.span_max)
    print(f"\nlearned spans (per layer, per head): "
          f"{[[round(s) for s in layer] for layer in spans]}; attention FLOPs saved against "
          f"the fixed span {span_model.cfg.mem_len}: {saved:.1%} (plot: {out / 'spans.png'})")
    return results


# ---- part 3: evaluation cost against context length ---------------------------------------------
def plot_eval_cost(rows: list[dict], path: Path) -> None:
    """Milliseconds per predicted token against context length, both models, log-log."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ctx = [r["context"] for r in rows]
    fig, ax = plt.subplots(figsize=(5, 3.4))
    ax.loglog(ctx, [r["vanilla_ms_per_token"] for r in rows], "o-",
              label="vanilla (window re-encoded per token)")
    ax.loglog(ctx, [r["xl_ms_per_token"] for r in rows], "s-", label="Transformer-XL (memory)")
    for r in rows:
        ax.annotate(f"{r['speedup']:.0f}x", (r["context"], r["xl_ms_per_token"]),
                    textcoords="offset points", xytext=(0, 7), ha="center", fontsize=7)
    ax.set_xticks(ctx, [str(c) for c in ctx])
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("context length L")
    ax.set_ylabel("ms per predicted token")
    ax.set_title("speed-up of memory reuse over re-encoding", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def part_eval_cost(contexts: list[int], size: dict, repeats: int, out: Path) -> list[dict]:
    c, layers, seg = size["d_model"], size["layers"], size["seg_len"]
    print(f"\n## Evaluation cost per predicted token ({layers} x {c}, XL segments of {seg})\n")
    print("| context L | vanilla ms/token | XL ms/token | speed-up |")
    print("|---|---|---|---|")
    rows = []
    for ctx in contexts:
        torch.manual_seed(0)
        vanilla = GPT2(GPT2Config(vocab_size=65, n_positions=ctx, d_model=c, n_heads=4,
                                  n_layers=layers, dropout=0.0, attention_dropout=0.0)).eval()
        xl = TransformerXL(xl_arch("tiny", dict(d_model=c, n_heads=4, n_layers=layers,
                                                d_ff=4 * c, mem_len=ctx, dropout=0.0), 65)).eval()
        window = torch.randint(0, 65, (1, ctx))
        segment = torch.randint(0, 65, (1, seg))
        mems = [torch.randn(1, ctx, c) for _ in range(layers)]

        def run_vanilla(vanilla=vanilla, window=window):
            with torch.no_grad():
                vanilla(window)  # one prediction: the whole window re-encoded

        def run_xl(xl=xl, segment=segment, mems=mems):
            with torch.no_grad():
                xl(segment, mems)  # seg predictions after a memory of ctx

        run_vanilla(), run_xl()
        med = median_times({"vanilla": run_vanilla, "xl": run_xl}, repeats)
        v_ms, x_ms = med["vanilla"] * 1e3, med["xl"] * 1e3 / seg
        rows.append({"context": ctx, "vanilla_ms_per_token": v_ms, "xl_ms_per_token": x_ms,
                     "speedup": v_ms / x_ms})
        print(f"| {ctx} | {v_ms:.2f} | {x_ms:.3f} | {v_ms / x_ms:.0f}x |")
    plot_eval_cost(rows, out / "eval_cost.png")
    print(f"\nplot: {out / 'eval_cost.png'}")
    return rows


# ---- child processes (peak memory) ---------------------------------------------------------------
def probe(task: dict) -> float:
    """Extra peak resident MiB of one forward (attention) or three training steps (lm)."""
    if task["part"] == "attention":
        args = attention_layer(task["t"], task["span"], task["path"])
        run_attention(*args)  # warm-up: compilation and allocator caches are not counted
        before = reset_peak()
        run_attention(*args)
    else:
        size = task["size"]
        ids = torch.randint(0, task["vocab"], (200_000,))
        trainer = Trainer(build_models(task["vocab"], size)[task["model"]], ids, size)
        trainer.step()
        before = reset_peak()
        for _ in range(3):
            trainer.step()
    return (_status("VmHWM") - before) / 1024


SIZES = {
    "tiny": dict(d_model=64, layers=2, mem_len=32, context=64, seg_len=32, batch=8, lr=2e-3,
                 seconds=4.0, slice=1.0, eval_chars=1500),
    "full": dict(d_model=128, layers=4, mem_len=128, context=256, seg_len=128, batch=16,
                 lr=1e-3, seconds=1200.0, slice=20.0, eval_chars=50_000),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["all", "attention", "lm", "eval-cost", "_probe"])
    p.add_argument("task", nargs="?", help=argparse.SUPPRESS)
    p.add_argument("--tiny", action="store_true", help="seconds-long budget (proves it runs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="runs/bench-long-context")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.part == "_probe":
        print(probe(json.loads(args.task)))
        return
    size = SIZES["tiny" if args.tiny else "full"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"# long context, torch {torch.__version__}, {args.threads} threads, "
          f"load average before: {load()}")
    results: dict = {"threads": args.threads, "size": size, "load_before": load()}
    if args.part in ("all", "attention"):
        lengths = [256, 512] if args.tiny else [1024, 2048, 4096]
        results["attention"] = part_attention(lengths, 2 if args.tiny else 5, args.threads)
    if args.part in ("all", "lm"):
        results["lm"] = part_lm(size, args.threads, out)
    if args.part in ("all", "eval-cost"):
        contexts = [64, 256] if args.tiny else [256, 512, 1024, 2048, 4096]
        results["eval_cost"] = part_eval_cost(contexts, size, 2 if args.tiny else 5, out)
    results["load_after"] = load()
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print(f"\n# load average after: {load()}; results in {out / 'results.json'}")


if __name__ == "__main__":
    main()
