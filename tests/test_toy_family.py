"""Adding a family is a model file (tests/toy_family.py) and one entry in the family table:
the toy then trains, evaluates, generates and is drawn through the command line. Generation
is checked against greedy decoding by full recomputation, the drawn weights against an
explicit float64 softmax(q k^T / sqrt(D)) with the causal mask."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attnkit import load, viz
from attnkit.cli import main
from attnkit.models import FAMILIES
from toy_family import TOY, ToyLM


@pytest.fixture()
def toy_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setitem(FAMILIES, "toy", TOY)  # the one table entry
    text = tmp_path / "text.txt"
    text.write_text("the cat sat on the mat\nthe dog ran to the sun\n" * 20, encoding="utf-8")
    run = tmp_path / "run"
    sets = ["model=toy", 'arch={"d_model": 16}', "block_size=16", "batch_size=4", "sample.n=0",
            "train.steps=3", "train.eval_every=3", "train.save_every=3", "train.threads=1",
            "eval.batch_size=8", f"data.train={text}", f"run_dir={run}"]
    torch.manual_seed(0)
    assert main(["train", "lm", *[a for s in sets for a in ("--set", s)]]) == 0
    return run


def _greedy_by_recomputation(model: ToyLM, ids: list[int], n: int, eos: int | None
                             ) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(torch.tensor([ids + out])).logits[0, -1].argmax())
            out.append(nxt)
            if nxt == eos:
                break
    return out


def test_a_toy_family_trains_evaluates_generates_and_draws(
        toy_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    record = json.loads((toy_run / "config.json").read_text(encoding="utf-8"))
    assert record["model"]["family"] == "toy"
    assert main(["eval", str(toy_run)]) == 0
    assert math.isfinite(json.loads((toy_run / "results.json").read_text())["val"]["loss"])

    loaded = load(toy_run)
    assert (loaded.family, type(loaded.model)) == ("toy", ToyLM)
    model, tok = loaded.model, loaded.tokenizer
    capsys.readouterr()
    assert main(["generate", str(toy_run), "the c", "--greedy", "--max-new-tokens", "6"]) == 0
    expect = _greedy_by_recomputation(model, tok.encode("the c"), 6, tok.eos_id)
    expect = [t for t in expect if t != tok.eos_id]
    assert capsys.readouterr().out == "the c" + tok.decode(expect) + "\n"
    prompt = tok.encode("the c")  # the toy's decoding protocol: cached steps = recomputation
    state, nxt, stepped = model.start(torch.tensor([prompt]), max_new_tokens=6), prompt, []
    with torch.no_grad():
        for _ in range(6):
            logits, state = model.step(state, torch.tensor([nxt]))
            nxt = [int(logits[0].argmax())]
            stepped += nxt
    assert stepped == _greedy_by_recomputation(model, prompt, 6, None)

    out = tmp_path / "toy.html"
    assert main(["viz", str(toy_run), "the cat", "-o", str(out)]) == 0
    assert out.is_file()
    cap = viz.capture_text(model, tok, "the cat")
    (w,) = cap.group("self").weights  # (H, T, T)
    ids = torch.tensor([tok.encode("the cat")])
    with torch.no_grad():
        x = (model.embed(ids) + model.positions(torch.arange(ids.size(1))[None])).double()
        q, k, _ = (x @ model.attn.qkv_proj.weight.double().T
                   + model.attn.qkv_proj.bias.double()).chunk(3, dim=-1)
    t, h = ids.size(1), model.config.n_heads
    q, k = (y[0].view(t, h, -1).transpose(0, 1) for y in (q, k))  # (H, T, D)
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.size(-1))
    scores = scores.masked_fill(~torch.ones(t, t, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(w.double(), scores.softmax(-1), atol=1e-6, rtol=1e-5)

    for command in (["export", str(toy_run), str(tmp_path / "hf")],
                    ["translate", str(toy_run), "the"]):
        capsys.readouterr()
        assert main(command) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("attnkit: error:"), err
