"""Synthetic string tasks: copy, reverse, sort (e.g. Vinyals et al. 2015; Graves et al. 2014).

Each symbol is one character of ``alphabet`` and the strings carry **no separators**
("3141" -> "1413" for reverse), so the ``char`` tokenizer gives one token per symbol.
"""

from __future__ import annotations

import random

from attnkit.config import unknown
from attnkit.errors import UserError


def _copy(s: str) -> str:
    return s


def _reverse(s: str) -> str:
    return s[::-1]


def _sort(s: str) -> str:
    return "".join(sorted(s))


TASKS = {"copy": _copy, "reverse": _reverse, "sort": _sort}


def synthetic_pairs(task: str, n: int, min_len: int, max_len: int, seed: int,
                    alphabet: str = "0123456789") -> list[tuple[str, str]]:
    """``n`` (input, target) pairs; lengths uniform in ``[min_len, max_len]``, symbols uniform.

    Deterministic given the arguments (a private ``random.Random(seed)``); sort orders symbols
    by code point.
    """
    if task not in TASKS:
        raise unknown("synthetic task", task, TASKS)
    if n < 0:
        raise UserError(f"n must be >= 0, got {n}")
    if not 1 <= min_len <= max_len:
        raise UserError(f"need 1 <= min_len <= max_len, got min_len={min_len}, "
                        f"max_len={max_len}")
    if not alphabet or len(set(alphabet)) != len(alphabet):
        raise UserError(f"alphabet must be non-empty with distinct symbols, got {alphabet!r}")
    rng = random.Random(seed)
    fn = TASKS[task]
    pairs = []
    for _ in range(n):
        s = "".join(rng.choices(alphabet, k=rng.randint(min_len, max_len)))
        pairs.append((s, fn(s)))
    return pairs
