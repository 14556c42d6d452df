"""The "lm" recipe: a decoder-only language model trained from scratch on any text.

Data, training windows, evaluation, samples and the report are every language-model run's
(:mod:`attnkit.recipes.lm`); this recipe adds the model (a family of
:data:`attnkit.models.FAMILIES` speaking the "lm" protocol, from a preset) and a tokenizer
trained on the text.
Defaults follow nanoGPT's Shakespeare-character settings sized for a CPU (4 layers x 128,
4 heads, context 64, batch 12, AdamW 1e-3 with cosine decay to 1e-4, betas (0.9, 0.99)).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from attnkit.data.lm import text_chunks
from attnkit.errors import ConfigError
from attnkit.models import build_lm, check_lm
from attnkit.recipes.lm import (
    LMRunConfig,
    SampleConfig,
    final_report,
    load_corpus,
    train_lm,
    training_windows,
    with_data_default,
)
from attnkit.recipes.run import setup_run
from attnkit.rundir import TOKENIZER
from attnkit.tokenizers import Tokenizer, TokenizerConfig, resolve_tokenizer
from attnkit.train import distributed as dist
from attnkit.train.loop import TrainConfig
from attnkit.train.optim import OptimConfig


@dataclass(frozen=True)
class LMConfig(LMRunConfig):
    model: str = "gpt2"      # language-model family (attnkit.models.names("lm"))
    preset: str = "tiny"
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        model_cfg = check_lm(self.model, self.preset, self.model_arch)
        context = getattr(model_cfg, "n_positions", self.block_size)
        if context < self.block_size:
            raise ConfigError(f"block_size {self.block_size} exceeds the model's context "
                              f"arch.n_positions={context}")

    @property
    def model_arch(self) -> dict:
        """``arch`` with the context defaulting to block_size."""
        return {"n_positions": self.block_size, **self.arch}


def main(cfg: LMConfig, recipe: str = "lm") -> dict:
    """Train a language model from scratch on ``cfg.data``, then report."""
    cfg = with_data_default(cfg)
    train_docs, val_docs = load_corpus(cfg.data)
    tok = resolve_tokenizer(cfg.tokenizer, lambda: text_chunks(train_docs), cfg.run_dir,
                            ("eos",))
    windows = training_windows(cfg, tok, train_docs)

    def create(run_dir: Path) -> tuple[Tokenizer, nn.Module]:
        if dist.is_main() and not (run_dir / TOKENIZER).exists():
            tok.save(run_dir / TOKENIZER)
        return tok, build_lm(cfg.model, cfg.preset, cfg.model_arch, tok.vocab_size)[0]

    run_dir, tok, model = setup_run(recipe, cfg, create)
    train_lm(run_dir, cfg, tok, model, windows, val_docs)
    return final_report(run_dir, cfg) if dist.is_main() else {}


def defaults() -> LMConfig:
    """nanoGPT's shakespeare_char settings for a CPU: 4 x 128, 4 heads, context 64, batch 12."""
    return LMConfig(
        preset="tiny", arch={"n_layers": 4, "dropout": 0.0, "attention_dropout": 0.0},
        tokenizer=TokenizerConfig(kind="char"), block_size=64, batch_size=12,
        train=TrainConfig(steps=2000, eval_every=250, save_every=250, log_every=50,
                          best_metric="val_loss",
                          optim=OptimConfig(name="adamw", lr=1e-3, betas=(0.9, 0.99), eps=1e-8,
                                            weight_decay=0.1, schedule="cosine",
                                            warmup_steps=100, min_lr_ratio=0.1)),
        sample=SampleConfig(prompt="\n", n=1, max_new_tokens=200))
