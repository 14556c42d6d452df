"""Text generation (src/attnkit/generation.py) against independent references.

- transformers' GPT2LMHeadModel.generate (greedy, 50 tokens; a left-padded batch) with the same
  weights copied through attnkit.convert;
- full recomputation without a cache, argmax at every step, in float64;
- the same prompts one at a time (greedy, sampling, repetition penalty, beam search);
- the logit filters against plain-Python float64 loops, and sampled frequencies against the
  filtered distribution (a chi-square bound, fixed seed);
- beam search against brute-force enumeration of every output of a tiny vocabulary;
- stop strings and streaming (byte-level pieces that end inside a UTF-8 character);
- every bad input's one-line error, also through the CLI (exit code 2).
"""

from __future__ import annotations

import itertools
import math
from types import SimpleNamespace

import pytest
import torch
import transformers  # a dev dependency: its absence is a failure, not a skip
from torch import nn

from attnkit.cli import main as cli_main
from attnkit.decoding import length_penalty
from attnkit.errors import ConfigError, UserError
from attnkit.generation import (
    GenerationConfig,
    TextStream,
    generate,
    generate_text,
    process_logits,
)
from attnkit.models.gpt2 import GPT2, GPT2Config


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: extra intra-op threads only add contention on the shared machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# -- models -------------------------------------------------------------------------------------
def hf_pair(vocab: int = 97, seed: int = 0, std: float = 0.3):
    """A random transformers GPT-2 and ours with its weights (larger init: varied outputs)."""
    from attnkit.convert.gpt2 import build, config_from_hf, state_from_hf

    torch.manual_seed(seed)
    hc = transformers.GPT2Config(vocab_size=vocab, n_positions=96, n_embd=32, n_layer=2,
                                 n_head=4, initializer_range=std, bos_token_id=vocab - 1,
                                 eos_token_id=vocab - 1)
    hf = transformers.GPT2LMHeadModel(hc).eval()
    cfg = config_from_hf(hc.to_dict())
    ours = build(cfg)
    ours.load_state_dict(state_from_hf(hf.state_dict(), cfg))
    return hf, ours.eval()


def tiny_gpt2(vocab: int = 11, seed: int = 0) -> GPT2:
    """A float64 GPT-2 with wide logits (so that argmax ties are practically impossible)."""
    torch.manual_seed(seed)
    model = GPT2(GPT2Config(vocab_size=vocab, n_positions=48, d_model=16, n_heads=2, n_layers=2,
                            dropout=0.0, attention_dropout=0.0, init_std=0.4))
    return model.double().eval()


class HistoryCache:
    """Every token seen so far (B, S) and whether it is real (not a left pad)."""

    def __init__(self, prompt_real: torch.Tensor) -> None:
        batch = prompt_real.size(0)
        self.prompt_real = prompt_real  # (B, P) the prompts' attention mask
        self.ids = torch.empty((batch, 0), dtype=torch.long)
        self.real = torch.empty((batch, 0), dtype=torch.bool)

    def reorder(self, index: torch.Tensor) -> None:
        self.ids, self.real = self.ids[index], self.real[index]
        self.prompt_real = self.prompt_real[index]


class TableLM(nn.Module):
    """Next-token logits table[last token, (sum of all real tokens) mod M]: depends on the whole
    history, so a wrongly reordered cache or a counted pad changes the output."""

    M = 5

    def __init__(self, vocab: int = 4, context: int = 64, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.table = nn.Parameter(2 * torch.randn(vocab, self.M, vocab, generator=g,
                                                  dtype=torch.float64), requires_grad=False)
        self.config = SimpleNamespace(vocab_size=vocab, n_positions=context)

    def next_logits(self, history: list[int]) -> torch.Tensor:
        """The reference: logits (V,) after ``history`` (real tokens only)."""
        return self.table[history[-1], sum(history) % self.M]

    def start(self, input_ids, attention_mask=None, max_new_tokens=0) -> HistoryCache:
        return HistoryCache(torch.ones_like(input_ids, dtype=torch.bool)
                            if attention_mask is None else attention_mask.bool())

    def reorder(self, state: HistoryCache, index: torch.Tensor) -> HistoryCache:
        state.reorder(index)
        return state

    def step(self, state: HistoryCache, ids: torch.Tensor):
        real = (state.prompt_real if state.ids.size(1) == 0
                else torch.ones_like(ids, dtype=torch.bool))
        c = state
        c.ids, c.real = torch.cat([c.ids, ids], 1), torch.cat([c.real, real], 1)
        total = (c.ids * c.real).sum(1) % self.M
        return self.table[ids[:, -1], total], state  # (B, V)


class ConstLM(TableLM):
    """The same logits at every step, whatever came before."""

    def __init__(self, logits: list[float], context: int = 4096) -> None:
        super().__init__(len(logits), context)
        self.logits = torch.tensor(logits, dtype=torch.float64)

    def step(self, state, ids):
        return self.logits.expand(ids.size(0), -1), state


class ScriptLM(TableLM):
    """Emits ``script`` token by token (step i: a large logit on script[i])."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__(vocab, context=256)
        self.script, self.calls = script, 0

    def start(self, input_ids, attention_mask=None, max_new_tokens=0) -> None:
        self.calls = 0

    def step(self, state, ids):
        logits = torch.zeros(ids.size(0), self.config.vocab_size, dtype=torch.float64)
        logits[:, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits, state


# -- parity with transformers and with recomputation ---------------------------------------------
def test_greedy_50_tokens_equal_transformers():
    hf, ours = hf_pair()
    prompt = [5, 17, 42, 8, 3, 60]
    got = generate(ours, [prompt], GenerationConfig(max_new_tokens=50))[0]
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=50, min_new_tokens=50,
                      do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
    assert len(set(ref)) > 5  # a varied sequence, not one token repeated
    assert got == ref


def test_padded_batch_greedy_equals_transformers():
    hf, ours = hf_pair(seed=1)
    prompts = [[5, 17, 42, 8, 3, 60], [9, 1], [33, 4, 4]]
    got = generate(ours, prompts, GenerationConfig(max_new_tokens=20))
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ref = hf.generate(ids, attention_mask=mask, max_new_tokens=20, min_new_tokens=20,
                      do_sample=False, pad_token_id=0)[:, width:].tolist()
    assert got == ref


def test_cached_generation_equals_full_recomputation():
    model = tiny_gpt2(vocab=11)
    prompt = [3, 1, 4, 1, 5]
    got = generate(model, [prompt], GenerationConfig(max_new_tokens=30))[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(30):
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    assert got == seq[len(prompt):]
    assert len(set(got)) > 3


def test_repetition_penalty_equals_recomputed_reference():
    model = tiny_gpt2(vocab=11, seed=3)
    prompt, theta = [3, 1, 4, 1, 5], 3.0
    cfg = GenerationConfig(max_new_tokens=25, repetition_penalty=theta)
    got = generate(model, [prompt], cfg)[0]
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(25):
            logits = model(torch.tensor([seq])).logits[0, -1].tolist()
            penalised = [(v / theta if v > 0 else v * theta) if i in seq else v
                         for i, v in enumerate(logits)]
            seq.append(max(range(len(penalised)), key=penalised.__getitem__))
    plain = generate(model, [prompt], GenerationConfig(max_new_tokens=25))[0]
    assert got == seq[len(prompt):]
    assert got != plain


@pytest.mark.parametrize("model_kind", ["gpt2", "table"])
@pytest.mark.parametrize("cfg", [
    GenerationConfig(max_new_tokens=12),
    GenerationConfig(max_new_tokens=12, do_sample=True, seed=7, temperature=0.8, top_k=6,
                     top_p=0.9),
    GenerationConfig(max_new_tokens=12, repetition_penalty=1.8, eos_id=2),
    GenerationConfig(max_new_tokens=6, num_beams=3, eos_id=2, repetition_penalty=1.3),
], ids=["greedy", "sample", "penalty-eos", "beam"])
def test_left_padded_batch_equals_one_at_a_time(model_kind, cfg):
    model = tiny_gpt2(vocab=11) if model_kind == "gpt2" else TableLM(vocab=7)
    prompts = [[1, 5, 3, 6, 0, 4, 2], [6], [4, 3, 0]]
    batch = generate(model, prompts, cfg)
    seed = cfg.seed or 0
    alone = [generate(model, [p], GenerationConfig(**{**vars(cfg), "seed": seed + i}))[0]
             for i, p in enumerate(prompts)]
    assert batch == alone


def test_eos_ends_a_row_and_min_new_tokens_forbids_it():
    model = TableLM(vocab=4, seed=3)
    free = generate(model, [[0], [1], [2], [3]], GenerationConfig(max_new_tokens=20, eos_id=3))
    assert any(len(r) < 20 for r in free)  # some row met EOS early ...
    assert all(r[-1] == 3 or len(r) == 20 for r in free)  # ... and ended with it
    assert all(3 not in r[:-1] for r in free)
    forced = generate(model, [[0], [1], [2], [3]],
                      GenerationConfig(max_new_tokens=20, min_new_tokens=20, eos_id=3))
    assert all(len(r) == 20 and 3 not in r for r in forced)


def test_training_flag_restored_and_zero_temperature_is_greedy():
    model = tiny_gpt2()
    model.train()
    greedy = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8))
    assert model.training
    cold = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8, do_sample=True,
                                                         temperature=0.0))
    top1 = generate(model, [[1, 2, 3]], GenerationConfig(max_new_tokens=8, do_sample=True,
                                                         top_k=1, seed=5))
    assert greedy == cold == top1


# -- logit filters and sampling ------------------------------------------------------------------
def reference_probs(logits: list[float], cfg: GenerationConfig, seen: set[int]) -> list[float]:
    """Penalty, temperature, top-k, top-p and softmax written out in float64 Python."""
    x = []
    for i, v in enumerate(logits):
        if i in seen:
            v = v / cfg.repetition_penalty if v > 0 else v * cfg.repetition_penalty
        x.append(v / cfg.temperature)
    if cfg.top_k:
        kth = sorted(x, reverse=True)[cfg.top_k - 1]
        x = [v if v >= kth else -math.inf for v in x]

    def softmax(v):
        top = max(v)
        e = [math.exp(a - top) if a > -math.inf else 0.0 for a in v]
        return [a / sum(e) for a in e]

    probs = softmax(x)
    keep, mass = set(), 0.0
    for i in sorted(range(len(x)), key=lambda j: -probs[j]):
        if mass >= cfg.top_p:
            break
        keep.add(i)
        mass += probs[i]
    return softmax([v if i in keep else -math.inf for i, v in enumerate(x)])


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7), dict(top_k=3), dict(top_p=0.6), dict(top_p=0.95, temperature=1.7),
    dict(repetition_penalty=1.5), dict(top_k=4, top_p=0.5, temperature=0.5,
                                       repetition_penalty=0.7),
])
def test_filters_equal_float64_reference(kw):
    torch.manual_seed(0)
    cfg = GenerationConfig(do_sample=True, **kw)
    logits = torch.randn(4, 9, dtype=torch.float64) * 2
    seen = torch.rand(4, 9) < 0.4
    got = process_logits(logits, cfg, seen).softmax(-1)
    for row in range(4):
        ref = reference_probs(logits[row].tolist(), cfg, set(seen[row].nonzero()[:, 0].tolist()))
        assert got[row].tolist() == pytest.approx(ref, abs=1e-12)


def test_sampling_frequencies_match_filtered_distribution():
    logits = [1.2, 0.3, -0.5, 2.0, 0.9, -1.5, 0.1]
    cfg = GenerationConfig(max_new_tokens=1000, do_sample=True, temperature=0.9, top_k=5,
                           top_p=0.92, seed=123)
    probs = reference_probs(logits, cfg, set())
    rows = generate(ConstLM(logits), [[0]] * 20, cfg)
    counts = torch.bincount(torch.tensor(rows).flatten(), minlength=len(logits)).tolist()
    n = sum(counts)
    assert all(c == 0 for c, p in zip(counts, probs, strict=True) if p == 0)  # filtered: never
    kept = [(c, p) for c, p in zip(counts, probs, strict=True) if p > 0]
    chi2 = sum((c - n * p) ** 2 / (n * p) for c, p in kept)
    assert len(kept) == 4
    assert chi2 < 16.3  # chi-square, 3 degrees of freedom: P(X > 16.3) = 0.001
    again = generate(ConstLM(logits), [[0]] * 20, cfg)
    assert again == rows  # seeded: reproducible


# -- beam search ---------------------------------------------------------------------------------
def brute_force_best(logprob_of, vocab: int, eos: int | None, n: int, alpha: float
                     ) -> list[int]:
    """The best output by enumeration: up to n tokens, ending at EOS or after n tokens."""
    best, best_score = None, -math.inf
    for length in range(1, n + 1):
        content = [t for t in range(vocab) if t != eos]
        for head in itertools.product(content, repeat=length - 1):
            for last in (range(vocab) if length == n else [eos] if eos is not None else []):
                seq = [*head, last]
                score = logprob_of(seq) / length_penalty(length, alpha)
                if score > best_score:
                    best, best_score = seq, score
    return best


def table_logprob(model: TableLM, prompt: list[int], seq: list[int]) -> float:
    total, history = 0.0, list(prompt)
    for tok in seq:
        total += float(torch.log_softmax(model.next_logits(history), -1)[tok])
        history.append(tok)
    return total


def garden_path(logprob_of, best: list[int], vocab: int, eos: int) -> bool:
    """Whether some prefix of ``best`` is not the most probable prefix of its length: then
    beam search must carry a lower-ranked hypothesis (and its cache rows) to find ``best``."""
    content = [t for t in range(vocab) if t != eos]
    return any(list(max(itertools.product(content, repeat=t), key=lambda s: logprob_of(list(s))))
               != best[:t] for t in range(1, len(best)))


@pytest.mark.parametrize("alpha", [0.0, 0.6, 2.0])
def test_beam_search_equals_brute_force(alpha):
    model = TableLM(vocab=4, seed=9)
    prompts = [[0, 1], [2], [3, 3, 1]]
    cfg = GenerationConfig(max_new_tokens=4, num_beams=64, eos_id=3, length_penalty=alpha)
    got = generate(model, prompts, cfg)
    scorers = [lambda s, p=p: table_logprob(model, p, s) for p in prompts]
    refs = [brute_force_best(f, 4, 3, 4, alpha) for f in scorers]
    assert got == refs
    assert garden_path(scorers[2], refs[2], 4, 3)


def test_beam_search_on_gpt2_equals_brute_force():
    model = tiny_gpt2(vocab=5, seed=9)
    prompt = [1, 4, 2]

    def logprob(seq):
        with torch.no_grad():
            logp = torch.log_softmax(model(torch.tensor([prompt + seq])).logits[0], -1)
        return sum(float(logp[len(prompt) - 1 + i, t]) for i, t in enumerate(seq))

    best = brute_force_best(logprob, 5, 0, 4, 1.0)
    assert garden_path(logprob, best, 5, 0)  # the KV caches must follow the hypotheses
    cfg = GenerationConfig(max_new_tokens=4, num_beams=64, eos_id=0, length_penalty=1.0)
    assert generate(model, [prompt, [3]], cfg)[0] == best
    one = GenerationConfig(max_new_tokens=6, num_beams=1)
    assert generate(model, [prompt], one) == generate(model, [prompt], GenerationConfig(
        max_new_tokens=6))


# -- text: streaming and stop strings ------------------------------------------------------------
@pytest.fixture(scope="module")
def char_tok():
    from attnkit.tokenizers import Tokenizer

    return Tokenizer.train("char", ["the quick brown fox. jumps over; the lazy dog!"])


def test_stop_strings_cut_text_and_stop_generation(char_tok):
    text = "the fox jumps. over the dog"
    model = ScriptLM(char_tok.encode(text), char_tok.vocab_size)
    pieces = []
    cfg = GenerationConfig(max_new_tokens=40, stop=("s. o", "dog"))
    out = generate_text(model, char_tok, ["the"], cfg, stream=lambda r, p: pieces.append(p))
    assert out == ["the fox jump"]
    assert "".join(pieces) == out[0]
    assert model.calls == len("the fox jumps. o")  # stopped at once, no further step
    out = generate_text(model, char_tok, "x", GenerationConfig(max_new_tokens=len(text)))
    assert out == [text]  # no stop strings: everything, EOS-free script


def test_continuation_keeps_the_space_before_its_first_word():
    from attnkit.tokenizers import Tokenizer

    tok = Tokenizer.train("bpe", ["the quick brown fox jumps over the lazy dog"] * 3,
                          vocab_size=60)
    script = tok.encode("jumps over")  # SentencePiece style: "▁jumps" starts a word
    model = ScriptLM(script, tok.vocab_size)
    out = generate_text(model, tok, "the fox", GenerationConfig(max_new_tokens=len(script)))
    assert out == [" jumps over"]
    assert "the fox" + out[0] == tok.decode(tok.encode("the fox") + script)


def test_text_stream_holds_partial_utf8_and_stop_prefixes():
    import tokenizers
    from tokenizers import decoders, models, pre_tokenizers, trainers

    from attnkit.tokenizers import SPECIAL_TOKENS, Tokenizer

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=270, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator(["plain ascii words here"], trainer)
    tok = Tokenizer(backend, "bpe")
    text = "héllo 日本語 😀 ok"
    ids = tok.encode(text)
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # pieces end inside characters
    stream = TextStream(tok, stop=("本語 X",))
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == text == stream.text
    held = TextStream(tok, stop=("日本",))
    shown = "".join(held.push(i) for i in tok.encode("héllo 日本語"))
    assert shown == "héllo " and held.stopped and held.text == "héllo "


# -- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kw, msg", [
    (dict(top_p=0.0), "top_p must be in (0, 1], got 0.0"),
    (dict(top_p=1.5), "top_p must be in (0, 1], got 1.5"),
    (dict(temperature=-0.5), "temperature must be >= 0, got -0.5"),
    (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
    (dict(top_k=-1), "top_k must be >= 0"),
    (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
    (dict(num_beams=0), "num_beams must be >= 1"),
    (dict(num_beams=2, do_sample=True), "beam search does not sample"),
    (dict(stop=("",)), "stop strings must be non-empty"),
    (dict(temperature=math.nan), "temperature must be a finite number"),
])
def test_bad_config_one_line_error(kw, msg):
    with pytest.raises(ConfigError) as err:
        GenerationConfig(**kw)
    assert msg in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("prompts, kw, msg", [
    ([[]], {}, "prompt 0 is empty"),
    ([[1, 2], [1, 97]], {}, "token id 97 in prompt 1 is outside the vocabulary of size 97"),
    ([[1, -1]], {}, "token id -1 in prompt 0"),
    ([1, 2, 3], {}, "prompts must be a non-empty list of token-id lists"),
    ([], {}, "prompts must be a non-empty list"),
    ([[1]], dict(max_new_tokens=96, truncate=True), "leaves no room for a prompt"),
    ([[1]], dict(stop=("x",)), "stop strings need a tokenizer"),
])
def test_bad_prompt_one_line_error(prompts, kw, msg):
    _, model = hf_pair()
    with pytest.raises(UserError) as err:
        generate(model, prompts, GenerationConfig(**{"max_new_tokens": 10, **kw}))
    assert msg in str(err.value) and "\n" not in str(err.value)


def test_truncate_keeps_the_last_tokens():
    _, model = hf_pair()
    long = list(range(1, 91))
    cfg = GenerationConfig(max_new_tokens=10, truncate=True)
    assert generate(model, [long], cfg) == generate(model, [long[-86:]], cfg)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, char_tok):
    """A Hugging Face GPT-2 directory (transformers' save_pretrained) with our tokenizer."""
    torch.manual_seed(0)
    hc = transformers.GPT2Config(vocab_size=char_tok.vocab_size, n_positions=64, n_embd=32,
                                 n_layer=2, n_head=4, initializer_range=0.3,
                                 bos_token_id=1, eos_token_id=2)
    path = tmp_path_factory.mktemp("hf-gpt2")
    transformers.GPT2LMHeadModel(hc).save_pretrained(path)
    char_tok.save(path / "tokenizer.json")
    return path


def test_cli_generate_streams_greedy_text(hf_dir, char_tok, capsys):
    from attnkit import load

    assert cli_main(["generate", str(hf_dir), "the fox", "--greedy", "--max-new-tokens",
                     "12"]) == 0
    out = capsys.readouterr().out
    loaded = load(hf_dir)
    model, tok = loaded.model, loaded.tokenizer
    cont = generate_text(model, tok, "the fox", GenerationConfig(max_new_tokens=12))[0]
    assert out == "the fox" + cont + "\n"
    assert cont


def test_cli_prompts_file_equals_one_at_a_time(hf_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("the dog\n\nover the\nq\n", encoding="utf-8")
    args = ["generate", str(hf_dir), "--top-k", "5", "--seed", "3", "--max-new-tokens", "8"]
    assert cli_main([*args, "--prompts-file", str(prompts), "--batch-size", "2"]) == 0
    batched = capsys.readouterr().out
    singles = []
    for i, p in enumerate(["the dog", "over the", "q"]):
        assert cli_main([*args[:2], p, *args[2:5], str(3 + i), *args[6:], "--no-stream"]) == 0
        singles.append(capsys.readouterr().out)
    assert batched == "\n".join(singles)


@pytest.mark.parametrize("extra, msg", [
    (["x", "--top-p", "1.5"], "top_p must be in (0, 1], got 1.5"),
    (["x", "--temperature", "-1"], "temperature must be >= 0, got -1.0"),
    ([""], "prompt 0 is empty"),
    (["x", "--max-new-tokens", "70", "--truncate"], "leaves no room for a prompt"),
    ([], "give either a prompt or --prompts-file"),
])
def test_cli_bad_input_exit_2_one_line(hf_dir, capsys, extra, msg):
    assert cli_main(["generate", str(hf_dir), *extra]) == 2
    err = capsys.readouterr().err
    assert msg in err and err.count("\n") == 1


def test_cli_missing_model_dir(tmp_path, capsys):
    assert cli_main(["generate", str(tmp_path / "nope"), "hi"]) == 2
    assert "model directory not found" in capsys.readouterr().err
