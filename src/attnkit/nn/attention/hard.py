"""Hard (stochastic) attention: attend to one sampled position instead of a weighted average.

Notation: B batch, H heads (optional), T query length, S key length, Dv value width.

Xu et al. 2015 ("Show, Attend and Tell", section 4.1): the attention weights alpha_t = softmax
(score(q_t, k)) are a categorical distribution over the S positions; a location s_t ~ alpha_t is
sampled and the output is v_{s_t}. The sampling is not differentiable, so the score parameters
W are trained with the REINFORCE estimator (Williams 1992) with a moving-average baseline b:

    dL/dW ~ sum_t [ d log p(y | s) / dW + (R - b) d log alpha_t(s_t) / dW ],
    b <- decay * b + (1 - decay) * R,         R = log p(y | s) (or any reward),

which is unbiased for d E_s[R] / dW whenever b does not depend on the current sample.
The ``"gumbel"`` mode is the straight-through Gumbel-softmax alternative (Jang et al. 2017;
Maddison et al. 2017): the forward pass uses the one-hot argmax of (log alpha + g) / tau with
Gumbel noise g, the backward pass the gradient of the relaxed softmax((log alpha + g) / tau).

Sampling needs the full (…, T, S) distribution: hard attention always runs on the explicit path
of the attention core; asking for the fused path is a ConfigError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.errors import ConfigError
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.scores import build_score

MODES = ("reinforce", "gumbel")


@dataclass
class HardAttentionOutput:
    """``out`` (…, T, Dv) = the value at the chosen position; ``index`` (…, T) the positions;
    ``log_prob`` and ``entropy`` (…, T) of the sampling distribution (REINFORCE terms);
    ``weights`` (…, T, S) the distribution alpha, only when asked for."""

    out: Tensor
    index: Tensor
    log_prob: Tensor
    entropy: Tensor
    weights: Tensor | None = None


def _sample(probs: Tensor, generator: torch.Generator | None) -> Tensor:
    """One index per row of ``probs`` (…, S) by the Gumbel-max trick (exact categorical)."""
    u = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device)
    gumbel = -torch.log(-torch.log(u.clamp_min(1e-20)))
    return (probs.log() + gumbel).argmax(dim=-1)


class HardAttention(nn.Module):
    """Stochastic hard attention over any score of :data:`~attnkit.nn.attention.scores.SCORES`.

    ``mode`` "reinforce" (Xu et al. 2015; train with :meth:`reinforce_loss`) or "gumbel"
    (straight-through, trains by backpropagation alone); ``tau`` the Gumbel temperature;
    ``decay`` the baseline's moving-average factor (0.9 in Xu et al.). In evaluation the most
    likely position is taken (deterministic). ``path`` must be "auto" or "explicit".
    """

    def __init__(self, d_query: int, d_key: int, score: str = "scaled_dot",
                 mode: str = "reinforce", tau: float = 1.0, decay: float = 0.9,
                 path: str = "auto", d_hidden: int | None = None,
                 **score_options: object) -> None:
        super().__init__()
        if path in ("fused", "flex"):
            raise ConfigError(f"hard attention samples from the full weight matrix: it cannot "
                              f"use the {path} path (use path 'auto' or 'explicit')")
        if mode not in MODES:
            raise ConfigError(f"hard attention mode must be one of {', '.join(MODES)}, "
                              f"got {mode!r}")
        if tau <= 0 or not 0 <= decay < 1:
            raise ConfigError(f"hard attention needs tau > 0 and 0 <= decay < 1, got {tau}, "
                              f"{decay}")
        self.mode, self.tau, self.decay = mode, tau, decay
        self.score = build_score(score, d_query, d_key, d_hidden, **score_options)
        self.register_buffer("baseline", torch.zeros(()))
        self.register_buffer("baseline_ready", torch.zeros((), dtype=torch.bool))

    def _choose(self, probs: Tensor, generator: torch.Generator | None) -> Tensor:
        """Indices (…, T): sampled in training (REINFORCE), argmax in evaluation."""
        live = probs.sum(-1, keepdim=True) > 0  # rows with something to attend to
        safe = torch.where(live, probs, torch.ones_like(probs))  # dead rows: any index
        if not self.training:
            return safe.argmax(-1)
        return _sample(safe / safe.sum(-1, keepdim=True), generator)

    def _gumbel_st(self, probs: Tensor, generator: torch.Generator | None) -> Tensor:
        """Straight-through one-hot: forward argmax of (log p + g) / tau, backward the soft."""
        u = torch.rand(probs.shape, generator=generator, dtype=probs.dtype, device=probs.device)
        g = -torch.log(-torch.log(u.clamp_min(1e-20)))
        soft = torch.softmax((probs.clamp_min(1e-30).log() + g) / self.tau, dim=-1)
        soft = soft * (probs > 0)  # masked positions stay impossible
        hard = F.one_hot(soft.argmax(-1), probs.size(-1)).to(probs.dtype)
        return hard - soft.detach() + soft

    def forward(self, q: Tensor, k: Tensor, v: Tensor, *, mask: Tensor | None = None,
                need_weights: bool = False,
                generator: torch.Generator | None = None) -> HardAttentionOutput:
        """``q`` (…, T, Dq), ``k`` (…, S, Dk), ``v`` (…, S, Dv), ``mask`` True = may attend."""
        chosen: dict[str, Tensor] = {}

        def pick(probs: Tensor) -> Tensor:  # (…, T, S) -> one-hot weights used for the output
            chosen["probs"] = probs
            if self.training and self.mode == "gumbel":
                one_hot = self._gumbel_st(probs, generator)
                chosen["index"] = one_hot.argmax(-1)
                return one_hot * (probs.sum(-1, keepdim=True) > 0)
            chosen["index"] = self._choose(probs, generator)
            one_hot = F.one_hot(chosen["index"], probs.size(-1)).to(probs.dtype)
            return one_hot * (probs.sum(-1, keepdim=True) > 0)

        res = attention(q, k, v, mask=mask, score_fn=self.score, post_fn=pick,
                        need_weights=True, path="explicit")
        probs, index = chosen["probs"], chosen["index"]
        log_p = probs.clamp_min(1e-30).log()
        log_prob = log_p.gather(-1, index.unsqueeze(-1)).squeeze(-1)  # (…, T)
        entropy = -(probs * log_p).sum(-1)  # (…, T)
        return HardAttentionOutput(res.out, index, log_prob, entropy,
                                   probs if need_weights else None)

    def reinforce_loss(self, reward: Tensor, log_prob: Tensor) -> Tensor:
        """Surrogate loss -(R - b) log p(s) whose gradient is the REINFORCE estimate.

        ``reward`` (B,) per example (e.g. log p(y | s), detached); ``log_prob`` (B, …) from
        :meth:`forward`, summed over all but the batch axis. The baseline b is the moving
        average of earlier batches' mean reward (before the first update: the mean reward of the
        *other* examples of the batch, which keeps the estimate unbiased); it is updated after
        use, in training mode only.
        """
        reward = reward.detach()
        total = log_prob.reshape(log_prob.size(0), -1).sum(-1)  # (B,)
        n = reward.numel()
        others = (reward.sum() - reward) / (n - 1) if n > 1 else torch.zeros_like(reward)
        ready = self.baseline_ready  # a tensor, never read on the host (no GPU sync)
        base = torch.where(ready, self.baseline, others)
        loss = -((reward - base) * total).mean()
        if self.training:
            with torch.no_grad():
                mean = reward.mean()
                self.baseline.copy_(torch.where(
                    ready, self.baseline * self.decay + (1 - self.decay) * mean, mean))
                self.baseline_ready.fill_(True)
        return loss
