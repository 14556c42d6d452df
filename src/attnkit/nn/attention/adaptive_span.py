"""Adaptive attention span (Sukhbaatar et al. 2019, "Adaptive Attention Span in Transformers").

Notation: B batch, H heads, T query length, S key length, x = i - j >= 0 the distance from a
query to a key. Each head h learns a span z_h in [0, max_span] and weighs its attention with the
soft mask (section 3, eq. 2 of the paper)

    m_z(x) = clamp((R + z - x) / R, 0, 1)        (R: the ramp, a fixed hyper-parameter)
    a_ij   = m_z(i - j) exp(s_ij) / sum_k m_z(i - k) exp(s_ik)          (renormalised)

which equals softmax(s_ij + log m_z(i - j)): the mask enters the attention core as an additive
bias (log m) plus a boolean mask where m = 0, so it can also be fused (a flex-attention score
modification). Keys with m = 0 for every head are trimmed from the key/value memory before the
scores are computed (:meth:`AdaptiveSpan.window`), so the compute really shrinks as spans do.
The L1 penalty on the spans (:func:`span_penalty`) is added to the loss.

Distances are limited to x < max_span (a key max_span positions back is never seen).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from attnkit.errors import ConfigError


class AdaptiveSpan(nn.Module):
    """Learnable per-head spans z_h = frac_h * max_span, frac_h kept in [0, 1]."""

    def __init__(self, n_heads: int, max_span: int, ramp: int = 32, init: float = 0.0) -> None:
        super().__init__()
        if max_span < 1:
            raise ConfigError(f"adaptive span: max_span must be >= 1, got {max_span}")
        if ramp < 1:
            raise ConfigError(f"adaptive span: ramp must be >= 1, got {ramp}")
        if not 0.0 <= init <= 1.0:
            raise ConfigError(f"adaptive span: init must be a fraction in [0, 1], got {init}")
        self.max_span, self.ramp = max_span, ramp
        self.frac = nn.Parameter(torch.full((n_heads,), float(init)))  # z / max_span, (H,)

    def spans(self) -> Tensor:
        """z (H,) in positions, clamped to [0, max_span]."""
        return self.frac.clamp(0.0, 1.0) * self.max_span

    @torch.no_grad()
    def clamp_(self) -> None:
        """Keep the parameters in [0, 1] (call before each forward in training, as the paper)."""
        self.frac.clamp_(0.0, 1.0)

    def window(self) -> int:
        """How many distances 0..W-1 have m > 0 for some head: W = min(max_span, ceil(z + R))."""
        longest = float(self.spans().max().detach())
        return max(1, min(self.max_span, math.ceil(longest + self.ramp)))

    def soft_mask(self, distance: Tensor) -> Tensor:
        """m_z(x) for integer distances ``distance`` (T, S) -> (H, T, S); 0 where x < 0 or
        x >= max_span."""
        z = self.spans()[:, None, None]  # (H, 1, 1)
        x = distance.to(z.dtype)[None]
        m = ((self.ramp + z - x) / self.ramp).clamp(0.0, 1.0)
        inside = (distance >= 0) & (distance < self.max_span)
        return m * inside[None]

    def bias_and_mask(self, distance: Tensor) -> tuple[Tensor, Tensor]:
        """(log m (H, T, S) with a finite floor, boolean m > 0 (H, T, S)) for the core.

        The floor keeps gradients finite; where m = 0 the boolean mask removes the key exactly.
        """
        m = self.soft_mask(distance)
        return torch.log(m.clamp_min(1e-30)), m > 0

    def extra_repr(self) -> str:
        return f"heads={self.frac.numel()}, max_span={self.max_span}, ramp={self.ramp}"


def span_penalty(spans: list[Tensor], coef: float) -> Tensor:
    """The L1 span penalty per token: coef * sum over layers of the mean span over heads.

    The paper adds (lambda / M) sum_i z_i to the per-token loss (section 3; M = number of
    heads); ``spans`` are the (H,) spans of each layer in positions.
    """
    if not spans:
        return torch.zeros(())
    return coef * torch.stack([z.mean() for z in spans]).sum()


def attention_flops(t: int, keys: list[int], d_model: int) -> float:
    """Forward FLOPs of the score, position and value products of attention layers that each
    see ``keys[l]`` keys for ``t`` queries: 3 products of 2 * T * S * C multiply-adds."""
    return float(sum(6 * t * s * d_model for s in keys))
