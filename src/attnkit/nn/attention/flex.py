"""Band (sliding-window) masks and the compiled ``flex_attention`` kernel that keeps them O(T).

Notation: B batch, H heads, T query length, S key length, D head size. Queries are the last T
of S positions (as after a key/value cache): query i sits at absolute position i + (S - T).
With a one-sided ``window`` w, query i may attend to key j when |i + S - T - j| <= w (2w + 1
keys), and, if ``causal``, only when j <= i + S - T (w + 1 keys): the sliding-window local
self-attention of Beltagy et al. 2020 (Longformer) and Child et al. 2019.

A boolean (T, S) band mask given to ``scaled_dot_product_attention`` costs O(T * S) memory and
the kernel still visits every score. ``torch.nn.attention.flex_attention`` takes a *block mask*
instead: per 128 x 128 tile, whether it is empty, full or partial; empty tiles are skipped, so
time and memory grow with T * w rather than T * S. The block mask is built here tile row by
tile row (O(S) memory at a time, never the (T, S) matrix) and cached with the compiled kernel.
Keys past S (``extra``, e.g. Transformer-XL's persistent memory) may be visible to every query.
On CPU, torch 2.13's flex_attention has no backward: it is used for inference only.

:func:`use_flex` is the one policy deciding when a caller (the attention core's band, the
Transformer-XL relative attention) runs on flex, with one compile budget per process.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import Tensor

from attnkit.errors import ConfigError
from attnkit.nn.attention.kernels import note

BLOCK = 128  # flex_attention's tile size
MIN_SCORES = 1 << 20  # "auto" takes flex from T * S >= this many scores (a compile costs ~7 s)
MAX_COMPILES = 6  # ... for at most this many compiled shapes per process, all callers together
_compiled: set[tuple] = set()  # the compile keys "auto" has admitted so far


def band_mask(t: int, s: int, window: int, causal: bool = False,
              device: torch.device | None = None) -> Tensor:
    """(T, S) boolean mask, True = may attend: |pos_i - j| <= window (and j <= pos_i if causal),
    where pos_i = i + S - T. O(T * S) memory: for the explicit path and small inputs."""
    rel = (torch.arange(t, device=device)[:, None] + (s - t)
           - torch.arange(s, device=device)[None, :])  # (T, S): pos_i - j
    allowed = rel.abs() <= window
    return allowed & (rel >= 0) if causal else allowed


def band_mask_mod(window: int, causal: bool, offset: int,
                  keys: int | None = None) -> Callable[..., Tensor]:
    """The same predicate as :func:`band_mask` in flex_attention's mask_mod form; keys from
    index ``keys`` on (the ``extra`` ones of :func:`band_block_mask`) are visible to all."""

    # 0-d tensors, not Python ints: the compiled kernel then guards on their shape only and
    # is not recompiled for every window, offset or key count.
    w, off = torch.tensor(window), torch.tensor(offset)
    last = None if keys is None else torch.tensor(keys)

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        rel = q_idx + off - kv_idx
        allowed = (rel <= w) & (rel >= -w)
        allowed = allowed & (rel >= 0) if causal else allowed
        return allowed if last is None else allowed | (kv_idx >= last)

    return mask_mod


def _tile_row(i: int, t: int, s: int, window: int, causal: bool,
              extra: int) -> tuple[Tensor, Tensor]:
    """For query tile ``i``: which key tiles have any / all entries allowed, (n_kv,) each."""
    rows = torch.arange(i * BLOCK, min((i + 1) * BLOCK, t))
    n_kv = -(-(s + extra) // BLOCK)
    allowed = torch.zeros(len(rows), n_kv * BLOCK, dtype=torch.bool)  # tail keys stay False
    rel = rows[:, None] + (s - t) - torch.arange(s)[None, :]  # (rows, S): pos_i - j
    allowed[:, :s] = (rel.abs() <= window) & ((rel >= 0) if causal else True)
    allowed[:, s:s + extra] = True
    tiles = allowed.view(len(rows), n_kv, BLOCK)
    full = tiles.all(dim=2).all(dim=0) & (len(rows) == BLOCK)
    return tiles.any(dim=2).any(dim=0), full


def _indices(flags: Tensor) -> tuple[Tensor, Tensor]:
    """(n_q, n_kv) tile flags -> counts (n_q,) and indices (n_q, n_kv), selected tiles first."""
    counts = flags.sum(dim=1).to(torch.int32)
    order = torch.argsort((~flags).to(torch.int8), dim=1, stable=True).to(torch.int32)
    return counts, order


@functools.lru_cache(maxsize=32)
def band_block_mask(t: int, s: int, window: int, causal: bool, extra: int = 0):  # -> BlockMask
    """The flex_attention BlockMask of the band over S keys, then ``extra`` keys every query
    sees; built without the (T, S + extra) matrix and cached."""
    from torch.nn.attention.flex_attention import BlockMask

    any_rows, full_rows = zip(*(_tile_row(i, t, s, window, causal, extra)
                                for i in range(-(-t // BLOCK))), strict=True)
    anyf, full = torch.stack(any_rows), torch.stack(full_rows)  # (n_q, n_kv)
    partial = anyf & ~full
    n_part, idx_part = _indices(partial)
    n_full, idx_full = _indices(full)
    mask_mod = band_mask_mod(window, causal, s - t, s if extra else None)
    return BlockMask.from_kv_blocks(
        n_part[None, None], idx_part[None, None], n_full[None, None], idx_full[None, None],
        BLOCK_SIZE=BLOCK, mask_mod=mask_mod, seq_lengths=(t, s + extra))


@functools.cache
def compiled_flex() -> Callable[..., Tensor]:
    """``torch.compile(flex_attention)``, compiled once per process (the first call takes
    seconds; inductor's on-disk cache makes later processes faster)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=False)


def flex_available() -> bool:
    """True when torch has flex_attention (torch >= 2.5)."""
    try:
        from torch.nn.attention import flex_attention  # noqa: F401
    except ImportError:
        return False
    return True


def use_flex(path: str, q: Tensor, keys: int, blockers: dict[str, bool], kind: tuple) -> bool:
    """The one flex policy: whether a call with queries ``q`` (B, H, T, D) over ``keys`` keys
    runs on the compiled flex kernel.

    ``path`` "flex" insists (a ``ConfigError`` names the first of the ``blockers`` that hold);
    "auto" takes flex when none holds, the call has at least :data:`MIN_SCORES` scores
    (T * keys) and its compile key (``kind``, which names the caller and whatever else makes
    torch.compile specialise, plus the shapes and dtype) was admitted before or fits the
    budget of :data:`MAX_COMPILES`, shared by every caller; other paths never take flex.
    """
    cpu_dtype = q.device.type != "cpu" or q.dtype in (torch.float32, torch.float16,
                                                       torch.bfloat16)
    blockers = {**blockers, "flex_attention is unavailable": not flex_available(),
                f"flex_attention on CPU takes no {q.dtype}": not cpu_dtype}
    if path == "flex":
        reasons = [r for r, hit in blockers.items() if hit]
        if reasons:
            raise ConfigError(f"attention path 'flex' is not possible: {reasons[0]}")
        return True
    if path != "auto" or any(blockers.values()) or q.size(-2) * keys < MIN_SCORES:
        return False
    key = (*kind, tuple(q.shape), keys, q.dtype, q.device.type)
    if key not in _compiled and len(_compiled) >= MAX_COMPILES:
        return False  # every new shape compiles again: stay on the other path instead
    _compiled.add(key)
    return True


def flex_band_attention(q: Tensor, k: Tensor, v: Tensor, window: int | None,
                        causal: bool = False, scale: float | None = None,
                        score_mod: Callable[..., Tensor] | None = None,
                        extra: int = 0) -> Tensor:
    """Attention (B, H, T, D) with the compiled flex kernel and a cached block mask of the band
    (``window`` None: every key, or causal) over the first S - ``extra`` keys; the last
    ``extra`` keys are visible to every query. ``score_mod`` (flex's signature) can add a bias
    such as :func:`relative_bias_mod`. No backward on CPU."""
    t, s = q.size(-2), k.size(-2) - extra
    # Always an explicit block mask: with block_mask=None, flex_attention on CPU (torch 2.13)
    # was measured to peak at O(T * S) memory (138 MiB at T = S = 4096) against 8 MiB here.
    block = band_block_mask(t, s, max(t, s) if window is None else window, causal, extra)
    note("flex")
    return compiled_flex()(q, k, v, score_mod=score_mod, block_mask=block, scale=scale)


def relative_bias_mod(table: Tensor, offset: int) -> Callable[..., Tensor]:
    """score_mod adding ``table[h, clamp(pos_i - j, -M, M) + M]`` with ``table`` (H, 2M + 1):
    a bias by clipped relative distance (Shaw et al. 2018; ALiBi with M >= S), never
    materialised as a (T, S) matrix. ``offset`` is S - T."""
    m = (table.size(-1) - 1) // 2

    def score_mod(score: Tensor, b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        rel = (q_idx + offset - kv_idx).clamp(-m, m)
        return score + table[h, rel + m]

    return score_mod


def relative_bias(table: Tensor, t: int, s: int) -> Tensor:
    """The (H, T, S) bias matrix of :func:`relative_bias_mod` (for the explicit path/tests)."""
    m = (table.size(-1) - 1) // 2
    rel = torch.arange(t)[:, None] + (s - t) - torch.arange(s)[None, :]
    return table[:, rel.clamp(-m, m) + m]
