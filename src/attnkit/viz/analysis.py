"""Analyses of captured attention: rollout, flow, entropy and "attends to" summaries.

Rollout and flow follow Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers":
each layer's attention is averaged over heads and mixed with the residual connection,
A_hat = 0.5 * A + 0.5 * I, rows renormalised. Rollout multiplies A_hat across layers; flow
treats A_hat as edge capacities of a layered graph (one node per token per layer) and takes
the maximum flow from an output token to each input token.
"""

from __future__ import annotations

from collections import deque

import numpy as np
import torch
from torch import Tensor

from attnkit.errors import UserError
from attnkit.viz.capture import AttentionGroup

SPECIAL = ("[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]", "[CLS]", "[SEP]", "<s>", "</s>",
           "<pad>", "<|endoftext|>")
FLOW_MAX_TOKENS = 32  # flow runs T^2 max-flow problems; beyond this it is too slow to be useful


def residual_attention(weights: Tensor) -> Tensor:
    """A_hat = 0.5 * mean over heads of ``weights`` (H, T, T) + 0.5 * I, row-normalised."""
    a = weights.double().mean(0)  # (T, T)
    if a.size(0) != a.size(1):
        raise UserError("rollout and flow need self-attention (a square matrix)")
    a = 0.5 * a + 0.5 * torch.eye(a.size(0), dtype=a.dtype)
    return a / a.sum(-1, keepdim=True)


def rollout(weights: list[Tensor]) -> list[Tensor]:
    """Attention rollout after each layer: R_l = A_hat_l R_{l-1}, R_0 = I; each (T, T).

    Row i of R_l says how much output token i of layer l draws on each input token.
    """
    out, r = [], None
    for w in weights:
        a = residual_attention(w)
        r = a if r is None else a @ r
        out.append(r)
    return out


def max_flow(capacity: np.ndarray, source: int, sink: int) -> float:
    """Maximum flow from ``source`` to ``sink`` (Edmonds-Karp: shortest augmenting paths).

    ``capacity`` is an (N, N) array of non-negative edge capacities.
    """
    cap = np.array(capacity, dtype=np.float64)
    n = cap.shape[0]
    residual = cap.copy()
    neighbours = [sorted(set(np.nonzero(cap[u])[0]) | set(np.nonzero(cap[:, u])[0]))
                  for u in range(n)]
    total = 0.0
    while True:
        parent = [-1] * n
        parent[source] = source
        queue = deque([source])
        while queue and parent[sink] < 0:
            u = queue.popleft()
            for v in neighbours[u]:
                if parent[v] < 0 and residual[u, v] > 1e-12:
                    parent[v] = u
                    queue.append(v)
        if parent[sink] < 0:
            return total
        path, v = [], sink
        while v != source:
            path.append((parent[v], v))
            v = parent[v]
        push = min(residual[u, v] for u, v in path)
        for u, v in path:
            residual[u, v] -= push
            residual[v, u] += push
        total += push


def flow_graph(weights: list[Tensor]) -> np.ndarray:
    """Capacities of the layered graph: node l*T + i is token i after layer l (l = 0: input).

    An edge runs from token i of layer l+1 to token j of layer l with capacity A_hat_l[i, j].
    """
    t = weights[0].size(-1)
    n = (len(weights) + 1) * t
    cap = np.zeros((n, n))
    for layer, w in enumerate(weights):
        a = residual_attention(w).numpy()
        cap[(layer + 1) * t:(layer + 2) * t, layer * t:(layer + 1) * t] = a
    return cap


def attention_flow(weights: list[Tensor], max_tokens: int = FLOW_MAX_TOKENS) -> Tensor:
    """Flow (T, T): entry [i, j] is the max flow from output token i to input token j."""
    t = weights[0].size(-1)
    if t > max_tokens:
        raise UserError(f"attention flow is limited to {max_tokens} tokens, got {t}")
    cap, top = flow_graph(weights), len(weights) * t
    flow = np.zeros((t, t))
    for i in range(t):
        for j in range(t):
            flow[i, j] = max_flow(cap, top + i, j)
    return torch.from_numpy(flow)


def entropy(group: AttentionGroup) -> Tensor:
    """Mean entropy (nats) of each head's attention rows: (L, H)."""
    rows = []
    for w in group.weights:
        p = w.double()  # (H, T, S)
        ent = -(p * torch.log(p.clamp_min(1e-30))).sum(-1)  # (H, T)
        rows.append(ent.mean(-1))
    return torch.stack(rows)


def attends_to(group: AttentionGroup, special: tuple[str, ...] = SPECIAL) -> dict[str, Tensor]:
    """Mean fraction of each head's attention (L, H) going to the first, last and special
    tokens, and (self-attention only) to the previous, same and next token; NaN otherwise."""
    specials = torch.tensor([c in special for c in group.cols], dtype=torch.bool)
    square = group.rows == group.cols
    out: dict[str, list[Tensor]] = {k: [] for k in
                                    ("first", "last", "special", "previous", "self", "next")}
    for w in group.weights:
        w = w.double()  # (H, T, S)
        out["first"].append(w[..., 0].mean(-1))
        out["last"].append(w[..., -1].mean(-1))
        out["special"].append(w[..., specials].sum(-1).mean(-1))
        for name, offset in (("previous", -1), ("self", 0), ("next", 1)):
            if square:
                diag = torch.diagonal(w, offset=offset, dim1=-2, dim2=-1)  # (H, T - |offset|)
                out[name].append(diag.sum(-1) / w.size(1))
            else:
                out[name].append(torch.full((w.size(0),), float("nan"), dtype=w.dtype))
    return {k: torch.stack(v) for k, v in out.items()}
