"""attnkit.viz without a browser: analyses against hand/brute-force references, escaping,
capture shapes, neuron-view scores, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from attnkit import viz
from attnkit.cli import main
from attnkit.errors import UserError
from attnkit.models.transformer import Transformer, transformer_config
from attnkit.tokenizers import Tokenizer
from attnkit.viz import analysis
from attnkit.viz.capture import AttentionGroup
from attnkit.viz.html import document, safe_json

NASTY = ["<script>alert(1)</script>", '"', "&", "</div>", "<img src=x onerror=alert(2)>",
         "\u2028"]


# ---- helpers -----------------------------------------------------------------------------------
def tiny_model(vocab: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    cfg = transformer_config("tiny", src_vocab_size=vocab, d_model=32, n_heads=4, d_ff=64,
                             n_encoder_layers=2, n_decoder_layers=3, dropout=0.0)
    return Transformer(cfg).eval()


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train("char", ["the quick brown fox jumps over the lazy dog <>&\"/"],
                           vocab_size=100)


def embedded_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', page,
                  re.S)
    assert m is not None
    return json.loads(m.group(1))


def random_weights(layers: int, heads: int, t: int, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.softmax(torch.randn(heads, t, t, generator=g, dtype=torch.float64) * 2, -1)
            for _ in range(layers)]


# ---- max flow, rollout, flow -------------------------------------------------------------------
def brute_force_min_cut(cap: np.ndarray, s: int, t: int) -> float:
    """Max-flow = min-cut (Ford-Fulkerson theorem): enumerate every s-t cut."""
    others = [v for v in range(len(cap)) if v not in (s, t)]
    best = math.inf
    for bits in itertools.product((0, 1), repeat=len(others)):
        side = {s} | {v for v, b in zip(others, bits, strict=True) if b}
        cut = sum(cap[u, v] for u in side for v in range(len(cap)) if v not in side)
        best = min(best, cut)
    return best


def test_max_flow_textbook_network() -> None:
    # Cormen et al., Introduction to Algorithms, Figure 26.1: maximum flow 23
    cap = np.zeros((6, 6))
    for u, v, c in [(0, 1, 16), (0, 2, 13), (2, 1, 4), (1, 3, 12), (3, 2, 9), (2, 4, 14),
                    (4, 3, 7), (3, 5, 20), (4, 5, 4)]:
        cap[u, v] = c
    assert analysis.max_flow(cap, 0, 5) == pytest.approx(23)


@pytest.mark.parametrize("seed", range(5))
def test_max_flow_equals_brute_force_min_cut(seed: int) -> None:
    rng = np.random.default_rng(seed)
    cap = rng.random((7, 7)) * (rng.random((7, 7)) < 0.5)
    np.fill_diagonal(cap, 0)
    assert analysis.max_flow(cap, 0, 6) == pytest.approx(brute_force_min_cut(cap, 0, 6))


def test_flow_on_attention_graph_equals_brute_force() -> None:
    weights = random_weights(2, 2, 3, seed=1)
    cap, flow = analysis.flow_graph(weights), analysis.attention_flow(weights)
    for i, j in itertools.product(range(3), range(3)):
        assert flow[i, j].item() == pytest.approx(brute_force_min_cut(cap, 6 + i, j))


def test_flow_of_one_layer_is_the_residual_attention() -> None:
    weights = random_weights(1, 3, 4, seed=2)
    a_hat = analysis.residual_attention(weights[0])
    torch.testing.assert_close(analysis.attention_flow(weights), a_hat)


def test_rollout_matches_explicit_loops() -> None:
    weights = random_weights(3, 2, 4, seed=3)
    ref = np.eye(4)
    for w in weights:
        a = w.numpy()
        mean = sum(a[h] for h in range(a.shape[0])) / a.shape[0]
        hat = np.array([[0.5 * mean[i, j] + 0.5 * (i == j) for j in range(4)] for i in range(4)])
        hat = hat / hat.sum(1, keepdims=True)
        ref = hat @ ref
    out = analysis.rollout(weights)
    assert len(out) == 3
    np.testing.assert_allclose(out[-1].numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(out[-1].sum(-1).numpy(), np.ones(4))


def test_flow_refuses_long_inputs() -> None:
    with pytest.raises(UserError, match="limited to 4 tokens"):
        analysis.attention_flow(random_weights(1, 1, 5), max_tokens=4)


# ---- entropy, attends-to -----------------------------------------------------------------------
def test_entropy_by_hand() -> None:
    uniform = torch.full((1, 4, 4), 0.25)
    onehot = torch.eye(4)[None]
    g = AttentionGroup("x", [torch.cat([uniform, onehot])], list("abcd"), list("abcd"))
    ent = analysis.entropy(g)
    assert ent.shape == (1, 2)
    assert ent[0, 0].item() == pytest.approx(math.log(4))
    assert ent[0, 1].item() == pytest.approx(0.0)


def test_attends_to_by_hand() -> None:
    t = 5
    prev = torch.zeros(t, t)
    prev[0, 0] = 1
    for i in range(1, t):
        prev[i, i - 1] = 1
    nxt = torch.roll(torch.eye(t), 1, dims=1)  # row i -> i+1, last row -> first
    tokens = ["[BOS]", "a", "b", "c", "[EOS]"]
    g = AttentionGroup("x", [torch.stack([prev, nxt, torch.eye(t)])], tokens, tokens)
    s = analysis.attends_to(g)
    assert s["previous"][0].tolist() == pytest.approx([(t - 1) / t, 0, 0])
    assert s["next"][0].tolist() == pytest.approx([0, (t - 1) / t, 0])
    assert s["self"][0].tolist() == pytest.approx([1 / t, 0, 1])
    assert s["first"][0].tolist() == pytest.approx([2 / t, 1 / t, 1 / t])
    assert s["last"][0].tolist() == pytest.approx([0, 1 / t, 1 / t])
    assert s["special"][0].tolist() == pytest.approx([2 / t, 2 / t, 2 / t])
    cross = AttentionGroup("c", [torch.full((1, 2, 3), 1 / 3)], ["x", "y"], ["p", "q", "r"])
    assert math.isnan(analysis.attends_to(cross)["self"][0, 0].item())


# ---- escaping ----------------------------------------------------------------------------------
def test_safe_json_cannot_close_the_script() -> None:
    text = safe_json({"tokens": NASTY})
    for bad in ("<", ">", "&", "\u2028"):
        assert bad not in text
    assert json.loads(text) == {"tokens": NASTY}


def test_document_round_trips_nasty_tokens_and_escapes_the_title() -> None:
    page = document({"view": "head", "title": "</title><script>alert(3)</script>",
                     "tokens": NASTY})
    assert embedded_data(page)["tokens"] == NASTY
    assert page.count("<script") == 2  # the JSON block and the viewer
    assert "&lt;/title&gt;" in page
    assert "http://" not in page.replace("http://www.w3.org/2000/svg", "")
    assert "https://" not in page


# ---- capture -----------------------------------------------------------------------------------
def test_capture_shapes_tokens_and_no_leftover_hooks(tok: Tokenizer) -> None:
    model = tiny_model(tok.vocab_size)
    cap = viz.capture_text(model, tok, "the fox", target="a dog")
    src, tgt = list("the fox"), ["[BOS]", *"a dog"]
    assert set(cap.groups) == {"encoder", "decoder", "cross"}
    expect = {"encoder": (2, src, src), "decoder": (3, tgt, tgt), "cross": (3, tgt, src)}
    for name, (layers, rows, cols) in expect.items():
        g = cap.group(name)
        assert (g.rows, g.cols, g.n_layers) == (rows, cols, layers)
        for layer in range(layers):
            assert g.weights[layer].shape == (4, len(rows), len(cols))
            assert g.queries[layer].shape == (4, len(rows), 8)
            assert g.keys[layer].shape == (4, len(cols), 8)
    assert all(not m._forward_hooks for m in model.modules())


def test_capture_weights_are_the_models(tok: Tokenizer) -> None:
    model = tiny_model(tok.vocab_size)
    src, tgt = tok.encode("lazy dog"), [1, *tok.encode("fox")]
    cap = viz.capture_ids(model, tok, src, tgt)
    out = model(torch.tensor([src]), torch.tensor([tgt]), output_attentions=True)
    for name, ws in (("encoder", out.encoder_attentions), ("decoder", out.decoder_attentions),
                     ("cross", out.cross_attentions)):
        for layer, w in enumerate(ws):
            torch.testing.assert_close(cap.group(name).weights[layer], w[0])


def test_neuron_scores_give_the_weights_and_match_float64(tok: Tokenizer) -> None:
    model = tiny_model(tok.vocab_size)
    cap = viz.capture_text(model, tok, "quick brown", target="over")
    data = embedded_data(viz.render(cap, "neuron").html)["neuron"]
    for g in data:
        group = cap.group(g["name"])
        for layer in range(g["L"]):
            shown = torch.tensor([[[-math.inf if s is None else s for s in row] for row in head]
                                  for head in g["scores"][layer]], dtype=torch.float64)
            torch.testing.assert_close(torch.softmax(shown, -1),
                                       group.weights[layer].double(), atol=2e-6, rtol=1e-5)
            # the scores are q k^T / sqrt(D) of the shown q and k (float64 reference)
            q = torch.tensor(g["q"][layer], dtype=torch.float64)
            k = torch.tensor(g["k"][layer], dtype=torch.float64)
            ref = q @ k.transpose(-1, -2) / math.sqrt(q.size(-1))
            finite = torch.isfinite(shown)
            torch.testing.assert_close(shown[finite], ref[finite], atol=2e-3, rtol=1e-3)
    # decoder scores are masked above the diagonal
    dec = next(g for g in data if g["name"] == "decoder")
    assert dec["scores"][0][0][0][1] is None


def test_views_render_every_group(tok: Tokenizer) -> None:
    model = tiny_model(tok.vocab_size)
    for view in ("head", "model", "neuron", "rollout"):
        page = getattr(viz, f"{view}_view")(model, tok, "the dog", target="fox")
        data = embedded_data(page.html)
        assert data["view"] == view
        assert page._repr_html_().startswith("<iframe srcdoc=")
    page = viz.head_view(model, tok, "the dog", target="fox")
    group = embedded_data(page.html)["panels"][0]["groups"][0]
    assert (group["name"], group["L"], group["H"], group["T"], group["S"]) == (
        "encoder", 2, 4, 7, 7)
    cmp = viz.compare_view(model, tiny_model(tok.vocab_size, seed=1), "the dog",
                           tokenizer_a=tok, tokenizer_b=tok)
    panels = embedded_data(cmp.html)["panels"]
    assert len(panels) == 2
    assert panels[0]["groups"][1]["rows"] == panels[1]["groups"][1]["rows"]
    assert panels[0]["groups"][0]["w"] != panels[1]["groups"][0]["w"]


def test_view_errors(tok: Tokenizer) -> None:
    model = tiny_model(tok.vocab_size)
    with pytest.raises(UserError, match="empty"):
        viz.head_view(model, tok, "   ")
    with pytest.raises(UserError, match="maximum"):
        viz.head_view(model, tok, "the dog " * 200)
    with pytest.raises(UserError, match="tokenizer"):
        viz.head_view(model, None, "the dog")
    with pytest.raises(UserError, match="unknown view"):
        viz.render(viz.capture_text(model, tok, "dog", "dog"), "heads")


# ---- CLI ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    run = tmp_path_factory.mktemp("vizrun") / "run"
    sets = ["train.steps=4", "train.eval_every=4", "train.save_every=4", "train.threads=1",
            "batch_tokens=256", "arch.d_model=32", "arch.d_ff=64", "arch.n_heads=2",
            "arch.n_encoder_layers=2", "arch.n_decoder_layers=1", "arch.max_len=40",
            "data.train_size=100", "data.eval_size=4", "eval_examples=2", f"run_dir={run}"]
    assert main(["train", "copy", *[a for s in sets for a in ("--set", s)]]) == 0
    return run


def test_cli_viz_writes_html_and_png(run_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    for view in ("head", "model", "neuron", "rollout"):
        out, png = tmp_path / f"{view}.html", tmp_path / f"{view}.png"
        assert main(["viz", str(run_dir), "12312", "--view", view, "-o", str(out),
                     "--png", str(png)]) == 0
        data = embedded_data(out.read_text(encoding="utf-8"))
        assert data["view"] == view
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = embedded_data((tmp_path / "head.html").read_text(encoding="utf-8"))
    groups = {g["name"]: g for g in page["panels"][0]["groups"]}
    assert groups["encoder"]["rows"] == list("12312")
    assert groups["decoder"]["rows"][0] == "[BOS]"  # then the model's greedy output
    out = tmp_path / "pair.html"
    assert main(["viz", str(run_dir), "123", "--pair", "321", "--group", "cross",
                 "-o", str(out)]) == 0
    (g,) = embedded_data(out.read_text(encoding="utf-8"))["panels"][0]["groups"]
    assert (g["name"], g["rows"], g["cols"]) == ("cross", ["[BOS]", *"321"], list("123"))


@pytest.mark.parametrize("args,fragment", [
    (["{tmp}/nope", "abc"], "not a directory"),
    (["{tmp}", "abc"], "not an attnkit run directory"),
    (["{run}", "  "], "empty"),
    (["{run}", "1" * 41], "maximum is 40"),
    (["{run}", "abc", "--view", "heads"], "unknown view 'heads'"),
    (["{run}", "abc", "--group", "crosss"], "unknown attention group"),
    (["{hf}", "abc"], "Hugging Face"),
])
def test_cli_viz_errors(args: list[str], fragment: str, run_dir: Path, tmp_path: Path,
                        capsys: pytest.CaptureFixture) -> None:
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    args = [a.format(tmp=tmp_path, run=run_dir, hf=hf) for a in args]
    out = tmp_path / "out.html"
    capsys.readouterr()
    assert main(["viz", *args, "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnkit: error:") and fragment in err[0], err
    assert not out.exists()
