"""Task heads on a bidirectional encoder (BERT, RoBERTa, DistilBERT), as Devlin et al. 2019
section 4 uses them, and the best-span search of extractive question answering.

Notation: B batch, S sequence length, C model width, K labels.

- :class:`SequenceClassifier`: one summary vector per sequence -> dropout -> linear (K).
  The summary is the tanh pooler over [CLS] (``pooling="pooler"``, BERT's
  ``BertForSequenceClassification``), the raw first hidden state (``"cls"``) or the mean over
  real tokens (``"mean"``, Sentence-BERT). Bloem's "classifier transformer" is the mean case.
- :class:`TokenClassifier`: dropout -> linear on every position (``BertForTokenClassification``).
- :class:`SpanExtractor`: a linear layer to two scores per position, start and end
  (``BertForQuestionAnswering``, section 4.2); :func:`best_spans` picks the valid span
  i <= j < i + max_answer_len inside the context that maximises start_i + end_j.

A head takes the encoder module (composition) and returns a small output dataclass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from attnkit.config import unknown
from attnkit.errors import UserError
from attnkit.losses import mean_token_nll, sequence_classification_loss, span_loss
from attnkit.models.bert import BertOutput
from attnkit.models.outputs import EncoderPassThrough

POOLINGS = ("pooler", "cls", "mean")


@dataclass
class HeadOutput(EncoderPassThrough):
    """Logits of a head and what the encoder returned."""

    logits: Tensor            # (B, K) sequence, (B, S, K) token, (B, S, 2) span
    encoder: BertOutput
    loss: Tensor | None = None  # given labels (span heads: start and end positions)

    @property
    def start_logits(self) -> Tensor:
        """(B, S) span starts (span heads only)."""
        return self.logits[..., 0]

    @property
    def end_logits(self) -> Tensor:
        """(B, S) span ends (span heads only)."""
        return self.logits[..., 1]


def _init_linear(layer: nn.Linear, std: float) -> nn.Linear:
    nn.init.normal_(layer.weight, std=std)
    nn.init.zeros_(layer.bias)
    return layer


class _Head(nn.Module):
    """An encoder (``.bert``) and its config; subclasses add the output layer."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__()
        self.bert = encoder
        self.arch = encoder.arch
        self.cfg = encoder.cfg

    def encode(self, input_ids: Tensor | None, attention_mask: Tensor | None,
               token_type_ids: Tensor | None, **outputs: bool) -> BertOutput:
        """The encoder's output; ``outputs``: ``output_attentions``, ``output_hidden_states``."""
        if token_type_ids is not None and getattr(self.bert, "token_types", None) is None:
            token_type_ids = None  # DistilBERT: no segments
        return self.bert(input_ids, attention_mask, token_type_ids, **outputs)


class _Classifier(_Head):
    """dropout -> ``classifier`` (C -> K) on the encoder features a subclass picks
    (:meth:`features`), and its loss given ``labels`` (:meth:`label_loss`)."""

    def __init__(self, encoder: nn.Module, n_labels: int, dropout: float | None = None) -> None:
        super().__init__(encoder)
        if n_labels < 1:
            raise UserError(f"a classifier needs at least one label, got {n_labels}")
        self.dropout = nn.Dropout(self.arch.dropout if dropout is None else dropout)
        self.classifier = _init_linear(nn.Linear(self.arch.d_model, n_labels),
                                       self.arch.init_std)

    def features(self, enc: BertOutput, input_ids: Tensor, attention_mask: Tensor | None
                 ) -> Tensor:
        raise NotImplementedError

    def label_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, *, labels: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False
                ) -> HeadOutput:
        """input_ids (B, S) -> logits; ``labels`` give ``loss`` (shapes: the subclass)."""
        enc = self.encode(input_ids, attention_mask, token_type_ids,
                          output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states)
        logits = self.classifier(self.dropout(self.features(enc, input_ids, attention_mask)))
        return HeadOutput(logits, enc, None if labels is None else self.label_loss(logits, labels))


class SequenceClassifier(_Classifier):
    """Sequence classification: summary -> dropout -> ``classifier`` (C -> K): logits (B, K).

    ``labels`` (B,) class ids, (B,) floats for one output (regression) or (B, K) floats
    (multi-label) give ``loss`` (:func:`~attnkit.losses.sequence_classification_loss`).
    """

    def __init__(self, encoder: nn.Module, n_labels: int,
                 pooling: Literal["pooler", "cls", "mean"] = "pooler",
                 dropout: float | None = None) -> None:
        if pooling not in POOLINGS:
            raise unknown("pooling", pooling, POOLINGS)
        if pooling == "pooler" and getattr(encoder, "pooler", None) is None:
            raise UserError("this encoder has no pooler (DistilBERT): use pooling 'cls' or "
                            "'mean'")
        super().__init__(encoder, n_labels, dropout)
        self.pooling = pooling

    def features(self, enc: BertOutput, input_ids: Tensor, attention_mask: Tensor | None
                 ) -> Tensor:
        """The (B, C) summary: the pooler's, the first hidden state or the real tokens' mean."""
        if self.pooling == "pooler":
            return enc.pooler_output
        if self.pooling == "cls":
            return enc.last_hidden_state[:, 0]
        w = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        w = w[..., None].to(enc.last_hidden_state.dtype)
        return (enc.last_hidden_state * w).sum(1) / w.sum(1).clamp(min=1.0)

    def label_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return sequence_classification_loss(logits, labels)


class TokenClassifier(_Classifier):
    """Token classification: dropout -> ``classifier`` (C -> K) at every position: logits
    (B, S, K); ``labels`` (B, S), -100 where not scored, give ``loss``."""

    def features(self, enc: BertOutput, input_ids: Tensor, attention_mask: Tensor | None
                 ) -> Tensor:
        return enc.last_hidden_state

    def label_loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        return mean_token_nll(logits, labels)


class SpanExtractor(_Head):
    """Extractive QA: ``qa_outputs`` (C -> 2) gives start and end logits per position."""

    def __init__(self, encoder: nn.Module) -> None:
        super().__init__(encoder)
        self.qa_outputs = _init_linear(nn.Linear(self.arch.d_model, 2), self.arch.init_std)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                token_type_ids: Tensor | None = None, *, start_positions: Tensor | None = None,
                end_positions: Tensor | None = None,
                output_attentions: bool = False, output_hidden_states: bool = False
                ) -> HeadOutput:
        """input_ids (B, S) -> logits (B, S, 2): ``.start_logits``, ``.end_logits`` (B, S);
        ``start_positions`` and ``end_positions`` (B,) give ``loss`` (:func:`span_loss`)."""
        enc = self.encode(input_ids, attention_mask, token_type_ids,
                          output_attentions=output_attentions,
                          output_hidden_states=output_hidden_states)
        out = HeadOutput(self.qa_outputs(enc.last_hidden_state), enc)
        if start_positions is not None and end_positions is not None:
            out.loss = span_loss(out.start_logits, out.end_logits, start_positions,
                                 end_positions)
        return out


def best_spans(start: Tensor, end: Tensor, allowed: Tensor, max_answer_len: int
               ) -> tuple[Tensor, Tensor, Tensor]:
    """The best valid span per row: argmax of start_i + end_j over i <= j < i + max_answer_len
    with both i and j ``allowed`` (the context tokens).

    start, end (B, S) logits; allowed (B, S) bool. Returns (starts, ends, scores), each (B,);
    a row with no allowed position gets (0, 0, -inf).
    """
    if max_answer_len < 1:
        raise UserError(f"max_answer_len must be >= 1, got {max_answer_len}")
    s = start.size(1)
    scores = start[:, :, None] + end[:, None, :]  # (B, S, S): [i, j]
    i = torch.arange(s, device=start.device)
    band = (i[None, :] >= i[:, None]) & (i[None, :] < i[:, None] + max_answer_len)  # (S, S)
    ok = band[None] & allowed[:, :, None] & allowed[:, None, :]
    scores = scores.masked_fill(~ok, float("-inf"))
    best, flat = scores.reshape(start.size(0), -1).max(dim=1)
    return flat // s, flat % s, best


def task_head(task: str, encoder: nn.Module, n_labels: int,
              pooling: Literal["pooler", "cls", "mean"] = "pooler") -> nn.Module:
    """The head of a fine-tuning task ("classify", "tokens", "qa") around ``encoder``;
    pooling 'pooler' falls back to 'cls' for an encoder without a pooler (DistilBERT)."""
    if task == "classify":
        if getattr(encoder, "pooler", None) is None and pooling == "pooler":
            pooling = "cls"
        return SequenceClassifier(encoder, n_labels, pooling)
    if task == "tokens":
        return TokenClassifier(encoder, n_labels)
    if task == "qa":
        return SpanExtractor(encoder)
    raise unknown("task", task, ("classify", "tokens", "qa"))
