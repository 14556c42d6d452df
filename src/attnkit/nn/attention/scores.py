"""Score functions: how much a query ``q`` matches each key ``k``, before mask and softmax.

Notation: B batch, H heads, T query length, S key length, Dq / Dk query / key width. Every
module maps ``q`` (B, T, Dq) or (B, H, T, Dq) and ``k`` (B, S, Dk) or (B, H, S, Dk) to raw
scores (B, T, S) or (B, H, T, S); the attention core adds the bias, masks, normalises and takes
the weighted sum of the values:

    attention(q, k, v, mask=..., score_fn=build_score("additive", Dq, Dk))

| name | score(q, k_s) | paper |
|---|---|---|
| ``dot`` | q . k_s | Luong et al. 2015, eq. 8 ("dot") |
| ``scaled_dot`` | q . k_s / sqrt(Dk) | Vaswani et al. 2017, eq. 1 |
| ``general`` | q^T W k_s | Luong et al. 2015, eq. 8 ("general") |
| ``additive`` / ``concat`` | v^T tanh(W_q q + W_k k_s) | Bahdanau et al. 2015, A.1.2; Luong eq. 8 |
| ``location`` | (W_a q)_s | Luong et al. 2015, eq. 9 |
| ``cosine`` | beta * q . k_s / (abs(q) abs(k_s)) | Graves et al. 2014, eq. 5-6 |

Scores that are a scaled dot product of transformed queries and keys (dot, scaled_dot,
general, cosine) expose :meth:`dot_form`, so the core can still run the fused O(T)-memory
kernel when nobody asks for the weights; additive and location need the full (T, S) matrix.
"""

from __future__ import annotations

import inspect
import math

import torch
from torch import Tensor, nn

from attnkit.config import unknown
from attnkit.errors import ConfigError

DotForm = tuple[Tensor, Tensor, float]  # (q', k', scale): score = scale * q' . k'


def _same_width(name: str, d_query: int, d_key: int) -> None:
    if d_query != d_key:
        raise ConfigError(f"score '{name}' needs equal query and key widths, got {d_query} and "
                          f"{d_key} (use 'general' or 'additive')")


class DotScore(nn.Module):
    """score(q, k_s) = q . k_s (Luong et al. 2015, eq. 8, "dot"). No parameters."""

    def __init__(self, d_query: int, d_key: int, d_hidden: int | None = None) -> None:
        super().__init__()
        _same_width("dot", d_query, d_key)

    def dot_form(self, q: Tensor, k: Tensor) -> DotForm:
        return q, k, 1.0

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return torch.matmul(q, k.transpose(-2, -1))  # (..., T, S)


class ScaledDotScore(nn.Module):
    """score(q, k_s) = q . k_s / sqrt(Dk) (Vaswani et al. 2017, eq. 1). No parameters."""

    def __init__(self, d_query: int, d_key: int, d_hidden: int | None = None) -> None:
        super().__init__()
        _same_width("scaled_dot", d_query, d_key)
        self.scale = 1.0 / math.sqrt(d_key)

    def dot_form(self, q: Tensor, k: Tensor) -> DotForm:
        return q, k, self.scale

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return torch.matmul(q, k.transpose(-2, -1)) * self.scale  # (..., T, S)


class GeneralScore(nn.Module):
    """score(q, k_s) = q^T W k_s with W (Dq, Dk) (Luong et al. 2015, eq. 8, "general")."""

    def __init__(self, d_query: int, d_key: int, d_hidden: int | None = None) -> None:
        super().__init__()
        self.proj = nn.Linear(d_key, d_query, bias=False)  # k -> W k, weight is W (Dq, Dk)

    def dot_form(self, q: Tensor, k: Tensor) -> DotForm:
        return q, self.proj(k), 1.0  # (..., S, Dq)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        return torch.matmul(q, self.proj(k).transpose(-2, -1))  # (..., T, S)


class AdditiveScore(nn.Module):
    """score(q, k_s) = v^T tanh(W_q q + W_k k_s) (Bahdanau et al. 2015, "concat" in Luong).

    Luong's ``v^T tanh(W_a [q; k_s])`` is the same function with W_a = [W_q W_k]. ``d_hidden``
    (default Dq) is the width of the tanh layer; ``bias`` adds a bias inside the tanh. Memory is
    O(T * S * d_hidden): meant for recurrent decoders, not long self-attention. Decoders that
    score many queries against fixed keys can pass ``k_proj=self.project_keys(k)`` once.
    """

    def __init__(self, d_query: int, d_key: int, d_hidden: int | None = None,
                 bias: bool = False) -> None:
        super().__init__()
        d_hidden = d_query if d_hidden is None else d_hidden
        self.w_q = nn.Linear(d_query, d_hidden, bias=bias)
        self.w_k = nn.Linear(d_key, d_hidden, bias=False)
        self.v = nn.Linear(d_hidden, 1, bias=False)

    def project_keys(self, k: Tensor) -> Tensor:
        """W_k k: (..., S, Dk) -> (..., S, d_hidden)."""
        return self.w_k(k)

    def forward(self, q: Tensor, k: Tensor, k_proj: Tensor | None = None) -> Tensor:
        k_proj = self.w_k(k) if k_proj is None else k_proj
        hidden = torch.tanh(self.w_q(q).unsqueeze(-2) + k_proj.unsqueeze(-3))  # (..., T, S, Dh)
        return self.v(hidden).squeeze(-1)  # (..., T, S)


class LocationScore(nn.Module):
    """score(q)_s = (W_a q)_s, W_a (max_len, Dq): the alignment depends on the query alone
    (Luong et al. 2015, eq. 9, "location"); the keys only supply S <= max_len."""

    def __init__(self, d_query: int, d_key: int, d_hidden: int | None = None, *,
                 max_len: int | None = None) -> None:
        super().__init__()
        if max_len is None or max_len <= 0:
            raise ConfigError("score 'location' needs the option max_len (a positive number of "
                              f"source positions), got {max_len}")
        self.max_len = max_len
        self.proj = nn.Linear(d_query, max_len, bias=False)

    def forward(self, q: Tensor, k: Tensor) -> Tensor:
        s = k.size(-2)
        if s > self.max_len:
            raise ConfigError(f"score 'location' was built for max_len {self.max_len} source "
                              f"positions, got {s}")
        return self.proj(q)[..., :s]  # (..., T, S)


class CosineScore(nn.Module):
    """score(q, k_s) = beta * cos(q, k_s) (Graves et al. 2014, eq. 5-6: content addressing).

    ``beta`` is the key strength: a fixed float (option ``beta``, default 1.0), or per query at
    call time as a tensor of shape q.shape[:-1] (an NTM head emits beta_t >= 0 each step).
    """

    def __init__(self, d_query: int, d_key: int, d_hidden: int | None = None, *,
                 beta: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        _same_width("cosine", d_query, d_key)
        self.beta, self.eps = beta, eps

    def _unit(self, x: Tensor) -> Tensor:
        return x / x.norm(dim=-1, keepdim=True).clamp_min(self.eps)

    def dot_form(self, q: Tensor, k: Tensor, beta: Tensor | float | None = None) -> DotForm:
        beta = self.beta if beta is None else beta
        if isinstance(beta, Tensor):
            return self._unit(q) * beta.unsqueeze(-1), self._unit(k), 1.0
        return self._unit(q), self._unit(k), float(beta)

    def forward(self, q: Tensor, k: Tensor, beta: Tensor | float | None = None) -> Tensor:
        qn, kn, scale = self.dot_form(q, k, beta)
        return torch.matmul(qn, kn.transpose(-2, -1)) * scale  # (..., T, S)


SCORES: dict[str, type[nn.Module]] = {
    "dot": DotScore,
    "scaled_dot": ScaledDotScore,
    "general": GeneralScore,
    "additive": AdditiveScore,
    "concat": AdditiveScore,
    "location": LocationScore,
    "cosine": CosineScore,
}


def build_score(name: str, d_query: int, d_key: int, d_hidden: int | None = None,
                **options: object) -> nn.Module:
    """The score module ``name`` from :data:`SCORES`; unknown names and options -> ConfigError."""
    if name not in SCORES:
        raise unknown("score function", name, SCORES)
    cls = SCORES[name]
    allowed = [p for p in inspect.signature(cls.__init__).parameters
               if p not in ("self", "d_query", "d_key", "d_hidden")]
    for key in options:
        if key not in allowed:
            raise unknown(f"option of score '{name}'", key, allowed or ["(none)"])
    return cls(d_query, d_key, d_hidden, **options)

