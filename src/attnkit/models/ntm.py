"""Neural Turing machine (Graves, Wayne & Danihelka 2014): an LSTM controller with a memory.

The memory M_t is N x M (N locations of width M). Heads address it with a weighting w_t over
the N locations (sec. 3; equation numbers of the paper):

    read            r_t = sum_i w_t(i) M_t(i)                                    (2)
    erase           M~_t(i) = M_{t-1}(i) [1 - w_t(i) e_t]                         (3)
    add             M_t(i) = M~_t(i) + w_t(i) a_t                                 (4)
    content         K[u, v] = u.v / (|u| |v|)                                     (6)
                    w^c_t(i) = softmax_i(beta_t K[k_t, M_t(i)])                   (5)
    interpolation   w^g_t = g_t w^c_t + (1 - g_t) w_{t-1}                        (7)
    shift           w~_t(i) = sum_j w^g_t(j) s_t(i - j)   (indices modulo N)     (8)
    sharpening      w_t(i) = w~_t(i)^gamma_t / sum_j w~_t(j)^gamma_t              (9)

Each head emits, per step, from the controller's output: key k (M, linear), strength
beta = softplus >= 0, gate g = sigmoid in [0, 1], shift weights s = softmax over the shifts
-R..R, gamma = 1 + softplus >= 1; a write head also an erase vector e = sigmoid and an add
vector a = tanh (the paper leaves these activations open). The content score K * beta is
``CosineScore`` from :mod:`attnkit.nn.attention.scores`. With several write heads the erases
multiply and the adds sum (sec. 3.2: their order does not matter).

One step: the controller reads x_t and the previous reads r_{t-1}; the write heads write, then
the read heads read the new memory; the output is a linear map of [controller output; reads]
(logits). Memory starts at a small constant (1e-6: Collier & Beel 2018 found it trains best);
the first reads and head weightings are learned, the weightings starting focused on location 0.

Notation: B batch, T steps, N locations, M width, H heads of one kind.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.errors import ConfigError, UserError
from attnkit.nn.attention.scores import build_score

INIT_FOCUS = 10.0  # logit of location 0 in the first weightings (the others 0)


@dataclass(frozen=True)
class NTMConfig:
    """Sizes of an NTM. Defaults: the copy task's LSTM-controller NTM (Graves et al. 2014,
    table 2: controller 100, memory 128 x 20, one head; copy inputs are 8 bits + delimiter)."""

    input_size: int = 9
    output_size: int = 8
    controller_size: int = 100
    memory_size: int = 128        # N locations
    memory_width: int = 20        # M
    read_heads: int = 1
    write_heads: int = 1
    shift_range: int = 1          # shifts -R..R (the paper's copy task: -1, 0, 1)
    memory_init: float = 1e-6     # constant initial memory (Collier & Beel 2018)

    def __post_init__(self) -> None:
        for name in ("input_size", "output_size", "controller_size", "memory_size",
                     "memory_width", "read_heads", "write_heads"):
            if getattr(self, name) < 1:
                raise ConfigError(f"arch.{name} must be >= 1, got {getattr(self, name)}")
        if self.shift_range < 0 or 2 * self.shift_range + 1 > self.memory_size:
            raise ConfigError(f"arch.shift_range must be in [0, (memory_size - 1) / 2], got "
                              f"{self.shift_range}")


# ---- addressing (sec. 3.3) and memory access (sec. 3.1-3.2): pure functions ----------------

def content_weights(memory: Tensor, key: Tensor, beta: Tensor, score: nn.Module | None = None
                    ) -> Tensor:
    """Eq. 5-6: softmax over locations of beta * cosine(key, M(i)).

    memory (B, N, M), key (B, H, M), beta (B, H) -> (B, H, N).
    """
    score = score if score is not None else build_score("cosine", key.size(-1), key.size(-1))
    return torch.softmax(score(key, memory, beta), dim=-1)  # (B, H, N)


def interpolate(w_content: Tensor, w_prev: Tensor, gate: Tensor) -> Tensor:
    """Eq. 7: g w^c + (1 - g) w_{t-1}; weights (B, H, N), gate (B, H)."""
    g = gate.unsqueeze(-1)
    return g * w_content + (1 - g) * w_prev


def shift(w: Tensor, s: Tensor) -> Tensor:
    """Eq. 8, circular convolution: w~(i) = sum_j w(j) s(i - j mod N).

    w (B, H, N); s (B, H, 2R+1) weights of the shifts -R..R (s[..., R] is "no shift"):
    shifting by +1 moves weight from location i to i + 1, and from N - 1 to 0.
    """
    r = (s.size(-1) - 1) // 2
    rolled = torch.stack([torch.roll(w, k - r, dims=-1) for k in range(2 * r + 1)], dim=-1)
    return (rolled * s.unsqueeze(-2)).sum(-1)  # (B, H, N)


def sharpen(w: Tensor, gamma: Tensor) -> Tensor:
    """Eq. 9: w^gamma / sum w^gamma; w (B, H, N), gamma (B, H) >= 1."""
    p = w.clamp_min(0).pow(gamma.unsqueeze(-1))
    return p / p.sum(-1, keepdim=True).clamp_min(torch.finfo(w.dtype).tiny)


def read_memory(memory: Tensor, w: Tensor) -> Tensor:
    """Eq. 2: r = sum_i w(i) M(i); memory (B, N, M), w (B, H, N) -> (B, H, M)."""
    return torch.matmul(w, memory)


def write_memory(memory: Tensor, w: Tensor, erase: Tensor, add: Tensor) -> Tensor:
    """Eq. 3-4 for H write heads: M (prod_h [1 - w_h(i) e_h]) + sum_h w_h(i) a_h.

    memory (B, N, M), w (B, H, N), erase and add (B, H, M) -> (B, N, M).
    """
    keep = (1 - w.unsqueeze(-1) * erase.unsqueeze(-2)).prod(dim=1)  # (B, N, M)
    return memory * keep + torch.matmul(w.transpose(1, 2), add)  # (B, N, M)


def address(memory: Tensor, w_prev: Tensor, key: Tensor, beta: Tensor, gate: Tensor,
            shifts: Tensor, gamma: Tensor, score: nn.Module | None = None) -> Tensor:
    """The whole addressing mechanism (fig. 2): content, interpolation, shift, sharpening."""
    w = content_weights(memory, key, beta, score)
    return sharpen(shift(interpolate(w, w_prev, gate), shifts), gamma)


# ---- heads and the machine ---------------------------------------------------------------------

class Heads(nn.Module):
    """H heads of one kind: a linear map from the controller output to their parameters."""

    def __init__(self, n_heads: int, d_in: int, width: int, shift_range: int,
                 write: bool) -> None:
        super().__init__()
        self.n_heads, self.width, self.write = n_heads, width, write
        # key M, beta 1, gate 1, shifts 2R+1, gamma 1 (+ erase M, add M)
        self.sizes = [width, 1, 1, 2 * shift_range + 1, 1] + ([width, width] if write else [])
        self.proj = nn.Linear(d_in, n_heads * sum(self.sizes))
        self.score = build_score("cosine", width, width)

    def forward(self, h: Tensor, memory: Tensor, w_prev: Tensor
                ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """Weightings (B, H, N) and, for write heads, erase and add vectors (B, H, M)."""
        params = self.proj(h).view(h.size(0), self.n_heads, -1)  # (B, H, P)
        parts = torch.split(params, self.sizes, dim=-1)
        key, beta, gate, shifts, gamma = parts[:5]
        w = address(memory, w_prev, key, F.softplus(beta[..., 0]), torch.sigmoid(gate[..., 0]),
                    torch.softmax(shifts, dim=-1), 1 + F.softplus(gamma[..., 0]), self.score)
        if not self.write:
            return w, None, None
        return w, torch.sigmoid(parts[5]), torch.tanh(parts[6])


@dataclass
class NTMState:
    """What the machine carries between steps."""

    memory: Tensor    # (B, N, M)
    reads: Tensor     # (B, Hr, M) last read vectors
    read_w: Tensor    # (B, Hr, N)
    write_w: Tensor   # (B, Hw, N)
    h: Tensor         # (B, controller_size)
    c: Tensor         # (B, controller_size)


@dataclass
class NTMOutput:
    """Logits (B, T, output_size); head weightings (B, T, H, N) only when asked for."""

    logits: Tensor
    read_weights: Tensor | None = None
    write_weights: Tensor | None = None


class NTM(nn.Module):
    """An LSTM-controlled neural Turing machine; see the module docstring."""

    def __init__(self, cfg: NTMConfig) -> None:
        super().__init__()
        self.cfg = cfg
        c, m, n = cfg.controller_size, cfg.memory_width, cfg.memory_size
        self.controller = nn.LSTMCell(cfg.input_size + cfg.read_heads * m, c)
        self.read_heads = Heads(cfg.read_heads, c, m, cfg.shift_range, write=False)
        self.write_heads = Heads(cfg.write_heads, c, m, cfg.shift_range, write=True)
        self.out = nn.Linear(c + cfg.read_heads * m, cfg.output_size)
        self.init_reads = nn.Parameter(torch.randn(cfg.read_heads, m) * 0.01)
        # logits of the first weightings: focused on location 0, like a tape head at its start
        # (uniform weights over a constant memory would be a symmetric point gradients never
        # leave: every location would look and move alike)
        start = torch.zeros(n)
        start[0] = INIT_FOCUS
        self.init_read_w = nn.Parameter(start.repeat(cfg.read_heads, 1))  # softmax -> weights
        self.init_write_w = nn.Parameter(start.repeat(cfg.write_heads, 1))

    def initial_state(self, batch: int) -> NTMState:
        cfg, p = self.cfg, self.init_reads
        zeros = p.new_zeros(batch, cfg.controller_size)
        return NTMState(
            memory=p.new_full((batch, cfg.memory_size, cfg.memory_width), cfg.memory_init),
            reads=p.expand(batch, -1, -1), read_w=torch.softmax(self.init_read_w, -1).expand(
                batch, -1, -1), write_w=torch.softmax(self.init_write_w, -1).expand(
                batch, -1, -1), h=zeros, c=zeros)

    def step(self, x: Tensor, state: NTMState) -> tuple[Tensor, NTMState]:
        """One time step: x (B, input_size) -> logits (B, output_size) and the next state."""
        b = x.size(0)
        h, c = self.controller(torch.cat([x, state.reads.reshape(b, -1)], -1), (state.h, state.c))
        write_w, erase, add = self.write_heads(h, state.memory, state.write_w)
        memory = write_memory(state.memory, write_w, erase, add)
        read_w, _, _ = self.read_heads(h, memory, state.read_w)
        reads = read_memory(memory, read_w)  # (B, Hr, M)
        logits = self.out(torch.cat([h, reads.reshape(b, -1)], -1))
        return logits, NTMState(memory, reads, read_w, write_w, h, c)

    def forward(self, x: Tensor, output_attentions: bool = False) -> NTMOutput:
        """Run over x (B, T, input_size) from the initial state; ``output_attentions`` (the
        ``transformers`` name) adds the heads' weightings."""
        if x.dim() != 3 or x.size(-1) != self.cfg.input_size:
            raise UserError(f"NTM inputs must be (batch, steps, {self.cfg.input_size}), got "
                            f"{tuple(x.shape)}")
        state = self.initial_state(x.size(0))
        logits, reads, writes = [], [], []
        for t in range(x.size(1)):
            out, state = self.step(x[:, t], state)
            logits.append(out)
            if output_attentions:
                reads.append(state.read_w)
                writes.append(state.write_w)
        if not output_attentions:
            return NTMOutput(torch.stack(logits, 1))
        return NTMOutput(torch.stack(logits, 1), torch.stack(reads, 1), torch.stack(writes, 1))


def copy_loss(logits: Tensor, targets: Tensor) -> tuple[Tensor, int]:
    """Summed binary cross-entropy of the last L output steps against the L target vectors.

    logits (B, 2L+1, W), targets (B, L, W) -> (sum over bits, number of bits).
    """
    out = logits[:, -targets.size(1):]  # (B, L, W)
    loss = F.binary_cross_entropy_with_logits(out, targets, reduction="sum")
    return loss, targets.numel()


def bit_errors(logits: Tensor, targets: Tensor) -> Tensor:
    """Wrong bits per sequence (B,), outputs thresholded at 0.5 (Graves et al. 2014, fig. 3)."""
    out = logits[:, -targets.size(1):] > 0
    return (out != (targets > 0.5)).sum(dim=(1, 2))
