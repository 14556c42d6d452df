"""The family table: every model family attnkit knows, in one plain dict (as ``SCORES`` is).

An entry says what each command needs to know about a family: its config class, presets and
builder (``train``), how a recorded config rebuilds it (``eval``, ``load``), which decoding
protocol it speaks (``generate``, ``translate``), its Hugging Face ``model_type`` and converter
(``export``, reading Hugging Face directories), how ``viz`` captures its attention, and its
tensor-parallel plan. Adding a family is one model file and one entry::

    FAMILIES["mine"] = Family(MyConfig, MyModel, arch=my_arch, decoding="lm",
                              viz="attnkit.viz.families:LM")

Converters and viz captures sit above this layer, so they are named by import path
(``"module:attribute"``) and imported only when used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from attnkit.config import from_dict, to_dict, unknown
from attnkit.errors import UserError
from attnkit.models import bert, distilbert, gpt2, rnn, transformer, transformer_xl
from attnkit.models.act import ParityACT, ParityModelConfig
from attnkit.models.ntm import NTM, NTMConfig
from attnkit.models.pointer import PointerConfig, PointerNet

Decoding = Literal["seq2seq", "lm"]


@dataclass(frozen=True)
class Family:
    """One model family (see the module docstring)."""

    config: type                                # its frozen config dataclass
    build: Callable[[Any], nn.Module]           # config -> freshly initialised model
    arch: Callable[..., Any] | None = None      # (preset, arch, *vocab sizes) -> checked config
    presets: Mapping[str, dict] = field(default_factory=dict)
    decoding: Decoding | None = None            # "seq2seq": source -> target; "lm": prompt
    hf_types: tuple[str, ...] = ()              # Hugging Face model_type(s) it reads
    converter: str = ""                         # module of its Hugging Face state-dict mapping
    viz: str = ""                               # "module:attribute" of its viz capture
    accepts: Callable[[Any], bool] | None = None  # among families sharing a config class
    tp_plan: Mapping[str, Any] | None = None    # tensor-parallel plan (module path -> style)
    renamed: Mapping[str, str] = field(default_factory=dict)  # config keys of older runs -> now


def transformer_arch(preset: str, arch: dict, src_vocab: int, tgt_vocab: int = 0
                     ) -> transformer.TransformerConfig:
    """The validated config of a preset plus ``arch`` overrides, sized for the vocabularies."""
    if preset not in transformer.PRESETS:
        raise unknown("transformer preset", preset, transformer.PRESETS)
    data = {**transformer.PRESETS[preset], **arch, "src_vocab_size": src_vocab,
            "tgt_vocab_size": tgt_vocab}
    return from_dict(transformer.TransformerConfig, data, prefix="arch.")


def gpt2_arch(preset: str, arch: dict, vocab: int) -> gpt2.GPT2Config:
    """GPT-2's validated config: a preset ("" = GPT2Config's defaults) plus ``arch``."""
    if preset and preset not in gpt2.PRESETS:
        raise unknown("gpt2 preset", preset, gpt2.PRESETS)
    data = {**gpt2.PRESETS.get(preset, {}), **arch, "vocab_size": vocab}
    return from_dict(gpt2.GPT2Config, data, prefix="arch.")


_BERT = dict(converter="attnkit.convert.bert", viz="attnkit.viz.families:BERT")

FAMILIES: dict[str, Family] = {
    "transformer": Family(transformer.TransformerConfig, transformer.Transformer,
                          transformer_arch, transformer.PRESETS, "seq2seq",
                          viz="attnkit.viz.families:TRANSFORMER"),
    "rnn-attention": Family(rnn.RNNConfig, rnn.RNNSeq2Seq, rnn.rnn_attention_arch, rnn.PRESETS,
                            "seq2seq", viz="attnkit.viz.families:RNN",
                            accepts=lambda c: c.attention != "none"),
    "rnn": Family(rnn.RNNConfig, rnn.RNNSeq2Seq, rnn.rnn_arch, rnn.PRESETS, "seq2seq",
                  accepts=lambda c: c.attention == "none"),
    "gpt2": Family(gpt2.GPT2Config, gpt2.GPT2, gpt2_arch, gpt2.PRESETS, "lm", ("gpt2",),
                   "attnkit.convert.gpt2", "attnkit.viz.families:GPT2"),
    "transformer-xl": Family(transformer_xl.TransformerXLConfig, transformer_xl.TransformerXL,
                             transformer_xl.xl_arch, transformer_xl.PRESETS, "lm",
                             viz="attnkit.viz.families:XL", renamed=transformer_xl.RENAMED),
    "bert": Family(bert.BertConfig, bert.build_bert, presets=bert.PRESETS, hf_types=("bert",),
                   accepts=lambda c: c.variant == "bert", **_BERT),
    "roberta": Family(bert.BertConfig, bert.build_bert, presets=bert.PRESETS,
                      hf_types=("roberta",), accepts=lambda c: c.variant == "roberta", **_BERT),
    "distilbert": Family(distilbert.DistilBertConfig, distilbert.build_distilbert,
                         presets=distilbert.PRESETS, hf_types=("distilbert",), **_BERT),
    "pointer": Family(PointerConfig, PointerNet, viz="attnkit.viz.families:POINTER"),
    "ntm": Family(NTMConfig, NTM, viz="attnkit.viz.families:NTM"),
    "parity-act": Family(ParityModelConfig, ParityACT),
}


ENCODERS = ("bert", "roberta", "distilbert")  # what fine-tuning and distillation start from


def get_family(name: str) -> Family:
    """The table's entry ``name`` (a one-line error suggesting the nearest name)."""
    if name not in FAMILIES:
        raise unknown("model family", name, FAMILIES)
    return FAMILIES[name]


def names(decoding: Decoding | None = None) -> list[str]:
    """The families that can be trained from a preset and speak ``decoding`` (all if None)."""
    return [n for n, f in FAMILIES.items()
            if f.arch is not None and (decoding is None or f.decoding == decoding)]


def config_of(model: nn.Module) -> Any:
    """A model's config object (``.config`` as in transformers, or ``.cfg``)."""
    cfg = getattr(model, "config", None) or getattr(model, "cfg", None)
    if cfg is None:
        raise UserError(f"a {type(model).__name__} carries no config (.config or .cfg)")
    return cfg


def family_of_config(cfg: Any) -> str:
    """The name of the family a config object belongs to."""
    for name, fam in FAMILIES.items():
        if isinstance(cfg, fam.config) and (fam.accepts is None or fam.accepts(cfg)):
            return name
    raise UserError(f"a {type(cfg).__name__} belongs to no family of attnkit.models.FAMILIES")


def family_of(model: nn.Module) -> str:
    """The name of ``model``'s family, found by its config (models with heads included)."""
    return family_of_config(config_of(model))


def model_record(model: nn.Module) -> dict:
    """What config.json records of a built model: ``{"family", "config"}``; the config
    rebuilds it (:func:`read_record`)."""
    return {"family": family_of(model), "config": to_dict(config_of(model))}


def read_record(record: dict) -> tuple[str, Any]:
    """The family name and config of a recorded model ``{"family", "config"}`` written by any
    release: config keys renamed since are read by their new names (the entry's ``renamed``),
    and a config its recorded family does not accept belongs to the family sharing its config
    class that does (RoBERTa runs were recorded as "bert" before the family table)."""
    name = record.get("family", "?")
    fam = get_family(name)
    cfg = from_dict(fam.config, {fam.renamed.get(k, k): v for k, v in record["config"].items()})
    if fam.accepts is not None and not fam.accepts(cfg):
        name = family_of_config(cfg)
    return name, cfg


def build_on_meta(family: str, preset: str, **overrides: Any) -> nn.Module:
    """Family ``family`` at ``preset`` (one of its table entry's presets, plus config
    ``overrides`` such as ``vocab_size``) built on the meta device: every parameter has its
    shape and dtype but no storage, so the largest presets are counted and planned without
    allocating or initialising anything (``attnkit count``)."""
    fam = get_family(family)
    if not fam.presets:
        raise UserError(f"the '{family}' family has no presets (families with presets: "
                        f"{', '.join(n for n, f in FAMILIES.items() if f.presets)})")
    if preset not in fam.presets:
        raise unknown(f"{family} preset", preset, fam.presets)
    cfg = from_dict(fam.config, {**fam.presets[preset], **overrides})
    if fam.accepts is not None and not fam.accepts(cfg):
        raise UserError(f"the {family} preset '{preset}' with these settings builds a "
                        f"'{family_of_config(cfg)}' model, not a '{family}' one")
    with torch.device("meta"):
        return fam.build(cfg)


def _checked(name: str, decoding: Decoding) -> Family:
    if name not in names(decoding):
        raise unknown("model", name, names(decoding))
    return FAMILIES[name]


def check(name: str, decoding: Decoding, preset: str, arch: dict) -> Any:
    """Validate a family that speaks ``decoding``, a preset and overrides (vocabulary 1)."""
    return _checked(name, decoding).arch(preset, arch, 1)


def build(name: str, decoding: Decoding, preset: str, arch: dict, *vocab: int
          ) -> tuple[nn.Module, dict]:
    """Build family ``name`` from a preset and ``arch`` overrides sized for ``vocab``; returns
    the model and its resolved config."""
    fam = _checked(name, decoding)
    cfg = fam.arch(preset, arch, *vocab)
    return fam.build(cfg), to_dict(cfg)


def check_seq2seq(name: str, preset: str, arch: dict) -> None:
    """Validate a sequence-to-sequence family, preset and overrides before any work is done."""
    check(name, "seq2seq", preset, arch)


def build_seq2seq(name: str, preset: str, arch: dict, src_vocab: int, tgt_vocab: int = 0
                  ) -> tuple[nn.Module, dict]:
    """Build the sequence-to-sequence family ``name``."""
    return build(name, "seq2seq", preset, arch, src_vocab, tgt_vocab)


def check_lm(name: str, preset: str, arch: dict) -> Any:
    """Validate a language-model family, preset and overrides (vocabulary size 1)."""
    return check(name, "lm", preset, arch)


def build_lm(name: str, preset: str, arch: dict, vocab: int) -> tuple[nn.Module, dict]:
    """Build the language-model family ``name``. Its model maps ids (B, T) to an output with
    .logits (B, T, V); a saved config dict passed as ``arch`` (minus vocab_size) with preset ""
    rebuilds the same model."""
    return build(name, "lm", preset, arch, vocab)
