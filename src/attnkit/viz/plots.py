"""PNG heatmaps of captured attention with matplotlib (for papers and reports)."""

from __future__ import annotations

from pathlib import Path

import torch

from attnkit.errors import UserError
from attnkit.rundir import atomic_path
from attnkit.viz import analysis
from attnkit.viz.capture import AttentionGroup, Capture

LABEL_LIMIT = 40  # token labels on the axes up to this many tokens


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _labels(ax, rows: list[str], cols: list[str]) -> None:
    # tokens are text: a "$" would otherwise start matplotlib mathtext (GPT-2 has "$" tokens)
    rows, cols = ([t.replace("$", r"\$") for t in names] for names in (rows, cols))
    if len(cols) <= LABEL_LIMIT:
        ax.set_xticks(range(len(cols)), cols, rotation=90, fontsize=6)
    else:
        ax.set_xticks([])
    if len(rows) <= LABEL_LIMIT:
        ax.set_yticks(range(len(rows)), rows, fontsize=6)
    else:
        ax.set_yticks([])


def _save(fig, path: str | Path) -> Path:
    """Write the figure atomically, in the format its suffix names (PNG without one)."""
    path = Path(path)
    fmt = path.suffix[1:].lower() or "png"
    try:
        if fmt not in fig.canvas.get_supported_filetypes():
            raise UserError(f"cannot write {path}: unknown image format '{fmt}' (use .png, "
                            ".pdf or .svg)")
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=120, bbox_inches="tight")
    except OSError as err:
        raise UserError(f"cannot write {path}: {(err.strerror or str(err)).lower()}") from None
    finally:
        _pyplot().close(fig)
    return path


def plot_heads(group: AttentionGroup, path: str | Path, layers: list[int] | None = None) -> Path:
    """A grid of heatmaps, one row per layer and one column per head (rows: queries)."""
    plt = _pyplot()
    layers = list(range(group.n_layers)) if layers is None else layers
    h = group.n_heads
    fig, axes = plt.subplots(len(layers), h, figsize=(1.9 * h + 1, 1.9 * len(layers) + 0.6),
                             squeeze=False)
    for r, layer in enumerate(layers):
        for c in range(h):
            ax = axes[r][c]
            ax.imshow(group.weights[layer][c].float().numpy(), cmap="Blues", vmin=0, vmax=1)
            _labels(ax, group.rows, group.cols)
            ax.set_title(f"layer {layer} head {c}", fontsize=7)
    fig.suptitle(f"{group.name} attention", fontsize=9)
    return _save(fig, path)


def plot_matrix(matrix: torch.Tensor, rows: list[str], cols: list[str], title: str,
                path: str | Path) -> Path:
    """One (T, S) heatmap with token labels (e.g. a rollout)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.imshow(matrix.float().numpy(), cmap="Blues")
    _labels(ax, rows, cols)
    ax.set_title(title, fontsize=9)
    return _save(fig, path)


def plot_rollout(group: AttentionGroup, path: str | Path) -> Path:
    """The rollout of a self-attention group (Abnar & Zuidema 2020) as a heatmap."""
    return plot_matrix(analysis.rollout(group.weights)[-1], group.rows, group.cols,
                       f"{group.name} attention rollout", path)


def plot_view(cap: Capture, view: str, path: str | Path, group: str | None = None,
              layer: int = 0) -> Path:
    """The PNG matching an HTML view: heads of one layer (head, neuron), all heads (model),
    or the rollout of the first self-attention group (rollout)."""
    names = [group] if group else list(cap.groups)
    if view == "rollout":
        square = [n for n in names if cap.group(n).rows == cap.group(n).cols]
        if not square:
            raise UserError("rollout needs a self-attention group")
        return plot_rollout(cap.group(square[0]), path)
    g = cap.group(names[0])
    return plot_heads(g, path, None if view == "model" else [layer])
