"""The "xl-lm" recipe: a Transformer-XL family language model trained segment by segment.

Data, tokenizer and run directory come from the "lm" recipe (:mod:`attnkit.recipes.lm`); the
batching is Transformer-XL's (:class:`~attnkit.data.segments.SegmentStream`: ``batch_size``
contiguous rows read in consecutive segments of ``seg_len`` tokens, the memory carried from one
segment to the next and checkpointed with the data position). The model family is
``transformer-xl``; its presets cover plain Transformer-XL (``tiny``, ``enwik8-base``), adaptive
span (``tiny-span``, ``adaptive-span-small``) and all-attention (``tiny-all-attention``,
``all-attention-small``). With adaptive span the loss gains the L1 span penalty and the report
the learned spans (``plots/spans.png``) and the attention FLOPs saved.

Evaluation scores the held-out text segment by segment with the memory carried (bits per
character); ``eval.mem_len`` may be longer than training's (relative positions extrapolate).
Samples (``sample.*``, as in the "lm" recipe) are printed at every evaluation and in the report;
they read the prompt once and then one token at a time after the memory.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit import accel
from attnkit.config import unknown
from attnkit.data.lm import LMData, encode_documents, n_characters, text_chunks
from attnkit.data.lm import truncate_documents as truncate
from attnkit.data.segments import SegmentStream, score_segments
from attnkit.errors import ConfigError
from attnkit.evaluation import NLLScore
from attnkit.loading import load
from attnkit.losses import token_nll
from attnkit.models import build_lm
from attnkit.models.transformer_xl import FAMILY, TransformerXL, xl_arch
from attnkit.nn.attention.adaptive_span import attention_flops, span_penalty
from attnkit.recipes.lm import (
    SampleConfig,
    load_corpus,
    sample_texts,
    show_samples,
    with_data_default,
)
from attnkit.recipes.run import setup_run
from attnkit.rundir import PLOTS, RESULTS, TOKENIZER, write_json_atomic
from attnkit.tokenizers import Tokenizer, TokenizerConfig, resolve_tokenizer
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig, fit
from attnkit.train.optim import OptimConfig

METRICS = ("val_loss", "val_bpc")


@dataclass(frozen=True)
class XLEvalConfig:
    seg_len: int = 0        # evaluation segment length; 0 = the training seg_len
    mem_len: int = 0        # evaluation memory; 0 = the model's mem_len (longer works)
    batch_size: int = 1     # rows of held-out text (1 = every character scored)
    max_chars: int = 0      # evaluations during training read the first max_chars (0 = all)

    def __post_init__(self) -> None:
        for name in ("seg_len", "mem_len", "max_chars"):
            if getattr(self, name) < 0:
                raise ConfigError(f"eval.{name} must be >= 0, got {getattr(self, name)}")
        if self.batch_size < 1:
            raise ConfigError(f"eval.batch_size must be >= 1, got {self.batch_size}")


@dataclass(frozen=True)
class XLLMConfig:
    data: LMData = field(default_factory=LMData)
    model: str = FAMILY
    preset: str = "tiny"
    arch: dict = field(default_factory=dict)   # overrides of the preset (model.* fields)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    seg_len: int = 64        # tokens per segment (Transformer-XL's tgt_len)
    batch_size: int = 16     # parallel streams (rows) per optimiser step
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: XLEvalConfig = field(default_factory=XLEvalConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    run_dir: str = ""

    def __post_init__(self) -> None:
        if self.model != FAMILY:
            raise unknown("model family for xl-lm", self.model, [FAMILY])
        if self.seg_len < 1 or self.batch_size < 1:
            raise ConfigError("seg_len and batch_size must be >= 1")
        self.train.check_best_metric(METRICS)
        xl_arch(self.preset, self.arch, 1)


# ---- training ----------------------------------------------------------------------------------
def xl_loss(model: nn.Module, batch: Any) -> tuple[torch.Tensor, int]:
    """Summed NLL of a segment continuing the carried memory (+ span penalty x tokens)."""
    raw = dist.unwrap(model)
    raw.clamp_spans_()
    # the memory lives on the model's device; a resumed one comes back from the CPU once
    mems = None if batch.reset else accel.to_device(batch.carry.mems, batch.ids.device)
    out = model(batch.ids, mems)
    batch.carry.mems = out.mems
    loss, n = token_nll(out.logits, batch.targets)
    spans = raw.spans()
    if spans and raw.cfg.span_loss > 0:
        loss = loss + span_penalty(spans, raw.cfg.span_loss) * n  # a per-token penalty
    return loss, n


def evaluate_bpc(model: TransformerXL, stream: torch.Tensor, seg_len: int, mem_len: int,
                 batch_size: int = 1, chars: int | None = None) -> NLLScore:
    """Held-out NLL and bits per character, segment by segment with ``mem_len`` of memory."""
    def forward(ids: torch.Tensor, mems: list[torch.Tensor] | None):
        out = model(ids, mems, mem_len=mem_len)
        return out.logits, out.mems
    return score_segments(forward, stream, seg_len, batch_size, chars,
                          accel.device_of(model))


def _eval_settings(cfg: XLLMConfig, model: TransformerXL) -> tuple[int, int]:
    return cfg.eval.seg_len or cfg.seg_len, cfg.eval.mem_len or model.cfg.mem_len


def make_evaluate(tok: Tokenizer, val_docs: list[str], cfg: XLLMConfig, run_dir: Path,
                  segments: SegmentStream):
    """Held-out loss and bpc (the first eval.max_chars) and samples."""
    docs = truncate(val_docs, cfg.eval.max_chars)
    stream, chars = encode_documents(tok, docs), n_characters(docs)

    def evaluate(model: nn.Module) -> dict[str, float]:
        model = dist.unwrap(model)
        seg, mem = _eval_settings(cfg, model)
        result = evaluate_bpc(model, stream, seg, mem, cfg.eval.batch_size, chars)
        if cfg.sample.n:
            step = segments.index // max(1, cfg.train.accum_steps)
            texts = sample_texts(model, tok, cfg.sample)
            show_samples(texts, run_dir, step)
        return {"val_loss": result.loss, "val_bpc": result.bpc}
    return evaluate


# ---- report ------------------------------------------------------------------------------------
def span_report(model: TransformerXL, seg_len: int) -> dict[str, Any]:
    """Learned spans per layer and head and the attention FLOPs against the fixed span."""
    spans = [z.detach().tolist() for z in model.spans()]
    if not spans:
        return {}
    keys = model.attention_keys(seg_len)
    full = [seg_len + model.cfg.mem_len + model.cfg.n_persistent] * len(keys)
    flops, fixed = (attention_flops(seg_len, k, model.cfg.d_model) for k in (keys, full))
    return {"spans": spans, "keys_per_layer": keys, "attention_flops": flops,
            "fixed_span_flops": fixed, "flops_saved": 1.0 - flops / fixed}


def plot_spans(spans: list[list[float]], path: Path, max_span: int) -> None:
    """Bar chart of the learned span of every head, one group per layer."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from attnkit.rundir import atomic_path
    n_heads = len(spans[0])
    width = 0.8 / n_heads
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(spans), 3))
    for h in range(n_heads):
        ax.bar([i + h * width for i in range(len(spans))], [s[h] for s in spans], width,
               label=f"head {h}")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(spans))],
                  [f"layer {i}" for i in range(len(spans))])
    ax.set_ylabel("learned span (positions)")
    ax.set_ylim(0, max_span)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120)
    plt.close(fig)


def final_report(run_dir: Path, cfg: XLLMConfig) -> dict:
    """Held-out bpc with the training memory, the evaluation memory and none; spans."""
    run = load(run_dir, families=[FAMILY], device=cfg.train.device)
    model, tok = run.model, run.require_tokenizer(run_dir)
    _, val_docs = load_corpus(cfg.data)
    stream, chars = encode_documents(tok, val_docs), n_characters(val_docs)
    seg, mem = _eval_settings(cfg, model)
    results: dict[str, Any] = {}
    for name, m in (("val", model.cfg.mem_len), ("val_eval_mem", mem), ("val_no_memory", 0)):
        if name == "val_eval_mem" and m == model.cfg.mem_len:
            continue
        start = time.perf_counter()
        r = evaluate_bpc(model, stream, seg, m, 1, chars)
        results[name] = {"loss": r.loss, "bpc": r.bpc, "tokens": r.tokens, "mem_len": m,
                         "seg_len": seg, "seconds": round(time.perf_counter() - start, 2)}
        print(f"{name}: {r.bpc:.4f} bits per character (memory {m}, segments of {seg})")
    if cfg.sample.n:
        results["samples"] = sample_texts(model, tok, cfg.sample)
        show_samples(results["samples"], run_dir, None)
    spans = span_report(model, cfg.seg_len)
    if spans:
        results["adaptive_span"] = spans
        plot_spans(spans["spans"], run_dir / PLOTS / "spans.png", model.cfg.span_max)
        print(f"attention FLOPs saved by the learned spans: {spans['flops_saved']:.1%}")
    write_json_atomic(run_dir / RESULTS, results)
    print(f"run directory: {run_dir}")
    return results


def main(cfg: XLLMConfig, recipe: str = "xl-lm") -> dict:
    """Train on ``cfg.data`` segment by segment with memory, then report."""
    cfg = with_data_default(cfg)
    train_docs, val_docs = load_corpus(cfg.data)

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        tok = resolve_tokenizer(cfg.tokenizer, lambda: text_chunks(train_docs), run_dir,
                                ("eos",))
        if dist.is_main() and not (run_dir / TOKENIZER).exists():
            tok.save(run_dir / TOKENIZER)
        return tok, build_lm(FAMILY, cfg.preset, cfg.arch, tok.vocab_size)[0]

    run_dir, tok, model = setup_run(recipe, cfg, create)
    segments = SegmentStream(encode_documents(tok, train_docs), cfg.batch_size, cfg.seg_len)
    if dist.is_main():
        print(f"training tokens: {segments.rows.numel():,} in {cfg.batch_size} streams of "
              f"{segments.n_segments} segments; parameters "
              f"{sum(p.numel() for p in model.parameters()):,}", file=sys.stderr)
    fit(model, xl_loss, segments, cfg.train, run_dir,
        evaluate=make_evaluate(tok, val_docs, cfg, run_dir, segments))
    return final_report(run_dir, cfg) if dist.is_main() else {}


def evaluate(run_dir: Path, cfg: XLLMConfig) -> dict:
    """`attnkit eval RUN`: the final report again."""
    return final_report(run_dir, cfg)


def defaults() -> XLLMConfig:
    """Tiny Shakespeare, 4 x 128, segments of 64 with a memory of 128, 16 streams."""
    return XLLMConfig(
        preset="tiny", arch={"dropout": 0.1}, tokenizer=TokenizerConfig(kind="char"),
        seg_len=64, batch_size=16, eval=XLEvalConfig(max_chars=20_000),
        sample=SampleConfig(prompt="\n", n=1, max_new_tokens=200),
        train=TrainConfig(steps=2000, eval_every=250, save_every=250, log_every=50,
                          best_metric="val_loss",
                          optim=OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.99), eps=1e-8,
                                            weight_decay=0.1, schedule="cosine",
                                            warmup_steps=100, min_lr_ratio=0.1)))
