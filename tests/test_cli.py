"""The `attnkit` command end to end: tiny real runs in subprocesses, bad input in process.

Every bad input must end with exit code 2, exactly one ``attnkit: error:`` line on stderr, no
traceback, and nothing created or overwritten. Runs are tiny (one-layer, d_model 32, a few
steps) so the whole file stays well under a minute on 2 cores.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from attnkit.cli import main
from attnkit.recipes import RECIPES

SRC = Path(__file__).resolve().parents[1] / "src"
TINY_ARCH = ["arch.d_model=32", "arch.d_ff=64", "arch.n_heads=2", "arch.n_encoder_layers=1",
             "arch.n_decoder_layers=1"]
TINY_TRAIN = ["train.steps=10", "train.eval_every=5", "train.save_every=5", "train.threads=1",
              "batch_tokens=256"]
COPY_MAX_LEN = 64


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def copy_args(run_dir: Path, *extra: str) -> list[str]:
    """A tiny `train copy` command line (a few seconds)."""
    return ["train", "copy", *_sets([*TINY_TRAIN, *TINY_ARCH, f"arch.max_len={COPY_MAX_LEN}",
                                     "data.train_size=300", "data.eval_size=20",
                                     "eval_examples=10", f"run_dir={run_dir}", *extra])]


def run_cli(args: list[str], cwd: Path, stdin: str | None = None
            ) -> subprocess.CompletedProcess:
    """`python -m attnkit ARGS` in a subprocess, with its cache inside ``cwd``."""
    env = {**os.environ, "PYTHONPATH": str(SRC), "ATTNKIT_CACHE": str(cwd / "cache"),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "attnkit", *map(str, args)], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


def assert_user_error(code: int, err: str, *fragments: str) -> str:
    """Exit 2, one `attnkit: error:` line (the last one), no traceback; returns the message."""
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith("attnkit: error:")]
    assert len(errors) == 1, err
    assert lines[-1] == errors[0], err
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def cli_error(capsys: pytest.CaptureFixture, args: list[str], *fragments: str,
              only_line: bool = True) -> str:
    """Run main(args) in process, expecting a user error; ``only_line``: stderr is just it."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    message = assert_user_error(code, err, *fragments)
    if only_line:
        assert err.strip() == message, err
    return message


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every path under ``root`` with its bytes (None for directories)."""
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
            for p in sorted(root.rglob("*"))}


def report_outputs(stdout: str) -> list[tuple[str, str]]:
    """(input, output) pairs of the samples a final report prints."""
    lines = stdout.splitlines()
    pairs = []
    for i, line in enumerate(lines):
        if line.startswith("  input: "):
            out = lines[i + 2]
            assert out.startswith("  output:"), out
            out = out.removesuffix("   (wrong)")
            pairs.append((line[len("  input: "):], out[len("  output: "):]))
    return pairs


# ---- trained tiny runs (shared, never modified: tests that damage a run copy it first) ---------
@pytest.fixture(scope="module")
def copy_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("copy")
    proc = run_cli(copy_args(root / "run"), root)
    assert proc.returncode == 0, proc.stderr
    return root / "run", proc


def _sentence(i: int) -> tuple[str, str]:
    """A deterministic toy 'language pair': number words in, reversed English words out."""
    de = ["null", "eins", "zwei", "drei", "vier", "fuenf", "sechs", "sieben"]
    en = ["zero", "one", "two", "three", "four", "five", "six", "seven"]
    digits = [(i * 7 + k * 3) % 8 for k in range(2 + i % 3)]
    return " ".join(de[d] for d in digits), " ".join(en[d] for d in reversed(digits))


def write_parallel(folder: Path, n_train: int = 40, n_valid: int = 8) -> list[str]:
    """train/valid source and target files; returns the four --set assignments."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, rows in (("train", range(n_train)), ("valid", range(100, 100 + n_valid))):
        pairs = [_sentence(i) for i in rows]
        for side, k in (("src", 0), ("tgt", 1)):
            path = folder / f"{split}.{side}"
            path.write_text("".join(p[k] + "\n" for p in pairs), encoding="utf-8")
            files[f"{split}_{side}"] = path
    return [f"data.{key}={path}" for key, path in files.items()]


TRANSLATE_MAX_LEN = 24


def translate_args(run_dir: Path, data_sets: list[str], *extra: str) -> list[str]:
    return ["train", "translate", *_sets([*TINY_TRAIN, *TINY_ARCH,
                                          f"arch.max_len={TRANSLATE_MAX_LEN}",
                                          "tokenizer.vocab_size=60", "eval_examples=4",
                                          "decode.beam_size=2", f"run_dir={run_dir}",
                                          *data_sets, *extra])]


@pytest.fixture(scope="module")
def translate_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("translate")
    proc = run_cli(translate_args(root / "run", write_parallel(root / "data")), root)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "val: bleu" in proc.stdout
    assert (root / "run" / "checkpoints" / "best.safetensors").is_file()
    return root / "run"


# ---- positive paths ------------------------------------------------------------------------------
def test_help_mentions_every_command(tmp_path: Path) -> None:
    proc = run_cli(["--help"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("train", "eval", "translate", "recipes"):
        assert command in proc.stdout


def test_recipes_lists_and_shows(capsys: pytest.CaptureFixture) -> None:
    assert main(["recipes"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert names == list(RECIPES)  # every registered recipe, in registry order
    assert {"math-demo", "math", "translate", "copy", "lm", "pointer-sort"} <= set(names)
    assert main(["recipes", "--show", "translate"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["tokenizer"]["kind"] == "bpe"
    assert shown["train"]["best_metric"] == "val_loss"
    assert set(shown["data"]) >= {"train_src", "train_tgt", "valid_src", "valid_tgt"}


def test_export_refuses_runs_without_a_hugging_face_format(
        copy_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run, _ = copy_run
    assert main(["export", str(run), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'copy' runs have no Hugging Face format" in err
    assert not (tmp_path / "out").exists()


def test_copy_run_layout(copy_run: tuple[Path, subprocess.CompletedProcess]) -> None:
    run, proc = copy_run
    for name in ("config.json", "tokenizer.json", "metrics.jsonl", "plots/loss.png",
                 "results.json"):
        assert (run / name).is_file(), name
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert ckpts == ["step-000005.safetensors", "step-000005.state.pt",
                     "step-000010.safetensors", "step-000010.state.pt"]
    record = json.loads((run / "config.json").read_text())
    assert record["recipe"] == "copy"
    assert record["config"]["train"]["steps"] == 10
    assert record["model"]["config"]["d_model"] == 32
    assert record["model"]["config"]["max_len"] == COPY_MAX_LEN
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 10
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"seen_lengths", "longer"}
    assert results["longer"]["examples"] == 20
    assert (run / "plots" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "seen_lengths: exact_match" in proc.stdout


def test_eval_reproduces_the_final_report(copy_run: tuple[Path, subprocess.CompletedProcess],
                                          tmp_path: Path) -> None:
    src, proc = copy_run
    run = tmp_path / "run"
    shutil.copytree(src, run)
    before = json.loads((run / "results.json").read_text())
    checkpoints = snapshot(run / "checkpoints")
    ev = run_cli(["eval", run], tmp_path)
    assert ev.returncode == 0, ev.stderr
    after = json.loads((run / "results.json").read_text())
    for name in before:
        assert after[name]["exact_match"] == before[name]["exact_match"]
        assert after[name]["examples"] == before[name]["examples"]
    # the decoded samples (not just the metric) are the same as at the end of training
    assert report_outputs(ev.stdout) == report_outputs(proc.stdout)
    assert len(report_outputs(ev.stdout)) == 10
    assert snapshot(run / "checkpoints") == checkpoints


def test_translate_reads_stdin_one_line_per_input(
        copy_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run, proc = copy_run
    sources = [src for src, _ in report_outputs(proc.stdout)[:3]] + ["7"]
    tr = run_cli(["translate", run], tmp_path, stdin="".join(s + "\n" for s in sources))
    assert tr.returncode == 0, tr.stderr
    outputs = tr.stdout.split("\n")
    assert outputs[-1] == "" and len(outputs) == len(sources) + 1
    # the same lines given as arguments (in process) decode to the same outputs
    capsys.readouterr()
    assert main(["translate", str(run), *sources]) == 0
    assert capsys.readouterr().out == tr.stdout


def test_translate_output_does_not_depend_on_batch_mates(
        copy_run: tuple[Path, subprocess.CompletedProcess],
        capsys: pytest.CaptureFixture) -> None:
    # The output length limit is per sentence (a * len(source_i) + b), so a sentence's output
    # does not depend on which other sentences share its batch.
    run, _ = copy_run
    capsys.readouterr()
    assert main(["translate", str(run), "12"]) == 0
    alone = capsys.readouterr().out.splitlines()
    assert main(["translate", str(run), "12", "0123456789" * 4]) == 0
    together = capsys.readouterr().out.splitlines()
    assert together[0] == alone[0]


def test_translate_args_and_greedy_in_process(translate_run: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    capsys.readouterr()
    assert main(["translate", str(translate_run), "eins zwei", "drei", "--greedy"]) == 0
    out = capsys.readouterr().out
    assert len(out.splitlines()) == 2


def test_rerun_of_finished_run_resumes_without_training(
        copy_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path) -> None:
    run, first = copy_run
    checkpoints = snapshot(run / "checkpoints")
    metrics = (run / "metrics.jsonl").read_bytes()
    config = (run / "config.json").read_bytes()
    proc = run_cli(copy_args(run), tmp_path)  # the very same command line
    assert proc.returncode == 0, proc.stderr
    assert "resuming from" in proc.stderr and "step 10" in proc.stderr
    assert snapshot(run / "checkpoints") == checkpoints
    assert (run / "metrics.jsonl").read_bytes() == metrics
    assert (run / "config.json").read_bytes() == config
    assert report_outputs(proc.stdout) == report_outputs(first.stdout)


# ---- bad data files (translate recipe with explicit files) ---------------------------------------
@pytest.fixture()
def data_sets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Good parallel files in tmp_path/data; the working directory is tmp_path."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    return write_parallel(tmp_path / "data")


def _translate_error(capsys: pytest.CaptureFixture, tmp_path: Path, data: list[str],
                     *fragments: str) -> None:
    before = snapshot(tmp_path)
    cli_error(capsys, translate_args(tmp_path / "run", data), *fragments)
    assert not (tmp_path / "run").exists()
    assert snapshot(tmp_path) == before


def _replace(data: list[str], key: str, path: Path) -> list[str]:
    return [f"data.{key}={path}" if item.startswith(f"data.{key}=") else item for item in data]


def test_missing_source_file(data_sets: list[str], tmp_path: Path,
                             capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "data" / "nope.src"
    _translate_error(capsys, tmp_path, _replace(data_sets, "train_src", missing),
                     "not found", "nope.src")


def test_empty_file(data_sets: list[str], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "data" / "empty.tgt"
    empty.write_bytes(b"")
    _translate_error(capsys, tmp_path, _replace(data_sets, "train_tgt", empty),
                     "empty", "empty.tgt")


def test_non_utf8_file(data_sets: list[str], tmp_path: Path,
                       capsys: pytest.CaptureFixture) -> None:
    latin = tmp_path / "data" / "latin1.src"
    text = (tmp_path / "data" / "valid.src").read_text(encoding="utf-8")
    latin.write_bytes(text.encode("utf-8") .replace(b"fuenf", "f\u00fcnf".encode("latin-1")))
    assert b"\xfc" in latin.read_bytes()
    _translate_error(capsys, tmp_path, _replace(data_sets, "valid_src", latin),
                     "UTF-8", "latin1.src", "0xfc")


def test_parallel_files_of_different_lengths(data_sets: list[str], tmp_path: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    short = tmp_path / "data" / "short.tgt"
    lines = (tmp_path / "data" / "train.tgt").read_text(encoding="utf-8").splitlines()
    short.write_text("\n".join(lines[:-3]) + "\n", encoding="utf-8")
    _translate_error(capsys, tmp_path, _replace(data_sets, "train_tgt", short),
                     "differ in length", "40", "37")


def test_translate_without_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, ["train", "translate"], "data.dir")
    assert list(tmp_path.iterdir()) == []


# ---- bad recipe names, keys, values and config files -----------------------------------------
def test_unknown_recipe_suggests_nearest(tmp_path: Path) -> None:
    proc = run_cli(["train", "trasnlate"], tmp_path)  # end to end through `python -m attnkit`
    assert_user_error(proc.returncode, proc.stderr, "trasnlate", "did you mean 'translate'")
    assert proc.stderr.strip().count("\n") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize(("override", "fragments"), [
    ("train.stpes=5", ("train.stpes", "did you mean 'train.steps'")),
    ("trian.steps=5", ("trian", "did you mean 'train'")),
    ("data.taks=reverse", ("data.taks", "did you mean 'data.task'")),
    ("arch.d_modle=32", ("d_modle", "d_model")),
    ("train.steps=abc", ("train.steps", "integer", "abc")),
    ("train.steps=0", ("train.steps", ">= 1")),
    ("label_smoothing=yes", ("label_smoothing", "number")),
    ("decode.method=beem", ("decode.method", "did you mean 'beam'")),
    ("tokenizer.kind=bpx", ("tokenizer.kind",)),
    ("train.steps", ("key=value",)),
])
def test_bad_override(override: str, fragments: tuple[str, ...], tmp_path: Path,
                      monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, ["train", "copy", "--set", override], *fragments)
    assert list(tmp_path.iterdir()) == []  # no runs/ directory


def test_config_file_missing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, ["train", "copy", "--config", "nope.json"], "not found", "nope.json")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("content", "fragment"), [
    (b'{"train": {"steps": 5,}}', "not valid JSON"),
    (b"[1, 2]", "JSON object"),
    (b"\xff\xfe\x00garbage", "cfg.json"),
    (b'{"train": {"stpes": 5}}', "did you mean 'train.steps'"),
])
def test_config_file_bad(content: bytes, fragment: str, tmp_path: Path,
                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cfg.json").write_bytes(content)
    cli_error(capsys, ["train", "copy", "--config", "cfg.json"], fragment)
    assert [p.name for p in tmp_path.iterdir()] == ["cfg.json"]
    assert (tmp_path / "cfg.json").read_bytes() == content


# ---- bad runs ------------------------------------------------------------------------------------
def test_input_longer_than_the_model_maximum(translate_run: Path,
                                             capsys: pytest.CaptureFixture) -> None:
    long = " ".join(["sieben drei fuenf"] * 6)
    message = cli_error(capsys, ["translate", translate_run, "eins", long],
                        "input 2", f"maximum is {TRANSLATE_MAX_LEN}")
    assert "Traceback" not in message
    assert capsys.readouterr().out == ""  # nothing decoded before the error


def test_copy_run_input_too_long(copy_run: tuple[Path, subprocess.CompletedProcess],
                                 capsys: pytest.CaptureFixture) -> None:
    run, _ = copy_run
    cli_error(capsys, ["translate", run, "1" * (COPY_MAX_LEN + 1)],
              f"{COPY_MAX_LEN + 1} tokens", f"maximum is {COPY_MAX_LEN}")


def test_translate_nothing_given(copy_run: tuple[Path, subprocess.CompletedProcess],
                                 tmp_path: Path) -> None:
    run, _ = copy_run
    proc = run_cli(["translate", run], tmp_path, stdin="\n  \n")
    assert_user_error(proc.returncode, proc.stderr, "nothing to translate")


def test_bad_beam(copy_run: tuple[Path, subprocess.CompletedProcess],
                  capsys: pytest.CaptureFixture) -> None:
    cli_error(capsys, ["translate", copy_run[0], "12", "--beam", "0"], "--beam")


def _damaged_copy(copy_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path,
                  how: str) -> tuple[Path, Path, bytes]:
    run = tmp_path / "run"
    shutil.copytree(copy_run[0], run)
    latest = run / "checkpoints" / "step-000010.safetensors"
    data = latest.read_bytes()
    if how == "truncated":
        damaged = data[: len(data) // 2]
    else:  # same size, the header and every byte after the first 8 garbled
        damaged = data[:8] + bytes((b * 37 + 11) % 256 for b in data[8:])
    latest.write_bytes(damaged)
    return run, latest, damaged


@pytest.mark.parametrize("how", ["corrupt", "truncated"])
def test_damaged_checkpoint_eval_and_translate(
        how: str, copy_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path,
        capsys: pytest.CaptureFixture) -> None:
    run, latest, damaged = _damaged_copy(copy_run, tmp_path, how)
    before = snapshot(run)
    cli_error(capsys, ["eval", run], "step-000010.safetensors", "corrupt or truncated")
    cli_error(capsys, ["translate", run, "123"], "step-000010.safetensors",
              "corrupt or truncated")
    assert latest.read_bytes() == damaged
    assert snapshot(run) == before  # results.json and everything else left as it was


def test_damaged_checkpoint_end_to_end(copy_run: tuple[Path, subprocess.CompletedProcess],
                                       tmp_path: Path) -> None:
    run, latest, damaged = _damaged_copy(copy_run, tmp_path, "truncated")
    before = snapshot(run)
    proc = run_cli(["eval", run], tmp_path)
    assert_user_error(proc.returncode, proc.stderr, "corrupt or truncated")
    assert proc.stdout == ""
    assert snapshot(run) == before


def test_damaged_best_checkpoint_of_translate_run(translate_run: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    shutil.copytree(translate_run, run)
    best = run / "checkpoints" / "best.safetensors"
    best.write_bytes(best.read_bytes()[:100])
    before = snapshot(run)
    cli_error(capsys, ["translate", run, "eins zwei"], "best.safetensors", "corrupt")
    assert snapshot(run) == before


@pytest.mark.parametrize("content", [None, "notes.txt", "config.json"])
def test_eval_on_a_directory_that_is_not_a_run(content: str | None, tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    folder = tmp_path / "folder"
    folder.mkdir()
    if content == "notes.txt":
        (folder / "notes.txt").write_text("hello\n")
    elif content == "config.json":
        (folder / "config.json").write_text("{not json")
    before = snapshot(tmp_path)
    cli_error(capsys, ["eval", folder], str(folder))
    cli_error(capsys, ["translate", folder, "text"], str(folder))
    cli_error(capsys, ["eval", tmp_path / "missing"], "missing")
    assert snapshot(tmp_path) == before


def test_run_dir_with_another_config_is_refused(
        copy_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    run = copy_run[0]
    before = snapshot(run)
    message = cli_error(capsys, copy_args(run, "train.steps=12"), str(run), "another",
                        only_line=False)
    assert "Traceback" not in message
    assert snapshot(run) == before
    # another recipe on the same directory is refused too
    cli_error(capsys, translate_args(run, write_parallel(tmp_path / "data")), "another",
              only_line=False)
    assert snapshot(run) == before


def test_run_dir_that_is_not_a_run_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                              capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me\n")
    before = snapshot(tmp_path)
    cli_error(capsys, copy_args(folder), "not an attnkit run", only_line=False)
    assert snapshot(tmp_path) == before


def test_resume_from_damaged_checkpoint_falls_back_or_is_refused(
        copy_run: tuple[Path, subprocess.CompletedProcess], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    # The newest complete checkpoint that reads back whole is resumed (the damaged newer one
    # named in one line); when every checkpoint is damaged, resume is refused.
    monkeypatch.chdir(tmp_path)
    run, latest, damaged = _damaged_copy(copy_run, tmp_path, "corrupt")
    record = json.loads((run / "config.json").read_text())
    record["config"]["run_dir"] = str(run)  # the copy is its own run (run_dir is recorded)
    (run / "config.json").write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    older = run / "checkpoints" / "step-000005.safetensors"
    older_bytes = older.read_bytes()
    older.write_bytes(older_bytes[:100])
    before = snapshot(run)
    cli_error(capsys, copy_args(run), "step-000010.safetensors", "corrupt or truncated",
              only_line=False)
    assert snapshot(run) == before
    older.write_bytes(older_bytes)
    capsys.readouterr()
    assert main([str(a) for a in copy_args(run)]) == 0
    err = capsys.readouterr().err
    assert f"attnkit: skipping corrupt or truncated checkpoint {latest}" in err
    assert f"resuming from {older} (step 5)" in err
    from safetensors.torch import load_file

    original = load_file(copy_run[0] / "checkpoints" / "step-000010.safetensors")
    again = load_file(latest)  # retrained from step 5: the very same weights
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)


@pytest.mark.parametrize("content", ["[]", '{"recipe": "copy"}'])
def test_eval_on_a_run_with_a_malformed_config_json(content: str, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    # A config.json that is valid JSON but not a run record is refused in one line.
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.json").write_text(content)
    before = snapshot(tmp_path)
    cli_error(capsys, ["eval", folder], "config.json")
    cli_error(capsys, ["translate", folder, "text"], "config.json")
    assert snapshot(tmp_path) == before


def test_config_file_is_a_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    capsys: pytest.CaptureFixture) -> None:
    # Not only a missing file: a directory (or unreadable file) is refused in one line.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "somedir").mkdir()
    cli_error(capsys, ["train", "copy", "--config", "somedir"], "somedir")
    assert [p.name for p in tmp_path.iterdir()] == ["somedir"]


@pytest.mark.parametrize("override", ["train.best_metric=val_bleu", "tokenizer.path=nope.json"])
def test_invalid_settings_are_refused_before_a_run_dir_is_created(
        override: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    # train.best_metric and tokenizer.path are checked before the run directory is made, so
    # no half-made run blocks rerunning the corrected command with the same run_dir.
    monkeypatch.chdir(tmp_path)
    cli_error(capsys, copy_args(tmp_path / "run", override), only_line=False)
    assert not (tmp_path / "run").exists()
