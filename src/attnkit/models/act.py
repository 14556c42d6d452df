"""The parity network of Graves (2016, sec. 3.1): adaptive computation time around a tanh RNN
cell that ponders over one input vector, with one logistic output unit.

The input is a vector of ``size`` entries in {-1, 0, +1}; the cell (``hidden_size`` units)
runs N ponder steps with ACT (:class:`attnkit.nn.act.ACTCell`), and the output unit reads the
mean-field state. ``max_steps=1`` is the network without ACT (one step, p = 1).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from attnkit.errors import ConfigError
from attnkit.nn.act import ACTCell


@dataclass(frozen=True)
class ParityModelConfig:
    """Graves (2016, sec. 3.1): 128 tanh units, a logistic output, eps = 0.01."""

    size: int = 64
    hidden_size: int = 128
    eps: float = 0.01
    max_steps: int = 100
    halt_bias: float = 1.0

    def __post_init__(self) -> None:
        if self.size < 1 or self.hidden_size < 1 or self.max_steps < 1:
            raise ConfigError("size, hidden_size and max_steps must be >= 1")
        if not 0 < self.eps < 1:
            raise ConfigError(f"eps must be in (0, 1), got {self.eps}")


class ParityACT(nn.Module):
    """ACT around ``nn.RNNCell`` (tanh) with one logistic output unit."""

    def __init__(self, cfg: ParityModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.act = ACTCell(nn.RNNCell(cfg.size + 1, cfg.hidden_size), cfg.eps, cfg.max_steps,
                           cfg.halt_bias)
        self.out = nn.Linear(cfg.hidden_size, 1)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x (B, size) -> logits (B,), ponder cost N + R (B,), steps N (B,)."""
        out = self.act.step(x, self.act.initial_state(x))
        return self.out(out.state).squeeze(-1), out.cost, out.steps
