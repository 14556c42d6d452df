"""Greedy and beam search (src/attnkit/decoding.py) against independent references: brute-force
enumeration of every output of a tiny Transformer scored by teacher-forced float64 forward()
log-probabilities and the GNMT length penalty (Wu et al. 2016, eq. 14) computed here; a
hand-made table model where greedy and beam provably differ; greedy against argmax of full
recomputation; EOS, banned-token, max_len and early-stopping behaviour; user errors."""

from __future__ import annotations

import copy
import functools
import itertools
import math

import pytest
import torch

from attnkit.decoding import Hypothesis, beam_search, greedy_search, length_penalty
from attnkit.errors import UserError
from attnkit.models.transformer import Transformer, TransformerConfig

PAD, BOS, EOS = 0, 1, 2
VOCAB = 7
CONTENT = [3, 4, 5, 6]  # the tokens a hypothesis may contain (PAD/BOS banned, EOS ends it)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: intra-op threads only add contention on the shared 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- references ---------------------------------------------------------------------------------
def tiny_model(seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = TransformerConfig(src_vocab_size=VOCAB, d_model=16, n_heads=2, n_encoder_layers=1,
                            n_decoder_layers=2, d_ff=32, max_len=16, dropout=0.0,
                            tie_output=False)
    model = Transformer(cfg).eval()
    # Untied and sharpened output layer: with tied weights at init the model mostly predicts
    # its input token and EOS is always unlikely, so the optimum is always the empty output.
    with torch.no_grad():
        model.out_proj.weight.mul_(3.0)
    return model


def sources() -> torch.Tensor:
    """(4, 5) sources of different lengths, right-padded."""
    return torch.tensor([[3, 4, 5, 6, 3],
                         [6, 6, 4, PAD, PAD],
                         [5, 3, PAD, PAD, PAD],
                         [4, 5, 3, 3, PAD]])


def gnmt_lp(length: int, alpha: float) -> float:
    """((5 + |Y|) / 6) ** alpha, written out independently of decoding.length_penalty."""
    return math.pow((5.0 + length) / 6.0, alpha)


@functools.cache
def all_outputs(seed: int, src: tuple[int, ...], max_len: int) -> list[tuple[float, tuple]]:
    """Every output y1..yd EOS with d < max_len (|Y| = d + 1 <= max_len, EOS counted) of
    ``tiny_model(seed)`` with its teacher-forced float64 log-probability, as (logprob, tokens).

    As decoding.py documents, PAD/BOS are never generated and only EOS may be taken at step
    max_len; the probabilities are those of the full softmax (banned tokens are removed, not
    renormalised)."""
    ref = tiny_model(seed).double()
    out = []
    with torch.no_grad():
        for d in range(max_len):
            seqs = [list(p) + [EOS] for p in itertools.product(CONTENT, repeat=d)]
            y = torch.tensor(seqs)                                  # (N, d + 1)
            tgt_in = torch.cat([torch.full((len(seqs), 1), BOS), y[:, :-1]], dim=1)
            src_n = torch.tensor([src]).expand(len(seqs), -1)       # (N, S)
            logits = ref(src_n, tgt_in).logits                      # (N, d + 1, V)
            logp = torch.log_softmax(logits, dim=-1).gather(-1, y[..., None])[..., 0]
            out += [(lp, tuple(seq[:-1])) for seq, lp in zip(seqs, logp.sum(-1).tolist(),
                                                               strict=True)]
    return out


def brute_force(seed: int, src: torch.Tensor, max_len: int,
                alpha: float) -> list[tuple[float, float, tuple[int, ...]]]:
    """All outputs as (score, logprob, tokens), best first; score = logprob / lp(|Y|)."""
    outputs = all_outputs(seed, tuple(src.tolist()), max_len)
    scored = [(lp / gnmt_lp(len(tokens) + 1, alpha), lp, tokens) for lp, tokens in outputs]
    return sorted(scored, key=lambda r: -r[0])


def live_prefixes(depth: int) -> int:
    return len(CONTENT) ** depth


def exact_beam(max_len: int) -> int:
    # Beam search here is exact when no candidate is ever pruned. At step t (0-based) the live
    # hypotheses have t tokens, at most |CONTENT|^t of them, and they propose
    # |CONTENT|^(t+1) live continuations plus |CONTENT|^t EOS endings. decoding.py keeps the
    # best K live ones and only the EOS endings ranked above the K-th kept live one, so nothing
    # is lost if K > |CONTENT|^(t+1) for every step but the last (t <= max_len - 2; the last
    # step offers EOS only); then the 2K top-k candidates also cover all of them. So
    # K = |CONTENT|^(max_len - 1) + 1: 17 for max_len 3, 65 for max_len 4. The stopping rule
    # (best live log-prob / lp(max_len) <= K-th finished score) is a valid bound for alpha >= 0.
    return live_prefixes(max_len - 1) + 1


# -- 1. exhaustive optimum ----------------------------------------------------------------------
@pytest.mark.parametrize("alpha", [0.0, 0.6, 1.0])
@pytest.mark.parametrize("max_len", [2, 3, 4])
def test_beam_returns_brute_force_optimum(alpha, max_len):
    model, src = tiny_model(), sources()
    beam = max(exact_beam(max_len), VOCAB)  # max_len 2: beam = |V| = 7 (exact needs 5)
    got = beam_search(model, src, max_len, beam_size=beam, alpha=alpha)
    for i in range(src.size(0)):
        best_score, best_lp, best_tokens = brute_force(0, src[i], max_len, alpha)[0]
        (hyp,) = got[i]
        assert hyp.tokens == list(best_tokens)
        assert hyp.score == pytest.approx(best_score, abs=1e-5)
        assert hyp.logprob == pytest.approx(best_lp, abs=1e-5)


def test_brute_force_optima_are_not_trivial():
    # The exhaustive test above is only strong if the optimum varies in length across sources
    # and alphas, and if greedy sometimes misses it (so beam search has work to do).
    model, src = tiny_model(), sources()
    greedy = greedy_search(model, src, 4)
    best = {(i, a): brute_force(0, src[i], 4, a)[0][2] for i in range(4) for a in (0, 1)}
    assert len({len(tokens) for tokens in best.values()}) >= 3
    assert any(list(tokens) != greedy[i] for (i, _), tokens in best.items())


@pytest.mark.parametrize("alpha", [0.0, 1.0])
@pytest.mark.parametrize("beam,max_len", [(17, 3), (3, 8)])  # exact; small beam, early stops
def test_batched_beam_equals_one_source_at_a_time(alpha, beam, max_len):
    model, src = tiny_model(), sources()
    batched = beam_search(model, src, max_len, beam_size=beam, alpha=alpha, nbest=3)
    for i in range(src.size(0)):
        row = src[i:i + 1]
        row = row[:, : int((row != PAD).sum())]  # unpadded
        (single,) = beam_search(model, row, max_len, beam_size=beam, alpha=alpha, nbest=3)
        assert [h.tokens for h in batched[i]] == [h.tokens for h in single]
        for a, b in zip(batched[i], single, strict=True):
            assert a.score == pytest.approx(b.score, abs=1e-5)


@pytest.mark.parametrize("alpha", [0.0, 0.6])
def test_nbest_is_sorted_and_matches_brute_force_ranking(alpha):
    model, src, n, max_len = tiny_model(), sources(), 8, 3
    got = beam_search(model, src, max_len, beam_size=exact_beam(max_len), alpha=alpha, nbest=n)
    for i in range(src.size(0)):
        ranking = brute_force(0, src[i], max_len, alpha)
        hyps = got[i]
        assert len(hyps) == n
        scores = [h.score for h in hyps]
        assert scores == sorted(scores, reverse=True)
        assert scores == pytest.approx([r[0] for r in ranking[:n]], abs=1e-5)
        for j, h in enumerate(hyps):
            # tokens must match wherever the brute-force ranking has no near-tie
            gap_before = ranking[j - 1][0] - ranking[j][0] if j else math.inf
            gap_after = ranking[j][0] - ranking[j + 1][0]
            if min(gap_before, gap_after) > 1e-4:
                assert h.tokens == list(ranking[j][2])
            assert h.score == pytest.approx(h.logprob / gnmt_lp(len(h.tokens) + 1, alpha))


def test_length_penalty_matches_gnmt_formula():
    for length, alpha in [(1, 0.0), (1, 0.6), (7, 0.6), (20, 1.0), (3, 2.0)]:
        assert length_penalty(length, alpha) == pytest.approx(gnmt_lp(length, alpha), rel=1e-12)
    assert length_penalty(1, 1.0) == 1.0  # (5 + 1) / 6


# -- 2. a table model where greedy and beam differ ----------------------------------------------
class TableState:
    def __init__(self, b: int) -> None:
        self.prefixes: list[tuple[int, ...]] = [() for _ in range(b)]

    def reorder(self, index: torch.Tensor) -> None:
        self.prefixes = [self.prefixes[i] for i in index.tolist()]


class TableModel:
    """Next-token probabilities looked up by prefix: table[prefix] = {token: p}; tokens absent
    from an entry get probability ``floor``; unknown prefixes use ``default``."""

    def __init__(self, table: dict, default: dict, vocab: int = VOCAB, floor: float = 1e-9):
        self.table, self.default, self.vocab, self.floor = table, default, vocab, floor
        self.steps = 0

    def start(self, src: torch.Tensor, max_len: int) -> TableState:
        return TableState(src.size(0))

    def reorder(self, state: TableState, index: torch.Tensor) -> TableState:
        state.reorder(index)
        return state

    def step(self, state: TableState, tokens: torch.Tensor) -> tuple[torch.Tensor, TableState]:
        self.steps += 1
        logits = torch.empty(len(state.prefixes), self.vocab)
        for r, tok in enumerate(tokens[:, -1].tolist()):
            if tok != BOS:
                state.prefixes[r] = state.prefixes[r] + (tok,)
            probs = self.table.get(state.prefixes[r], self.default)
            logits[r] = torch.tensor([math.log(probs.get(v, self.floor))
                                      for v in range(self.vocab)])
        return logits, state  # (B, V)

    def logprob(self, seq: list[int]) -> float:
        """Reference log P(seq EOS) from the table itself, float64 log-softmax per step."""
        total, prefix = 0.0, ()
        for tok in [*seq, EOS]:
            probs = self.table.get(prefix, self.default)
            logits = torch.tensor([math.log(probs.get(v, self.floor)) for v in range(self.vocab)],
                                  dtype=torch.float64)
            total += torch.log_softmax(logits, -1)[tok].item()
            prefix = prefix + (tok,)
        return total


A, B = 3, 4
GARDEN_PATH = TableModel(
    table={(): {A: 0.55, B: 0.45},                # greedy takes A ...
           (A,): {A: 0.46, B: 0.44, EOS: 0.10},   # ... but every continuation of A is weak
           (B,): {A: 0.90, B: 0.05, EOS: 0.05}},  # while B A has probability 0.405 > 0.253
    default={EOS: 0.99, A: 0.005, B: 0.005})


def test_beam_escapes_the_greedy_garden_path():
    src = torch.tensor([[5, 6], [6, 5]])
    assert greedy_search(GARDEN_PATH, src, max_len=3) == [[A, A], [A, A]]
    for hyps in beam_search(GARDEN_PATH, src, max_len=3, beam_size=2, alpha=0.0, nbest=2):
        assert [h.tokens for h in hyps] == [[B, A], [A, A]]
        assert hyps[0].logprob == pytest.approx(GARDEN_PATH.logprob([B, A]), abs=1e-5)
        assert hyps[1].logprob == pytest.approx(GARDEN_PATH.logprob([A, A]), abs=1e-5)
        assert GARDEN_PATH.logprob([B, A]) > GARDEN_PATH.logprob([A, A])
    (beam1,) = beam_search(GARDEN_PATH, src[:1], max_len=3, beam_size=1, alpha=0.0)
    assert beam1[0].tokens == [A, A]  # beam 1 is greedy


def test_length_penalty_lets_a_longer_hypothesis_win_after_a_finished_one():
    # Beam 1, alpha 1: at step 1 "EOS" (p 0.5) finishes with score log 0.5 / lp(1) = -0.693
    # while "A" (p 0.45) lives on; "A EOS" then scores log(0.45 * 0.999) / lp(2) = -0.686 and
    # wins. The stopping rule must not end the search after step 1: the live log-prob -0.799
    # bounds the final score only after division by lp(max_len), not as it stands.
    model = TableModel(table={(): {EOS: 0.5, A: 0.45, B: 0.05}}, default={EOS: 0.999, A: 0.001})
    src = torch.tensor([[5]])
    scores = {(): model.logprob([]) / gnmt_lp(1, 1.0), (A,): model.logprob([A]) / gnmt_lp(2, 1.0)}
    assert scores[(A,)] > scores[()]
    (hyps,) = beam_search(model, src, max_len=3, beam_size=1, alpha=1.0)
    assert hyps[0].tokens == [A]
    assert hyps[0].score == pytest.approx(scores[(A,)], abs=1e-5)
    assert greedy_search(model, src, max_len=3) == [[]]


# -- 3. greedy against beam 1 and against full recomputation -----------------------------------
def test_greedy_equals_beam_size_one():
    model, src = tiny_model(seed=3), sources()
    for max_len in (1, 3, 6):
        greedy = greedy_search(model, src, max_len)
        beam = beam_search(model, src, max_len, beam_size=1, alpha=0.0)
        assert greedy == [hyps[0].tokens for hyps in beam]


def full_recompute_greedy(model: Transformer, src: torch.Tensor, max_len: int) -> list[int]:
    """Greedy by argmax of forward() on the whole growing prefix (no cache), float64."""
    ref = copy.deepcopy(model).double()
    prefix = [BOS]
    with torch.no_grad():
        for t in range(max_len):
            logits = ref(src[None], torch.tensor([prefix])).logits[0, -1]  # (V,)
            logits[[PAD, BOS]] = -math.inf
            if t == max_len - 1:
                logits[[v for v in range(VOCAB) if v != EOS]] = -math.inf
            tok = int(logits.argmax())
            if tok == EOS:
                break
            prefix.append(tok)
    return prefix[1:]


@pytest.mark.parametrize("seed", [0, 1])
def test_cached_greedy_equals_full_recomputation(seed):
    model, src, max_len = tiny_model(seed), sources(), 8
    got = greedy_search(model, src, max_len)
    for i in range(src.size(0)):
        row = src[i, : int((src[i] != PAD).sum())]
        assert got[i] == full_recompute_greedy(model, row, max_len)


def test_cached_step_logits_equal_forward():
    model, src = tiny_model(), sources()
    tgt = torch.tensor([[BOS, 3, 4, 5, 6, 3]] * src.size(0))
    with torch.no_grad():
        full = model(src, tgt).logits  # (B, T, V)
        state = model.start(src, tgt.size(1))
        steps = torch.stack([model.step(state, tgt[:, t:t + 1])[0]
                             for t in range(tgt.size(1))], 1)
    torch.testing.assert_close(steps, full, atol=1e-5, rtol=1e-5)


# -- 4. EOS, banned tokens, max_len, early stop -------------------------------------------------
def test_outputs_never_contain_banned_or_eos_and_respect_max_len():
    # PAD and BOS are the most probable tokens everywhere; EOS is next, then A.
    wants_banned = TableModel(table={}, default={PAD: 0.5, BOS: 0.3, EOS: 0.15, A: 0.05})
    src = torch.tensor([[5], [6]])
    assert greedy_search(wants_banned, src, max_len=5) == [[], []]
    for hyps in beam_search(wants_banned, src, max_len=5, beam_size=3, nbest=3):
        for h in hyps:
            assert not {PAD, BOS, EOS} & set(h.tokens)
    # never ends by itself: outputs are closed with EOS at max_len (|Y| = max_len, EOS counted)
    never_ends = TableModel(table={}, default={PAD: 0.5, A: 0.3, B: 0.2})
    for max_len in (1, 2, 5):
        assert greedy_search(never_ends, src, max_len) == [[A] * (max_len - 1)] * 2
        for hyps in beam_search(never_ends, src, max_len, beam_size=3, alpha=0.0, nbest=3):
            assert hyps[0].tokens == [A] * (max_len - 1)
            assert all(len(h.tokens) <= max_len - 1 for h in hyps)
            assert not {PAD, BOS, EOS} & {t for h in hyps for t in h.tokens}
    # real model: every output is free of specials and shorter than max_len
    model = tiny_model()
    for max_len in (1, 2, 4):
        for row in greedy_search(model, sources(), max_len):
            assert len(row) <= max_len - 1 and not {PAD, BOS, EOS} & set(row)
        for hyps in beam_search(model, sources(), max_len, beam_size=4, nbest=4):
            for h in hyps:
                assert len(h.tokens) <= max_len - 1 and not {PAD, BOS, EOS} & set(h.tokens)


def test_stops_at_eos_and_search_stops_early():
    # EOS first with probability ~1: nothing follows it, and decoding must not run to max_len.
    eos_now = TableModel(table={}, default={EOS: 0.97, A: 0.02, B: 0.01})
    src = torch.tensor([[5], [6], [3]])
    assert greedy_search(eos_now, src, max_len=50) == [[], [], []]
    assert eos_now.steps == 1
    eos_now.steps = 0
    (hyps,) = beam_search(eos_now, src[:1], max_len=50, beam_size=1, alpha=0.0)
    assert hyps[0].tokens == [] and eos_now.steps == 1
    eos_now.steps = 0
    out = beam_search(eos_now, src, max_len=50, beam_size=3, alpha=0.6, nbest=3)
    assert all(h[0].tokens == [] for h in out)
    assert eos_now.steps < 10  # the stopping bound ends the search long before max_len
    # greedy stops at the step where every row has produced EOS
    staggered = TableModel(table={(): {A: 0.9, EOS: 0.1}, (A,): {A: 0.9, EOS: 0.1},
                                  (A, A): {EOS: 0.9, A: 0.1}}, default={EOS: 0.9, A: 0.1})
    assert greedy_search(staggered, src, max_len=50) == [[A, A]] * 3
    assert staggered.steps == 3


def test_hypothesis_fields():
    (hyps,) = beam_search(GARDEN_PATH, torch.tensor([[5]]), max_len=3, beam_size=2, alpha=1.0)
    h = hyps[0]
    assert isinstance(h, Hypothesis)
    assert h.score == pytest.approx(h.logprob / gnmt_lp(len(h.tokens) + 1, 1.0), abs=1e-6)


# -- 5. errors -----------------------------------------------------------------------------------
@pytest.mark.parametrize("max_len", [0, -1])
def test_max_len_below_one_is_a_user_error(max_len):
    src = torch.tensor([[5]])
    with pytest.raises(UserError):
        greedy_search(GARDEN_PATH, src, max_len)
    with pytest.raises(UserError):
        beam_search(GARDEN_PATH, src, max_len)


@pytest.mark.parametrize("nbest,beam", [(3, 2), (0, 2), (5, 4)])
def test_nbest_outside_beam_is_a_user_error(nbest, beam):
    with pytest.raises(UserError):
        beam_search(GARDEN_PATH, torch.tensor([[5]]), 3, beam_size=beam, nbest=nbest)
