"""How viz reads each family: text -> :class:`Inputs` -> :class:`Capture`, found through the
family table (an entry's ``viz`` names one :class:`Way` of this module, or of any module).

Every capture asks the model for its weights (``output_attentions=True``, the attention core's
"return the weights" path) or reads the distributions the model outputs; nothing is kept as a
side effect. Transformer-XL's relative attention, the attentional RNN's alignment, the pointer
network's pointer distributions and the NTM's addressing weights show as they are computed.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from attnkit.accel import device_of
from attnkit.errors import UserError
from attnkit.viz.capture import (
    AttentionGroup,
    Capture,
    Inputs,
    capture_bert,
    capture_gpt2,
    capture_rnn,
    capture_transformer,
)
from attnkit.viz.inputs import bert_inputs, lm_inputs, seq2seq_inputs


@dataclass(frozen=True)
class Way:
    """One family's inputs and capture; ``decoder``: its decoder reads a target (or its own
    greedy output); ``tokenizer``: whether text goes through a tokenizer."""

    inputs: Callable[..., Inputs]                  # (model, tok, text, target, pair) -> Inputs
    capture: Callable[[nn.Module, Inputs], Capture]
    decoder: bool = False
    tokenizer: bool = True


def way_of(model: nn.Module) -> Way:
    """The :class:`Way` the family table names for ``model``'s family (one-line errors)."""
    from attnkit.models import FAMILIES, family_of

    family = family_of(model)
    path = FAMILIES[family].viz
    if not path:
        raise UserError(f"the '{family}' family has no attention to show (attnkit viz draws "
                        f"{', '.join(n for n, f in FAMILIES.items() if f.viz)})")
    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


def encode(model: nn.Module, tok: Any, text: str, target: str | None = None,
           pair: str | None = None) -> Inputs:
    """The :class:`Inputs` of ``text`` (and ``target``/``pair``) for ``model``'s family."""
    if target is not None and pair is not None:
        raise UserError("give either target or pair, not both")
    return way_of(model).inputs(model, tok, text, target, pair)


def capture(model: nn.Module, inputs: Inputs) -> Capture:
    """The attention of ``model`` on ``inputs`` (in eval mode, restored after), computed on the
    model's device (the capture function's new tensors are made there) and returned on the CPU."""
    way = way_of(model)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad(), device_of(model):
            return way.capture(model, inputs).to("cpu")
    finally:
        model.train(was_training)


def is_seq2seq(model: nn.Module) -> bool:
    """True when ``model``'s decoder reads a target (greedy output by default)."""
    return way_of(model).decoder


# ---- decoder-only language models that return .attentions (e.g. a new family) ----------------
def capture_lm(model: nn.Module, inputs: Inputs) -> Capture:
    """Causal self-attention, "self": ``model(ids, output_attentions=True).attentions``, one
    (1, H, T, T) tensor per layer."""
    out = model(torch.tensor([inputs.ids]), output_attentions=True)
    t = len(inputs.ids)
    return Capture({"self": AttentionGroup(
        "self", [w[0] for w in out.attentions], inputs.tokens, inputs.tokens,
        mask=torch.ones(t, t, dtype=torch.bool).tril())})


# ---- Transformer-XL ----------------------------------------------------------------------------
def capture_xl(model: nn.Module, inputs: Inputs) -> Capture:
    """Transformer-XL's relative self-attention (Dai et al. 2019, eq. in section 3.3) over the
    text as one segment without memory, "self"; with all-attention's persistent vectors
    (Sukhbaatar et al. 2019b) their N key slots follow the tokens as columns "[p0]".."""
    out = model(torch.tensor([inputs.ids]), output_attentions=True)
    t = len(inputs.ids)
    weights = [w[0] for w in out.attentions]  # L x (H, T, T + N)
    extra = weights[0].size(-1) - t
    cols = inputs.tokens + [f"[p{i}]" for i in range(extra)]
    mask = torch.cat([torch.ones(t, t, dtype=torch.bool).tril(),
                      torch.ones(t, extra, dtype=torch.bool)], dim=1)
    return Capture({"self": AttentionGroup("self", weights, inputs.tokens, cols, mask=mask)})


# ---- pointer network ---------------------------------------------------------------------------
def _numbers(text: str, kind: str) -> list[float] | list[int]:
    try:
        values = [float(x) for x in text.replace(",", " ").split()]
    except ValueError:
        raise UserError(f"a pointer network reads numbers separated by spaces, got {text!r}"
                        ) from None
    if not values:
        raise UserError("nothing to visualise: the input has no numbers")
    if kind == "int":
        if any(v != int(v) for v in values):
            raise UserError("this pointer network reads whole numbers")
        return [int(v) for v in values]
    return values


def pointer_inputs(model: nn.Module, tok: Any, text: str, target: str | None,
                   pair: str | None) -> Inputs:
    """The numbers of ``text`` (e.g. "0.3 0.9 0.1"); ``ids`` holds the values themselves."""
    if target is not None or pair is not None:
        raise UserError("a pointer network reads one list of numbers (no --pair or --target)")
    values = _numbers(text, model.cfg.input_kind)
    return Inputs(values, [f"{v:g}" for v in values])


def capture_pointer(model: nn.Module, inputs: Inputs) -> Capture:
    """The pointer distributions softmax(u_j) of Vinyals et al. 2015 (eq. 3) at each output
    step of the greedy answer, "pointer": rows the chosen values, columns the inputs."""
    x = torch.tensor([inputs.ids])  # (1, S)
    picks = model.greedy(x, mask_chosen=True)  # (1, S)
    weights = model(x, picks).float().softmax(dim=-1)  # (1, T, S)
    rows = [f"{i + 1}: {inputs.tokens[p]}" for i, p in enumerate(picks[0].tolist())]
    return Capture({"pointer": AttentionGroup("pointer", [weights], rows, inputs.tokens)})


# ---- neural Turing machine ---------------------------------------------------------------------
def ntm_inputs(model: nn.Module, tok: Any, text: str, target: str | None,
               pair: str | None) -> Inputs:
    """Bit vectors of the copy task ("1011 0110", each ``input_size - 1`` bits wide): the
    vectors, the delimiter, then as many blank steps (Graves et al. 2014, section 4.1)."""
    if target is not None or pair is not None:
        raise UserError("an NTM reads one sequence of bit vectors (no --pair or --target)")
    width = model.cfg.input_size - 1
    words = text.split()
    if not words or any(len(w) != width or set(w) - {"0", "1"} for w in words):
        raise UserError(f"an NTM copy model reads bit vectors of {width} bits separated by "
                        f"spaces, e.g. {'10' * (width // 2) + '1' * (width % 2)}")
    labels = [*words, "[delim]", *(f"[out {i + 1}]" for i in range(len(words)))]
    return Inputs(words, labels)


def capture_ntm(model: nn.Module, inputs: Inputs) -> Capture:
    """The read and write weightings w_t of every head over the memory locations (Graves et
    al. 2014, eqs. 5-9), "read" and "write": one head of a group per NTM head."""
    n, width = len(inputs.ids), model.cfg.input_size - 1
    x = torch.zeros(1, 2 * n + 1, width + 1)  # (1, T, W + 1), as attnkit.data.copy_examples
    x[0, :n, :width] = torch.tensor([[float(b) for b in w] for w in inputs.ids])
    x[0, n, width] = 1.0
    out = model(x, output_attentions=True)
    cols = [f"m{i}" for i in range(model.cfg.memory_size)]
    return Capture({name: AttentionGroup(name, [w[0].transpose(0, 1)], inputs.tokens, cols)
                    for name, w in (("read", out.read_weights), ("write", out.write_weights))})


TRANSFORMER = Way(seq2seq_inputs, capture_transformer, decoder=True)
RNN = Way(seq2seq_inputs, capture_rnn, decoder=True)
GPT2 = Way(lm_inputs, capture_gpt2)
BERT = Way(bert_inputs, capture_bert)
LM = Way(lm_inputs, capture_lm)
XL = Way(lm_inputs, capture_xl)
POINTER = Way(pointer_inputs, capture_pointer, tokenizer=False)
NTM = Way(ntm_inputs, capture_ntm, tokenizer=False)
