"""The attention core: one pure function every attention variant in attnkit feeds.

Notation (shared by every attention module): B batch, H heads, T query length, S key length,
D head size. ``q`` is (B, H, T, D); ``k`` and ``v`` are (B, H, S, D). Masks are boolean with
True = may attend, broadcastable to (B, H, T, S); an additive ``bias`` (relative positions,
ALiBi, ...) is a float tensor broadcastable to the same shape.

    Attention(Q, K, V) = softmax(Q K^T / sqrt(D) + bias, masked) V   (Vaswani et al. 2017, eq. 1)

When nobody asks for the weights, :func:`attention` calls PyTorch's fused
``scaled_dot_product_attention`` (O(T) memory); otherwise it computes the same thing explicitly
and returns the (B, H, T, S) weights too. Both paths are tested equal.

Variants plug in by argument (docs/attention.md):
- ``score_fn``: a score module from :mod:`attnkit.nn.attention.scores` replacing
  Q K^T / sqrt(D). Scores that are a dot product of transformed inputs (``dot_form``: dot,
  scaled_dot, general, cosine) keep the fused path; the others (additive, location) need the
  explicit (T, S) matrix. Inputs may also be 3-D, (B, T, Dq) / (B, S, Dk) / (B, S, Dv).
- ``window``: sliding-window local attention, |pos_i - j| <= window. Without gradients, mask
  tensor, bias or dropout, long inputs take the compiled ``flex_attention`` kernel with a block
  mask (:func:`attnkit.nn.attention.flex.use_flex` decides, for every caller); otherwise SDPA
  with a boolean band mask.
- ``post_fn``: a function of the (…, T, S) weights applied after the softmax (Luong's local-p
  Gaussian); it needs the explicit path.
- ``path``: "auto" (default) picks as above; "fused", "flex" or "explicit" insist, and a
  combination that cannot run on the path asked for is a one-line ConfigError.

The core never chooses SDPA's backend itself (no ``sdpa_kernel``): PyTorch takes flash,
memory-efficient, cuDNN or math for the inputs it gets, so a GPU gets its fused kernels
whenever the inputs allow (docs/training.md lists which inputs do).
:func:`attnkit.nn.attention.kernels.record_kernels` counts which kernel each call took (the
trainer records its first step's in metrics.jsonl).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from attnkit.config import unknown
from attnkit.errors import ConfigError
from attnkit.nn.attention import flex
from attnkit.nn.attention.kernels import note, note_sdpa
from attnkit.nn.attention.masks import causal_mask, combine

PATHS = ("auto", "fused", "flex", "explicit")


@dataclass
class AttentionOutput:
    """``out`` (B, H, T, D) and, only when asked for, ``weights`` (B, H, T, S)."""

    out: Tensor
    weights: Tensor | None = None


def _combined_mask(mask: Tensor | None, bias: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """One ``attn_mask`` for SDPA: the boolean mask, or the bias with -inf where masked."""
    if bias is None:
        return mask
    bias = bias.to(dtype)
    if mask is None:
        return bias
    return bias.masked_fill(~mask, float("-inf"))


def _explicit_reason(need_weights: bool, score_fn: Callable | None,
                     post_fn: Callable | None) -> str | None:
    """Why the explicit O(T * S) path is needed, or None."""
    if need_weights:
        return "the attention weights were requested"
    if post_fn is not None:
        return "a post-processing of the weights (post_fn) was given"
    if score_fn is not None and not hasattr(score_fn, "dot_form"):
        return f"the score function {type(score_fn).__name__} needs the full score matrix"
    return None


def _use_flex(path: str, q: Tensor, k: Tensor, v: Tensor, window: int | None,
              mask: Tensor | None, bias: Tensor | None, dropout: float, causal: bool) -> bool:
    """Whether the fused-kind call runs on flex_attention (the policy is flex.use_flex)."""
    grad = torch.is_grad_enabled() and any(x.requires_grad for x in (q, k, v))
    blockers = {"no window was given": window is None, "a mask tensor was given": mask is not None,
                "inputs are not (B, H, T, D)": q.dim() != 4,
                "a bias tensor was given": bias is not None, "dropout > 0": dropout > 0,
                "gradients are needed (no flex backward on CPU)": grad and q.device.type == "cpu"}
    return flex.use_flex(path, q, k.size(-2), blockers, ("band", causal, tuple(v.shape)))


def attention(q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
              bias: Tensor | None = None, dropout: float = 0.0, need_weights: bool = False,
              scale: float | None = None, causal: bool = False, window: int | None = None,
              score_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
              post_fn: Callable[[Tensor], Tensor] | None = None,
              path: str = "auto") -> AttentionOutput:
    """Scaled dot-product attention with an optional boolean ``mask`` and additive ``bias``.

    ``causal`` lets query i attend to keys j <= i + (S - T) (queries are the last T positions,
    as after a key/value cache); it is ANDed with ``mask``, as is the band of ``window``.
    ``dropout`` is applied to the attention weights (pass 0.0 in evaluation). With
    ``need_weights=False`` a fused kernel runs and ``weights`` is None. ``scale`` applies to
    the default score only; ``score_fn``, ``post_fn`` and ``path`` are described above.
    """
    if path not in PATHS:
        raise unknown("attention path", path, PATHS)
    if window is not None and window <= 0:
        raise ConfigError(f"attention window must be a positive number of positions, got {window}")
    reason = _explicit_reason(need_weights, score_fn, post_fn)
    if reason is not None and path in ("fused", "flex"):
        raise ConfigError(f"attention path '{path}' is not possible: {reason}")
    if score_fn is not None and reason is None:
        q, k, scale = score_fn.dot_form(q, k)  # score = scale * q' . k'
        score_fn = None
    scale = 1.0 / math.sqrt(q.size(-1)) if scale is None else scale
    t, s = q.size(-2), k.size(-2)
    if reason is None and _use_flex(path, q, k, v, window, mask, bias, dropout, causal):
        return AttentionOutput(flex.flex_band_attention(q, k, v, window, causal, scale))
    if window is not None:
        mask = combine(mask, flex.band_mask(t, s, window, causal, device=q.device))
        causal = False
    if causal and (reason is not None or mask is not None or bias is not None or t != s):
        mask = combine(mask, causal_mask(t, s, device=q.device))
        causal = False
    if reason is None and path != "explicit":
        attn_mask = _combined_mask(mask, bias, q.dtype)
        note_sdpa(q, k, v, attn_mask, dropout, causal, scale)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, dropout_p=dropout,
            scale=scale, is_causal=causal)  # is_causal: only square and unmasked (fastest)
        return AttentionOutput(out)
    if causal:
        mask = combine(mask, causal_mask(t, s, device=q.device))
    note("explicit")
    res = _explicit(q, k, v, mask, bias, dropout, scale, score_fn, post_fn)
    return res if need_weights else AttentionOutput(res.out)  # weights only when asked for


def _explicit(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, bias: Tensor | None,
              dropout: float, scale: float, score_fn: Callable | None,
              post_fn: Callable | None) -> AttentionOutput:
    """softmax(score(q, k) + bias, masked), post-processed, dropped out, times v; O(T * S)."""
    if score_fn is None:
        scores = torch.matmul(q, k.transpose(-2, -1)) * scale  # (B, H, T, S)
    else:
        scores = score_fn(q, k)  # (B, T, S) or (B, H, T, S)
    if bias is not None:
        scores = scores + bias
    dead = None
    if mask is not None:  # no `if dead.any()`: a GPU would wait for it at every call
        scores = scores.masked_fill(~mask, float("-inf"))
        dead = ~mask.any(dim=-1, keepdim=True)  # queries that may attend to nothing
        scores = scores.masked_fill(dead, 0.0)
    weights = torch.softmax(scores, dim=-1)
    if dead is not None:
        weights = weights.masked_fill(dead, 0.0)  # as the fused kernel: a zero output
    if post_fn is not None:
        weights = post_fn(weights)
    dropped = F.dropout(weights, p=dropout) if dropout > 0 else weights
    return AttentionOutput(torch.matmul(dropped, v), weights)  # (B, H, T, Dv)
