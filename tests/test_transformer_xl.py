"""Transformer-XL: relative attention against explicit float64 math, the recurrence memory
against full passes, the segment stream, the xl-lm recipe and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from _resume import assert_resumed, mark_log
from attnkit.data.segments import SegmentStream, score_segments
from attnkit.errors import ConfigError, UserError
from attnkit.models.transformer_xl import TransformerXL, TransformerXLConfig, xl_arch
from attnkit.nn.attention.flex import flex_available
from attnkit.nn.attention.relative import RelativeMultiHeadAttention, rel_shift, relative_table


# ---- the efficient shift and the four terms ----------------------------------------------------
@pytest.mark.parametrize("t,s", [(1, 1), (4, 4), (3, 7), (5, 6)])
def test_rel_shift_moves_each_distance_into_place(t, s):
    torch.manual_seed(0)
    x = torch.randn(2, 3, t, s, dtype=torch.float64)
    y = rel_shift(x)
    assert y.shape == x.shape
    m = s - t
    for i in range(t):
        for j in range(s):
            if j <= i + m:  # distance m + i - j is column s - 1 - (m + i - j) of x
                assert y[..., i, j].equal(x[..., i, s - 1 - (m + i - j)])


def reference_attention(attn: RelativeMultiHeadAttention, x, mem, table, limit=None):
    """Every term of every (query, key) pair by explicit loops, in float64."""
    b, t, c = x.shape
    h = torch.cat([mem, x], dim=1) if mem is not None else x
    s, m = h.size(1), h.size(1) - t
    heads, d = attn.n_heads, attn.head_dim
    q = (x @ attn.q_proj.weight.T).view(b, t, heads, d)
    k, v = (h @ attn.kv_proj.weight.T).view(b, s, 2, heads, d).unbind(2)
    r = (table @ attn.r_proj.weight.T).view(-1, heads, d)  # (distance, H, D)
    u, vb = attn.u, attn.v
    out = torch.zeros(b, t, heads, d, dtype=x.dtype)
    weights = torch.zeros(b, heads, t, s, dtype=x.dtype)
    for bb in range(b):
        for hh in range(heads):
            for i in range(t):
                scores = torch.full((s,), -math.inf, dtype=x.dtype)
                for j in range(s):
                    dist = m + i - j
                    if dist < 0 or (limit is not None and dist > limit):
                        continue
                    qi, kj, rd = q[bb, i, hh], k[bb, j, hh], r[dist, hh]
                    a, bt = qi @ kj, qi @ rd  # content, content-dependent position
                    ct, dt = u[hh] @ kj, vb[hh] @ rd  # global content bias, global position bias
                    scores[j] = (a + bt + ct + dt) / math.sqrt(d)
                w = torch.softmax(scores, 0)
                weights[bb, hh, i] = w
                out[bb, i, hh] = w @ v[bb, :, hh]
    return out.reshape(b, t, c) @ attn.out_proj.weight.T, weights


@pytest.mark.parametrize("mem_len,clamp,limit", [(0, 0, None), (4, 0, None), (5, 3, None),
                                                 (4, 0, 3)])
def test_relative_attention_equals_explicit_terms(mem_len, clamp, limit):
    torch.manual_seed(1)
    attn = RelativeMultiHeadAttention(8, 2, path="explicit").double().eval()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    mem = torch.randn(2, mem_len, 8, dtype=torch.float64) if mem_len else None
    s = 3 + mem_len
    full = relative_table(s, 8, clamp).double()
    rows = min(s, clamp + 1) if clamp else s
    res = attn(x, mem, full[:rows], max_distance=limit, need_weights=True)
    ref_out, ref_w = reference_attention(attn, x, mem, full, limit)
    torch.testing.assert_close(res.weights, ref_w, rtol=0, atol=1e-12)
    torch.testing.assert_close(res.out, ref_out, rtol=0, atol=1e-12)
    attn.path = "fused"
    fused = attn(x, mem, full[:rows], max_distance=limit)  # SDPA with the bias
    torch.testing.assert_close(fused.out, ref_out, rtol=0, atol=1e-12)


def test_relative_table_is_the_sinusoid_and_clamps():
    r = relative_table(10, 6, clamp_len=4).double()
    w = [10000 ** (-2 * f / 6) for f in range(3)]
    for d in range(10):
        dd = min(d, 4)
        expect = [math.sin(dd * x) for x in w] + [math.cos(dd * x) for x in w]
        torch.testing.assert_close(r[d], torch.tensor(expect, dtype=torch.float64),
                                   rtol=0, atol=1e-6)


@pytest.mark.skipif(not flex_available(), reason="flex_attention needs torch >= 2.5")
def test_flex_path_equals_explicit_path():
    torch.manual_seed(2)
    from attnkit.nn.attention.adaptive_span import AdaptiveSpan
    from attnkit.nn.attention.persistent import PersistentMemory
    span = AdaptiveSpan(2, max_span=12, ramp=4, init=0.3)
    with torch.no_grad():
        span.frac.copy_(torch.tensor([0.2, 0.9]))
    attn = RelativeMultiHeadAttention(16, 2, span=span, persistent=PersistentMemory(2, 8, 3),
                                      path="explicit").eval()
    x, mem = torch.randn(2, 10, 16), torch.randn(2, 12, 16)
    table = relative_table(8, 16, clamp_len=7)
    with torch.no_grad():
        ref = attn(x, mem, table).out
        attn.path = "flex"
        out = attn(x, mem, table).out
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# ---- the model and its memory ------------------------------------------------------------------
def tiny(**kw) -> TransformerXL:
    base = dict(vocab_size=11, d_model=16, n_heads=2, n_layers=2, d_ff=24, dropout=0.0,
                mem_len=4, attention_path="explicit")
    return TransformerXL(TransformerXLConfig(**{**base, **kw})).double().eval()


def run_segments(model, tokens, seg, mem_len=None, output_attentions=False):
    mems, logits, weights = None, [], []
    for start in range(0, tokens.size(1), seg):
        out = model(tokens[:, start: start + seg], mems, mem_len=mem_len,
                    output_attentions=output_attentions)
        mems = out.mems
        logits.append(out.logits)
        weights.append(out.attentions)
    return torch.cat(logits, dim=1), weights, mems


def test_segments_with_a_longer_evaluation_memory_equal_one_full_pass():
    """With a memory holding everything so far (longer than training's mem_len = 4), every
    layer sees the same states as one causal pass over the whole sequence."""
    torch.manual_seed(3)
    model = tiny(mem_len=4)
    tokens = torch.randint(0, 11, (2, 20))
    full = model(tokens, mem_len=0).logits
    seg, _, mems = run_segments(model, tokens, 5, mem_len=64)
    torch.testing.assert_close(seg, full, rtol=0, atol=1e-10)
    assert mems[0].shape == (2, 20, 16)  # everything so far (<= 64)


def test_finite_memory_gives_exactly_the_promised_window():
    """One layer, memory M: query p sees keys [segment start - M, p]; equal to one full pass
    over exactly that window, and zero weight everywhere else."""
    torch.manual_seed(4)
    model = tiny(n_layers=1, mem_len=3)
    tokens = torch.randint(0, 11, (1, 16))
    seg_logits, weights, _ = run_segments(model, tokens, 4, output_attentions=True)
    for k, start in enumerate(range(0, 16, 4)):
        lo = max(0, start - 3)
        ref = model(tokens[:, lo: start + 4], mem_len=0).logits[:, start - lo:]
        torch.testing.assert_close(seg_logits[:, start: start + 4], ref, rtol=0, atol=1e-10)
        w = weights[k][0]  # (B, H, T, S) of the only layer
        m = w.size(-1) - 4
        for i in range(4):
            alive = (w[0, :, i] > 0).all(0)
            assert alive.tolist() == [j <= m + i for j in range(m + 4)]


def test_transformers_keywords_and_output_names():
    """input_ids / mems / labels as transformers' TransfoXL took them: the loss is the shifted
    F.cross_entropy, the logits are the last hidden state through the tied embedding, and the
    returned mems carry the next segment exactly as one pass over both segments."""
    torch.manual_seed(7)
    model = tiny(mem_len=8)
    ids = torch.randint(0, 11, (2, 10))
    labels = ids.clone()
    labels[1, 6:] = -100
    with torch.no_grad():
        first = model(input_ids=ids[:, :5], labels=labels[:, :5], output_attentions=True,
                      output_hidden_states=True)
        second = model(input_ids=ids[:, 5:], mems=first.mems)
        full = model(input_ids=ids, labels=labels, mem_len=0)
    logits = full.logits[:, :-1].flatten(0, 1)
    ref = torch.nn.functional.cross_entropy(logits, labels[:, 1:].flatten())
    torch.testing.assert_close(full.loss, ref, rtol=0, atol=1e-12)
    first_ref = torch.nn.functional.cross_entropy(full.logits[:, :4].flatten(0, 1),
                                                  labels[:, 1:5].flatten())
    torch.testing.assert_close(first.loss, first_ref, rtol=0, atol=1e-10)
    assert len(first.hidden_states) == 3 and len(first.attentions) == 2
    torch.testing.assert_close(first.hidden_states[-1] @ model.embed.weight.T, first.logits,
                               rtol=0, atol=1e-12)
    assert first.attentions[0].shape == (2, 2, 5, 5) and second.loss is None
    torch.testing.assert_close(second.logits, full.logits[:, 5:], rtol=0, atol=1e-10)


def test_same_length_gives_every_query_mem_len_keys():
    torch.manual_seed(5)
    model = tiny(n_layers=1, mem_len=6, same_length=True)
    tokens = torch.randint(0, 11, (1, 12))
    _, weights, _ = run_segments(model, tokens, 4, output_attentions=True)
    seen = (weights[-1][0] > 0).sum(-1)  # (B, H, T) once the memory is full
    assert seen.eq(6).all()


def test_memory_is_detached_and_gradients_stay_in_the_segment():
    torch.manual_seed(6)
    model = TransformerXL(TransformerXLConfig(vocab_size=11, d_model=16, n_heads=2, n_layers=2,
                                              d_ff=24, mem_len=4, attention_path="explicit"))
    out = model(torch.randint(0, 11, (2, 5)))
    assert all(not m.requires_grad for m in out.mems)
    nxt = model(torch.randint(0, 11, (2, 5)), out.mems)
    nxt.logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


# ---- the segment stream ------------------------------------------------------------------------
def test_segment_stream_rows_are_contiguous_and_reset_at_each_pass():
    stream = torch.arange(50)
    data = SegmentStream(stream, batch_size=3, seg_len=4)  # rows of 16 -> 3 segments per pass
    it = iter(data)
    batches = [next(it) for _ in range(7)]
    assert [b.reset for b in batches] == [True, False, False, True, False, False, True]
    for b in batches:
        assert b.targets.equal(b.ids + 1)
    assert batches[0].ids[1].tolist() == [16, 17, 18, 19]
    assert batches[1].ids[:, 0].equal(batches[0].targets[:, -1])  # segments follow each other
    state = data.state_dict()
    data.carry.mems = None
    fresh = SegmentStream(stream, 3, 4)
    fresh.load_state_dict(state)
    assert next(iter(fresh)).ids.equal(next(it).ids)
    with pytest.raises(UserError, match="seg_len 4"):
        SegmentStream(stream, 3, 5).load_state_dict(state)
    with pytest.raises(UserError):
        SegmentStream(torch.arange(5), 3, 4)


def test_segment_scoring_counts_every_target_once():
    torch.manual_seed(7)
    model = tiny()
    stream = torch.randint(0, 11, (23,))

    def forward(ids, mems):
        out = model(ids, mems, mem_len=64)
        return out.logits, out.mems

    r = score_segments(forward, stream, 5)
    full = model(stream[None, :-1], mem_len=0).logits[0]
    nll = torch.nn.functional.cross_entropy(full, stream[1:], reduction="sum").item()
    assert r.tokens == 22 and r.chars == 22
    assert r.nll == pytest.approx(nll, rel=1e-9)
    assert r.bpc == pytest.approx(nll / 22 / math.log(2), rel=1e-9)


# ---- bad input ---------------------------------------------------------------------------------
@pytest.mark.parametrize("kw,match", [
    (dict(mem_len=-1), "mem_len must be >= 0"),
    (dict(clamp_len=-2), "clamp_len"),
    (dict(same_length=True, mem_len=0), "same_length"),
    (dict(d_ff=0), "persistent"),
    (dict(n_heads=3), "divisible|multiple"),
    (dict(attention_path="fast"), "unknown model.attention_path 'fast'"),
])
def test_bad_configs_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        TransformerXLConfig(**{"vocab_size": 10, **kw})
    assert "\n" not in str(err.value)


def test_bad_memory_and_unknown_keys():
    model = tiny()
    with pytest.raises(UserError, match="mem_len must be >= 0"):
        model(torch.zeros(1, 3, dtype=torch.long), mem_len=-3)
    with pytest.raises(UserError, match="does not fit"):
        model(torch.zeros(1, 3, dtype=torch.long), [torch.zeros(2, 4, 16)] * 2)
    with pytest.raises(ConfigError, match="did you mean 'arch.mem_len'"):
        xl_arch("tiny", {"memlen": 3}, 10)


def test_run_configs_saved_with_the_old_switch_name_still_load():
    """Run directories record the resolved config; those written before the switch was named
    attention_path hold attn_impl, which the run loader's builder reads as attention_path."""
    from attnkit.config import to_dict
    from attnkit.models import build_lm
    saved = to_dict(TransformerXLConfig(vocab_size=10, d_model=16, n_heads=2, n_layers=1))
    assert saved.pop("attention_path") == "auto"
    for value in ("auto", "explicit", "flex"):  # the old switch's values
        config = {**saved, "attn_impl": value}
        vocab = config.pop("vocab_size")
        model, record = build_lm("transformer-xl", "", config, vocab)
        assert model.cfg.attention_path == value and record["attention_path"] == value
        assert "attn_impl" not in record  # saved again under the new name
        assert model.layers[0].attn.path == value


def _train_recipe(tmp_path, name, steps, **over):
    from attnkit.recipes import get_recipe, resolve_config
    text = tmp_path / "text.txt"
    if not text.exists():
        text.write_text("".join(f"line {i % 37} of a small text, abc.\n" for i in range(200)))
    recipe = get_recipe("xl-lm")
    sets = [f"data.train={text}", f"run_dir={tmp_path / name}", "seg_len=8", "batch_size=4",
            "preset=tiny", "arch.d_model=16", "arch.n_heads=2", "arch.n_layers=2",
            "arch.d_ff=32", "arch.mem_len=8", "arch.dropout=0.1", f"train.steps={steps}",
            "train.eval_every=0", "train.save_every=2", "train.log_every=1", "train.threads=1",
            "eval.max_chars=300",
            *[f"{k}={v}" for k, v in over.items()]]
    return resolve_config(recipe, None, sets)


def test_resumed_training_with_memory_equals_uninterrupted(tmp_path, capsys):
    """The memory travels in the data state: resuming at step 2 ends bitwise equal."""
    from attnkit.recipes.xl_lm import main
    from attnkit.train.checkpoint import latest_checkpoint, load_weights, state_path
    torch.manual_seed(0)
    cfg = _train_recipe(tmp_path, "run", 4)
    main(cfg)
    last = latest_checkpoint(tmp_path / "run")
    assert last.name == "step-000004.safetensors"
    whole = load_weights(last)
    state = torch.load(state_path(last), weights_only=True)
    assert len(state["data"]["memory"]) == 2  # one memory tensor per layer
    last.unlink()  # as if killed before step 4 was saved
    state_path(last).unlink()
    before = mark_log(tmp_path / "run")
    capsys.readouterr()
    main(cfg)
    assert_resumed(tmp_path / "run", 2, capsys.readouterr().err, before)
    again = load_weights(latest_checkpoint(tmp_path / "run"))
    assert whole.keys() == again.keys() and all(whole[k].equal(again[k]) for k in whole)
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["val"]["bpc"] > 0 and "val_no_memory" in results
    assert len(results["samples"]) == 1 and results["samples"][0].startswith("\n")


def test_sampling_with_memory_equals_recomputing_the_whole_text():
    """One token at a time after the memory (the decoding protocol's step) gives the logits of
    a full pass over the text (the memory holds every earlier position), so greedy and seeded
    sampling agree."""
    from attnkit.generation import GenerationConfig, choose_tokens, generate
    torch.manual_seed(0)
    model = TransformerXL(xl_arch("tiny", {"d_model": 32, "n_heads": 2, "n_layers": 2,
                                           "d_ff": 64, "mem_len": 64, "dropout": 0.0}, 23))
    model.eval()
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    with torch.no_grad():
        ids = list(prompt)
        logits, state = model.step(model.start(torch.tensor([ids])), torch.tensor([ids]))
        for nxt in (5, 3, 5, 8, 9, 7, 9, 3):
            full = model(torch.tensor([ids])).logits[:, -1]
            torch.testing.assert_close(logits, full, atol=1e-5, rtol=1e-5)
            ids.append(nxt)
            logits, state = model.step(state, torch.tensor([[nxt]]))
        for temperature in (0.0, 1.0):
            cfg = GenerationConfig(max_new_tokens=30, do_sample=temperature > 0,
                                   temperature=temperature, seed=7)
            a = generate(model, [prompt], cfg)[0]
            gens = [torch.Generator().manual_seed(7)] if temperature > 0 else []
            ids, b = list(prompt), []
            for _ in range(30):
                full = model(torch.tensor([ids])).logits[:, -1]
                b.append(int(choose_tokens(full, cfg, None, gens)[0]))
                ids.append(b[-1])
            assert a == b and len(a) == 30


def test_a_run_of_another_family_is_refused(tmp_path):
    from attnkit import load
    from attnkit.train.checkpoint import load_weights, save_weights
    run = tmp_path / "gpt"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"recipe": "lm", "config": {},
                                                 "model": {"family": "gpt2", "config": {}}}))
    (run / "tokenizer.json").write_text("{}")
    with pytest.raises(UserError, match="holds a 'gpt2' model"):
        load(run, families=["transformer-xl"])
    from attnkit.models import build_lm
    gpt, _ = build_lm("gpt2", "tiny", {"n_positions": 16}, 11)
    save_weights(tmp_path / "gpt.safetensors", gpt)
    with pytest.raises(UserError, match="does not fit the model") as err:
        load_weights(tmp_path / "gpt.safetensors", tiny())
    assert "\n" not in str(err.value)


def test_paper_presets_have_the_published_sizes():
    """Dai et al. 2019 Table 1: the 12-layer enwik8 model has 41M parameters. Sukhbaatar et al.
    2019a Table 1: the small adaptive-span model has 38M; ours sits on Transformer-XL's relative
    attention, which adds one d x d position projection W_r per layer."""
    vocab = 204  # enwik8's byte vocabulary in the Transformer-XL data
    sizes = {p: sum(x.numel() for x in TransformerXL(xl_arch(p, {}, vocab)).parameters())
             for p in ("enwik8-base", "adaptive-span-small")}
    assert sizes["enwik8-base"] == pytest.approx(41e6, rel=0.01)
    assert sizes["adaptive-span-small"] - 12 * 512**2 == pytest.approx(38e6, rel=0.01)


def test_two_process_resume_restores_each_ranks_memory(tmp_path):
    """Under torchrun every rank keeps the memory of its own rows; killed after step 2 and
    resumed, the run ends bitwise equal to the uninterrupted one."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from attnkit.train.checkpoint import latest_checkpoint, load_weights, state_path
    root = Path(__file__).resolve().parents[1]
    text = tmp_path / "text.txt"
    text.write_text("".join(f"line {i % 37} of a small text, abc.\n" for i in range(200)))
    run = tmp_path / "run"
    sets = [f"data.train={text}", f"run_dir={run}", "seg_len=8", "batch_size=4", "preset=tiny",
            "arch.d_model=16", "arch.n_heads=2", "arch.n_layers=2", "arch.d_ff=32",
            "arch.mem_len=8", "arch.dropout=0.1", "train.steps=4", "train.eval_every=0",
            "train.save_every=2", "train.log_every=1", "train.threads=1", "eval.max_chars=200",
            "sample.n=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           "--standalone", "-m", "attnkit", "train", "xl-lm",
           *[a for s in sets for a in ("--set", s)]]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root / "src")}
    first = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    last = latest_checkpoint(run)
    state = torch.load(state_path(last), weights_only=True)
    memories = [d["memory"] for d in state["data_per_rank"]]
    assert len(memories) == 2 and not torch.equal(memories[0][0], memories[1][0])
    whole = load_weights(last)
    last.unlink()  # as if killed before step 4 was saved
    state_path(last).unlink()
    before = mark_log(run)
    again = subprocess.run(cmd, env=env, cwd=root, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr[-3000:]
    assert_resumed(run, 2, again.stderr, before)
    assert "empty memory" not in again.stderr
    resumed = load_weights(latest_checkpoint(run))
    assert all(whole[k].equal(resumed[k]) for k in whole)
