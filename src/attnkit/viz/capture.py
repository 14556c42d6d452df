"""Capture a model's attention for visualisation: one plain dataclass for every model family.

A family plugs in with one *capture function* ``(model, inputs: Inputs) -> Capture``, named
with its input builder by the family table's ``viz`` entry (:mod:`attnkit.viz.families`). The
views, analyses and plots only ever read a :class:`Capture`, so they work for any family that
provides one. This module holds the
encoder-decoder Transformer (groups encoder, decoder, cross), the attentional RNN (cross), GPT-2
(self, causal) and BERT / RoBERTa / DistilBERT (encoder); :mod:`attnkit.viz.families` the rest.

Notation: L layers, H heads, T query (row) tokens, S key (column) tokens, D head size.
Queries and keys come from forward hooks on the attention projections (``qkv_proj`` for
self-attention, ``q_proj``/``kv_proj`` for cross-attention); the model code is not changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from attnkit.errors import UserError
from attnkit.models.bert import BertForPreTraining, BertModel, encoder_of
from attnkit.models.gpt2 import GPT2
from attnkit.models.rnn import RNNSeq2Seq
from attnkit.models.transformer import Transformer


@dataclass
class AttentionGroup:
    """One kind of attention (e.g. ``"cross"``) across layers.

    ``weights[l]`` is (H, T, S); ``queries[l]`` (H, T, D) and ``keys[l]`` (H, S, D) are the
    projected vectors the scores come from, ``mask`` (T, S) is True where a query may attend.
    """

    name: str
    weights: list[Tensor]
    rows: list[str]
    cols: list[str]
    queries: list[Tensor] = field(default_factory=list)
    keys: list[Tensor] = field(default_factory=list)
    mask: Tensor | None = None
    scale: float = 1.0

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_heads(self) -> int:
        return self.weights[0].size(0)

    def to(self, device: torch.device | str) -> AttentionGroup:
        """The same group with every tensor on ``device``."""
        def move(ts: list[Tensor]) -> list[Tensor]:
            return [t.to(device) for t in ts]
        return replace(self, weights=move(self.weights), queries=move(self.queries),
                       keys=move(self.keys), mask=None if self.mask is None
                       else self.mask.to(device))

    def scores(self, layer: int) -> Tensor:
        """Pre-softmax scores (H, T, S) = q k^T * scale, -inf where masked (Vaswani eq. 1)."""
        if not self.queries:
            raise UserError(f"the {self.name} attention was captured without queries and keys")
        s = self.queries[layer] @ self.keys[layer].transpose(-2, -1) * self.scale  # (H, T, S)
        if self.mask is not None:
            s = s.masked_fill(~self.mask, float("-inf"))
        return s


@dataclass
class Capture:
    """Named attention groups of one input (``"encoder"``, ``"decoder"``, ``"cross"``, ...)."""

    groups: dict[str, AttentionGroup]
    label: str = ""

    def to(self, device: torch.device | str) -> Capture:
        """The same capture with every tensor on ``device``."""
        return Capture({k: g.to(device) for k, g in self.groups.items()}, self.label)

    def group(self, name: str) -> AttentionGroup:
        if name not in self.groups:
            raise UserError(f"unknown attention group {name!r}; this model has "
                            f"{', '.join(self.groups)}")
        return self.groups[name]


@dataclass
class Inputs:
    """The token ids a capture function runs and the strings that label them.

    ``ids`` is the (encoder's, or only) sequence; ``tgt`` the decoder inputs BOS y1 .. yn of an
    encoder-decoder model (empty otherwise); ``token_types`` BERT's segment ids (0 for sentence
    A, 1 for B) or None.
    """

    ids: list[int]
    tokens: list[str]
    tgt: list[int] = field(default_factory=list)
    tgt_tokens: list[str] = field(default_factory=list)
    token_types: list[int] | None = None


class _Recorder:
    """Forward hooks that keep the output of chosen linear layers, in call order."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.outputs: dict[str, list[Tensor]] = {name: [] for name in modules}
        self.handles = [m.register_forward_hook(self._hook(name)) for name, m in modules.items()]

    def _hook(self, name: str) -> Callable:
        def keep(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
            self.outputs[name].append(output.detach())
        return keep

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def _heads(x: Tensor, n_heads: int) -> Tensor:
    """(1, T, C) -> (H, T, D)."""
    _, t, c = x.shape
    return x[0].view(t, n_heads, c // n_heads).transpose(0, 1)


def capture_transformer(model: Transformer, inputs: Inputs) -> Capture:
    """Encoder, decoder and cross attention of attnkit's encoder-decoder Transformer.

    ``inputs.ids`` are the source ids, ``inputs.tgt`` the decoder inputs (BOS y1 .. yn).
    """
    src, tgt_in = inputs.ids, inputs.tgt
    src_tokens, tgt_tokens = inputs.tokens, inputs.tgt_tokens
    h = model.cfg.n_heads
    hooks: dict[str, nn.Module] = {}
    for i, block in enumerate(model.encoder):
        hooks[f"enc{i}"] = block.self_attn.qkv_proj
    for i, block in enumerate(model.decoder):
        hooks[f"dec{i}"] = block.self_attn.qkv_proj
        hooks[f"crossq{i}"] = block.cross_attn.q_proj
        hooks[f"crosskv{i}"] = block.cross_attn.kv_proj
    rec = _Recorder(hooks)
    try:
        with torch.no_grad():
            out = model(torch.tensor([list(src)]), torch.tensor([list(tgt_in)]),
                        output_attentions=True)
    finally:
        rec.remove()
    scale = 1.0 / math.sqrt(model.cfg.d_model // h)

    def qk_self(name: str) -> tuple[Tensor, Tensor]:
        q, k, _ = rec.outputs[name][0].chunk(3, dim=-1)
        return _heads(q, h), _heads(k, h)

    enc = [qk_self(f"enc{i}") for i in range(len(model.encoder))]
    dec = [qk_self(f"dec{i}") for i in range(len(model.decoder))]
    cross = [(_heads(rec.outputs[f"crossq{i}"][0], h),
              _heads(rec.outputs[f"crosskv{i}"][0].chunk(2, dim=-1)[0], h))
             for i in range(len(model.decoder))]
    t = len(tgt_in)
    groups = {
        "encoder": AttentionGroup("encoder", [w[0] for w in out.encoder_attentions], src_tokens,
                                  src_tokens, [q for q, _ in enc], [k for _, k in enc],
                                  None, scale),
        "decoder": AttentionGroup("decoder", [w[0] for w in out.decoder_attentions], tgt_tokens,
                                  tgt_tokens, [q for q, _ in dec], [k for _, k in dec],
                                  torch.ones(t, t, dtype=torch.bool).tril(), scale),
        "cross": AttentionGroup("cross", [w[0] for w in out.cross_attentions], tgt_tokens,
                                src_tokens, [q for q, _ in cross], [k for _, k in cross],
                                None, scale),
    }
    return Capture(groups)


def capture_rnn(model: RNNSeq2Seq, inputs: Inputs) -> Capture:
    """The alignment a_ij of an attentional RNN encoder-decoder (Bahdanau or Luong) as the
    "cross" group: one layer, one head, rows the decoder inputs, columns the source tokens."""
    if model.cfg.attention == "none":
        raise UserError("the RNN without attention (model rnn) has no attention to show")
    with torch.no_grad():
        out = model(torch.tensor([inputs.ids]), torch.tensor([inputs.tgt]), output_attentions=True)
    weights = out.cross_attentions[0][0]  # (1, T, S)
    return Capture({"cross": AttentionGroup("cross", [weights], inputs.tgt_tokens,
                                            inputs.tokens)})


def _self_attention(blocks: nn.ModuleList, run: Callable[[], list[Tensor]], n_heads: int
                    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
    """Run ``run()`` (-> L weights (1, H, T, T)) with hooks on every block's fused ``qkv_proj``;
    return the weights (H, T, T), queries and keys (H, T, D) of each layer."""
    rec = _Recorder({f"l{i}": block.self_attn.qkv_proj for i, block in enumerate(blocks)})
    try:
        with torch.no_grad():
            weights = run()
    finally:
        rec.remove()
    qk = [rec.outputs[f"l{i}"][0].chunk(3, dim=-1)[:2] for i in range(len(blocks))]
    return ([w[0] for w in weights], [_heads(q, n_heads) for q, _ in qk],
            [_heads(k, n_heads) for _, k in qk])


def capture_gpt2(model: GPT2, inputs: Inputs) -> Capture:
    """GPT-2's causal self-attention (Radford et al. 2019) as one group, "self": query i sees
    keys j <= i; q and k come from each block's fused ``qkv_proj``."""
    cfg, ids = model.config, torch.tensor([inputs.ids])  # (1, T)
    weights, queries, keys = _self_attention(
        model.blocks, lambda: model(ids, output_attentions=True).attentions, cfg.n_heads)
    t = len(inputs.ids)
    return Capture({"self": AttentionGroup(
        "self", weights, inputs.tokens, inputs.tokens, queries, keys,
        torch.ones(t, t, dtype=torch.bool).tril(), 1.0 / math.sqrt(cfg.head_dim))})


def capture_bert(model: BertModel | BertForPreTraining, inputs: Inputs) -> Capture:
    """The bidirectional self-attention of BERT, RoBERTa or DistilBERT (its encoder, with or
    without pre-training heads) as one group, "encoder"; token types go to BERT's segment
    embedding (RoBERTa and DistilBERT have none to speak of)."""
    enc = encoder_of(model)
    ids = torch.tensor([inputs.ids])  # (1, S)
    types = None
    if inputs.token_types is not None and enc.token_types is not None:
        types = torch.tensor([inputs.token_types])
    weights, queries, keys = _self_attention(
        enc.layers, lambda: enc(ids, token_type_ids=types, output_attentions=True).attentions,
        enc.arch.n_heads)
    return Capture({"encoder": AttentionGroup(
        "encoder", weights, inputs.tokens, inputs.tokens, queries, keys, None,
        1.0 / math.sqrt(enc.arch.d_model // enc.arch.n_heads))})
