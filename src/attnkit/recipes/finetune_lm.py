"""The "finetune-lm" recipe: continue training a pretrained GPT-2 on domain documents.

The use case of "Training Optimus Prime, M.D." (fine-tuning GPT-2 on exam questions so that it
writes new ones): start from a Hugging Face GPT-2 directory (``init=DIR``, loaded with
:func:`attnkit.convert.hf.from_pretrained`, its own tokenizer), read documents from a file or
folder (JSONL records become text through ``data.template``, e.g.
``"Question: {question}\\nOptions: {options}\\nAnswer: {answer}"``), train on the stream
``<|endoftext|> item <|endoftext|> item ...`` and generate new items from a prompt (the empty
prompt starts a new document). `attnkit export RUN DIR` (:func:`attnkit.loading.export_run`)
writes the result back as a Hugging Face directory.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from attnkit.config import to_dict
from attnkit.data.lm import LMData
from attnkit.errors import UserError
from attnkit.models import build_lm, names
from attnkit.recipes.lm import (
    LMEvalConfig,
    LMRunConfig,
    SampleConfig,
    final_report,
    load_corpus,
    train_lm,
    training_windows,
)
from attnkit.recipes.run import setup_run
from attnkit.rundir import TOKENIZER
from attnkit.tokenizers import Tokenizer, check_specials
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig
from attnkit.train.optim import OptimConfig

if TYPE_CHECKING:
    from attnkit.convert.hf import Pretrained

TEMPLATE = "Question: {question}\nOptions: {options}\nAnswer: {answer}"


@dataclass(frozen=True)
class FinetuneLMConfig(LMRunConfig):
    init: str = ""  # a Hugging Face GPT-2 directory (config.json, weights, tokenizer)


def _pretrained(cfg: FinetuneLMConfig) -> Pretrained:
    """The pretrained model and tokenizer, checked against the run's settings."""
    from attnkit.convert.hf import from_pretrained

    if not cfg.init:
        raise UserError("set init=DIR, a Hugging Face GPT-2 directory (config.json, "
                        "model.safetensors or pytorch_model.bin, tokenizer.json)")
    pre = from_pretrained(cfg.init)
    if pre.model_type not in names("lm"):
        raise UserError(f"{cfg.init} holds a '{pre.model_type}' model; finetune-lm trains "
                        f"{', '.join(sorted(names('lm')))} models")
    if pre.tokenizer is None:
        raise UserError(f"{cfg.init} has no tokenizer (tokenizer.json, or vocab.json and "
                        "merges.txt)")
    check_specials(pre.tokenizer, ("eos",), f"of {cfg.init}")
    vocab = getattr(pre.config, "vocab_size", pre.tokenizer.vocab_size)
    if pre.tokenizer.vocab_size > vocab:
        raise UserError(f"the tokenizer of {cfg.init} has {pre.tokenizer.vocab_size} tokens but "
                        f"the model only {vocab}")
    context = getattr(pre.config, "n_positions", cfg.block_size)
    if cfg.block_size > context:
        raise UserError(f"block_size {cfg.block_size} exceeds the model's context of {context}")
    return pre


def _build(pre: Pretrained, cfg: FinetuneLMConfig) -> nn.Module:
    """The pretrained model rebuilt with ``cfg.arch`` overrides (e.g. dropout), weights kept."""
    config = {**to_dict(pre.config), **cfg.arch}
    vocab = config.pop("vocab_size")
    model, _ = build_lm(pre.model_type, "", config, vocab)
    try:
        model.load_state_dict(pre.model.state_dict())
    except RuntimeError:
        raise UserError("arch may only change settings that keep the pretrained weights' "
                        "shapes (e.g. dropout)") from None
    return model


def main(cfg: FinetuneLMConfig, recipe: str = "finetune-lm") -> dict:
    """Fine-tune ``cfg.init`` on ``cfg.data``, then report (held-out scores and new items)."""
    pre = _pretrained(cfg)
    train_docs, val_docs = load_corpus(cfg.data)
    windows = training_windows(cfg, pre.tokenizer, train_docs)

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        path = run_dir / TOKENIZER
        if not path.exists() and dist.is_main():
            pre.tokenizer.save(path)
        return Tokenizer.load(path), _build(pre, cfg)

    run_dir, tok, model = setup_run(recipe, cfg, create)
    train_lm(run_dir, cfg, tok, model, windows, val_docs)
    return final_report(run_dir, cfg) if dist.is_main() else {}


def defaults() -> FinetuneLMConfig:
    """Sized for GPT-2 small on a CPU: 200 steps of 4 x 128 tokens, AdamW 1e-4."""
    return FinetuneLMConfig(
        data=LMData(template=TEMPLATE, val_fraction=0.1), block_size=128, batch_size=4,
        train=TrainConfig(steps=200, eval_every=50, save_every=50, log_every=10,
                          best_metric="val_loss",
                          optim=OptimConfig(name="adamw", lr=1e-4, betas=(0.9, 0.999),
                                            eps=1e-8, weight_decay=0.01, schedule="cosine",
                                            warmup_steps=20, min_lr_ratio=0.1)),
        eval=LMEvalConfig(batch_size=8),
        sample=SampleConfig(prompt="", n=2, max_new_tokens=120, temperature=0.8, top_p=0.95))
