"""Seeing attention: head, model and neuron views, rollout/flow analyses, comparisons, plots.

Every view takes an attnkit model with its tokenizer, or a directory: an attnkit run of any
family with attention to show (Transformer, attentional RNN, GPT-2, Transformer-XL, BERT /
RoBERTa / DistilBERT, pointer network, NTM) or a Hugging Face checkpoint (``model_type`` gpt2,
bert, roberta or distilbert), both read by :func:`attnkit.load`.
For an encoder-decoder model the text is the source and the target is ``target`` (alias
``pair``) or, when not given, the model's greedy output; for BERT-style encoders ``pair`` is
the second sentence ([CLS] a [SEP] b [SEP]); GPT-2 reads one text.

    from attnkit import viz
    viz.head_view("runs/translate-...", text="Ein Hund läuft.").save("head.html")
    viz.head_view("models/bert", text="the cat sat", pair="it was tired")
    viz.model_view(model, tok, "some text")          # in Jupyter: displays inline

Views return a :class:`~attnkit.viz.html.View` (``.html``, ``.save(path)``, ``_repr_html_``).
A model family plugs in with one :class:`~attnkit.viz.families.Way` (input builder + capture
function) named by its entry in the family table (:data:`attnkit.models.FAMILIES`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.errors import UserError
from attnkit.viz.capture import AttentionGroup, Capture, Inputs
from attnkit.viz.families import Way, capture, encode, is_seq2seq, way_of
from attnkit.viz.html import VIEWS, View, render, render_compare
from attnkit.viz.inputs import target_ids

__all__ = ["AttentionGroup", "Capture", "Inputs", "View", "VIEWS", "Way", "capture",
           "capture_ids", "capture_text", "compare_view", "encode", "head_view", "load",
           "model_view", "neuron_view", "render", "rollout_view", "target_ids", "way_of"]


def load(source: Any, tokenizer: Any = None, device: str | torch.device = "cpu"
         ) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a model object (tokenizer required; it stays where it is) or a
    directory: an attnkit run or a Hugging Face checkpoint, read by :func:`attnkit.load` onto
    ``device``. Captures run on the model's device and come back on the CPU."""
    if isinstance(source, nn.Module):
        if tokenizer is None and way_of(source).tokenizer:
            raise UserError("a model object needs its tokenizer")
        return source, tokenizer
    from attnkit.loading import load as load_any

    loaded = load_any(source, reader="attnkit viz", device=device)
    way = way_of(loaded.model)
    if tokenizer is None and way.tokenizer:
        tokenizer = loaded.require_tokenizer(source)
    return loaded.model, tokenizer or loaded.tokenizer


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
