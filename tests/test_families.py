"""The family table walked through the command line: every family trains a tiny run, and every
command that applies to it (eval; viz where it has attention to show; generate or translate by
its decoding protocol; export where it has a Hugging Face format) works on that run, while the
others refuse in one line. A family added to the table without an entry here fails."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from attnkit import viz
from attnkit.cli import main
from attnkit.models import FAMILIES

SEQ2SEQ = ["arch.d_model=16", "arch.d_ff=32", "arch.n_heads=2", "arch.n_encoder_layers=1",
           "arch.n_decoder_layers=1", "arch.max_len=32"]
RNN = ["preset=tiny", "arch.embed_size=16", "arch.hidden_size=16", "arch.n_layers=1",
       "arch.max_len=32"]
COPY = ["data.max_len=5", "data.train_size=60", "data.eval_size=4", "eval_examples=2",
        "batch_tokens=128", "decode.beam_size=2"]
SHORT = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "train.threads=1"]
LM = ["arch.n_layers=1", "arch.d_model=16", "arch.n_heads=2", "block_size=16", "batch_size=4",
      "sample.n=0", "eval.batch_size=16"]
XL = ["seg_len=8", "batch_size=2", "arch.d_model=16", "arch.n_heads=2", "arch.n_layers=1",
      "arch.d_ff=32", "arch.mem_len=8", "eval.max_chars=200", "sample.n=0"]
BERT = ["max_len=24", "batch_size=4", "tokenizer.vocab_size=60", "arch.d_model=16",
        "arch.d_ff=32", "arch.n_heads=2", "arch.n_layers=1"]

# family -> (recipe, settings ({text}, {bert} are filled in), text viz draws, group it shows)
WALK: dict[str, tuple[str, list[str], str, str]] = {
    "transformer": ("copy", [*SEQ2SEQ, *COPY], "123", "cross"),
    "rnn-attention": ("copy", ["model=rnn-attention", *RNN, *COPY], "123", "cross"),
    "rnn": ("copy", ["model=rnn", *RNN, *COPY], "", ""),
    "gpt2": ("lm", [*LM, "data.train={text}"], "the cat", "self"),
    "transformer-xl": ("xl-lm", [*XL, "data.train={text}"], "the cat", "self"),
    "bert": ("bert-pretrain", [*BERT, "data.train={text}"], "the cat", "encoder"),
    "roberta": ("roberta-pretrain", [*BERT, "data.train={text}", "train.accum_steps=1"],
                "the cat", "encoder"),
    "distilbert": ("distil", ["teacher={bert}", "data.train={text}", "max_len=24",
                              "batch_size=4", "speed_repeats=1"], "the cat", "encoder"),
    "pointer": ("pointer-sort", ["arch.d_model=8", "data.min_len=2", "data.max_len=3",
                                 "data.eval_size=4", "batch_size=4"], "0.5 0.1 0.9", "pointer"),
    "ntm": ("ntm-copy", ["arch.controller_size=8", "arch.memory_size=8", "arch.memory_width=4",
                         "data.width=4", "data.max_len=2", "data.eval_size=4", "batch_size=4"],
            "1011 0110", "read"),
    "parity-act": ("act-parity", ["hidden_size=8", "max_steps=3", "data.size=4",
                                  "data.eval_size=8", "batch_size=8"], "", ""),
}


def test_every_family_is_walked() -> None:
    assert set(WALK) == set(FAMILIES)


@pytest.fixture(scope="module")
def text(tmp_path_factory: pytest.TempPathFactory) -> Path:
    lines = [f"the {w} sat on the {v} mat ." for w in ("cat", "dog", "fox")
             for v in ("red", "blue")]
    path = tmp_path_factory.mktemp("data") / "text.txt"
    path.write_text("\n\n".join(lines) * 6, encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


def _train(family: str, runs: Path, text: Path) -> Path:
    recipe, settings, _, _ = WALK[family]
    run = runs / family
    if not run.exists():
        if family == "distilbert":
            _train("bert", runs, text)
        torch.manual_seed(0)
        filled = [s.format(text=text, bert=runs / "bert") for s in settings]
        args = [a for s in [*filled, *SHORT, f"run_dir={run}"] for a in ("--set", s)]
        assert main(["train", recipe, *args]) == 0
    return run


def _refused(args: list[str], capsys: pytest.CaptureFixture, fragment: str) -> None:
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("attnkit: error:") and fragment in err[0], err


def _viz(family: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    _, _, text, group = WALK[family]
    out = tmp_path / "view.html"
    if not FAMILIES[family].viz:
        _refused(["viz", str(run), "abc", "-o", str(out)], capsys, "no attention to show")
        return
    assert main(["viz", str(run), text, "-o", str(out), "--group", group]) == 0
    page = out.read_text(encoding="utf-8")
    data = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>', page,
                     re.S)
    (shown,) = json.loads(data.group(1))["panels"][0]["groups"]
    assert shown["name"] == group and (shown["T"], shown["S"]) == (len(shown["rows"]),
                                                                    len(shown["cols"]))
    model, tok = viz.load(run)
    for g in viz.capture_text(model, tok, text).groups.values():  # distributions over columns
        for w in g.weights:
            torch.testing.assert_close(w.sum(-1), torch.ones(w.shape[:-1]))
            if g.mask is not None:
                assert bool((w.masked_select(~g.mask) == 0).all())


def _decode(family: str, run: Path, capsys: pytest.CaptureFixture) -> None:
    kind = FAMILIES[family].decoding
    capsys.readouterr()
    if kind == "lm":
        assert main(["generate", str(run), "the", "--greedy", "--max-new-tokens", "3"]) == 0
        assert capsys.readouterr().out.startswith("the")
    elif kind == "seq2seq":
        assert main(["translate", str(run), "123", "--greedy"]) == 0
        assert capsys.readouterr().out.strip("\n") != ""
    else:
        _refused(["generate", str(run), "abc"], capsys, "not a decoder-only language model")
        _refused(["translate", str(run), "abc"], capsys, f"holds a '{family}' model")


def _export(family: str, run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "hf"
    if not FAMILIES[family].converter:
        _refused(["export", str(run), str(out)], capsys, "runs have no Hugging Face format")
        assert not out.exists()
        return
    assert main(["export", str(run), str(out)]) == 0
    hf = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert hf["model_type"] in FAMILIES[family].hf_types


@pytest.mark.parametrize("family", list(WALK))
def test_commands_on_a_tiny_run_of_each_family(family: str, runs: Path, text: Path,
                                               tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    run = _train(family, runs, text)
    record = json.loads((run / "config.json").read_text(encoding="utf-8"))
    assert record["model"]["family"] == family  # setup_run recorded it
    assert main(["eval", str(run)]) == 0
    _viz(family, run, tmp_path, capsys)
    _export(family, run, tmp_path, capsys)
    _decode(family, run, capsys)
