"""Losses as pure functions of logits and targets (models compute logits, losses compute losses)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def label_smoothed_nll(logits: Tensor, target: Tensor, epsilon: float = 0.1,
                       ignore_index: int = 0) -> tuple[Tensor, int]:
    """Summed label-smoothed cross-entropy and the number of non-ignored tokens.

    The target distribution is (1 - eps) * one_hot(y) + eps / V (Szegedy et al. 2016, used with
    eps = 0.1 by Vaswani et al. 2017, section 5.4): loss = -sum_v q(v) log p(v).
    logits (..., V), target (...) integer ids; positions equal to ``ignore_index`` are skipped.
    """
    flat_logits = logits.reshape(-1, logits.size(-1))
    flat_target = target.reshape(-1)
    if flat_logits.dtype in (torch.float16, torch.bfloat16):
        flat_logits = flat_logits.float()
    loss = F.cross_entropy(flat_logits, flat_target, ignore_index=ignore_index,
                           label_smoothing=epsilon, reduction="sum")
    return loss, int((flat_target != ignore_index).sum())


IGNORE = -100  # the label of positions that are not scored (PyTorch's default ignore_index)


def token_nll(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE
              ) -> tuple[Tensor, int]:
    """Summed cross-entropy (nats) over the scored positions and their number.

    Next-token language modelling (every target scored but padding) and BERT's MLM objective
    (Devlin et al. 2019, section 3.1: only the selected tokens are predicted). logits (..., V)
    and labels (...) with ``ignore_index`` where not scored; or logits (N, V) of the scored
    positions only with their N labels.
    """
    return label_smoothed_nll(logits, labels, 0.0, ignore_index)


def distillation_loss(student_logits: Tensor | None, teacher_logits: Tensor | None,
                      labels: Tensor | None, student_hidden: Tensor, teacher_hidden: Tensor, *,
                      temperature: float = 2.0, alpha_ce: float = 5.0, alpha_mlm: float = 2.0,
                      alpha_cos: float = 1.0) -> dict[str, Tensor]:
    """DistilBERT's triple loss (Sanh et al. 2019, section 2; defaults of the reference code).

    ``ce = T^2 * KL(p_t || p_s)`` averaged over the N scored positions, with p = softmax(z / T)
    (the reference's ``KLDivLoss(log_softmax(z_s / T), softmax(z_t / T), "batchmean")``);
    ``mlm`` = mean cross-entropy of the student against ``labels``; ``cos`` = mean of
    1 - cos(h_s, h_t) over the M real positions' last hidden states.
    Logits (N, V) of the scored positions, labels (N,); hidden states (M, C). Returns the
    weighted ``loss`` = alpha_ce * ce + alpha_mlm * mlm + alpha_cos * cos and each part;
    a term whose alpha is 0 (or whose inputs are None) is left out.
    """
    parts: dict[str, Tensor] = {}
    if alpha_ce and student_logits is not None and teacher_logits is not None:
        log_ps = F.log_softmax(student_logits.float() / temperature, dim=-1)
        pt = F.softmax(teacher_logits.float() / temperature, dim=-1)
        kl = F.kl_div(log_ps, pt, reduction="sum") / max(1, student_logits.size(0))
        parts["ce"] = kl * temperature ** 2
    if alpha_mlm and student_logits is not None and labels is not None:
        total, n = token_nll(student_logits, labels)
        parts["mlm"] = total / max(1, n)
    if alpha_cos:
        cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)
        parts["cos"] = (1.0 - cos).mean()
    weights = {"ce": alpha_ce, "mlm": alpha_mlm, "cos": alpha_cos}
    parts["loss"] = sum((weights[k] * v for k, v in parts.items()),
                        student_hidden.new_zeros(()))
    return parts


# ---- the losses models return when given ``labels`` (transformers' conventions) ------------------
def mean_token_nll(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Mean cross-entropy over the positions whose label is not ``ignore_index`` (0 if none).

    The loss of ``transformers``' masked-LM, token-classification and single-label heads.
    """
    total, n = token_nll(logits, labels, ignore_index)
    return total / max(1, n)


def causal_lm_loss(logits: Tensor, labels: Tensor, ignore_index: int = IGNORE) -> Tensor:
    """Next-token loss with ``labels`` aligned to the inputs (``labels = input_ids`` works):
    position t's logits (B, T, V) are scored against labels[:, t + 1] (B, T), as
    ``transformers``' causal language models shift inside."""
    return mean_token_nll(logits[:, :-1], labels[:, 1:], ignore_index)


def sequence_classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """``transformers``' ``BertForSequenceClassification`` loss, chosen by shape and dtype:
    one label column -> mean squared error (regression); integer labels (B,) -> mean
    cross-entropy (-100 ignored); float labels (B, K) -> binary cross-entropy (multi-label)."""
    if logits.size(-1) == 1:
        return F.mse_loss(logits.squeeze(-1).float(), labels.reshape(-1).float())
    if not labels.is_floating_point():
        return mean_token_nll(logits, labels)
    return F.binary_cross_entropy_with_logits(logits.float(), labels.float())


def span_loss(start_logits: Tensor, end_logits: Tensor, start_positions: Tensor,
              end_positions: Tensor) -> Tensor:
    """Extractive QA (Devlin et al. 2019, section 4.2): the mean of the start and end
    cross-entropies over S positions; positions outside [0, S) are clamped to S and ignored,
    as ``transformers``' ``BertForQuestionAnswering`` does."""
    s = start_logits.size(1)
    starts, ends = start_positions.reshape(-1).clamp(0, s), end_positions.reshape(-1).clamp(0, s)
    return (mean_token_nll(start_logits, starts, s) + mean_token_nll(end_logits, ends, s)) / 2


# ---- summed losses for the training loop (fit divides by the count) ------------------------------
def span_nll(logits: Tensor, spans: Tensor) -> tuple[Tensor, int]:
    """Extractive QA: the mean of the start and end cross-entropies, summed over the questions,
    and their number (Devlin et al. 2019, section 4.2; :func:`span_loss` is its mean). logits
    (B, S, 2) start and end scores, spans (B, 2) the gold start and end positions."""
    start, n = token_nll(logits[..., 0], spans[:, 0])
    end, _ = token_nll(logits[..., 1], spans[:, 1])
    return (start + end) / 2, n


TASK_LOSSES = {"classify": token_nll, "tokens": token_nll, "qa": span_nll}
"""Fine-tuning task -> loss(logits, target) -> (sum, count): one label per sequence (B, K)
and (B,), one per token (B, S, K) and (B, S) with IGNORE where unscored, or spans."""


def mlm_nsp_loss(mlm_logits: Tensor, mlm_labels: Tensor, nsp_logits: Tensor | None = None,
                 nsp_labels: Tensor | None = None) -> tuple[Tensor, int]:
    """BERT's pre-training objective (Devlin et al. 2019, section 3.1) as (sum, n): the summed
    MLM cross-entropy over the n selected tokens plus n times the mean NSP cross-entropy, so
    that sum / n = mean MLM loss + mean NSP loss. mlm_logits (N, V) at the selected
    positions with their N labels; nsp_logits (B, 2), nsp_labels (B,) or None."""
    total, n = token_nll(mlm_logits, mlm_labels)
    if nsp_logits is not None and nsp_labels is not None:
        total = total + n * F.cross_entropy(nsp_logits.float(), nsp_labels)
    return total, n
