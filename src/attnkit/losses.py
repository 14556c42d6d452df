"""Losses as pure functions of logits and targets (models compute logits, losses compute losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_nll(logits: Tensor, target: Tensor, epsilon: float = 0.1,
                       ignore_index: int = 0) -> tuple[Tensor, int]:
    """Summed label-smoothed cross-entropy and the number of non-ignored tokens.

    The target distribution is (1 - eps) * one_hot(y) + eps / V (Szegedy et al. 2016, used with
    eps = 0.1 by Vaswani et al. 2017, section 5.4): loss = -sum_v q(v) log p(v).
    logits (..., V), target (...) integer ids; positions equal to ``ignore_index`` are skipped.
    """
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_target = target.reshape(-1)
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()
    loss = F.cross_entropy(flat_logits, flat_target, ignore_index=ignore_index,
                           label_smoothing=epsilon, reduction="sum")
    return loss, int((flat_target != ignore_index).sum())
