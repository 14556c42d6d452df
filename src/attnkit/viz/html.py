"""Self-contained HTML for the views: inline CSS and JavaScript, data as embedded JSON.

Nothing is fetched from a network or a CDN. Token strings reach the page only through
JSON that is safe inside ``<script>`` (``<``, ``>``, ``&`` and the line separators are
written as ``\\uXXXX``) and are put into the DOM with ``textContent``; the title is HTML-escaped.
Attention weights travel as base64 bytes (weight x 255, rounded), so 512 tokens x 12 layers x
12 heads stay a file a browser opens (docs/viz.md gives the size and render time).
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from attnkit.config import unknown
from attnkit.errors import UserError
from attnkit.rundir import write_text_atomic
from attnkit.viz import analysis
from attnkit.viz.capture import AttentionGroup, Capture


@dataclass
class View:
    """A rendered view: ``html`` (one self-contained document), ``save(path)`` and Jupyter
    display (``_repr_html_`` shows it in a sandbox-free iframe, so its scripts run)."""

    html: str

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        try:
            write_text_atomic(path, self.html)  # an existing file survives a failed write
        except OSError as err:
            raise UserError(f"cannot write {path}: {(err.strerror or str(err)).lower()}") from None
        return path

    def _repr_html_(self) -> str:
        doc = html.escape(self.html, quote=True)
        return (f'<iframe srcdoc="{doc}" style="width:100%;height:640px;border:1px solid #ddd">'
                "</iframe>")


def safe_json(value: object) -> str:
    """JSON that cannot end a ``<script>`` element or open a comment/entity inside it."""
    text = json.dumps(value, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, code in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                       ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(char, code)
    return text


def _asset(name: str) -> str:
    return resources.files("attnkit.viz").joinpath("static", name).read_text(encoding="utf-8")


def document(data: dict) -> str:
    """The HTML page of one view."""
    title = html.escape(str(data.get("title", "attnkit attention")))
    return ("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\">"
            "<meta http-equiv=\"Content-Security-Policy\" content=\"default-src 'none'; "
            "script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:\">"
            f"<title>{title}</title><style>{_asset('viz.css')}</style></head>\n"
            "<body><div id=\"attnkit-root\" class=\"attnkit-viz\"></div>\n"
            f"<script type=\"application/json\" id=\"attnkit-data\">{safe_json(data)}</script>\n"
            f"<script>{_asset('viz.js')}</script>\n</body></html>\n")


def quantise(weights: torch.Tensor) -> str:
    """(H, T, S) weights in [0, 1] -> base64 of round(255 w) bytes, row-major."""
    q = (weights.float().clamp(0, 1) * 255).round().to(torch.uint8).contiguous()
    return base64.b64encode(q.numpy().tobytes()).decode("ascii")


def group_data(g: AttentionGroup) -> dict:
    h, t, s = g.weights[0].shape
    return {"name": g.name, "rows": list(g.rows), "cols": list(g.cols), "L": g.n_layers,
            "H": h, "T": t, "S": s, "w": [quantise(w) for w in g.weights]}


def panel_data(cap: Capture, groups: list[str] | None = None) -> dict:
    names = groups or list(cap.groups)
    return {"label": cap.label, "groups": [group_data(cap.group(n)) for n in names]}


def _num(x: float, digits: int = 6) -> float | None:
    """A float for JSON: None for -inf/NaN (masked), else ``digits`` significant digits."""
    return None if not math.isfinite(x) else float(f"{x:.{digits}g}")


def _nested(t: torch.Tensor, digits: int = 6) -> list:
    if t.dim() == 0:
        return _num(float(t), digits)
    return [_nested(x, digits) for x in t]


def neuron_data(g: AttentionGroup) -> dict:
    """Queries, keys and pre-softmax scores of every layer and head of one group."""
    return {"name": g.name, "rows": list(g.rows), "cols": list(g.cols), "L": g.n_layers,
            "H": g.n_heads,
            "q": [_nested(q.double(), 5) for q in g.queries],
            "k": [_nested(k.double(), 5) for k in g.keys],
            "scores": [_nested(g.scores(layer).double()) for layer in range(g.n_layers)]}


def analysis_data(g: AttentionGroup, flow_max_tokens: int = analysis.FLOW_MAX_TOKENS) -> dict:
    """Rollout, flow (short self-attention only), entropy and attends-to summaries."""
    out = {"name": g.name, "rows": list(g.rows), "cols": list(g.cols), "rollout": None,
           "flow": None, "note": "",
           "entropy": _nested(analysis.entropy(g), 4),
           "attends": {k: _nested(v, 4) for k, v in analysis.attends_to(g).items()}}
    if g.rows != g.cols or len(g.rows) != len(g.cols):
        out["note"] = "rollout and flow apply to self-attention; this group attends elsewhere"
        return out
    out["rollout"] = _nested(analysis.rollout(g.weights)[-1], 4)
    if len(g.rows) <= flow_max_tokens:
        out["flow"] = _nested(analysis.attention_flow(g.weights, flow_max_tokens), 4)
    else:
        out["note"] = f"attention flow is computed for inputs of up to {flow_max_tokens} tokens"
    return out


VIEWS = ("head", "model", "neuron", "rollout")


def render(cap: Capture, view: str, *, title: str = "", groups: list[str] | None = None,
           min_weight: float = 0.01) -> View:
    """The HTML of ``view`` (one of :data:`VIEWS`) for a capture."""
    names = groups or list(cap.groups)
    data: dict = {"view": view, "title": title or f"attnkit {view} view",
                  "min_weight": min_weight}
    if view in ("head", "model"):
        data["panels"] = [panel_data(cap, names)]
    elif view == "neuron":
        data["neuron"] = [neuron_data(cap.group(n)) for n in names]
    elif view == "rollout":
        data["analysis"] = [analysis_data(cap.group(n)) for n in names]
    else:
        raise unknown("view", view, VIEWS)
    return View(document(data))


def render_compare(a: Capture, b: Capture, *, title: str = "", groups: list[str] | None = None
                   ) -> View:
    """Model views of two captures of the same text side by side, and their difference."""
    data = {"view": "compare", "title": title or "attnkit comparison", "min_weight": 0.01,
            "panels": [panel_data(a, groups), panel_data(b, groups)]}
    return View(document(data))
