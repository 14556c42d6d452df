"""Capture a model's attention for visualisation: one plain dataclass for every model family.

A family plugs in with one *capture function* ``(model, src_ids, tgt_ids) -> Capture`` entered
in :data:`CAPTURES` (model class -> function). The views, analyses and plots only ever read a
:class:`Capture`, so they work for any family that provides one.

Notation: L layers, H heads, T query (row) tokens, S key (column) tokens, D head size.
Queries and keys come from forward hooks on the attention projections (``qkv_proj`` for
self-attention, ``q_proj``/``kv_proj`` for cross-attention); the model code is not changed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from attnkit.errors import UserError
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

    def group(self, name: str) -> AttentionGroup:
        if name not in self.groups:
            raise UserError(f"unknown attention group {name!r}; this model has "
                            f"{', '.join(self.groups)}")
        return self.groups[name]


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


def capture_transformer(model: Transformer, src: Sequence[int], tgt_in: Sequence[int],
                        src_tokens: list[str], tgt_tokens: list[str]) -> Capture:
    """Encoder, decoder and cross attention of attnkit's encoder-decoder Transformer.

    ``src`` are the source ids, ``tgt_in`` the decoder inputs (BOS y1 .. yn); the token
    strings label rows and columns.
    """
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
                        need_weights=True)
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
        "encoder": AttentionGroup("encoder", [w[0] for w in out.encoder_weights], src_tokens,
                                  src_tokens, [q for q, _ in enc], [k for _, k in enc],
                                  None, scale),
        "decoder": AttentionGroup("decoder", [w[0] for w in out.decoder_weights], tgt_tokens,
                                  tgt_tokens, [q for q, _ in dec], [k for _, k in dec],
                                  torch.ones(t, t, dtype=torch.bool).tril(), scale),
        "cross": AttentionGroup("cross", [w[0] for w in out.cross_weights], tgt_tokens,
                                src_tokens, [q for q, _ in cross], [k for _, k in cross],
                                None, scale),
    }
    return Capture(groups)


# model class -> capture function; a new family adds one entry
CAPTURES: dict[type, Callable[..., Capture]] = {Transformer: capture_transformer}


def capture(model: nn.Module, src: Sequence[int], tgt_in: Sequence[int],
            src_tokens: list[str], tgt_tokens: list[str]) -> Capture:
    """Dispatch to the capture function of ``model``'s family."""
    for cls, fn in CAPTURES.items():
        if isinstance(model, cls):
            was_training = model.training
            model.eval()
            try:
                return fn(model, src, tgt_in, src_tokens, tgt_tokens)
            finally:
                model.train(was_training)
    raise UserError(f"attnkit.viz cannot capture attention of {type(model).__name__} yet "
                    f"(supported: {', '.join(c.__name__ for c in CAPTURES)})")
