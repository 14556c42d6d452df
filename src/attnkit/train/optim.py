"""Optimisers and learning-rate schedules.

Adam with the Transformer's settings (Vaswani et al. 2017, section 5.3: beta1 = 0.9,
beta2 = 0.98, eps = 1e-9) or AdamW (Loshchilov & Hutter 2019, decoupled weight decay), and four
schedules, each a multiplier of the peak rate ``lr`` applied per optimiser step ``s`` (1-based):

- ``inverse_sqrt``: ``min(s / w, sqrt(w / s))``: linear warm-up to ``lr`` at ``s = w``, then
  decay with the inverse square root of the step. This is the paper's
  ``lrate = d^-0.5 * min(s^-0.5, s * w^-1.5)`` (equation 3) rescaled so that its peak
  ``d^-0.5 * w^-0.5`` equals ``lr`` (see :func:`noam_lr`).
- ``cosine``: warm-up, then ``r + (1 - r) * (1 + cos(pi * p)) / 2`` with progress ``p`` from 0
  at ``s = max(w, 1)`` to 1 at ``s = total``, floor ``r = min_lr_ratio``.
- ``linear``: warm-up, then ``r + (1 - r) * (1 - p)``.
- ``constant``: warm-up, then 1.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from attnkit.config import unknown
from attnkit.errors import ConfigError

OPTIMIZERS = ("adam", "adamw")
SCHEDULES = ("inverse_sqrt", "cosine", "linear", "constant")


@dataclass(frozen=True)
class OptimConfig:
    """Optimiser and schedule. Defaults: the Transformer paper's Adam with Noam warm-up."""

    name: Literal["adam", "adamw"] = "adam"
    lr: float = 1e-3  # peak learning rate
    betas: tuple[float, float] = (0.9, 0.98)  # Vaswani et al. 2017, section 5.3
    eps: float = 1e-9
    weight_decay: float = 0.0  # never applied to biases, norms, embeddings
    schedule: Literal["inverse_sqrt", "cosine", "linear", "constant"] = "inverse_sqrt"
    warmup_steps: int = 4000
    min_lr_ratio: float = 0.0  # floor for cosine/linear decay, as a fraction of lr

    def __post_init__(self) -> None:
        if self.name not in OPTIMIZERS:
            raise unknown("optimizer", self.name, OPTIMIZERS)
        if self.schedule not in SCHEDULES:
            raise unknown("schedule", self.schedule, SCHEDULES)
        if not self.lr > 0:
            raise ConfigError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if not self.eps > 0:
            raise ConfigError(f"optim.eps must be > 0, got {self.eps}")
        if self.weight_decay < 0:
            raise ConfigError(f"optim.weight_decay must be >= 0, got {self.weight_decay}")
        if self.warmup_steps < 0:
            raise ConfigError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ConfigError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")


def _is_no_decay_module(module: nn.Module) -> bool:
    """Norm layers and embedding tables (by type, or by class name for home-made ones)."""
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.LayerNorm, nn.GroupNorm,
                           nn.modules.batchnorm._NormBase, nn.RMSNorm)):
        return True
    name = type(module).__name__.lower()
    return "norm" in name or "embedding" in name


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group and a group without weight decay.

    No decay for: biases and every other parameter with fewer than 2 dimensions (norm gains,
    scalars), parameters of norm layers, and embedding tables (including ones tied to an output
    projection, and parameters whose name mentions ``emb``, e.g. learned positions).
    """
    no_decay: set[int] = set()
    for module in model.modules():
        for pname, p in module.named_parameters(recurse=False):
            if (p.ndim < 2 or pname.endswith("bias") or "emb" in pname.lower()
                    or _is_no_decay_module(module)):
                no_decay.add(id(p))
    decay, plain = [], []
    for p in model.parameters():  # deduplicated: a tied weight appears once
        if p.requires_grad:
            (plain if id(p) in no_decay else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """Adam or AdamW over :func:`param_groups`, fused when the device supports it.

    With ``name="adam"`` a non-zero ``weight_decay`` is the classic L2 penalty added to the
    gradient; with ``"adamw"`` it is decoupled. The fused kernel is about 4x faster on CPU.
    """
    cls = torch.optim.AdamW if cfg.name == "adamw" else torch.optim.Adam
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise ConfigError("the model has no trainable parameters")
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # device or dtype without a fused kernel
        return cls(groups, **kwargs)


def schedule_factor(cfg: OptimConfig, total_steps: int) -> Callable[[int], float]:
    """The multiplier of ``cfg.lr`` for optimiser step ``s`` (1-based); see the module doc."""
    w = cfg.warmup_steps
    w1 = max(w, 1)  # the step that runs at the peak rate
    r = cfg.min_lr_ratio

    def factor(s: int) -> float:
        s = max(s, 1)
        if cfg.schedule == "inverse_sqrt":
            return min(s / w1, math.sqrt(w1 / s))
        if s < w:
            return s / w
        if cfg.schedule == "constant":
            return 1.0
        p = min(1.0, (s - w1) / max(1, total_steps - w1))
        if cfg.schedule == "cosine":
            return r + (1.0 - r) * 0.5 * (1.0 + math.cos(math.pi * p))
        return r + (1.0 - r) * (1.0 - p)

    return factor


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR whose rate during optimiser step ``s`` (1-based) is ``lr * factor(s)``.

    Call ``scheduler.step()`` after each ``optimizer.step()``. LambdaLR counts from 0 at
    construction, so its epoch ``e`` is the 0-based index of the next step: ``factor(e + 1)``.
    """
    if total_steps < 1:
        raise ConfigError(f"total_steps must be >= 1, got {total_steps}")
    factor = schedule_factor(cfg, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda e: factor(e + 1))


def noam_lr(step: int, d_model: int, warmup: int, factor: float = 1.0) -> float:
    """Vaswani et al. 2017, equation 3: ``factor * d^-0.5 * min(step^-0.5, step * warmup^-1.5)``.

    Kept as the reference the ``inverse_sqrt`` schedule is tested against; ``step`` >= 1.
    """
    if step < 1 or warmup < 1 or d_model < 1:
        raise ConfigError("noam_lr needs step, warmup and d_model >= 1")
    return factor * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5)
