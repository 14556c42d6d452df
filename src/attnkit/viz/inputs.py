"""Text -> the token ids each model family reads, as the family was trained to read them.

- encoder-decoder (Transformer, RNN): the source text; the decoder reads BOS and ``target``
  (alias ``pair``) or, without one, the model's own greedy output;
- GPT-2 and other decoder-only models (Transformer-XL): the text's tokens alone, as bertviz
  shows them (no BOS is added);
- BERT: ``[CLS] a [SEP]``, or with ``pair`` ``[CLS] a [SEP] b [SEP]`` with token types 0 up to
  the first [SEP] and 1 after it (Devlin et al. 2019, section 3);
- RoBERTa: ``<s> a </s>``, a pair as ``<s> a </s></s> b </s>`` (one token type; Liu et al. 2019);
- DistilBERT: as BERT without token types (Sanh et al. 2019).

A text longer than the model allows is refused (never cut silently); [CLS]/[SEP] are the
tokenizer's BOS/EOS ids (``attnkit.tokenizers`` maps them by name).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from attnkit.accel import device_of
from attnkit.errors import UserError
from attnkit.models.bert import BertForPreTraining, BertModel, encoder_of
from attnkit.viz.capture import Inputs


def text_ids(tok: Any, text: str, what: str, limit: int) -> list[int]:
    """Ids of ``text`` (stripped), refusing an empty text or one of more than ``limit`` tokens."""
    if not isinstance(text, str) or not text.strip():
        raise UserError(f"nothing to visualise: the {what} text is empty")
    ids = tok.encode(text.strip())
    if not ids:
        raise UserError(f"the {what} text has no tokens")
    if len(ids) > limit:
        raise UserError(f"the {what} text has {len(ids)} tokens; the model's maximum is {limit}")
    return ids


def _labels(tok: Any, ids: list[int]) -> list[str]:
    return [tok.token(i) for i in ids]


def target_ids(model: nn.Module, tok: Any, src: list[int], target: str | None) -> list[int]:
    """Decoder inputs BOS y1 .. yn: ``target`` tokenised, or the model's greedy output."""
    limit = getattr(getattr(model, "cfg", None), "max_len", 1024)
    if target is not None:
        tgt = text_ids(tok, target, "target", limit - 1)
    else:
        from attnkit.decoding import greedy_search

        with torch.no_grad():
            tgt = greedy_search(model.eval(), torch.tensor([src], device=device_of(model)),
                                min(limit, int(1.5 * len(src)) + 10), tok.bos_id, tok.eos_id)[0]
    return [tok.bos_id, *tgt[: limit - 1]]


def seq2seq_inputs(model: nn.Module, tok: Any, text: str, target: str | None,
                   pair: str | None) -> Inputs:
    """Source ids and decoder inputs of an encoder-decoder model (``pair`` = ``target``)."""
    src = text_ids(tok, text, "source", getattr(getattr(model, "cfg", None), "max_len", 1024))
    tgt = target_ids(model, tok, src, target if target is not None else pair)
    return Inputs(src, _labels(tok, src), tgt, _labels(tok, tgt))


def lm_inputs(model: nn.Module, tok: Any, text: str, target: str | None,
              pair: str | None) -> Inputs:
    """The tokens of ``text`` for a decoder-only language model (one text only), at most its
    context (``n_positions``; relative positions as Transformer-XL's have no limit) long."""
    if target is not None or pair is not None:
        raise UserError(f"{type(model).__name__} reads one text: a second text (--pair or "
                        "--target) is for BERT-style pairs and encoder-decoder models")
    from attnkit.models import config_of

    ids = text_ids(tok, text, "input", getattr(config_of(model), "n_positions", 1 << 16))
    return Inputs(ids, _labels(tok, ids))


def bert_inputs(model: BertModel | BertForPreTraining, tok: Any, text: str,
                target: str | None, pair: str | None) -> Inputs:
    """``[CLS] a [SEP] (b [SEP])`` with token types (BERT), or RoBERTa's / DistilBERT's form."""
    if target is not None:
        raise UserError(f"{type(model).__name__} is an encoder without a decoder: give a "
                        "second sentence with pair (--pair), not target")
    if tok.bos_id is None or tok.eos_id is None:
        raise UserError("this tokenizer has no [CLS]/[SEP] (BOS/EOS) tokens to frame the text")
    arch = encoder_of(model).arch
    a = text_ids(tok, text, "first" if pair is not None else "input", arch.max_tokens)
    b = [] if pair is None else text_ids(tok, pair, "second (pair)", arch.max_tokens)
    cls, sep = tok.bos_id, tok.eos_id
    ids = [cls, *a, sep]
    if pair is not None:
        ids += [sep, *b, sep] if arch.variant == "roberta" else [*b, sep]
    if len(ids) > arch.max_tokens:
        raise UserError(f"the text{' pair' if pair is not None else ''} takes {len(ids)} "
                        f"tokens with [CLS]/[SEP]; the model's maximum is {arch.max_tokens}")
    types = None
    if arch.type_vocab_size > 1:
        types = [0] * (len(a) + 2) + [1] * (len(ids) - len(a) - 2)
    return Inputs(ids, _labels(tok, ids), token_types=types)
