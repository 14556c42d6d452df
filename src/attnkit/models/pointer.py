"""Pointer network (Vinyals, Fortunato & Jaitly 2015): attention over the inputs IS the output.

An LSTM encoder reads the input elements x_1..x_S into states e_1..e_S; an LSTM decoder,
started from the encoder's final state, produces d_1..d_T. At output step i the model scores
every input position with the additive score (sec. 2.3, eq. 3)

    u^i_j = v^T tanh(W1 e_j + W2 d_i),        p(C_i | C_1..C_{i-1}, P) = softmax(u^i)

and the softmax over the S input positions is the output distribution: the network points at
an input element instead of choosing from a fixed vocabulary, so the same weights handle any
input length. The score is ``build_score("additive", ...)`` from
:mod:`attnkit.nn.attention.scores`. The decoder's input at step i is the embedded input element
chosen at step i-1 (a learned start vector at step 1): the teacher's choice in training, the
model's own in decoding.

``mask_chosen`` removes positions already pointed to from the softmax (-inf), so the output is
a permutation. The paper does not constrain the softmax in training; for the TSP it restricts
the beam search to valid tours at inference (sec. 4.3). Here it is one flag for training
(:meth:`PointerNet.forward`) and one argument for decoding (:meth:`PointerNet.greedy`).

Notation: B batch, S input length, T output length, D model width. Inputs are scalars:
floats (B, S) embedded by a linear map, or integers (B, S) in [0, n_values) by a lookup table.
A batch holds lists of one length (no padding).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from attnkit.errors import ConfigError, UserError
from attnkit.nn.attention.scores import build_score
from attnkit.nn.recurrent import LSTM


@dataclass(frozen=True)
class PointerConfig:
    """Sizes of a pointer network. Defaults: the paper (one LSTM layer of 256 units, uniform
    initialisation in [-0.08, 0.08], sec. 4)."""

    input_kind: Literal["float", "int"] = "float"
    n_values: int = 0             # vocabulary of integer inputs (input_kind "int")
    d_model: int = 256            # LSTM width (encoder and decoder)
    d_attention: int = 0          # width of the tanh layer of the score; 0 = d_model
    n_layers: int = 1
    init_range: float = 0.08      # uniform initialisation range; 0 = PyTorch's default
    mask_chosen: bool = False     # in training, mask positions the teacher already chose

    def __post_init__(self) -> None:
        if self.input_kind not in ("float", "int"):
            raise ConfigError(f"arch.input_kind must be 'float' or 'int', got "
                              f"{self.input_kind!r}")
        if self.input_kind == "int" and self.n_values < 1:
            raise ConfigError("arch.n_values must be >= 1 for integer inputs")
        for name in ("d_model", "n_layers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"arch.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_attention < 0 or self.init_range < 0:
            raise ConfigError("arch.d_attention and arch.init_range must be >= 0")


def chosen_mask(targets: Tensor, n_positions: int) -> Tensor:
    """(B, T, S) bool: True where position s was chosen at an output step before t."""
    onehot = nn.functional.one_hot(targets, n_positions).to(torch.int64)  # (B, T, S)
    before = onehot.cumsum(dim=1) - onehot  # chosen strictly before step t
    return before > 0


class PointerNet(nn.Module):
    """Encoder LSTM, decoder LSTM, additive pointer attention; see the module docstring."""

    def __init__(self, cfg: PointerConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.d_model
        self.embed = (nn.Linear(1, d) if cfg.input_kind == "float"
                      else nn.Embedding(cfg.n_values, d))
        self.encoder = LSTM(d, d, cfg.n_layers, batch_first=True)
        self.decoder = LSTM(d, d, cfg.n_layers, batch_first=True)
        self.start = nn.Parameter(torch.zeros(d))  # decoder input at step 1
        self.score = build_score("additive", d, d, cfg.d_attention or d)
        if cfg.init_range > 0:
            for p in self.parameters():
                nn.init.uniform_(p, -cfg.init_range, cfg.init_range)

    def _embed(self, inputs: Tensor) -> Tensor:
        if self.cfg.input_kind == "float":
            if inputs.is_floating_point():
                return self.embed(inputs.unsqueeze(-1))  # (B, S, D)
            raise UserError("this pointer network reads float inputs")
        if inputs.is_floating_point():
            raise UserError("this pointer network reads integer inputs")
        # values are checked on the CPU only: on a GPU the check would wait for the device
        if inputs.is_cpu and inputs.numel() and (inputs.min() < 0
                                                 or inputs.max() >= self.cfg.n_values):
            raise UserError(f"integer inputs must be in [0, {self.cfg.n_values})")
        return self.embed(inputs)  # (B, S, D)

    def encode(self, inputs: Tensor) -> tuple[Tensor, Tensor, tuple[Tensor, Tensor]]:
        """Embedded inputs (B, S, D), encoder states e (B, S, D), final LSTM state."""
        if inputs.dim() != 2 or inputs.size(1) < 1:
            raise UserError(f"pointer inputs must be (batch, length >= 1), got "
                            f"{tuple(inputs.shape)}")
        x = self._embed(inputs)
        enc, state = self.encoder(x)
        return x, enc, state

    def forward(self, inputs: Tensor, targets: Tensor) -> Tensor:
        """Teacher-forced pointer logits u (B, T, S) for target positions ``targets`` (B, T)."""
        x, enc, state = self.encode(inputs)
        b, s, d = x.shape
        prev = torch.gather(x, 1, targets[:, :-1, None].expand(-1, -1, d))  # (B, T-1, D)
        dec_in = torch.cat([self.start.expand(b, 1, d), prev], dim=1)  # (B, T, D)
        dec, _ = self.decoder(dec_in, state)  # (B, T, D)
        logits = self.score(dec, enc, k_proj=self.score.project_keys(enc))  # (B, T, S)
        if self.cfg.mask_chosen:
            logits = logits.masked_fill(chosen_mask(targets, s), float("-inf"))
        return logits

    @torch.no_grad()
    def greedy(self, inputs: Tensor, steps: int | None = None, mask_chosen: bool = True
               ) -> Tensor:
        """Greedy decoding: (B, steps) input positions, ``steps`` default S.

        ``mask_chosen``: never point twice at one position (the output is a permutation
        when ``steps == S``); needs ``steps <= S``.
        """
        x, enc, state = self.encode(inputs)
        b, s, d = x.shape
        steps = s if steps is None else steps
        if mask_chosen and steps > s:
            raise UserError(f"cannot choose {steps} distinct positions out of {s}")
        k_proj = self.score.project_keys(enc)  # (B, S, Da), once for all steps
        used = torch.zeros(b, s, dtype=torch.bool, device=x.device)
        dec_in = self.start.expand(b, 1, d)
        out = []
        for _ in range(steps):
            dec, state = self.decoder(dec_in, state)  # (B, 1, D)
            logits = self.score(dec, enc, k_proj=k_proj)[:, 0]  # (B, S)
            if mask_chosen:
                logits = logits.masked_fill(used, float("-inf"))
            pick = logits.argmax(dim=-1)  # (B,)
            used[torch.arange(b), pick] = True
            out.append(pick)
            dec_in = x[torch.arange(b), pick][:, None]  # (B, 1, D)
        return torch.stack(out, dim=1)  # (B, steps)


def pointer_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Summed negative log-likelihood of the target positions and their number."""
    loss = nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    return loss, targets.numel()


def sort_accuracy(inputs: Tensor, pointers: Tensor) -> dict[str, float]:
    """Exact-sort accuracy (whole list right) and per-position accuracy of chosen ``pointers``.

    Judged by values, not positions (ties among integers may come in either order): position i
    is right when the value pointed at equals the i-th smallest input.
    """
    out = torch.gather(inputs, 1, pointers)  # (B, S) values in output order
    right = out == torch.sort(inputs, dim=1).values  # (B, S)
    return {"exact": right.all(dim=1).float().mean().item(),
            "per_position": right.float().mean().item()}
