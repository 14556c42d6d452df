"""Seeing attention: head, model and neuron views, rollout/flow analyses, comparisons, plots.

Every view takes an attnkit model with its tokenizer, or a directory: an attnkit run
(Transformer / RNN translation runs, GPT-2 language-model runs, BERT pre-training and
distillation runs) or a Hugging Face checkpoint (``config.json`` with ``model_type`` gpt2,
bert, roberta or distilbert, read by :func:`attnkit.convert.hf.from_pretrained`).
For an encoder-decoder model the text is the source and the target is ``target`` (alias
``pair``) or, when not given, the model's greedy output; for BERT-style encoders ``pair`` is
the second sentence ([CLS] a [SEP] b [SEP]); GPT-2 reads one text.

    from attnkit import viz
    viz.head_view("runs/translate-...", text="Ein Hund läuft.").save("head.html")
    viz.head_view("models/bert", text="the cat sat", pair="it was tired")
    viz.model_view(model, tok, "some text")          # in Jupyter: displays inline

Views return a :class:`~attnkit.viz.html.View` (``.html``, ``.save(path)``, ``_repr_html_``).
A model family plugs in with one capture function in :data:`attnkit.viz.capture.CAPTURES`
and one input builder in :data:`attnkit.viz.inputs.INPUTS`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from attnkit.errors import UserError
from attnkit.viz.capture import CAPTURES, AttentionGroup, Capture, Inputs, capture
from attnkit.viz.html import VIEWS, View, render, render_compare
from attnkit.viz.inputs import INPUTS, encode, is_seq2seq, target_ids

__all__ = ["AttentionGroup", "CAPTURES", "Capture", "INPUTS", "Inputs", "View", "VIEWS",
           "capture_ids", "capture_text", "compare_view", "encode", "head_view", "load",
           "load_pretrained", "model_view", "neuron_view", "render", "rollout_view",
           "target_ids"]

BERT_RUN_FAMILIES = ("bert", "distilbert")  # recorded by the bert-pretrain and distil recipes


def _read_config(path: Path) -> dict:
    try:
        record = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def load_pretrained(path: Path) -> tuple[nn.Module, Any]:
    """(model, tokenizer) of a Hugging Face directory, with one-line errors."""
    from attnkit.convert.hf import FAMILIES, from_pretrained

    model_type = _read_config(path).get("model_type")
    if model_type not in FAMILIES:
        raise UserError(f"{path} holds a Hugging Face '{model_type}' model; attnkit viz reads "
                        f"model types {', '.join(FAMILIES)}")
    try:
        pre = from_pretrained(path)
    except UserError as err:
        raise UserError(f"cannot load the Hugging Face model in {path}: {err}") from None
    if pre.tokenizer is None:
        raise UserError(f"{path} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json "
                        "with merges.txt): cannot turn text into tokens")
    return pre.model, pre.tokenizer


def load(source: Any, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a model object (tokenizer required), an attnkit run directory
    or a Hugging Face checkpoint directory."""
    if isinstance(source, nn.Module):
        if tokenizer is None:
            raise UserError("a model object needs its tokenizer")
        return source, tokenizer
    path = Path(source)
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (expected an attnkit run directory or a "
                        "Hugging Face model directory)")
    record = _read_config(path)
    if "model_type" in record:
        model, tok = load_pretrained(path)
    else:
        family = record.get("model", {}).get("family") if isinstance(
            record.get("model"), dict) else None
        model, tok = _load_run(path, family)
    return model, tokenizer or tok


def _load_run(path: Path, family: Any) -> tuple[nn.Module, Any]:
    """An attnkit run: language model, BERT-family or encoder-decoder (by recorded family)."""
    from attnkit.models import LM_MODELS

    if family in LM_MODELS:
        from attnkit.recipes.lm import load_model as load_lm

        return load_lm(path)
    if family in BERT_RUN_FAMILIES:
        from attnkit.recipes.pretrain import load_run_model

        return load_run_model(path)
    from attnkit.recipes.seq2seq import load_model
    from attnkit.tokenizers import Tokenizer

    model = load_model(path)
    return model, Tokenizer.load(path / "tokenizer.json")


def capture_ids(model: nn.Module, tok: Any, src: list[int], tgt_in: list[int] | None = None,
                *, token_types: list[int] | None = None) -> Capture:
    """Capture the attention of ``model`` on token ids, labelled with ``tok``'s strings.

    ``src`` is the (encoder's or only) sequence, ``tgt_in`` the decoder inputs of an
    encoder-decoder model, ``token_types`` BERT's segment ids.
    """
    tgt = list(tgt_in or [])
    return capture(model, Inputs(list(src), [tok.token(i) for i in src], tgt,
                                 [tok.token(i) for i in tgt], token_types))


def capture_text(model: nn.Module, tok: Any, text: str, target: str | None = None, *,
                 pair: str | None = None) -> Capture:
    """Capture the attention of ``model`` on ``text``: with ``target`` (or its greedy output)
    for an encoder-decoder model, with the second sentence ``pair`` for a BERT-style encoder."""
    return capture(model, encode(model, tok, text, target, pair))


def _view(view: str, model: Any, tokenizer: Any, text: str, target: str | None,
          pair: str | None, groups: list[str] | None, **kw: Any) -> View:
    model, tok = load(model, tokenizer)
    return render(capture_text(model, tok, text, target, pair=pair), view, groups=groups, **kw)


def head_view(model: Any, tokenizer: Any = None, text: str = "", *, target: str | None = None,
              pair: str | None = None, groups: list[str] | None = None,
              min_weight: float = 0.01, title: str = "") -> View:
    """One layer at a time: lines from each token to those it attends to, one colour a head."""
    return _view("head", model, tokenizer, text, target, pair, groups, min_weight=min_weight,
                 title=title)


def model_view(model: Any, tokenizer: Any = None, text: str = "", *, target: str | None = None,
               pair: str | None = None, groups: list[str] | None = None,
               title: str = "") -> View:
    """Every layer x head as a heatmap thumbnail; click one to enlarge it."""
    return _view("model", model, tokenizer, text, target, pair, groups, title=title)


def neuron_view(model: Any, tokenizer: Any = None, text: str = "", *, target: str | None = None,
                pair: str | None = None, groups: list[str] | None = None,
                title: str = "") -> View:
    """For a chosen layer, head and query token: q, each k, q x k and the scores."""
    return _view("neuron", model, tokenizer, text, target, pair, groups, title=title)


def rollout_view(model: Any, tokenizer: Any = None, text: str = "", *,
                 target: str | None = None, pair: str | None = None,
                 groups: list[str] | None = None, title: str = "") -> View:
    """Attention rollout and flow (Abnar & Zuidema 2020), per-head entropy, attends-to."""
    return _view("rollout", model, tokenizer, text, target, pair, groups, title=title)


def compare_view(model_a: Any, model_b: Any, text: str, *, tokenizer_a: Any = None,
                 tokenizer_b: Any = None, target: str | None = None, pair: str | None = None,
                 groups: list[str] | None = None, title: str = "") -> View:
    """Two checkpoints on the same text: their model views and the difference of each head.

    For encoder-decoder models without ``target`` both decoders read the first model's greedy
    output, so the decoder and cross attention of the two are comparable token by token.
    """
    ma, ta = load(model_a, tokenizer_a)
    mb, tb = load(model_b, tokenizer_b)
    if target is None and pair is None and is_seq2seq(ma):  # both read model A's output
        a_in = encode(ma, ta, text)
        a = capture(ma, a_in)
        b = capture_ids(mb, tb, a_in.ids, a_in.tgt)
    else:
        a = capture_text(ma, ta, text, target, pair=pair)
        b = capture_text(mb, tb, text, target, pair=pair)
    a.label, b.label = _label(model_a, "A"), _label(model_b, "B")
    return render_compare(a, b, groups=groups, title=title)


def _label(source: Any, default: str) -> str:
    return f"{default}: {source}" if isinstance(source, (str, Path)) else default
