"""Runs written by the release before the family table (commit d09adca; tests/data/old_runs, made
by its make_runs.sh) work with today's attnkit. ``eval`` reproduces the results.json that release
wrote; a run killed during step 2 resumes from its step-1 checkpoint (``attnkit resume`` and the
first command alike) to the very weights that release reached at step 2; generate, translate,
viz and export answer what that release answered (expected.json, its exports in data/). What
cannot carry over (a retired setting given again) is refused in one line that says what to do.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import attnkit
from _resume import assert_resumed, mark_log
from _runs import one_error_line
from attnkit.cli import main
from attnkit.models import FAMILIES
from attnkit.rundir import read_run

OLD = Path(__file__).resolve().parent / "data" / "old_runs"
RUNS = sorted(p.name for p in (OLD / "runs").iterdir())
EXPECTED = json.loads((OLD / "expected.json").read_text(encoding="utf-8"))
TIMINGS = {"seconds", "decode_seconds", "faster", "threads"}  # wall clock (and its threads)
# the first command of two runs (make_runs.sh): the same command resumes them
TINY = ["train.steps=2", "train.eval_every=2", "train.save_every=1", "train.log_every=1",
        "train.threads=1"]
FIRST = {
    "copy": ["copy", "arch.d_model=8", "arch.d_ff=16", "arch.n_heads=2",
             "arch.n_encoder_layers=1", "arch.n_decoder_layers=1", "arch.max_len=32",
             "data.max_len=5", "data.train_size=60", "data.eval_size=4", "eval_examples=2",
             "batch_tokens=128", "decode.beam_size=2"],
    "finetune": ["finetune", "init=runs/bert", "data.train=data/sentiment.csv", "max_len=24",
                 "batch_size=4"],
}


@pytest.fixture
def old(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the old runs and their data, as the working directory (their paths are
    relative to it, as a user's would be)."""
    root = tmp_path / "old_runs"
    shutil.copytree(OLD, root)
    monkeypatch.chdir(root)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    threads = torch.get_num_threads()  # the recipes run with train.threads=1
    yield root
    torch.set_num_threads(threads)


def _same(new: object, old: object, where: str = "") -> None:
    """``new`` equals ``old`` (numbers to 1e-6), wall-clock figures aside."""
    if isinstance(old, dict):
        assert isinstance(new, dict) and set(new) == set(old), where
        for key in set(old) - TIMINGS:
            _same(new[key], old[key], f"{where}.{key}")
    elif isinstance(old, list):
        assert isinstance(new, list) and len(new) == len(old), where
        for i, (a, b) in enumerate(zip(new, old, strict=True)):
            _same(a, b, f"{where}[{i}]")
    elif isinstance(old, float):
        assert new == pytest.approx(old, rel=1e-6, abs=1e-6), where
    else:
        assert new == old, where


def _results(run: str) -> dict:
    return json.loads((Path("runs") / run / "results.json").read_text(encoding="utf-8"))


@pytest.mark.parametrize("run", RUNS)
def test_eval_reproduces_what_the_old_release_reported(run: str, old: Path) -> None:
    before = _results(run)
    assert main(["eval", f"runs/{run}"]) == 0
    _same(_results(run), before)


def _interrupt(run: str) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The run as a kill during step 2 leaves it; returns the step-2 weights the old release
    reached and the marked log (tests/_resume.py)."""
    checkpoints = Path("runs") / run / "checkpoints"
    reached = load_file(checkpoints / "step-000002.safetensors")
    for name in ("step-000002.safetensors", "best.safetensors", "../results.json"):
        (checkpoints / name).unlink(missing_ok=True)
    return reached, mark_log(Path("runs") / run)


def _resumed_to(run: str, reached: dict[str, torch.Tensor], before: list[dict], err: str,
                results: dict) -> None:
    assert_resumed(Path("runs") / run, 1, err, before)
    weights = load_file(Path("runs") / run / "checkpoints" / "step-000002.safetensors")
    assert set(weights) == set(reached)
    assert all(torch.equal(weights[k], reached[k]) for k in reached), "not the old weights"
    _same(_results(run), results)


@pytest.mark.parametrize("run", RUNS)
def test_attnkit_resume_continues_an_old_run_exactly(run: str, old: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    results = _results(run)
    reached, before = _interrupt(run)
    capsys.readouterr()
    assert main(["resume", f"runs/{run}"]) == 0
    _resumed_to(run, reached, before, capsys.readouterr().err, results)


def test_old_records_are_read_in_todays_layout(old: Path) -> None:
    assert attnkit.load("runs/roberta").family == "roberta"  # recorded as "bert" before
    assert attnkit.load("runs/xl-lm").config.attention_path == "auto"  # recorded as attn_impl
    assert json.loads(Path("runs/xl-lm/config.json").read_text())["model"]["config"][
        "attn_impl"] == "auto"
    finetune = read_run("runs/finetune")  # the head recorded beside the model before
    assert finetune["model"]["head"] == {"labels": ["bad", "good"], "pooling": "pooler",
                                         "task": "classify"}
    assert "head" not in finetune
    for run in RUNS:
        record = read_run(f"runs/{run}")
        assert "country_iso_code" not in json.dumps(record)
        assert "country_iso_code" in Path(f"runs/{run}/config.json").read_text()


@pytest.mark.parametrize("run", list(FIRST))
def test_the_first_command_resumes_an_old_run(run: str, old: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    recipe, *settings = FIRST[run]
    results = _results(run)
    reached, before = _interrupt(run)
    capsys.readouterr()
    args = [a for s in [*settings, *TINY, f"run_dir=runs/{run}"] for a in ("--set", s)]
    assert main(["train", recipe, *args]) == 0
    _resumed_to(run, reached, before, capsys.readouterr().err, results)


def test_a_retired_setting_given_again_is_refused_in_one_line(
        old: Path, capsys: pytest.CaptureFixture) -> None:
    config = old / "copy.json"  # the settings the old release recorded, as a config file
    config.write_text(json.dumps(json.loads(Path("runs/copy/config.json").read_text())["config"]))
    listing = sorted(p for p in old.rglob("*"))
    for args, says in (
            (["--set", "train.energy.country_iso_code=FRA"], "leave it out"),
            (["--config", str(config)], "leave it out"),
            (["--set", "train.energy.method=codecarbon"], "use auto")):
        capsys.readouterr()
        assert main(["train", "copy", *args, "--set", "run_dir=runs/copy"]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "no longer" in line and "codecarbon" in line and says in line, line
    assert sorted(p for p in old.rglob("*")) == listing


def test_a_run_metered_by_codecarbon_evaluates_and_resumes(old: Path,
                                                           capsys: pytest.CaptureFixture) -> None:
    path = Path("runs/copy/config.json")
    record = json.loads(path.read_text(encoding="utf-8"))
    record["config"]["train"]["energy"]["method"] = "codecarbon"  # set by its first command
    path.write_text(json.dumps(record), encoding="utf-8")
    results = _results("copy")
    assert main(["eval", "runs/copy"]) == 0
    reached, before = _interrupt("copy")
    capsys.readouterr()
    assert main(["resume", "runs/copy"]) == 0
    _resumed_to("copy", reached, before, capsys.readouterr().err, results)


@pytest.mark.parametrize("run", sorted(EXPECTED["generate"]))
def test_generate_on_an_old_run(run: str, old: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["generate", f"runs/{run}", "the c", "--greedy", "--max-new-tokens", "8"]) == 0
    out = capsys.readouterr().out
    if EXPECTED["generate"][run] is None:  # that release could not generate with this family
        record = json.loads(Path(f"runs/{run}/config.json").read_text(encoding="utf-8"))
        assert record["model"]["family"] == "transformer-xl"
        assert out.startswith("the c") and len(out.rstrip("\n")) <= len("the c") + 8
    else:
        assert out == EXPECTED["generate"][run]


@pytest.mark.parametrize("run", sorted(EXPECTED["translate"]))
def test_translate_on_an_old_run(run: str, old: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["translate", f"runs/{run}", "12", "eins zwei"]) == 0
    assert capsys.readouterr().out == EXPECTED["translate"][run]


def _page_data(path: Path) -> dict:
    page = path.read_text(encoding="utf-8")
    found = re.search(r'<script type="application/json" id="attnkit-data">(.*?)</script>',
                      page, re.S)
    return json.loads(found.group(1))


def _weights(page: str) -> torch.Tensor:
    """A layer's weights as the page holds them: bytes round(255 w), base64."""
    return torch.tensor(list(base64.b64decode(page)), dtype=torch.int16)


VIZ_TEXT = {"pointer": "0.5 0.1 0.9", "ntm": "1011 0110"}


@pytest.mark.parametrize("run", RUNS)
def test_viz_on_an_old_run(run: str, old: Path, capsys: pytest.CaptureFixture) -> None:
    family = json.loads(Path(f"runs/{run}/config.json").read_text())["model"]["family"]
    expected = EXPECTED["viz"].get(run)
    text = expected["text"] if expected else VIZ_TEXT.get(run, "the cat")
    capsys.readouterr()
    code = main(["viz", f"runs/{run}", text, "-o", "view.html"])
    if not FAMILIES[family].viz:
        assert code == 2 and "no attention to show" in one_error_line(capsys.readouterr().err)
        return
    assert code == 0
    data = _page_data(Path("view.html"))
    if expected:  # what the old release drew (weights to the page's rounding, 1/255)
        for panel, before in zip(data["panels"], expected["data"]["panels"], strict=True):
            for group, was in zip(panel["groups"], before["groups"], strict=True):
                diffs = [(_weights(w) - _weights(v)).abs().max() for w, v in
                         zip(group.pop("w"), was.pop("w"), strict=True)]
                assert max(diffs) <= 1, group["name"]
        _same(data, {**expected["data"], "title": data["title"]})
        return
    for group in data["panels"][0]["groups"]:  # a family that release could not draw
        assert (group["T"], group["S"]) == (len(group["rows"]), len(group["cols"]))
        layers = [_weights(w) for w in group["w"]]
        assert len(layers) == group["L"]
        for w in layers:  # each row a distribution over the columns
            rows = w.view(group["H"] * group["T"], group["S"]).sum(-1)
            assert bool(((rows - 255).abs() <= group["S"] / 2).all()), rows


EXPORTS = {"lm": "gpt2-hf", "finetune-lm": "finetune-lm-hf", "bert": "bert-hf",
           "roberta": "roberta-hf", "distil": "distil-hf"}


@pytest.mark.parametrize("run", RUNS)
def test_export_an_old_run(run: str, old: Path, capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    code = main(["export", f"runs/{run}", "exported"])
    if run not in EXPORTS:
        assert code == 2 and "no Hugging Face format" in one_error_line(capsys.readouterr().err)
        return
    assert code == 0
    made = Path("data") / EXPORTS[run]  # the old release's export of this run
    assert sorted(p.name for p in Path("exported").iterdir()) == sorted(
        p.name for p in made.iterdir())
    config = json.loads(Path("exported/config.json").read_text(encoding="utf-8"))
    assert config.pop("attnkit_export") is True  # today's exports are marked as attnkit's
    assert config == json.loads((made / "config.json").read_text(encoding="utf-8"))
    assert Path("exported/tokenizer.json").read_bytes() == (made / "tokenizer.json").read_bytes()
    tensors, before = load_file("exported/model.safetensors"), load_file(made / "model.safetensors")
    assert set(tensors) == set(before) and all(torch.equal(tensors[k], before[k]) for k in before)


def test_export_overwrite_keeps_an_unmarked_old_export(old: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    made = Path("data/gpt2-hf")
    files = {p.name: p.read_bytes() for p in made.iterdir()}
    capsys.readouterr()
    assert main(["export", "runs/lm", str(made), "--overwrite"]) == 2
    assert "remove this one yourself" in one_error_line(capsys.readouterr().err)
    assert {p.name: p.read_bytes() for p in made.iterdir()} == files
