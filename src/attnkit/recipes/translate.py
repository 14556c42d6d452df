"""Translation on parallel text (one sentence per line; ``.gz`` accepted), scored with BLEU.

By default it reads Multi30k-style files ``{train,val}.{lang}[.gz]`` from ``data.dir``; any
user's files can be named one by one instead. Source and target share one BPE vocabulary, so
the source, target and output embeddings are one matrix (Vaswani et al. 2017, section 3.4).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from attnkit.data.text import read_parallel
from attnkit.errors import ConfigError, UserError
from attnkit.recipes.seq2seq import (
    DecodeConfig,
    Seq2SeqConfig,
    Task,
    entry_points,
)
from attnkit.tokenizers import TokenizerConfig
from attnkit.train.loop import TrainConfig
from attnkit.train.optim import OptimConfig


@dataclass(frozen=True)
class TranslateData:
    dir: str = ""                 # folder with {train,val}.{src,tgt}[.gz]
    src: str = "de"
    tgt: str = "en"
    train_src: str = ""           # explicit files override the folder convention
    train_tgt: str = ""
    valid_src: str = ""
    valid_tgt: str = ""
    lowercase: bool = False

    def __post_init__(self) -> None:
        if self.src == self.tgt:
            raise ConfigError(f"data.src and data.tgt are both '{self.src}'")


@dataclass(frozen=True)
class TranslateConfig(Seq2SeqConfig):
    data: TranslateData = field(default_factory=TranslateData)


def _find(folder: str, split: str, lang: str) -> Path:
    for name in (f"{split}.{lang}", f"{split}.{lang}.gz"):
        if (Path(folder) / name).exists():
            return Path(folder) / name
    raise UserError(f"no {split}.{lang} or {split}.{lang}.gz in {folder}")


def _files(data: TranslateData) -> dict[str, tuple[Path, Path]]:
    explicit = (data.train_src, data.train_tgt, data.valid_src, data.valid_tgt)
    if all(explicit):
        return {"train": (Path(data.train_src), Path(data.train_tgt)),
                "val": (Path(data.valid_src), Path(data.valid_tgt))}
    if not data.dir:
        raise UserError("set data.dir to a folder of {train,val}.<lang>[.gz] files, or "
                        "data.train_src/train_tgt/valid_src/valid_tgt")
    return {split: (_find(data.dir, split, data.src), _find(data.dir, split, data.tgt))
            for split in ("train", "val")}


def task(data: TranslateData) -> Task:
    def read(src: Path, tgt: Path) -> list[tuple[str, str]]:
        pairs = [(s.strip(), t.strip()) for s, t in read_parallel(src, tgt)]
        if data.lowercase:
            pairs = [(s.lower(), t.lower()) for s, t in pairs]
        return [(s, t) for s, t in pairs if s and t]
    files = _files(data)
    return Task(read(*files["train"]), {"val": read(*files["val"])}, "bleu")


main, evaluate = entry_points("translate", task)


def defaults() -> TranslateConfig:
    """Sized for Multi30k on 2 CPU cores in about an hour (BENCHMARKS.md)."""
    return TranslateConfig(
        preset="small",
        tokenizer=TokenizerConfig(kind="bpe", vocab_size=8000),
        batch_tokens=4096, label_smoothing=0.1, eval_examples=2000,
        train=TrainConfig(steps=1250, eval_every=250, save_every=250, best_metric="val_loss",
                          optim=OptimConfig(lr=1e-3, warmup_steps=800)),
        decode=DecodeConfig(beam_size=4, alpha=0.6, max_len_a=1.5, max_len_b=10))
