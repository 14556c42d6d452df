"""Model families for sequence-to-sequence recipes: name -> builder (preset, overrides, vocab)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from attnkit.config import from_dict, to_dict, unknown
from attnkit.models.transformer import PRESETS, Transformer, TransformerConfig


def transformer_arch(preset: str, arch: dict, src_vocab: int, tgt_vocab: int = 0
                     ) -> TransformerConfig:
    """The validated config of a preset plus ``arch`` overrides, sized for the vocabularies."""
    if preset not in PRESETS:
        raise unknown("transformer preset", preset, PRESETS)
    data = {**PRESETS[preset], **arch, "src_vocab_size": src_vocab, "tgt_vocab_size": tgt_vocab}
    return from_dict(TransformerConfig, data, prefix="arch.")


def build_transformer(preset: str, arch: dict, src_vocab: int, tgt_vocab: int = 0
                      ) -> tuple[nn.Module, dict]:
    """A Transformer from a preset plus ``arch`` overrides; returns it and its resolved config."""
    cfg = transformer_arch(preset, arch, src_vocab, tgt_vocab)
    return Transformer(cfg), to_dict(cfg)


# family name -> (validate(preset, arch, vocab...) -> config, build(...) -> (model, config dict))
SEQ2SEQ_MODELS: dict[str, tuple[Callable[..., object], Callable[..., tuple[nn.Module, dict]]]] = {
    "transformer": (transformer_arch, build_transformer),
}


def check_seq2seq(name: str, preset: str, arch: dict) -> None:
    """Validate a family, preset and overrides before any work is done (vocabulary size 1)."""
    if name not in SEQ2SEQ_MODELS:
        raise unknown("model", name, SEQ2SEQ_MODELS)
    SEQ2SEQ_MODELS[name][0](preset, arch, 1)


def build_seq2seq(name: str, preset: str, arch: dict, src_vocab: int, tgt_vocab: int = 0
                  ) -> tuple[nn.Module, dict]:
    """Build the sequence-to-sequence family ``name``."""
    if name not in SEQ2SEQ_MODELS:
        raise unknown("model", name, SEQ2SEQ_MODELS)
    return SEQ2SEQ_MODELS[name][1](preset, arch, src_vocab, tgt_vocab)
