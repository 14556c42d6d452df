"""Model families for sequence-to-sequence recipes: name -> builder (preset, overrides, vocab)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from attnkit.config import from_dict, to_dict, unknown
from attnkit.models.rnn import build_rnn, build_rnn_attention, rnn_arch, rnn_attention_arch
from attnkit.models.transformer import PRESETS, Transformer, TransformerConfig
from attnkit.models.transformer_xl import build_transformer_xl, xl_arch


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
    "rnn-attention": (rnn_attention_arch, build_rnn_attention),
    "rnn": (rnn_arch, build_rnn),
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


# ---- language models (decoder-only; used by the lm recipes) -----------------------------------
def gpt2_arch(preset: str, arch: dict, vocab: int) -> object:
    """GPT-2's validated config: a preset ("" = GPT2Config's defaults) plus ``arch``."""
    from attnkit.models.gpt2 import PRESETS as GPT2_PRESETS
    from attnkit.models.gpt2 import GPT2Config

    if preset and preset not in GPT2_PRESETS:
        raise unknown("gpt2 preset", preset, GPT2_PRESETS)
    data = {**GPT2_PRESETS.get(preset, {}), **arch, "vocab_size": vocab}
    return from_dict(GPT2Config, data, prefix="arch.")


def build_gpt2(preset: str, arch: dict, vocab: int) -> tuple[nn.Module, dict]:
    """A GPT-2 from a preset plus ``arch`` overrides; returns it and its resolved config."""
    from attnkit.models.gpt2 import GPT2

    cfg = gpt2_arch(preset, arch, vocab)
    return GPT2(cfg), to_dict(cfg)


# family name -> (validate(preset, arch, vocab) -> config, build(preset, arch, vocab) ->
# (model, config dict)). The model maps ids (B, T) to an output with .logits (B, T, V) (or the
# logits tensor itself); a saved config dict passed as ``arch`` (minus vocab_size) with preset
# "" rebuilds the same model.
LM_MODELS: dict[str, tuple[Callable[..., object], Callable[..., tuple[nn.Module, dict]]]] = {
    "gpt2": (gpt2_arch, build_gpt2),
    "transformer-xl": (xl_arch, build_transformer_xl),
}


def check_lm(name: str, preset: str, arch: dict) -> object:
    """Validate a language-model family, preset and overrides (vocabulary size 1)."""
    if name not in LM_MODELS:
        raise unknown("model", name, LM_MODELS)
    return LM_MODELS[name][0](preset, arch, 1)


def build_lm(name: str, preset: str, arch: dict, vocab: int) -> tuple[nn.Module, dict]:
    """Build the language-model family ``name``."""
    if name not in LM_MODELS:
        raise unknown("model", name, LM_MODELS)
    return LM_MODELS[name][1](preset, arch, vocab)
