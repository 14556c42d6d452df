"""Text generation for decoder-only language models: greedy, sampling, beam search, streaming.

A model is anything that speaks the decoding protocol of :mod:`attnkit.decoding` for
decoder-only models (``start(input_ids, attention_mask=, max_new_tokens=)``, ``step``,
``reorder``: GPT-2, Transformer-XL) and has a ``config`` (or ``cfg``) with ``vocab_size`` and,
for absolute positions, ``n_positions``.

How a batch runs: prompts of different lengths are padded on the left (attention mask 0 on the
pads, position ids ``cumsum(mask) - 1``, as in Hugging Face), the prompts run in one step, then
every step feeds one token per row and reads the logits of its last position. A prompt's output
never depends on the other prompts in its batch. A model without an attention mask
(``left_padding = False``: Transformer-XL) takes prompts of different lengths one at a time.
Past the context of a model with absolute positions the window slides (the next token is
predicted from the last ``n_positions`` tokens, re-encoded, as nanoGPT's sampler crops its
input); ``truncate`` instead cuts prompts so that prompt and new tokens fit the context.

The next token is chosen from the last logits after, in this order (the order of transformers):
1. repetition penalty (Keskar et al. 2019, CTRL, section 4.1, in the signed form transformers
   uses): the logit x of a token already in the prompt or the output becomes x / θ if x > 0,
   else x · θ;
2. temperature T: x / T (T = 0 means greedy);
3. top-k: keep the k largest logits (and any tied with the k-th);
4. top-p, nucleus sampling (Holtzman et al. 2020, eq. 3): keep the smallest set of most probable
   tokens whose probability reaches p;
then greedy takes the argmax and sampling draws from the softmax of what is left, row i with
its own ``torch.Generator`` seeded ``seed + i`` (so a batch equals its prompts run one at a time
with seeds seed, seed + 1, ...).

Greedy, sampling and beam search are the loops of :mod:`attnkit.decoding`; beam search ranks
hypotheses by GNMT's length-normalised score (Wu et al. 2016, eq. 14),
log P(Y | prompt) / ((5 + |Y|) / 6) ** alpha; a hypothesis ends at EOS or after
``max_new_tokens``.

Returned tokens are the new ones only; a row that produced EOS ends with it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, TextIO

import torch
from torch import Tensor, nn

from attnkit.accel import device_of
from attnkit.decoding import OnToken, decode_beams, decode_steps
from attnkit.errors import ConfigError, UserError
from attnkit.nn.fast_linear import decode_linears


@dataclass(frozen=True)
class GenerationConfig:
    """What to generate and how; every value is checked on construction (ConfigError).

    The strategy follows from the values: ``num_beams > 1`` is beam search, ``do_sample`` with
    a temperature above 0 is sampling, anything else greedy.
    """

    max_new_tokens: int = 64
    min_new_tokens: int = 0          # EOS is forbidden before this many new tokens
    do_sample: bool = False
    temperature: float = 1.0         # 0: greedy
    top_k: int = 0                   # 0: off
    top_p: float = 1.0               # 1: off
    repetition_penalty: float = 1.0  # 1: off
    num_beams: int = 1
    length_penalty: float = 0.6      # GNMT alpha of beam scores; 0: raw log-probability
    stop: tuple[str, ...] = ()       # stop strings (text-level: see generate_text)
    eos_id: int | None = None        # None: no EOS in generate(); the tokenizer's in text
    seed: int | None = None          # None: drawn from torch's global generator
    truncate: bool = False           # cut prompts so that the new tokens fit the context
    #                                  (by default the window slides past the context)

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop", tuple(self.stop))
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be a finite number, got {getattr(self, name)}")
        checks = [
            (self.max_new_tokens >= 1, "max_new_tokens must be >= 1"),
            (0 <= self.min_new_tokens <= self.max_new_tokens,
             f"min_new_tokens must be in [0, max_new_tokens={self.max_new_tokens}]"),
            (self.temperature >= 0, "temperature must be >= 0"),
            (self.top_k >= 0, "top_k must be >= 0 (0 = off)"),
            (0 < self.top_p <= 1, "top_p must be in (0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty must be > 0 (1 = off)"),
            (self.num_beams >= 1, "num_beams must be >= 1"),
            (self.length_penalty >= 0, "length_penalty must be >= 0"),
            (self.eos_id is None or self.eos_id >= 0, "eos_id must be >= 0"),
        ]
        for ok, msg in checks:
            if not ok:
                field = msg.split()[0]
                raise ConfigError(f"{msg}, got {getattr(self, field)}")
        if self.num_beams > 1 and self.do_sample:
            raise ConfigError("beam search does not sample: use num_beams=1 with do_sample, "
                              "or do_sample=false with beams")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise ConfigError(f"stop strings must be non-empty strings, got {self.stop!r}")

    @property
    def strategy(self) -> str:
        """'beam', 'sample' or 'greedy'."""
        if self.num_beams > 1:
            return "beam"
        return "sample" if self.do_sample and self.temperature > 0 else "greedy"


# -- logit processing -----------------------------------------------------------------------------
def penalize_repetition(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL's penalty on logits (B, V) of tokens marked in ``seen`` (B, V) bool."""
    hit = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, hit, logits)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """-inf on all but the k largest logits of each row (B, V); ties with the k-th stay."""
    kth = logits.topk(min(k, logits.size(-1)), dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """-inf outside the nucleus: the fewest most probable tokens with probability >= p."""
    probs, order = logits.float().softmax(dim=-1).sort(dim=-1, descending=True)  # (B, V)
    before = probs.cumsum(dim=-1) - probs  # mass of the more probable tokens
    drop_sorted = before >= p  # the most probable token always stays (before = 0)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def process_logits(logits: Tensor, cfg: GenerationConfig, seen: Tensor | None = None) -> Tensor:
    """Repetition penalty, temperature, top-k, top-p in that order (a new tensor (B, V))."""
    if cfg.repetition_penalty != 1.0 and seen is not None:
        logits = penalize_repetition(logits, seen, cfg.repetition_penalty)
    if cfg.strategy == "sample":
        if cfg.temperature != 1.0:
            logits = logits / cfg.temperature
        if cfg.top_k:
            logits = top_k_filter(logits, cfg.top_k)
        if cfg.top_p < 1.0:
            logits = top_p_filter(logits, cfg.top_p)
    return logits


def choose_tokens(logits: Tensor, cfg: GenerationConfig, seen: Tensor | None,
            gens: list[torch.Generator]) -> Tensor:
    """The next token of every row (B,) from its last logits (B, V)."""
    logits = process_logits(logits, cfg, seen)
    if not gens:
        return logits.argmax(dim=-1)
    probs = logits.float().softmax(dim=-1)  # (B, V)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(gens)])


# -- prompts --------------------------------------------------------------------------------------
def _sizes(model: nn.Module) -> tuple[int, int | None]:
    """The model's vocabulary size and context (None: no absolute positions, no limit)."""
    config = getattr(model, "config", None) or model.cfg
    return config.vocab_size, getattr(config, "n_positions", None)


def _check_prompts(model: nn.Module, prompts: Sequence[Sequence[int]],
                   cfg: GenerationConfig) -> list[list[int]]:
    """Prompts as lists of ints, each checked (empty, vocabulary) or truncated."""
    vocab, context = _sizes(model)
    if isinstance(prompts, Tensor):
        prompts = prompts.tolist()
    if (isinstance(prompts, (str, bytes)) or not prompts
            or any(isinstance(x, (int, str, bytes)) for x in prompts)):
        raise UserError("prompts must be a non-empty list of token-id lists")
    if cfg.truncate and context is not None and cfg.max_new_tokens >= context:
        raise UserError(f"max_new_tokens {cfg.max_new_tokens} leaves no room for a prompt in "
                        f"the model's context of {context} positions (without --truncate the "
                        "window slides)")
    if cfg.eos_id is not None and cfg.eos_id >= vocab:
        raise UserError(f"eos_id {cfg.eos_id} is outside the vocabulary of size {vocab}")
    out = []
    for i, ids in enumerate(prompts):
        ids = [int(x) for x in ids]
        if not ids:
            raise UserError(f"prompt {i} is empty")
        bad = next((x for x in ids if not 0 <= x < vocab), None)
        if bad is not None:
            raise UserError(f"token id {bad} in prompt {i} is outside the vocabulary of size "
                            f"{vocab}")
        if cfg.truncate and context is not None:
            ids = ids[-(context - cfg.max_new_tokens):]
        out.append(ids)
    return out


def window_note(model: nn.Module, prompt_lengths: Sequence[int], cfg: GenerationConfig
                ) -> str | None:
    """A one-line note when generation will pass the model's context (the window slides)."""
    context = _sizes(model)[1]
    longest = max(prompt_lengths, default=0)
    if context is None or cfg.truncate or longest + cfg.max_new_tokens <= context:
        return None
    return (f"a {longest}-token prompt and {cfg.max_new_tokens} new tokens exceed the model's "
            f"context of {context}: the window slides (each new token is predicted from the last "
            f"{context})")


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor | None]:
    """Prompts padded on the left (B, P) and their attention mask (B, P), None if unpadded."""
    b, p = len(prompts), max(map(len, prompts))
    ids = torch.zeros((b, p), dtype=torch.long)
    mask = torch.ones((b, p), dtype=torch.bool)
    for i, x in enumerate(prompts):
        ids[i, p - len(x):] = torch.tensor(x)
        mask[i, : p - len(x)] = False
    return ids.to(device), None if bool(mask.all()) else mask.to(device)


def _seen(prompts: list[list[int]], vocab: int, device: torch.device) -> Tensor:
    """(B, V) True for the tokens of each row's prompt (pads excluded)."""
    seen = torch.zeros((len(prompts), vocab), dtype=torch.bool)
    for i, ids in enumerate(prompts):
        seen[i, ids] = True
    return seen.to(device)


def _generators(cfg: GenerationConfig, rows: int, device: torch.device
                ) -> list[torch.Generator]:
    """One generator per row, seeded seed + row (none for greedy and beam search)."""
    if cfg.strategy != "sample":
        return []
    seed = cfg.seed if cfg.seed is not None else int(torch.randint(2**62, ()).item())
    return [torch.Generator(device).manual_seed(seed + i) for i in range(rows)]


def _forbid(logits: Tensor, token: int) -> Tensor:
    """A copy of logits (B, V) with ``token`` impossible (the model's output stays intact)."""
    logits = logits.clone()
    logits[:, token] = float("-inf")
    return logits


# -- generation -----------------------------------------------------------------------------------
def generate(model: nn.Module, prompt_ids: Sequence[Sequence[int]],
             cfg: GenerationConfig | None = None, *,
             on_token: OnToken | None = None) -> list[list[int]]:
    """The new tokens for each prompt (lists of token ids), batched with left padding.

    ``on_token(row, token)`` is called as each token of each row is produced (greedy and
    sampling; beam search calls it for the best hypothesis at the end); returning True ends
    that row there. Stop strings need text: see :func:`generate_text`. The model runs in eval
    mode and under ``torch.inference_mode``; its training flag is restored afterwards.
    """
    cfg = cfg or GenerationConfig()
    if cfg.stop:
        raise ConfigError("stop strings need a tokenizer: use generate_text")
    prompts = _check_prompts(model, prompt_ids, cfg)
    if len(set(map(len, prompts))) > 1 and not getattr(model, "left_padding", True):
        return [row for i, p in enumerate(prompts) for row in generate(
            model, [p], cfg if cfg.seed is None else replace(cfg, seed=cfg.seed + i),
            on_token=None if on_token is None else lambda _, tok, i=i: on_token(i, tok))]
    device, training = device_of(model), model.training
    model.eval()
    try:
        with torch.inference_mode(), decode_linears(model):  # faster at batch 1 on CPU
            return _decode(model, prompts, cfg, on_token, device)
    finally:
        model.train(training)


def _decode(model: nn.Module, prompts: list[list[int]], cfg: GenerationConfig,
            on_token: OnToken | None, device: torch.device) -> list[list[int]]:
    """The prompts in one step, then the loops of :mod:`attnkit.decoding`."""
    ids, mask = _left_pad(prompts, device)
    state = model.start(ids, attention_mask=mask, max_new_tokens=cfg.max_new_tokens)
    limits = torch.full((len(prompts),), cfg.max_new_tokens)
    beams = cfg.num_beams if cfg.strategy == "beam" else 1
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = _seen(prompts, _sizes(model)[0], device).repeat_interleave(beams, dim=0)

    def inputs(logits: Tensor, t: int, history: Tensor) -> tuple[Tensor, Tensor | None]:
        """The logits with EOS forbidden before min_new_tokens, and the tokens seen."""
        if cfg.eos_id is not None and t < cfg.min_new_tokens:
            logits = _forbid(logits, cfg.eos_id)
        return logits, None if seen is None else seen.scatter(1, history.to(device), True)

    def log_probs(logits: Tensor, t: int, history: Tensor) -> Tensor:
        logits, rows_seen = inputs(logits, t, history)
        return torch.log_softmax(process_logits(logits, cfg, rows_seen).float(), dim=-1)

    def choose(logits: Tensor, t: int, history: Tensor) -> Tensor:
        logits, rows_seen = inputs(logits, t, history)
        return choose_tokens(logits, cfg, rows_seen, gens)

    if beams > 1:
        found = decode_beams(model, state, ids, limits, beams, log_probs, cfg.eos_id,
                             cfg.length_penalty)
        return [_report(i, f[0].tokens, on_token) for i, f in enumerate(found)]
    gens = _generators(cfg, len(prompts), device)
    return decode_steps(model, state, ids, limits, choose, cfg.eos_id, on_token)


def _report(row: int, tokens: list[int], on_token: OnToken | None) -> list[int]:
    """Hand a finished row's tokens to ``on_token``, cut where it asks to stop."""
    if on_token is None:
        return tokens
    for j, tok in enumerate(tokens):
        if on_token(row, tok):
            return tokens[: j + 1]
    return tokens


# -- text -----------------------------------------------------------------------------------------
class Detokenizer(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: Sequence[int]) -> str: ...


class TextStream:
    """Incremental detokenisation of one output: the text that is safe to show so far.

    Each token decodes a short window (from the tokens behind the last shown piece) and emits
    what the new token adds, so a byte-level piece that ends inside a UTF-8 character (decoded
    as U+FFFD) waits for the rest, and decoders that treat the start of a text specially
    (SentencePiece's leading space) still join pieces correctly. Text that may be the start of
    a stop string is held back until it is not; ``text`` is cut before the first stop string.
    ``context``: the prompt's ids, whose last few start the window (so that the space before
    a continuation's first word is kept).
    """

    def __init__(self, tokenizer: Detokenizer, stop: Sequence[str] = (),
                 eos_id: int | None = None, context: Sequence[int] = ()) -> None:
        self.tokenizer, self.stop, self.eos_id = tokenizer, tuple(stop), eos_id
        self.ids: list[int] = list(context[-4:])
        self.decoded = ""  # everything decoded so far (after the context)
        self.text = ""     # the output: decoded, cut before a stop string
        self.stopped = False
        self._prefix, self._read, self._shown = 0, len(self.ids), 0

    def push(self, token: int) -> str:
        """Take one token; return the newly printable text ('' while a piece is pending)."""
        if self.stopped or token == self.eos_id:
            return ""
        self.ids.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: the text still held back."""
        return "" if self.stopped else self._advance(final=True)

    def _advance(self, final: bool) -> str:
        before = self.tokenizer.decode(self.ids[self._prefix:self._read])
        after = self.tokenizer.decode(self.ids[self._prefix:])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.decoded += after[len(before):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release(final)

    def _release(self, final: bool) -> str:
        end = len(self.decoded)
        hits = [j for j in (self.decoded.find(s, self._shown) for s in self.stop) if j >= 0]
        if hits:
            end, self.stopped = min(hits), True
        elif not final:
            end -= self._pending_stop()
        self.text = self.decoded[:end] if self.stopped else self.decoded
        piece = self.decoded[self._shown:end]
        self._shown = max(self._shown, end)
        return piece

    def _pending_stop(self) -> int:
        """Length of the longest unshown suffix that begins some stop string."""
        tail = self.decoded[self._shown:]
        for size in range(min(len(tail), max(map(len, self.stop), default=1) - 1), 0, -1):
            if any(s.startswith(tail[-size:]) for s in self.stop):
                return size
        return 0


def generate_text(model: nn.Module, tokenizer: Detokenizer, prompts: str | Sequence[str],
                  cfg: GenerationConfig | None = None, *,
                  stream: Callable[[int, str], None] | TextIO | None = None) -> list[str]:
    """The generated text (prompt excluded) for each prompt string, cut at stop strings.

    EOS is the tokenizer's ``eos_id`` unless ``cfg.eos_id`` is set. ``stream`` receives text
    as it is produced: a callable ``(row, piece)`` or a text file such as ``sys.stdout``.
    """
    cfg = cfg or GenerationConfig()
    texts = [prompts] if isinstance(prompts, str) else list(prompts)
    for i, text in enumerate(texts):
        if not text:
            raise UserError(f"prompt {i} is empty")
    if cfg.eos_id is None and getattr(tokenizer, "eos_id", None) is not None:
        cfg = replace(cfg, eos_id=tokenizer.eos_id)
    ids = [tokenizer.encode(t) for t in texts]
    streams = [TextStream(tokenizer, cfg.stop, cfg.eos_id, context=x) for x in ids]
    emit = _emitter(stream)

    def on_token(row: int, token: int) -> bool:
        piece = streams[row].push(token)
        if piece and emit is not None:
            emit(row, piece)
        return streams[row].stopped

    generate(model, ids, replace(cfg, stop=()), on_token=on_token)
    for row, s in enumerate(streams):
        piece = s.flush()
        if piece and emit is not None:
            emit(row, piece)
    return [s.text for s in streams]


def _emitter(stream: Callable[[int, str], None] | TextIO | None
             ) -> Callable[[int, str], None] | None:
    if stream is None or not hasattr(stream, "write"):
        return stream

    def write(row: int, piece: str) -> None:
        stream.write(piece)
        stream.flush()

    return write
