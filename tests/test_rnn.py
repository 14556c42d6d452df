"""The attentional RNN encoder-decoder (Bahdanau et al. 2015; Luong et al. 2015) and the RNN
without attention: decoder steps against the papers' equations written out in float64,
incremental decoding against the teacher-forced forward, beam search, padding, a short copy run
through the recipe and one-line errors for bad configurations.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.cli import main
from attnkit.decoding import beam_search, greedy_search
from attnkit.errors import ConfigError
from attnkit.models import build_seq2seq
from attnkit.models.rnn import PRESETS, RNNConfig, RNNSeq2Seq, rnn_arch, rnn_attention_arch
from attnkit.viz import capture_ids

SRC = Path(__file__).resolve().parents[1] / "src"
V = 13


def tiny(**kw) -> RNNSeq2Seq:
    """A float64 model of a few units with weights larger than the init, so that every
    term of the equations matters."""
    torch.manual_seed(0)
    cfg = RNNConfig(src_vocab_size=V, embed_size=5, hidden_size=6, dropout=0.0, max_len=32,
                    **kw)
    model = RNNSeq2Seq(cfg).double().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(6.0)
    return model


SOURCES = torch.tensor([[4, 5, 6, 7, 8], [9, 10, 11, 0, 0]])  # row 2 padded
TARGETS = torch.tensor([[1, 5, 12, 4], [1, 7, 0, 0]])


# ---- float64 reference equations -----------------------------------------------------------------
def gru(x, h, w_ih, w_hh, b_ih, b_hh):
    """PyTorch's GRU cell: r, z gates; n = tanh(W_in x + b_in + r * (W_hn h + b_hn))."""
    gi, gh = w_ih @ x + b_ih, w_hh @ h + b_hh
    r_i, z_i, n_i = gi.chunk(3)
    r_h, z_h, n_h = gh.chunk(3)
    r, z = torch.sigmoid(r_i + r_h), torch.sigmoid(z_i + z_h)
    n = torch.tanh(n_i + r * n_h)
    return (1 - z) * n + z * h


def lstm(x, h, c, w_ih, w_hh, b_ih, b_hh):
    """Hochreiter & Schmidhuber's LSTM with forget gate, gates ordered i, f, g, o."""
    i, f, g, o = (w_ih @ x + b_ih + w_hh @ h + b_hh).chunk(4)
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    return torch.sigmoid(o) * torch.tanh(c), c


def params(rnn: torch.nn.Module, suffix: str) -> list[torch.Tensor]:
    return [getattr(rnn, f"{n}_l0{suffix}").detach()
            for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]


def bahdanau_reference(model: RNNSeq2Seq, src: list[int], y_prev: int):
    """Logits and alignment of the first decoder step, for one unpadded source."""
    emb = model.src_embed.weight.detach()
    xs, h = [emb[t] for t in src], model.cfg.hidden_size
    fwd, bwd, f, b = [], [], torch.zeros(h, dtype=torch.float64), torch.zeros(h,
                                                                              dtype=torch.float64)
    for x in xs:  # forward RNN over x_1 .. x_S
        f = gru(x, f, *params(model.encoder[0], ""))
        fwd.append(f)
    for x in reversed(xs):  # backward RNN over x_S .. x_1
        b = gru(x, b, *params(model.encoder[1], ""))
        bwd.insert(0, b)
    annotations = torch.stack([torch.cat([a, c]) for a, c in zip(fwd, bwd, strict=True)])
    s0 = torch.tanh(model.bridge.weight.detach() @ torch.cat([fwd[-1], bwd[0]])
                    + model.bridge.bias.detach())
    sc = model.score
    e = torch.stack([sc.v.weight.detach()[0] @ torch.tanh(sc.w_q.weight.detach() @ s0
                                                           + sc.w_k.weight.detach() @ hj)
                     for hj in annotations])  # e_1j = v^T tanh(W_a s_0 + U_a h_j)
    alpha = torch.softmax(e, 0)
    ctx = alpha @ annotations  # c_1
    ey = model.tgt_embed.weight.detach()[y_prev]
    s1 = gru(torch.cat([ey, ctx]), s0, *params(model.decoder, ""))
    t_tilde = model.readout.weight.detach() @ torch.cat([s1, ey, ctx])
    t = torch.maximum(t_tilde[0::2], t_tilde[1::2])  # maxout over pairs
    return model.out_proj.weight.detach() @ t, alpha


def test_bahdanau_step_equals_the_paper_equations() -> None:
    model = tiny(cell="gru", attention="bahdanau", bidirectional=True)
    assert model.cfg.score == "additive" and model.cfg.input_feeding is False
    state = model.start(SOURCES, 10)
    logits, state = model.step(state, TARGETS[:, :1])
    out = model(SOURCES, TARGETS[:, :1], output_attentions=True)
    for row, length in ((0, 5), (1, 3)):
        ref, alpha = bahdanau_reference(model, SOURCES[row, :length].tolist(), 1)
        torch.testing.assert_close(logits[row], ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(out.cross_attentions[0][row, 0, 0, :length], alpha,
                                   rtol=1e-10, atol=1e-10)
    assert out.cross_attentions[0][1, 0, 0, 3:].abs().max() == 0  # padding gets no weight


def luong_reference(model: RNNSeq2Seq, src: list[int], targets: list[int]) -> list:
    """Logits of every decoder step (input feeding, general score), for one source."""
    emb, h = model.src_embed.weight.detach(), model.cfg.hidden_size
    zero = torch.zeros(h, dtype=torch.float64)
    state, cell, outs = zero, zero, []
    for t in src:
        state, cell = lstm(emb[t], state, cell, *params(model.encoder[0], ""))
        outs.append(state)
    keys = torch.stack(outs)  # h_s
    w_a = model.score.proj.weight.detach()  # score(h_t, h_s) = h_t^T W_a h_s
    # the decoder starts from tanh(W_s h_S) with a zero cell; h~_0 = 0
    state = torch.tanh(model.bridge.weight.detach() @ state + model.bridge.bias.detach())
    cell, feed, logits = zero, zero, []
    for y in targets:
        x = torch.cat([model.tgt_embed.weight.detach()[y], feed])
        state, cell = lstm(x, state, cell, *params(model.decoder, ""))
        alpha = torch.softmax(keys @ (w_a.T @ state), 0)
        ctx = alpha @ keys
        feed = torch.tanh(model.readout.weight.detach() @ torch.cat([ctx, state]))
        logits.append(model.out_proj.weight.detach() @ feed)
    return logits


def test_luong_steps_with_input_feeding_equal_the_paper_equations() -> None:
    model = tiny(cell="lstm", attention="luong", bidirectional=False)
    assert model.cfg.score == "general" and model.cfg.input_feeding is True
    state = model.start(SOURCES, 10)
    steps = [model.step(state, TARGETS[:, t:t + 1])[0] for t in range(3)]
    for row, length in ((0, 5), (1, 3)):
        ref = luong_reference(model, SOURCES[row, :length].tolist(), TARGETS[row, :3].tolist())
        for t in range(3):
            torch.testing.assert_close(steps[t][row], ref[t], rtol=1e-10, atol=1e-10)


# ---- invariants ----------------------------------------------------------------------------------
VARIANTS = [
    dict(cell="gru", attention="bahdanau"),
    dict(cell="lstm", attention="bahdanau", n_layers=2),
    dict(cell="lstm", attention="luong", bidirectional=False),
    dict(cell="gru", attention="luong", input_feeding=False, n_layers=2),  # fused decoder
    dict(cell="lstm", attention="luong", score="additive"),
    dict(cell="gru", attention="luong", score="dot", bidirectional=False),
    dict(cell="gru", attention="none"),
    dict(cell="lstm", attention="none", bidirectional=False, n_layers=2),
]


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(map(str, kw.values())))
def test_incremental_steps_equal_teacher_forcing_and_padding_changes_nothing(kw: dict) -> None:
    model = tiny(**kw)
    full = model(SOURCES, TARGETS).logits  # (B, T, V)
    state = model.start(SOURCES, 10)
    steps = torch.stack([model.step(state, TARGETS[:, t:t + 1])[0] for t in range(4)], 1)
    torch.testing.assert_close(steps, full, rtol=1e-9, atol=1e-9)
    explicit = model(SOURCES, TARGETS, output_attentions=True).logits  # the core's explicit path
    torch.testing.assert_close(explicit, full, rtol=1e-9, atol=1e-9)
    alone = model(SOURCES[1:, :3], TARGETS[1:]).logits  # the padded row without its padding
    torch.testing.assert_close(full[1:], alone, rtol=1e-9, atol=1e-9)
    state = model.start(SOURCES, 10)  # several tokens in one step: logits of the last
    torch.testing.assert_close(model.step(state, TARGETS[:, :3])[0], full[:, 2], rtol=1e-9,
                               atol=1e-9)


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_weights_are_distributions_over_real_source_tokens(attention: str) -> None:
    model = tiny(attention=attention)
    w = model(SOURCES, TARGETS, output_attentions=True).cross_attentions
    assert len(w) == 1 and w[0].shape == (2, 1, 4, 5)
    torch.testing.assert_close(w[0].sum(-1), torch.ones(2, 1, 4, dtype=torch.float64))
    assert w[0][1, ..., 3:].abs().max() == 0
    assert model(SOURCES, TARGETS).cross_attentions is None  # only when asked for


@pytest.mark.parametrize("attention", ["bahdanau", "luong"])
def test_transformers_keywords_give_loss_and_cross_attentions(attention: str) -> None:
    """input_ids / decoder_input_ids / labels as transformers' encoder-decoders take them; the
    loss is F.cross_entropy of the logits (-100 not scored), the alignment comes back as
    cross_attentions."""
    model = tiny(attention=attention)
    labels = torch.tensor([[5, 12, 4, 2], [7, 2, -100, -100]])
    with torch.no_grad():
        out = model(input_ids=SOURCES, decoder_input_ids=TARGETS, labels=labels,
                    output_attentions=True)
        plain = model(SOURCES, TARGETS)
    torch.testing.assert_close(out.logits, plain.logits, rtol=0, atol=1e-12)
    ref = torch.nn.functional.cross_entropy(out.logits.flatten(0, 1), labels.flatten())
    torch.testing.assert_close(out.loss, ref, rtol=0, atol=1e-12)
    assert plain.loss is None and plain.cross_attentions is None
    (w,) = out.cross_attentions
    assert w.shape == (2, 1, 4, 5) and w[1, :, :, 3:].abs().max() == 0


def test_beam_search_scores_what_the_model_says() -> None:
    model = tiny(cell="lstm", attention="bahdanau")
    with torch.no_grad():
        model.out_proj.weight.mul_(3.0)  # peaked distributions: a beam differs from greedy
    hyps = beam_search(model, SOURCES, 6, beam_size=3, alpha=0.0, nbest=3)
    for row, found in enumerate(hyps):
        assert len(found) == 3
        for h in found:  # teacher-forced log P(tokens EOS | source) of each hypothesis
            tgt = torch.tensor([[1, *h.tokens]])
            logp = torch.log_softmax(model(SOURCES[row:row + 1], tgt).logits[0], -1)
            want = sum(logp[i, tok] for i, tok in enumerate([*h.tokens, 2]))
            assert h.logprob == pytest.approx(want.item(), abs=1e-6)
    one = beam_search(model, SOURCES, 6, beam_size=1, alpha=0.0)
    assert [h[0].tokens for h in one] == greedy_search(model, SOURCES, 6)


def test_capture_gives_the_alignment_map() -> None:
    model = tiny(attention="luong")
    cap = capture_ids(model, _Tok(), [4, 5, 6], [1, 7, 8])
    group = cap.group("cross")
    assert group.n_layers == 1 and group.n_heads == 1 and group.weights[0].shape == (1, 3, 3)
    want = model(torch.tensor([[4, 5, 6]]), torch.tensor([[1, 7, 8]]),
                 output_attentions=True).cross_attentions[0][0]
    torch.testing.assert_close(group.weights[0], want)
    assert group.rows == ["t1", "t7", "t8"] and group.cols == ["t4", "t5", "t6"]


class _Tok:
    def token(self, i: int) -> str:
        return f"t{i}"


# ---- configuration -------------------------------------------------------------------------------
def test_paper_defaults_are_resolved_and_presets_build() -> None:
    assert RNNConfig().score == "additive" and RNNConfig().bidirectional
    luong = rnn_attention_arch("luong", {}, 50)
    assert (luong.cell, luong.score, luong.input_feeding, luong.n_layers) == (
        "lstm", "general", True, 4)
    assert rnn_arch("luong", {}, 50).attention == "none"
    for preset in ("small", "tiny"):
        model, resolved = build_seq2seq("rnn-attention", preset, {}, 40)
        assert resolved["attention"] == PRESETS[preset]["attention"]
        # a run's saved config rebuilds the same model (what load_model does)
        arch = {k: v for k, v in resolved.items() if k not in ("src_vocab_size",
                                                                "tgt_vocab_size")}
        again, resolved_again = build_seq2seq("rnn-attention", preset, arch, 40)
        assert resolved_again == resolved
        assert model.state_dict().keys() == again.state_dict().keys()


@pytest.mark.parametrize(("kw", "fragment"), [
    (dict(hidden_size=7), "even"),
    (dict(attention="none", score="general"), "needs attention"),
    (dict(attention="bahdanau", input_feeding=True), "Luong"),
    (dict(attention="luong", score="dot"), "equal query and key widths"),
    (dict(score="cosin"), "did you mean 'cosine'"),
    (dict(dropout=1.0), "dropout"),
    (dict(tgt_vocab_size=9), "share_embeddings"),
])
def test_bad_configs_raise_config_errors(kw: dict, fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        RNNConfig(src_vocab_size=V, **kw)


@pytest.mark.parametrize(("sets", "fragment"), [
    (["model=rnn-attention", "arch.cell=rnm"], "arch.cell"),
    (["model=rnn-attention", "arch.score=addtive"], "did you mean 'additive'"),
    (["model=rnn-attention", "arch.attention=none"], "use model=rnn"),
    (["model=rnn", "arch.attention=luong"], "use model=rnn-attention"),
    (["model=rnn-attention", "arch.attention=luong", "arch.score=dot"], "widths"),
    (["model=rnn-attention", "arch.d_model=64"], "arch.d_model"),
    (["model=rnn-attention", "preset=huge"], "unknown rnn preset 'huge'"),
    (["model=rnm"], "did you mean 'rnn'"),
])
def test_cli_refuses_bad_configs_with_one_line(sets: list[str], fragment: str, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch,
                                               capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    args = ["train", "copy", *[a for s in [*sets, "run_dir=run"] for a in ("--set", s)]]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("attnkit: error:") and "\n" not in err and fragment in err, err
    assert not any(tmp_path.iterdir())  # nothing created


# ---- through the recipe --------------------------------------------------------------------------
def test_copy_recipe_trains_the_attentional_rnn(tmp_path: Path) -> None:
    sets = ["model=rnn-attention", "preset=tiny", "arch.embed_size=32", "arch.hidden_size=32",
            "arch.dropout=0.0", "train.steps=80", "train.log_every=20", "train.eval_every=80",
            "train.save_every=80", "train.threads=1", "train.optim.lr=0.01",
            "train.optim.warmup_steps=5", "batch_tokens=512", "data.train_size=800",
            "data.eval_size=10", "data.max_len=8", "eval_examples=5", "decode.beam_size=2",
            f"run_dir={tmp_path / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": "1",
           "ATTNKIT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run([sys.executable, "-m", "attnkit", "train", "copy",
                           *[a for s in sets for a in ("--set", s)]], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "seen_lengths: exact_match" in proc.stdout
    records = [json.loads(line) for line in
               (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    # uniform over 10 digits and EOS is ln 11 = 2.4 nats; the run gets below 2.1 (seed 0)
    assert len(losses) == 4 and losses[-1] < 0.85 * losses[0], losses
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["family"] == "rnn-attention"
    assert config["model"]["config"]["score"] == "additive"
