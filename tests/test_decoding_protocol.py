"""The decoding protocol (start / step / reorder) of every family, against references.

- cached decoding equals full recomputation, greedy and beam, for the seq2seq Transformer, the
  RNN, the attentional RNNs (Bahdanau, Luong), GPT-2 and Transformer-XL: the same loops run
  over a reference that implements the protocol by calling ``forward`` on the whole text so
  far (float64), row by row;
- beam search against brute-force enumeration of every output of a tiny vocabulary, scored by
  teacher-forced float64 forward passes (attentional RNN, Transformer-XL);
- GPT-2 past its context: each token is the argmax of a forward pass over the last
  ``n_positions`` tokens (the last ``context - 1`` and the newest), recomputed explicitly; also
  left-padded batches, prompts longer than the context, seeded sampling and beam search;
- issue 21's documented example: ``attnkit generate RUN "ROMEO:" --max-new-tokens 200`` on an
  "lm" run with the default context of 64 works and says once (stderr) that the window slides.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from torch import nn

from attnkit.cli import main
from attnkit.decoding import beam_search, greedy_search, length_penalty
from attnkit.generation import GenerationConfig, generate
from attnkit.models import build_seq2seq
from attnkit.models.gpt2 import GPT2, GPT2Config
from attnkit.models.transformer import Transformer, TransformerConfig
from attnkit.models.transformer_xl import TransformerXL, xl_arch

PAD, BOS, EOS = 0, 1, 2


# -- references: the protocol by full recomputation -----------------------------------------------
class Seq2SeqRecompute:
    """start/step/reorder by ``forward(src, BOS + prefix)`` on the whole prefix, in float64."""

    def __init__(self, model) -> None:
        self.model = copy.deepcopy(model).double().eval()

    def start(self, src, max_len):
        return {"src": src, "prefix": torch.empty((src.size(0), 0), dtype=torch.long)}

    def step(self, state, tokens):
        state["prefix"] = torch.cat([state["prefix"], tokens.cpu()], 1)
        return self.model(state["src"], state["prefix"]).logits[:, -1], state

    def reorder(self, state, index):
        return {k: v[index.cpu()] for k, v in state.items()}


class LMRecompute(nn.Module):
    """start/step/reorder by ``forward`` on each row's real tokens (its last ``window``), one
    row at a time, in float64: no cache, no padding, no memory."""

    def __init__(self, model, window: int | None = None) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).double().eval()
        self.config = getattr(model, "config", None) or model.cfg
        self.window = window

    def start(self, input_ids, attention_mask=None, max_new_tokens=0):
        real = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None \
            else attention_mask.bool()
        return [ids[keep].tolist() for ids, keep in zip(input_ids, real, strict=True)], True

    def step(self, state, tokens):
        rows, first = state
        if not first:
            rows = [r + t for r, t in zip(rows, tokens.tolist(), strict=True)]
        logits = torch.stack([self.model(torch.tensor([r[-(self.window or len(r)):]]))
                              .logits[0, -1] for r in rows])
        return logits, (rows, False)

    def reorder(self, state, index):
        return [list(state[0][i]) for i in index.tolist()], state[1]


# -- tiny models ----------------------------------------------------------------------------------
def transformer(vocab: int = 7, seed: int = 0):
    torch.manual_seed(seed)
    model = Transformer(TransformerConfig(src_vocab_size=vocab, d_model=16, n_heads=2,
                                          n_encoder_layers=1, n_decoder_layers=2, d_ff=32,
                                          max_len=16, dropout=0.0, tie_output=False))
    with torch.no_grad():
        model.out_proj.weight.mul_(3.0)
    return model


def rnn(vocab: int = 7, seed: int = 0, **arch):
    torch.manual_seed(seed)
    sizes = dict(embed_size=12, hidden_size=16, dropout=0.0)
    family = "rnn" if arch.get("attention") == "none" else "rnn-attention"
    model, _ = build_seq2seq(family, "tiny", {**sizes, **arch}, vocab)
    with torch.no_grad():  # wider logits: varied outputs (the init is uniform +-0.1)
        model.out_proj.weight.mul_(20.0)
    return model


SEQ2SEQ = {
    "transformer": transformer,
    "rnn": lambda **kw: rnn(attention="none", **kw),
    "rnn-attention": lambda **kw: rnn(**kw),
    "rnn-attention-luong": lambda: rnn(cell="lstm", attention="luong", bidirectional=False,
                                       seed=3),
}


def gpt2(vocab: int = 11, context: int = 48, seed: int = 0) -> GPT2:
    torch.manual_seed(seed)
    return GPT2(GPT2Config(vocab_size=vocab, n_positions=context, d_model=16, n_heads=2,
                           n_layers=2, dropout=0.0, attention_dropout=0.0, init_std=0.4)).eval()


def xl(vocab: int = 11, seed: int = 0) -> TransformerXL:
    torch.manual_seed(seed)
    model = TransformerXL(xl_arch("tiny", {"d_model": 16, "n_heads": 2, "n_layers": 2,
                                           "d_ff": 32, "mem_len": 64, "dropout": 0.0,
                                           "tie_output": False}, vocab))
    with torch.no_grad():
        model.head.weight.mul_(40.0)  # wider logits: varied outputs
    return model.eval()


def sources() -> torch.Tensor:
    return torch.tensor([[3, 4, 5, 6, 3], [6, 6, 4, PAD, PAD], [5, 3, PAD, PAD, PAD]])


# -- cached = recomputed --------------------------------------------------------------------------
@pytest.mark.parametrize("family", SEQ2SEQ)
def test_seq2seq_cached_decoding_equals_recomputation(family):
    model = SEQ2SEQ[family]().double().eval()
    ref, src = Seq2SeqRecompute(model), sources()
    with torch.no_grad():
        greedy = greedy_search(model, src, 8)
        assert greedy == greedy_search(ref, src, 8)
        assert len({len(r) for r in greedy}) > 1 or max(map(len, greedy)) > 2  # not trivial
        got = beam_search(model, src, [6, 8, 5], beam_size=3, alpha=0.6, nbest=3)
        want = beam_search(ref, src, [6, 8, 5], beam_size=3, alpha=0.6, nbest=3)
    for g, w in zip(got, want, strict=True):
        assert [h.tokens for h in g] == [h.tokens for h in w]
        assert [h.score for h in g] == pytest.approx([h.score for h in w], abs=1e-9)


LM_CONFIGS = [
    GenerationConfig(max_new_tokens=20),
    GenerationConfig(max_new_tokens=20, do_sample=True, seed=3, top_k=5),
    GenerationConfig(max_new_tokens=6, num_beams=4, eos_id=2, length_penalty=1.0),
]


@pytest.mark.parametrize("cfg", LM_CONFIGS, ids=["greedy", "sample", "beam"])
@pytest.mark.parametrize("family", ["gpt2", "transformer-xl"])
def test_lm_cached_decoding_equals_recomputation(family, cfg):
    model = (gpt2() if family == "gpt2" else xl()).double()
    prompts = [[1, 5, 3, 6, 0, 4, 2], [6], [4, 3, 0]]  # XL: one at a time (no mask)
    got = generate(model, prompts, cfg)
    assert got == generate(LMRecompute(model), prompts, cfg)
    assert len({t for row in got for t in row}) > 3  # varied outputs


# -- beam search against brute force --------------------------------------------------------------
def best_by_enumeration(logprob, content: list[int], ends: list[int], n: int, alpha: float):
    """The best output of up to n tokens ending in one of ``ends`` (any token at length n)."""
    best, best_score = None, -math.inf
    for length in range(1, n + 1):
        for head in itertools.product(content, repeat=length - 1):
            for last in ends if length < n else content + ends:
                seq = [*head, last]
                score = logprob(seq) / length_penalty(length, alpha)
                if score > best_score:
                    best, best_score = seq, score
    return best


@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_rnn_attention_beam_equals_brute_force(alpha):
    model = rnn(vocab=6, seed=2).double().eval()
    content, n = [3, 4, 5], 3

    def logprob(src, seq):  # seq ends with EOS
        tgt_in = torch.tensor([[BOS, *seq[:-1]]])
        logp = torch.log_softmax(model(src[None], tgt_in).logits[0], -1)
        return sum(float(logp[i, t]) for i, t in enumerate(seq))

    src = torch.tensor([[3, 4, 5, 3], [5, 5, PAD, PAD]])
    with torch.no_grad():
        got = beam_search(model, src, n, beam_size=len(content) ** (n - 1) + 1, alpha=alpha)
        for i in range(2):
            row = src[i, : int((src[i] != PAD).sum())]
            best = best_by_enumeration(lambda s, r=row: logprob(r, s), content, [EOS], n, alpha)
            if len(best) == n and best[-1] != EOS:
                continue  # not an output (the last step offers EOS only)
            assert got[i][0].tokens == best[:-1]


def test_transformer_xl_beam_equals_brute_force():
    model = xl(vocab=5, seed=6).double()
    prompt = [1, 4, 2]

    def logprob(seq):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + seq])).logits[0], -1)
        return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))

    best = best_by_enumeration(logprob, [1, 2, 3, 4], [0], 4, 1.0)
    cfg = GenerationConfig(max_new_tokens=4, num_beams=64, eos_id=0, length_penalty=1.0)
    assert generate(model, [prompt], cfg)[0] == best
    greedy = generate(model, [prompt], GenerationConfig(max_new_tokens=4, eos_id=0))[0]
    assert greedy != best  # the memory must follow the hypotheses to find it


# -- GPT-2 past its context: the window slides ----------------------------------------------------
def window_greedy(model: GPT2, prompt: list[int], n: int) -> list[int]:
    """Greedy by argmax of forward() on the last n_positions tokens, float64, no cache."""
    ref, context, seq = copy.deepcopy(model).double(), model.config.n_positions, list(prompt)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(ref(torch.tensor([seq[-context:]])).logits[0, -1].argmax()))
    return seq[len(prompt):]


def test_generation_past_the_context_equals_recomputing_the_last_window():
    model = gpt2(context=12, seed=2).double()
    prompts = [[3, 1, 4, 1, 5], [9, 2], list(range(1, 11)) * 2]  # the last is longer than 12
    got = generate(model, prompts, GenerationConfig(max_new_tokens=30))
    assert got == [window_greedy(model, p, 30) for p in prompts]
    assert all(len(set(r[15:])) > 2 for r in got)  # varied after the slide
    for cfg in LM_CONFIGS[1:]:  # sampling and beam search: the same loop over a window
        long = GenerationConfig(**{**vars(cfg), "max_new_tokens": 16})
        assert generate(model, prompts, long) == generate(LMRecompute(model, 12), prompts, long)


def test_truncate_still_fits_the_prompt_to_the_context():
    model = gpt2(context=12).double()
    long = list(range(1, 11)) * 2
    cfg = GenerationConfig(max_new_tokens=5, truncate=True)
    assert generate(model, [long], cfg) == generate(model, [long[-7:]], cfg)


def test_cli_generates_past_the_default_lm_context(tmp_path, capsys):
    """Issue 21: the README's example on a default "lm" run (context 64) was refused."""
    from attnkit import load

    data = tmp_path / "text.txt"
    data.write_text("ROMEO: but soft, what light through yonder window breaks?\n" * 40,
                    encoding="utf-8")
    run = tmp_path / "run"
    sets = ["arch.n_layers=1", "arch.d_model=32", "arch.n_heads=2", "train.steps=2",
            "train.threads=1", "sample.n=0", "train.eval_every=2", "eval.max_chars=200",
            f"data.train={data}", f"run_dir={run}"]
    assert main(["train", "lm", *[a for s in sets for a in ("--set", s)]]) == 0
    loaded = load(run)
    model, tok = loaded.model, loaded.tokenizer
    assert model.config.n_positions == 64
    capsys.readouterr()
    assert main(["generate", str(run), "ROMEO:", "--max-new-tokens", "200", "--greedy"]) == 0
    out, err = capsys.readouterr()
    assert err.count("\n") == 1 and "window slides" in err and "64" in err
    ids = tok.encode("ROMEO:")
    new = window_greedy(model, ids, 200)
    if tok.eos_id in new:
        new = new[: new.index(tok.eos_id)]
    assert out == "ROMEO:" + tok.decode(new) + "\n"
    assert main(["generate", str(run), "ROMEO:"]) == 0  # the default 64 new tokens
    assert capsys.readouterr().err.count("window slides") == 1
