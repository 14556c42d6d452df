"""Seeing attention: head, model and neuron views, rollout/flow analyses, comparisons, plots.

Every view takes an attnkit model with its tokenizer, or a run directory (model and tokenizer
are loaded from it), plus the text. For an encoder-decoder model the text is the source and
the target is ``target`` (alias ``pair``) or, when not given, the model's greedy output.

    from attnkit import viz
    viz.head_view("runs/translate-...", text="Ein Hund läuft.").save("head.html")
    viz.model_view(model, tok, "some text")          # in Jupyter: displays inline

Views return a :class:`~attnkit.viz.html.View` (``.html``, ``.save(path)``, ``_repr_html_``).
A model family plugs in with one capture function in :data:`attnkit.viz.capture.CAPTURES`.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from attnkit.errors import UserError
from attnkit.viz.capture import CAPTURES, AttentionGroup, Capture, capture
from attnkit.viz.html import VIEWS, View, render, render_compare

__all__ = ["AttentionGroup", "CAPTURES", "Capture", "View", "VIEWS", "capture_text", "render",
           "capture_ids", "compare_view", "head_view", "load", "model_view", "neuron_view",
           "rollout_view", "target_ids"]


def load(source: Any, tokenizer: Any = None) -> tuple[nn.Module, Any]:
    """(model, tokenizer) from a model object (tokenizer required) or a run directory."""
    if isinstance(source, nn.Module):
        if tokenizer is None:
            raise UserError("a model object needs its tokenizer")
        return source, tokenizer
    path = Path(source)
    config = path / "config.json"
    if not path.is_dir():
        raise UserError(f"{path} is not a directory (expected an attnkit run directory)")
    if config.is_file():
        try:
            record = json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            record = {}
        if isinstance(record, dict) and "model_type" in record:
            raise UserError(f"{path} is a Hugging Face checkpoint; loading those needs "
                            "from_pretrained, which attnkit does not have yet")
    from attnkit.recipes.seq2seq import load_model
    from attnkit.tokenizers import Tokenizer

    model = load_model(path)
    return model, tokenizer or Tokenizer.load(path / "tokenizer.json")


def _ids(tok: Any, text: str, what: str, limit: int) -> list[int]:
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"nothing to visualise: the {what} text is empty")
    ids = tok.encode(text.strip())
    if not ids:
        raise UserError(f"the {what} text has no tokens")
    if len(ids) > limit:
        raise UserError(f"the {what} text has {len(ids)} tokens; the model's maximum is {limit}")
    return ids


def target_ids(model: nn.Module, tok: Any, src: list[int], target: str | None) -> list[int]:
    """Decoder inputs BOS y1 .. yn: ``target`` tokenised, or the model's greedy output."""
    limit = getattr(getattr(model, "cfg", None), "max_len", 1024)
    if target is not None:
        tgt = _ids(tok, target, "target", limit - 1)
    else:
        from attnkit.decoding import greedy_search

        with torch.no_grad():
            tgt = greedy_search(model.eval(), torch.tensor([src]),
                                min(limit, int(1.5 * len(src)) + 10), tok.bos_id, tok.eos_id)[0]
    return [tok.bos_id, *tgt[: limit - 1]]


def capture_ids(model: nn.Module, tok: Any, src: list[int], tgt_in: list[int]) -> Capture:
    """Capture the attention of ``model`` on token ids, labelled with ``tok``'s strings."""
    return capture(model, src, tgt_in, [tok.token(i) for i in src],
                   [tok.token(i) for i in tgt_in])


def capture_text(model: nn.Module, tok: Any, text: str, target: str | None = None) -> Capture:
    """Capture the attention of ``model`` on ``text`` (and ``target`` or its greedy output)."""
    src = _ids(tok, text, "source", getattr(getattr(model, "cfg", None), "max_len", 1024))
    return capture_ids(model, tok, src, target_ids(model, tok, src, target))


def _view(view: str, model: Any, tokenizer: Any, text: str, target: str | None,
          pair: str | None, groups: list[str] | None, **kw: Any) -> View:
    if target is not None and pair is not None:
        raise UserError("give either target or pair, not both")
    model, tok = load(model, tokenizer)
    cap = capture_text(model, tok, text, target if target is not None else pair)
    return render(cap, view, groups=groups, **kw)


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
                 tokenizer_b: Any = None, target: str | None = None,
                 groups: list[str] | None = None, title: str = "") -> View:
    """Two checkpoints on the same text: their model views and the difference of each head.

    Without ``target`` both decoders read the first model's greedy output, so the decoder and
    cross attention of the two are comparable token by token.
    """
    ma, ta = load(model_a, tokenizer_a)
    mb, tb = load(model_b, tokenizer_b)
    if target is None:  # both read model A's greedy output, token for token
        src = _ids(ta, text, "source", getattr(getattr(ma, "cfg", None), "max_len", 1024))
        tgt_in = target_ids(ma, ta, src, None)
        a, b = capture_ids(ma, ta, src, tgt_in), capture_ids(mb, tb, src, tgt_in)
    else:
        a, b = capture_text(ma, ta, text, target), capture_text(mb, tb, text, target)
    a.label, b.label = _label(model_a, "A"), _label(model_b, "B")
    return render_compare(a, b, groups=groups, title=title)


def _label(source: Any, default: str) -> str:
    return f"{default}: {source}" if isinstance(source, (str, Path)) else default
