"""Data: reading text files, seq2seq batching, synthetic tasks, mathematics problems.

Names are re-exported lazily so that importing one submodule (e.g. ``attnkit.data.math`` in a
generator process) does not import torch.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "read_lines": "text", "read_parallel": "text", "read_text": "text",
    "Seq2SeqBatch": "batching", "collate": "batching", "TokenBatches": "batching",
    "eval_batches": "batching",
    "TASKS": "synthetic", "synthetic_pairs": "synthetic",
    "math_problems": "math", "module_names": "math", "extrapolate_names": "math",
    "default_cache_dir": "math",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
