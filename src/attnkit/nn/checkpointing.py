"""Activation checkpointing (Chen et al. 2016, "Training deep nets with sublinear memory
cost"): a block marked for it keeps only its input during the forward pass and recomputes its
activations in the backward pass, trading about one more forward pass for the memory of all
but one block's activations. PyTorch's non-reentrant ``torch.utils.checkpoint`` replays the
dropout masks (it restores the RNG state), so gradients equal those without checkpointing.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class CheckpointableBlock(nn.Module):
    """A block whose call is checkpointed while ``gradient_checkpointing`` is on, in training
    mode, with gradients enabled and no key/value cache (decoding never recomputes)."""

    gradient_checkpointing: bool = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if (self.gradient_checkpointing and self.training and torch.is_grad_enabled()
                and kwargs.get("cache") is None):
            return checkpoint(super().__call__, *args, use_reentrant=False, **kwargs)
        return super().__call__(*args, **kwargs)


def set_gradient_checkpointing(model: nn.Module, enabled: bool = True) -> int:
    """Switch checkpointing of every :class:`CheckpointableBlock` in ``model``; returns how
    many blocks there are (0: the model has none, and nothing changes)."""
    blocks = [m for m in model.modules() if isinstance(m, CheckpointableBlock)]
    for block in blocks:
        block.gradient_checkpointing = enabled
    return len(blocks)
