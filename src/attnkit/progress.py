"""Progress bars for long work: live on a terminal, a line every 30 s in logs and CI."""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm


def progress_bar(quiet: bool = False, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr that does not flood non-interactive output; ``quiet`` bars (short
    passes such as evaluations) show on a terminal only."""
    interactive = sys.stderr.isatty()
    if quiet and not interactive:
        kwargs["disable"] = True
    kwargs.setdefault("mininterval", 0.1 if interactive else 30.0)
    kwargs.setdefault("dynamic_ncols", interactive)
    return tqdm(file=sys.stderr, **kwargs)
