"""Attentional RNN encoder-decoders ("the attentional interface"), and the RNN without attention.

Notation: B batch, S source length, T target length, E embedding size, H hidden size,
Dm = H x directions (width of the encoder's annotations), V vocabulary, L layers.

Bahdanau et al. 2015, "Neural Machine Translation by Jointly Learning to Align and Translate"
(RNNsearch; bidirectional encoder, annotations h_j = [fwd h_j; bwd h_j]); s_{i-1} is the top
decoder state *before* step i:
    e_ij = score(s_{i-1}, h_j)     additive by default: v^T tanh(W_a s_{i-1} + U_a h_j)   (eq. 6)
    a_ij = softmax_j(e_ij),   c_i = sum_j a_ij h_j                                      (eq. 5)
    s_i  = RNN(s_{i-1}, [E y_{i-1}; c_i])                          the context enters the cell
    t_i  = maxout_2(U_o s_i + V_o E y_{i-1} + C_o c_i),   p(y_i) = softmax(W_o t_i)  (A.2.2)
The readout uses s_i as in eq. 4, g(y_{i-1}, s_i, c_i) (appendix A.2.2 writes s_{i-1}); the
maxout halves H pre-activations to H/2 units (the paper: 1000 -> 500).

Luong et al. 2015, "Effective Approaches to Attention-based Neural Machine Translation"
(global attention); h_t is the top decoder state *after* step t:
    h_t  = RNN(h_{t-1}, [E y_{t-1}; h~_{t-1}])        input feeding (sec. 3.3; else E y_{t-1})
    a_t  = softmax_s(score(h_t, h_s)),   c_t = sum_s a_ts h_s      general: h_t^T W_a h_s (eq. 8)
    h~_t = tanh(W_c [c_t; h_t]),   p(y_t) = softmax(W_s h~_t)                      (eq. 5-6)

Without attention (Cho et al. 2014; Sutskever et al. 2014), the floor: the encoder's final
state initialises the decoder, s_t = RNN(s_{t-1}, E y_{t-1}), p(y_t) = softmax(W_o s_t).

Shared choices. The encoder runs fused (cuDNN-style nn.GRU/nn.LSTM) over the whole padded
source, one layer and direction at a time: the backward direction reads each row's tokens
reversed in place, so padding changes nothing (packed sequences would do the same, but their
CPU backward costs O(S^2) memory traffic). The decoder starts from s_0 = tanh(W_s h_final) per
layer, h_final = [fwd h_S; bwd h_1] (Bahdanau's s_0 = tanh(W_s bwd h_1), widened to both
directions; a unidirectional encoder's h_S); an LSTM decoder's cell starts at zero (Sutskever
et al. and Luong et al. copy the encoder's final h and c instead). Recurrent cells are PyTorch's
GRU/LSTM: in the GRU the reset gate multiplies W_hn h + b_hn, not h itself as in Cho et al.
Parameters start uniform in [-0.1, 0.1] (Luong, sec. 4.1). Decoders whose attention does not
feed the recurrence (no attention, Luong without input feeding) also run fused over the whole
target; the others loop over time, with the key side of the score (additive W_a h_j, general
W_a h_s) computed once per source. The attention itself is attnkit's core with the configured
score module (:mod:`attnkit.nn.attention.scores`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Literal

import torch
from torch import Tensor, nn

from attnkit.config import from_dict, unknown
from attnkit.errors import ConfigError, UserError
from attnkit.losses import mean_token_nll
from attnkit.models.transformer import Seq2SeqOutput
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.scores import SCORES, build_score
from attnkit.nn.recurrent import LSTM

Hidden = Tensor | tuple[Tensor, Tensor]  # (L, B, H); an LSTM's (h, c)
CELLS: dict[str, type[nn.RNNBase]] = {"gru": nn.GRU, "lstm": LSTM}  # LSTM: also fp16 on CPU
ATTENTIONS = ("bahdanau", "luong", "none")
PAPER_SCORE = {"bahdanau": "additive", "luong": "general", "none": ""}


@dataclass(frozen=True)
class RNNConfig:
    """Sizes and options of the RNN encoder-decoder (defaults: Bahdanau's RNNsearch-50).

    ``score`` "" and ``input_feeding`` None take the paper's choice for the attention: additive
    for Bahdanau, general with input feeding for Luong; the resolved values are stored.
    """

    src_vocab_size: int = 30000
    tgt_vocab_size: int = 0          # 0 = the source vocabulary (one shared vocabulary)
    cell: Literal["gru", "lstm"] = "gru"
    attention: Literal["bahdanau", "luong", "none"] = "bahdanau"
    score: str = ""                  # a name in attnkit.nn.attention.scores.SCORES
    input_feeding: bool | None = None  # Luong only (sec. 3.3)
    embed_size: int = 620
    hidden_size: int = 1000          # per direction in the encoder; the decoder's size
    n_layers: int = 1                # encoder and decoder layers
    bidirectional: bool = True       # encoder
    dropout: float = 0.0             # embeddings, between layers, before the output layer
    max_len: int = 1024              # longest source/target the recipes feed and decode
    share_embeddings: bool = True    # one embedding for source and target (needs one vocabulary)
    pad_id: int = 0

    def __post_init__(self) -> None:
        if self.cell not in CELLS:
            raise unknown("arch.cell", self.cell, CELLS)
        if self.attention not in ATTENTIONS:
            raise unknown("arch.attention", self.attention, ATTENTIONS)
        for name in ("src_vocab_size", "embed_size", "hidden_size", "n_layers", "max_len"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"arch.{name} must be positive, got {getattr(self, name)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"arch.dropout must be in [0, 1), got {self.dropout}")
        if self.share_embeddings and self.tgt_vocab_size not in (0, self.src_vocab_size):
            raise ConfigError("arch.share_embeddings needs one vocabulary: set tgt_vocab_size "
                              "to 0 or share_embeddings to false")
        if self.attention == "bahdanau" and self.hidden_size % 2:
            raise ConfigError("Bahdanau's maxout readout halves arch.hidden_size: it must be "
                              f"even, got {self.hidden_size}")
        self._resolve_score()
        self._resolve_feeding()

    def _resolve_score(self) -> None:
        if self.attention == "none":
            if self.score:
                raise ConfigError(f"arch.score '{self.score}' needs attention; the RNN without "
                                  "attention has none (use model=rnn-attention)")
            return
        score = self.score or PAPER_SCORE[self.attention]
        if score not in SCORES:
            raise unknown("arch.score", score, SCORES)
        with torch.device("meta"):  # checks the widths (dot needs Dm = H) without allocating
            build_score(score, self.hidden_size, self.annotation_size, self.hidden_size,
                        **self.score_options(score))
        object.__setattr__(self, "score", score)

    def _resolve_feeding(self) -> None:
        if self.attention == "luong":
            object.__setattr__(self, "input_feeding", self.input_feeding is not False)
        elif self.input_feeding:
            raise ConfigError("arch.input_feeding is Luong's (arch.attention=luong); Bahdanau's "
                              "decoder feeds the context into the cell by design")
        else:
            object.__setattr__(self, "input_feeding", False)

    def score_options(self, score: str) -> dict:
        """Options the score module needs: location scores cover ``max_len`` positions."""
        return {"max_len": self.max_len} if score == "location" else {}

    @property
    def annotation_size(self) -> int:
        """Dm: width of the encoder outputs the decoder attends to."""
        return self.hidden_size * (2 if self.bidirectional else 1)

    @property
    def target_vocab(self) -> int:
        return self.tgt_vocab_size or self.src_vocab_size


PRESETS: dict[str, dict] = {
    # RNNsearch (Bahdanau et al. 2015, sec. 4.2 and A.2): GRU, 620-dim embeddings, 1000 units
    "bahdanau": dict(cell="gru", attention="bahdanau", embed_size=620, hidden_size=1000,
                     n_layers=1, bidirectional=True, dropout=0.0),
    # Luong et al. 2015, sec. 4.1: 4-layer LSTM, 1000 cells, dropout 0.2, general + feeding
    "luong": dict(cell="lstm", attention="luong", embed_size=1000, hidden_size=1000,
                  n_layers=4, bidirectional=False, dropout=0.2),
    # sizes that train on a CPU (Bahdanau's model)
    "small": dict(cell="gru", attention="bahdanau", embed_size=256, hidden_size=256,
                  n_layers=1, bidirectional=True, dropout=0.1),
    "tiny": dict(cell="gru", attention="bahdanau", embed_size=128, hidden_size=128,
                 n_layers=1, bidirectional=True, dropout=0.1),
}


@dataclass
class RNNState:
    """What incremental decoding carries from step to step (one row per hypothesis)."""

    memory: Tensor             # (B, S, Dm) encoder annotations
    mask: Tensor               # (B, 1, S) True = a real source token
    keys: Tensor | None        # (B, S, D') key side of the score, computed once, or None
    hidden: Hidden             # (L, B, H) decoder state
    feed: Tensor | None        # (B, H) Luong's h~_{t-1} (input feeding), else None
    position: int = 0

    def reorder(self, index: Tensor) -> None:
        """Keep rows ``index`` (B',) of every tensor: beam search's survivors."""
        self.memory = self.memory.index_select(0, index)
        self.mask = self.mask.index_select(0, index)
        if self.keys is not None:
            self.keys = self.keys.index_select(0, index)
        if self.feed is not None:
            self.feed = self.feed.index_select(0, index)
        if isinstance(self.hidden, tuple):
            self.hidden = tuple(x.index_select(1, index) for x in self.hidden)
        else:
            self.hidden = self.hidden.index_select(1, index)


class _CachedKeys:
    """A dot-form score (score = scale * q' . k') whose key side k' was computed once per source:
    decoding loops then transform only the query at each step (the core still sees dot_form)."""

    def __init__(self, score: nn.Module, keys: Tensor) -> None:
        self.score, self.keys = score, keys  # keys (B, S, D')

    def dot_form(self, q: Tensor, k: Tensor) -> tuple[Tensor, Tensor, float]:
        q_form, _, scale = self.score.dot_form(q, k[..., :1, :])  # the query side only
        return q_form, self.keys, scale

    def __call__(self, q: Tensor, k: Tensor) -> Tensor:
        q_form, keys, scale = self.dot_form(q, k)
        return torch.matmul(q_form, keys.transpose(-2, -1)) * scale  # (B, T, S)


def _gather(x: Tensor, index: Tensor) -> Tensor:
    """x[b, index[b, j]] for every row b and position j: (B, S, D) -> (B, S, D)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.size(-1)))


def _top(hidden: Hidden) -> Tensor:
    """The top layer's hidden state (B, H)."""
    return (hidden[0] if isinstance(hidden, tuple) else hidden)[-1]


class RNNSeq2Seq(nn.Module):
    """RNN encoder-decoder; ``forward(input_ids, decoder_input_ids)`` gives next-token logits
    (B, T, V).

    ``start(src, max_len)``, ``step(state, tokens)`` and ``reorder(state, index)`` decode
    incrementally (:mod:`attnkit.decoding`); attention weights (B, 1, T, S) come back only
    when asked for.
    """

    def __init__(self, cfg: RNNConfig) -> None:
        super().__init__()
        self.cfg = cfg
        e, h, dm, layers = cfg.embed_size, cfg.hidden_size, cfg.annotation_size, cfg.n_layers
        rnn, inner = CELLS[cfg.cell], cfg.dropout if layers > 1 else 0.0
        self.src_embed = nn.Embedding(cfg.src_vocab_size, e, padding_idx=cfg.pad_id)
        self.tgt_embed = (self.src_embed if cfg.share_embeddings
                          else nn.Embedding(cfg.target_vocab, e, padding_idx=cfg.pad_id))
        self.dropout = nn.Dropout(cfg.dropout)
        dirs = 2 if cfg.bidirectional else 1
        self.encoder = nn.ModuleList(  # layer l, direction d at index l * dirs + d
            rnn(e if i < dirs else dm, h, batch_first=True) for i in range(layers * dirs))
        self.bridge = nn.Linear(dm, h)  # W_s: s_0 = tanh(W_s h_final)
        extra = {"bahdanau": dm, "luong": h if cfg.input_feeding else 0, "none": 0}
        self.decoder = rnn(e + extra[cfg.attention], h, layers, batch_first=True, dropout=inner)
        self.score = (None if cfg.attention == "none" else
                      build_score(cfg.score, h, dm, h, **cfg.score_options(cfg.score)))
        if cfg.attention == "bahdanau":   # [U_o V_o C_o]: maxout pre-activations from [s; Ey; c]
            self.readout, width = nn.Linear(h + e + dm, h, bias=False), h // 2
        elif cfg.attention == "luong":    # W_c: h~ = tanh(W_c [c; h])
            self.readout, width = nn.Linear(dm + h, h, bias=False), h
        else:
            self.readout, width = None, h
        self.out_proj = nn.Linear(width, cfg.target_vocab, bias=False)  # W_o / W_s
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Uniform in [-0.1, 0.1] (Luong et al. 2015, sec. 4.1); padding embeddings zero."""
        for p in self.parameters():
            nn.init.uniform_(p, -0.1, 0.1)
        with torch.no_grad():
            self.src_embed.weight[self.cfg.pad_id].zero_()
            self.tgt_embed.weight[self.cfg.pad_id].zero_()

    @property
    def _fused(self) -> bool:
        """True when no attention output feeds the recurrence: the decoder runs fused."""
        return self.cfg.attention == "none" or (self.cfg.attention == "luong"
                                                and not self.cfg.input_feeding)

    # -- encoder -------------------------------------------------------------------------------
    def encode(self, src: Tensor) -> RNNState:
        """Source ids (B, S) -> annotations, mask and the decoder's initial state."""
        b, s = src.shape
        mask = src != self.cfg.pad_id  # (B, S)
        last = (mask.sum(1) - 1).clamp_min(0)  # (B,) position of each row's last token
        pos = torch.arange(s, device=src.device)
        # per-row reversal of the real tokens, padding left in place (its own inverse)
        rev = torch.where(pos < last[:, None] + 1, last[:, None] - pos, pos)  # (B, S)
        x = self.dropout(self.src_embed(src))  # (B, S, E)
        finals = []
        for layer in range(self.cfg.n_layers):
            if layer:
                x = self.dropout(x)  # between layers
            outs = []
            for d, rnn in enumerate(self._encoder_layer(layer)):
                out = rnn(x if d == 0 else _gather(x, rev))[0]  # (B, S, H)
                outs.append(out if d == 0 else _gather(out, rev))
                finals.append(out[torch.arange(b), last])  # fwd h_S, bwd h_1: (B, H)
            x = torch.cat(outs, -1)  # (B, S, Dm)
        dm = self.cfg.annotation_size
        h_final = torch.cat(finals, -1).view(b, self.cfg.n_layers, dm).transpose(0, 1)
        h0 = torch.tanh(self.bridge(h_final)).contiguous()  # (L, B, H)
        hidden = (h0, torch.zeros_like(h0)) if self.cfg.cell == "lstm" else h0
        feed = x.new_zeros(b, self.cfg.hidden_size) if self.cfg.input_feeding else None
        return RNNState(x, mask[:, None, :], self._keys(x), hidden, feed)

    def _encoder_layer(self, layer: int) -> list[nn.Module]:
        dirs = 2 if self.cfg.bidirectional else 1
        return list(self.encoder[layer * dirs:(layer + 1) * dirs])

    def _keys(self, memory: Tensor) -> Tensor | None:
        """The key side of the score, computed once per source: additive W_a h_j (B, S, Dh),
        or k' of a dot-form score q'^T k' (general: W_a h_j); None for other scores."""
        if self.score is None:
            return None
        if hasattr(self.score, "project_keys"):
            return self.score.project_keys(memory)
        if hasattr(self.score, "dot_form"):
            query = memory.new_zeros(memory.size(0), 1, self.cfg.hidden_size)
            return self.score.dot_form(query, memory)[1]
        return None

    # -- decoder -------------------------------------------------------------------------------
    def _attend(self, query: Tensor, st: RNNState, need_weights: bool
                ) -> tuple[Tensor, Tensor | None]:
        """Queries (B, T, H) over the annotations: contexts (B, T, Dm), weights (B, T, S)."""
        score_fn = self.score
        if st.keys is not None:
            score_fn = (partial(self.score, k_proj=st.keys) if hasattr(self.score, "project_keys")
                        else _CachedKeys(self.score, st.keys))
        out = attention(query, st.memory, st.memory, mask=st.mask, score_fn=score_fn,
                        need_weights=need_weights)
        return out.out, out.weights

    def _recur(self, y: Tensor, st: RNNState, need_weights: bool
               ) -> tuple[Tensor, Tensor | None, Tensor | None]:
        """One decoder step from the embedded previous token ``y`` (B, E); updates ``st``.

        Returns the top state (B, H) (s_i or h_t), the context (B, Dm) and the weights (B, S)
        (None without attention); with input feeding ``st.feed`` becomes h~_t.
        """
        ctx = w = None
        if self.cfg.attention == "bahdanau":  # attend from s_{i-1}, then update the cell
            ctx, w = self._attend(_top(st.hidden)[:, None], st, need_weights)
            x = torch.cat([y, ctx[:, 0]], -1)
        else:
            x = y if st.feed is None else torch.cat([y, st.feed], -1)
        out, st.hidden = self.decoder(x[:, None], st.hidden)  # (B, 1, H)
        if self.cfg.attention == "luong":  # attend from h_t
            ctx, w = self._attend(out, st, need_weights)
            if st.feed is not None:
                st.feed = self._features(out, None, ctx)[:, 0]
        squeeze = lambda t: None if t is None else t[:, 0]  # noqa: E731
        return out[:, 0], squeeze(ctx), squeeze(w)

    def _features(self, h: Tensor, y: Tensor | None, ctx: Tensor | None) -> Tensor:
        """What the output layer reads, for states ``h`` (..., H): t_i, h~_t or s_t."""
        if self.cfg.attention == "bahdanau":
            t = self.readout(torch.cat([h, y, ctx], -1))  # (..., H)
            return t.view(*t.shape[:-1], -1, 2).amax(-1)  # maxout over pairs (..., H/2)
        if self.cfg.attention == "luong":
            return torch.tanh(self.readout(torch.cat([ctx, h], -1)))  # (..., H)
        return h

    def forward(self, input_ids: Tensor | None = None, decoder_input_ids: Tensor | None = None,
                *, labels: Tensor | None = None, output_attentions: bool = False
                ) -> Seq2SeqOutput:
        """Teacher-forced logits (B, T, V) for source ``input_ids`` (B, S) (padding =
        ``pad_id``) and target inputs ``decoder_input_ids`` (B, T) (BOS y1 .. y_{n});
        ``labels`` (B, T), -100 where not scored, give ``loss`` (mean cross-entropy);
        ``output_attentions`` gives the alignment as ``cross_attentions`` (one layer, one head).
        """
        if input_ids is None or decoder_input_ids is None:
            raise UserError("the RNN needs input_ids and decoder_input_ids")
        st = self.encode(input_ids)
        y = self.dropout(self.tgt_embed(decoder_input_ids))  # (B, T, E)
        weights = None
        if self._fused:
            h, _ = self.decoder(y, st.hidden)  # (B, T, H)
            ctx = None
            if self.cfg.attention == "luong":
                ctx, weights = self._attend(h, st, output_attentions)
            feats = self._features(h, y, ctx)
        else:
            steps, feeds = [], []
            for t in range(y.size(1)):
                steps.append(self._recur(y[:, t], st, output_attentions))
                feeds.append(st.feed)
            h, ctx = (torch.stack([s[i] for s in steps], 1) for i in (0, 1))
            feats = torch.stack(feeds, 1) if st.feed is not None else self._features(h, y, ctx)
            if output_attentions:
                weights = torch.stack([s[2] for s in steps], 1)  # (B, T, S)
        logits = self.out_proj(self.dropout(feats))
        loss = None if labels is None else mean_token_nll(logits, labels)
        if not output_attentions or weights is None:
            return Seq2SeqOutput(logits, loss=loss)
        return Seq2SeqOutput(logits, cross_attentions=[weights[:, None]], loss=loss)  # (B,1,T,S)

    # -- incremental decoding ------------------------------------------------------------------
    def start(self, src: Tensor, max_len: int) -> RNNState:
        """Encode ``src``; an RNN needs no cache sized by ``max_len``."""
        return self.encode(src)

    def step(self, state: RNNState, tokens: Tensor) -> tuple[Tensor, RNNState]:
        """Feed the next ``tokens`` (B, t): the logits of the last one (B, V) and the state."""
        for i in range(tokens.size(1)):
            y = self.dropout(self.tgt_embed(tokens[:, i]))  # (B, E)
            h, ctx, _ = self._recur(y, state, need_weights=False)
        state.position += tokens.size(1)
        feats = state.feed if state.feed is not None else self._features(h, y, ctx)
        return self.out_proj(self.dropout(feats)), state

    def reorder(self, state: RNNState, index: Tensor) -> RNNState:
        """Keep rows ``index`` (B',) of the state: beam search's survivors."""
        state.reorder(index)
        return state


# ---- configs of the two families (entries of attnkit.models.FAMILIES) ------------------------
def _arch(preset: str, arch: dict, src_vocab: int, tgt_vocab: int, attention: bool
          ) -> RNNConfig:
    if preset not in PRESETS:
        raise unknown("rnn preset", preset, PRESETS)
    chosen = arch.get("attention")
    if attention and chosen == "none":
        raise ConfigError("arch.attention=none is the RNN without attention: use model=rnn")
    if not attention and chosen not in (None, "none"):
        raise ConfigError(f"model rnn has no attention; for arch.attention={chosen} use "
                          "model=rnn-attention")
    data = {**PRESETS[preset], **arch, "src_vocab_size": src_vocab, "tgt_vocab_size": tgt_vocab}
    if not attention:
        data["attention"] = "none"
    return from_dict(RNNConfig, data, prefix="arch.")


def rnn_attention_arch(preset: str, arch: dict, src_vocab: int, tgt_vocab: int = 0
                       ) -> RNNConfig:
    """The validated config of the attentional RNN: a preset plus ``arch`` overrides."""
    return _arch(preset, arch, src_vocab, tgt_vocab, attention=True)


def rnn_arch(preset: str, arch: dict, src_vocab: int, tgt_vocab: int = 0) -> RNNConfig:
    """The validated config of the RNN without attention (a preset's sizes, attention none)."""
    return _arch(preset, arch, src_vocab, tgt_vocab, attention=False)
