"""Adaptive computation time (Graves 2016): let a recurrent step repeat until it decides to halt.

At input step t the wrapped transition S runs N(t) "ponder" steps n = 1, 2, ... from the
previous state, s^n = S(s^{n-1}, x^n), where x^n is x_t plus a binary flag that is 1 only at
n = 1, and a halting unit gives h^n = sigmoid(W_h s^n + b_h). With the paper's notation
(Graves 2016, sec. 2):

    N(t) = min{n' : sum_{n=1}^{n'} h^n >= 1 - eps}   (capped at max_steps M)
    R(t) = 1 - sum_{n=1}^{N(t)-1} h^n                (the remainder)
    p^n  = R(t) if n = N(t), h^n if n < N(t)          (a distribution: sum_n p^n = 1)

and the step's state (and output) is the mean field s_t = sum_n p^n s^n, y_t = sum_n p^n y^n.
The ponder cost rho_t = N(t) + R(t) is added to the task loss as ``tau * sum_t rho_t`` (sec.
2.1); N(t) is piecewise constant, so only R carries gradient (N is counted detached). The
halting bias starts at 1 (sigmoid(1) = 0.73: few ponder steps early in training), the
positive initial bias the paper recommends.

:func:`ponder` is the loop for any step function with per-element halting: :class:`ACTCell`
runs it around an RNN, GRU or LSTM cell over a sequence; :class:`ACTBlock` around a
Universal-Transformer-style block (Dehghani et al. 2019) with halting per position. Rows that
have halted stop contributing (p = 0) but, in a batch, are still computed until all halt.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from attnkit.errors import ConfigError

State = Any  # a tensor or a tuple of tensors whose leading dims match the halting shape


@dataclass
class PonderOutput:
    """The mean-field state and output, with the halting statistics.

    ``steps`` N, ``remainder`` R and ``cost`` N + R have the halting shape (e.g. (B,) or
    (B, T)); ``probs`` (..., n_run) are the p^n of every step run (zero after halting).
    """

    state: State
    output: Tensor | None
    steps: Tensor
    remainder: Tensor
    cost: Tensor
    probs: Tensor


def _map(fn: Callable, *states: State) -> State:
    if isinstance(states[0], tuple):
        return tuple(fn(*parts) for parts in zip(*states, strict=True))
    return fn(*states)


def _weigh(x: Tensor, p: Tensor) -> Tensor:
    """p (...,) times x (..., F...) broadcast over x's trailing dims."""
    return x * p.reshape(*p.shape, *([1] * (x.dim() - p.dim())))


def check_halting(eps: float, max_steps: int) -> None:
    """ConfigError unless 0 < eps < 1 and max_steps >= 1."""
    if not 0 < eps < 1 or max_steps < 1:
        raise ConfigError(f"ACT needs 0 < eps < 1 and max_steps >= 1, got {eps}, {max_steps}")


def ponder(step: Callable[[State, int], tuple[State, Tensor | None, Tensor]], state: State,
           eps: float = 0.01, max_steps: int = 100) -> PonderOutput:
    """Run ``step(state, n) -> (state, output or None, h)`` for n = 1.. until every element
    halts; ``h`` are halting probabilities in (0, 1) with the halting shape."""
    check_halting(eps, max_steps)
    acc_state = acc_out = None
    total = running = steps = remainder = None
    probs = []
    for n in range(1, max_steps + 1):
        state, out, h = step(state, n)
        if total is None:
            total = torch.zeros_like(h)
            running = torch.ones_like(h, dtype=torch.bool)
            steps, remainder = torch.zeros_like(h), torch.zeros_like(h)
        stop = running & ((total + h >= 1 - eps) | (n == max_steps))  # N(t) = n here
        p = torch.where(stop, 1 - total, torch.where(running, h, torch.zeros_like(h)))
        remainder = torch.where(stop, 1 - total, remainder)
        steps = torch.where(running, torch.full_like(h, n), steps)
        total = total + torch.where(running & ~stop, h, torch.zeros_like(h))
        running = running & ~stop
        probs.append(p)
        weighed = _map(lambda s, p=p: _weigh(s, p), state)
        acc_state = weighed if acc_state is None else _map(torch.add, acc_state, weighed)
        if out is not None:
            acc_out = _weigh(out, p) if acc_out is None else acc_out + _weigh(out, p)
        if not running.any():
            break
    return PonderOutput(acc_state, acc_out, steps, remainder, steps.detach() + remainder,
                        torch.stack(probs, dim=-1))


def halting_distribution(h: Tensor, eps: float = 0.01, max_steps: int | None = None
                         ) -> tuple[Tensor, Tensor, Tensor]:
    """The p^n, N and R for given halting values h (..., n) (a reference: the
    loop in :func:`ponder` computes the same thing step by step)."""
    max_steps = h.size(-1) if max_steps is None else min(max_steps, h.size(-1))
    seq = iter(h[..., :max_steps].unbind(-1))
    out = ponder(lambda s, n: (s, None, next(seq)), h.new_zeros(h.shape[:-1]), eps, max_steps)
    return out.probs, out.steps, out.remainder


class HaltingUnit(nn.Module):
    """h = sigmoid(W_h s + b_h), b_h initialised to ``bias``."""

    def __init__(self, d_state: int, bias: float = 1.0) -> None:
        super().__init__()
        self.proj = nn.Linear(d_state, 1)
        nn.init.constant_(self.proj.bias, bias)

    def forward(self, s: Tensor) -> Tensor:
        return torch.sigmoid(self.proj(s)).squeeze(-1)  # (...,)


@dataclass
class ACTOutput:
    """Mean-field hidden states (B, T, D), the final state, and per-step halting figures
    ``steps``, ``remainder``, ``cost`` (B, T)."""

    hidden: Tensor
    state: State
    steps: Tensor
    remainder: Tensor
    cost: Tensor


class ACTCell(nn.Module):
    """ACT around a recurrent cell (``nn.RNNCell``, ``nn.GRUCell`` or ``nn.LSTMCell``).

    The cell must take ``input_size + 1`` inputs (the first-step flag). The halting
    unit reads the hidden state h (for an LSTM the mean field covers h and c). A linear output
    layer on the mean-field state equals the mean field of per-step outputs, so it is left to
    the caller.
    """

    def __init__(self, cell: nn.Module, eps: float = 0.01, max_steps: int = 100,
                 halt_bias: float = 1.0) -> None:
        super().__init__()
        check_halting(eps, max_steps)
        self.cell, self.eps, self.max_steps = cell, eps, max_steps
        self.hidden_size = cell.hidden_size
        self.halt = HaltingUnit(cell.hidden_size, halt_bias)

    def initial_state(self, x: Tensor) -> State:
        zeros = x.new_zeros(x.size(0), self.hidden_size)
        return (zeros, zeros) if isinstance(self.cell, nn.LSTMCell) else zeros

    def step(self, x: Tensor, state: State) -> PonderOutput:
        """One input step x (B, input_size): ponder until halting."""
        first = torch.cat([x, x.new_ones(x.size(0), 1)], -1)  # flag 1 at n = 1
        later = torch.cat([x, x.new_zeros(x.size(0), 1)], -1)

        def run(s: State, n: int) -> tuple[State, None, Tensor]:
            s = self.cell(first if n == 1 else later, s)
            return s, None, self.halt(s[0] if isinstance(s, tuple) else s)

        return ponder(run, state, self.eps, self.max_steps)

    def forward(self, x: Tensor, state: State | None = None) -> ACTOutput:
        """x (B, T, input_size) -> ACTOutput with hidden (B, T, hidden_size)."""
        state = self.initial_state(x) if state is None else state
        hidden, steps, remainder, cost = [], [], [], []
        for t in range(x.size(1)):
            out = self.step(x[:, t], state)
            state = out.state
            hidden.append(state[0] if isinstance(state, tuple) else state)
            steps.append(out.steps)
            remainder.append(out.remainder)
            cost.append(out.cost)
        return ACTOutput(torch.stack(hidden, 1), state, torch.stack(steps, 1),
                         torch.stack(remainder, 1), torch.stack(cost, 1))


class ACTBlock(nn.Module):
    """ACT around a block applied repeatedly to a sequence state (B, T, C), halting per
    position, as in the Universal Transformer (Dehghani et al. 2019, sec. 2.2).

    ``block(x, **kwargs)`` returns a tensor or an object with ``.hidden`` (e.g.
    :class:`attnkit.nn.blocks.EncoderBlock`). Before each application a learned embedding of
    the step n is added (the role of the first-step flag; UT adds a timestep signal).
    """

    def __init__(self, block: nn.Module, d_model: int, eps: float = 0.01, max_steps: int = 8,
                 halt_bias: float = 1.0) -> None:
        super().__init__()
        check_halting(eps, max_steps)
        self.block, self.eps, self.max_steps = block, eps, max_steps
        self.step_embedding = nn.Embedding(max_steps, d_model)
        nn.init.normal_(self.step_embedding.weight, std=0.02)
        self.halt = HaltingUnit(d_model, halt_bias)

    def forward(self, x: Tensor, **kwargs: Any) -> ACTOutput:
        """x (B, T, C) -> ACTOutput with hidden (B, T, C) and figures (B, T)."""
        def run(s: Tensor, n: int) -> tuple[Tensor, None, Tensor]:
            out = self.block(s + self.step_embedding.weight[n - 1], **kwargs)
            s = out if isinstance(out, Tensor) else out.hidden
            return s, None, self.halt(s)

        out = ponder(run, x, self.eps, self.max_steps)
        return ACTOutput(out.state, out.state, out.steps, out.remainder, out.cost)


def ponder_loss(cost: Tensor, tau: float, mask: Tensor | None = None) -> Tensor:
    """tau * sum of ponder costs (the term added to the task loss); ``mask`` (True = counted)."""
    if mask is not None:
        cost = cost * mask
    return tau * cost.sum()
