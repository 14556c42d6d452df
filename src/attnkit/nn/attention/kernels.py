"""Which kernel the attention calls took: flash, efficient, cudnn or math (SDPA), flex, explicit.

:func:`record_kernels` counts them while it is active; :mod:`attnkit.nn.attention.core` and
:func:`attnkit.nn.attention.flex.flex_band_attention` report each call with :func:`note` /
:func:`note_sdpa`. The trainer records its first step's kernels in metrics.jsonl.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator

import torch
from torch import Tensor
from torch.nn.attention import SDPBackend

_taken: Counter[str] | None = None  # kernels counted while record_kernels() is active


@contextlib.contextmanager
def record_kernels() -> Iterator[Counter[str]]:
    """Count, for the attention calls made inside, which kernel each took: SDPA's ``flash``,
    ``efficient``, ``cudnn`` or ``math`` (PyTorch's own choice for those inputs, under the
    autocast in force), ``flex`` (the compiled flex_attention) or ``explicit`` (attnkit's
    O(T * S) path). Calls traced by ``torch.compile`` are not counted."""
    global _taken
    outer, _taken = _taken, Counter()
    try:
        yield _taken
    finally:
        _taken = outer


def note(kernel: str) -> None:
    """Count one call of ``kernel`` ("flex" or "explicit") when recording."""
    if _taken is not None and not torch.compiler.is_compiling():
        _taken[kernel] += 1


def note_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, dropout: float,
              causal: bool, scale: float) -> None:
    """Count the SDPA backend PyTorch dispatches these inputs to (``_fused_sdp_choice`` is the
    function its dispatcher asks on the CPU and CUDA; elsewhere the count is "sdpa")."""
    if _taken is None or torch.compiler.is_compiling():
        return
    kind = q.device.type
    if torch.is_autocast_enabled(kind) and q.is_floating_point():  # SDPA runs autocast
        low = torch.get_autocast_dtype(kind)
        q, k, v = q.to(low), k.to(low), v.to(low)
        mask = mask.to(low) if mask is not None and mask.is_floating_point() else mask
    try:
        choice = torch._fused_sdp_choice(q, k, v, mask, dropout, causal, scale=scale)
    except (RuntimeError, NotImplementedError):  # a device without the choice (MPS): "sdpa"
        _taken["sdpa"] += 1
        return
    _taken[SDPBackend(choice).name.split("_")[0].lower()] += 1
