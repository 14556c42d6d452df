"""Every command against a table of hostile inputs: one line, exit code 2, nothing touched.

A module-scoped "world" holds tiny real runs (copy, lm, bert-pretrain), a Hugging Face export
of the lm run and damaged or malicious variants of them, plus hostile files (empty, binary,
non-UTF-8, a file where a folder is wanted and the reverse, an unwritable folder). Each case runs
``attnkit.cli.main`` in process and asserts: exit code 2, exactly one stderr line
``attnkit: error: ...``, no traceback, and every byte of the world and of the working directory
unchanged (checksummed before and after). A few cases run ``python -m attnkit`` in a subprocess
for what only a real process shows: non-UTF-8 bytes in argv and stdin, a closed stdout pipe.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from attnkit.cli import COMMANDS, main
from attnkit.convert import from_pretrained
from attnkit.errors import UserError

SRC = Path(__file__).resolve().parents[1] / "src"
ATTNKIT = [sys.executable, "-m", "attnkit"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


TINY = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "train.threads=1"]
COPY = [*TINY, "batch_tokens=256", "arch.d_model=32", "arch.d_ff=64", "arch.n_heads=2",
        "arch.n_encoder_layers=1", "arch.n_decoder_layers=1", "arch.max_len=64",
        "data.train_size=100", "data.eval_size=10", "eval_examples=4"]
LM = [*TINY, "arch.n_layers=1", "arch.d_model=32", "arch.n_heads=2", "block_size=16",
      "batch_size=4", "sample.n=0", "eval.batch_size=16"]
BERT = [*TINY, "batch_size=4", "max_len=24", "tokenizer.vocab_size=60", "arch.d_model=32",
        "arch.d_ff=64"]


def tree_digest(root: Path) -> dict[str, str]:
    """Every path under ``root`` -> a digest of its bytes ("dir" / "link:TARGET" otherwise)."""
    out = {}
    for path in sorted(root.rglob("*")):
        key = str(path.relative_to(root))
        if path.is_symlink():
            out[key] = f"link:{os.readlink(path)}"
        elif path.is_dir():
            out[key] = "dir"
        else:
            out[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def _unwritable(root: Path) -> Path:
    """A folder in which nothing can be created: mode 0555, or for root (whom modes do not
    stop) a path under sysfs, where even root cannot make folders."""
    locked = root / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if not os.access(locked, os.W_OK):
        return locked
    sysfs = Path("/sys/attnkit-hostile")
    try:
        sysfs.mkdir()
    except OSError:
        return sysfs
    sysfs.rmdir()
    pytest.skip("no folder here refuses writes (running as root without sysfs)")


class Payload:
    """A pickle that would create ``marker`` when unpickled by a loader that runs code."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _shards(hf: Path, out: Path, index: dict | None = None,
            names: tuple[str, str] = ("model-1.safetensors", "model-2.safetensors")) -> None:
    """``out``: the Hugging Face directory ``hf`` with its weights split into two shards."""
    shutil.copytree(hf, out)
    state = load_file(str(out / "model.safetensors"))
    (out / "model.safetensors").unlink()
    keys = sorted(state)
    parts = {names[0]: keys[::2], names[1]: keys[1::2]}
    for name, part in parts.items():
        if not name.startswith(".."):
            save_file({k: state[k] for k in part}, str(out / name))
    if index is None:
        index = {"weight_map": {k: name for name, part in parts.items() for k in part}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")


def _damage(run: Path, out: Path, pattern: str, how: str) -> None:
    shutil.copytree(run, out)
    for path in (out / "checkpoints").glob(pattern):
        data = path.read_bytes()
        path.write_bytes(data[: len(data) // 2] if how == "truncate"
                         else data[:8] + bytes((b * 37 + 11) % 256 for b in data[8:]))


def _hugging_face_variants(w: Path) -> None:
    hf = w / "hf"
    _shards(hf, w / "hf_sharded")
    _shards(hf, w / "hf_no_weight_map", index={"metadata": {}})
    _shards(hf, w / "hf_weight_map_list", index={"weight_map": ["model-1.safetensors"]})
    _shards(hf, w / "hf_weight_map_types", index={"weight_map": {"wte.weight": ["x"]}})
    _shards(hf, w / "hf_missing_shard")
    (w / "hf_missing_shard" / "model-2.safetensors").unlink()
    # a shard name climbing out to a real, valid shard elsewhere (today it would be read)
    (w / "outside").mkdir()
    _shards(hf, w / "hf_escape", names=("model-1.safetensors", "../outside/model-2.safetensors"))
    shutil.copy(w / "hf_sharded" / "model-2.safetensors", w / "outside" / "model-2.safetensors")
    _shards(hf, w / "hf_symlink")
    (w / "hf_symlink" / "model-2.safetensors").unlink()
    (w / "hf_symlink" / "model-2.safetensors").symlink_to(w / "outside" / "model-2.safetensors")
    shutil.copytree(hf, w / "hf_evil")
    (w / "hf_evil" / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(2), "x": Payload(w / "PWNED")},
               w / "hf_evil" / "pytorch_model.bin")
    shutil.copytree(hf, w / "hf_bad_config")
    (w / "hf_bad_config" / "config.json").write_bytes(b"\xff\xfe{garbage")


def _files(w: Path) -> None:
    files = w / "files"
    files.mkdir()
    (files / "text.txt").write_text("the cat sat on the mat\n", encoding="utf-8")
    (files / "empty.txt").write_bytes(b"")
    (files / "binary.bin").write_bytes(bytes(range(256)) * 8)
    (files / "latin1.txt").write_bytes("caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    (files / "bad.json").write_text("{not json", encoding="utf-8")
    (w / "afile").write_text("a file, not a folder\n", encoding="utf-8")
    (w / "folder").mkdir()
    (w / "folder" / "keep.txt").write_text("not attnkit's\n", encoding="utf-8")
    (w / "emptydir").mkdir()
    for name, content in (("run_bad_config", b"{not json"), ("run_binary_config", b"\xff\x00\xfe"),
                          ("run_list_config", b"[1, 2]")):
        (w / name).mkdir()
        (w / name / "config.json").write_bytes(content)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    w = tmp_path_factory.mktemp("world")
    _files(w)
    lines = [f"the {a} sat on the {b} mat ." for a in ("cat", "dog", "fox") for b in ("red", "old")]
    (w / "files" / "docs.txt").write_text("\n\n".join(lines) * 4, encoding="utf-8")
    (w / "files" / "corpus.txt").write_text("the cat sat on the mat\nthe dog ran\n" * 40,
                                            encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(w)
        mp.setenv("ATTNKIT_CACHE", str(w.parent / "cache"))
        torch.manual_seed(0)
        for recipe, sets in (("copy", COPY), ("lm", [*LM, "data.train=files/corpus.txt"]),
                             ("bert-pretrain", [*BERT, "data.train=files/docs.txt"])):
            run = recipe.split("-")[0]
            assert main(["train", recipe, *_sets([*sets, f"run_dir={run}"])]) == 0
        assert main(["export", "lm", "hf"]) == 0
    _hugging_face_variants(w)
    _damage(w / "copy", w / "copy_corrupt", "step-*.safetensors", "garble")
    _damage(w / "lm", w / "lm_truncated", "*.safetensors", "truncate")
    shutil.copytree(w / "copy", w / "copy_bad_energy")
    (w / "copy_bad_energy" / "energy.json").write_bytes(b"\xff\xfe garbage")
    (w / "copy_bad_energy" / "results.json").write_bytes(b"\xff\xfe garbage")
    paths = {p.name: str(p) for p in w.iterdir()}
    paths.update({p.stem: str(p) for p in (w / "files").iterdir()})
    paths.update(root=str(w), locked=str(_unwritable(w)), nope=str(w / "nope"))
    return paths


TWO_TOKENS = ["--max-new-tokens", "2"]  # a tiny model can: only the hostile part fails

# ---- the table ----------------------------------------------------------------------------------
CASES: dict[str, list[str]] = {
    # train: names, numbers, config files, data files, run directories
    "train-unknown-recipe": ["train", "trasnlate"],
    "train-bad-number": ["train", "copy", "--set", "train.steps=abc"],
    "train-unknown-key": ["train", "copy", "--set", "train.stpes=5"],
    "train-config-missing": ["train", "copy", "--config", "{nope}"],
    "train-config-empty": ["train", "copy", "--config", "{empty}"],
    "train-config-binary": ["train", "copy", "--config", "{binary}"],
    "train-config-latin1": ["train", "copy", "--config", "{latin1}"],
    "train-config-folder": ["train", "copy", "--config", "{folder}"],
    "train-data-missing": ["train", "lm", *_sets([*LM, "data.train={nope}", "run_dir=run"])],
    "train-data-empty": ["train", "lm", *_sets([*LM, "data.train={empty}", "run_dir=run"])],
    "train-data-binary": ["train", "lm", *_sets([*LM, "data.train={binary}", "run_dir=run"])],
    "train-data-latin1": ["train", "lm", *_sets([*LM, "data.train={latin1}", "run_dir=run"])],
    "train-data-folder": ["train", "lm", *_sets([*LM, "data.train={folder}", "run_dir=run"])],
    "train-run-dir-is-a-file": ["train", "copy", *_sets([*COPY, "run_dir={afile}"])],
    "train-run-dir-under-a-file": ["train", "copy", *_sets([*COPY, "run_dir={afile}/run"])],
    "train-run-dir-unwritable": ["train", "copy", *_sets([*COPY, "run_dir={locked}/run"])],
    "train-run-dir-foreign": ["train", "copy", *_sets([*COPY, "run_dir={folder}"])],
    "train-run-dir-corrupt-config": ["train", "copy", *_sets([*COPY, "run_dir={run_bad_config}"])],
    "train-run-dir-other-run": ["train", "copy", *_sets([*COPY, "run_dir={lm}"])],
    # eval: not a run, damaged runs
    "eval-missing": ["eval", "{nope}"],
    "eval-file": ["eval", "{afile}"],
    "eval-empty-folder": ["eval", "{emptydir}"],
    "eval-foreign-folder": ["eval", "{folder}"],
    "eval-bad-config": ["eval", "{run_bad_config}"],
    "eval-binary-config": ["eval", "{run_binary_config}"],
    "eval-list-config": ["eval", "{run_list_config}"],
    "eval-corrupt-checkpoint": ["eval", "{copy_corrupt}"],
    # translate: wrong run kinds, bad text and numbers, damaged runs
    "translate-lm-run": ["translate", "{lm}", "hello"],
    "translate-bert-run": ["translate", "{bert}", "hello"],
    "translate-non-utf8-argument": ["translate", "{copy}", "12\udcff3"],
    "translate-bad-beam": ["translate", "{copy}", "12", "--beam", "0"],
    "translate-beam-not-a-number": ["translate", "{copy}", "12", "--beam", "two"],
    "translate-too-long": ["translate", "{copy}", "1" * 65],
    "translate-missing-run": ["translate", "{nope}", "12"],
    "translate-file-as-run": ["translate", "{afile}", "12"],
    "translate-corrupt-checkpoint": ["translate", "{copy_corrupt}", "12"],
    # generate: wrong kinds, prompt files, numbers, hostile Hugging Face directories
    "generate-seq2seq-run": ["generate", "{copy}", "12", *TWO_TOKENS],
    "generate-bert-run": ["generate", "{bert}", "the", *TWO_TOKENS],
    "generate-missing": ["generate", "{nope}", "the"],
    "generate-file": ["generate", "{afile}", "the"],
    "generate-non-utf8-prompt": ["generate", "{lm}", "the \udcff", *TWO_TOKENS],
    "generate-prompts-missing": ["generate", "{lm}", "--prompts-file", "{nope}"],
    "generate-prompts-folder": ["generate", "{lm}", "--prompts-file", "{folder}"],
    "generate-prompts-binary": ["generate", "{lm}", "--prompts-file", "{binary}"],
    "generate-prompts-latin1": ["generate", "{lm}", "--prompts-file", "{latin1}"],
    "generate-prompts-empty": ["generate", "{lm}", "--prompts-file", "{empty}"],
    "generate-prompt-and-file": ["generate", "{lm}", "the", "--prompts-file", "{text}"],
    "generate-batch-size-0": ["generate", "{lm}", "--prompts-file", "{text}", "--batch-size", "0"],
    "generate-tokens-not-a-number": ["generate", "{lm}", "the", "--max-new-tokens", "many"],
    "generate-top-p-2": ["generate", "{lm}", "the", "--top-p", "2"],
    "generate-negative-temperature": ["generate", "{lm}", "the", "--temperature", "-1"],
    "generate-truncated-checkpoint": ["generate", "{lm_truncated}", "the", *TWO_TOKENS],
    "generate-hf-no-weight-map": ["generate", "{hf_no_weight_map}", "the", *TWO_TOKENS],
    "generate-hf-weight-map-list": ["generate", "{hf_weight_map_list}", "the", *TWO_TOKENS],
    "generate-hf-weight-map-types": ["generate", "{hf_weight_map_types}", "the", *TWO_TOKENS],
    "generate-hf-missing-shard": ["generate", "{hf_missing_shard}", "the", *TWO_TOKENS],
    "generate-hf-escaping-shard": ["generate", "{hf_escape}", "the", *TWO_TOKENS],
    "generate-hf-escaping-symlink": ["generate", "{hf_symlink}", "the", *TWO_TOKENS],
    "generate-hf-pickle-payload": ["generate", "{hf_evil}", "the", *TWO_TOKENS],
    "generate-hf-bad-config": ["generate", "{hf_bad_config}", "the", *TWO_TOKENS],
    # export: runs without a format, targets that must not be written
    "export-seq2seq-run": ["export", "{copy}", "out"],
    "export-missing-run": ["export", "{nope}", "out"],
    "export-truncated-checkpoint": ["export", "{lm_truncated}", "out"],
    "export-out-is-a-file": ["export", "{lm}", "{afile}"],
    "export-out-under-a-file": ["export", "{lm}", "{afile}/out"],
    "export-out-foreign": ["export", "{lm}", "{folder}", "--overwrite"],
    "export-out-is-the-run": ["export", "{lm}", "{lm}", "--overwrite"],
    "export-out-unwritable": ["export", "{lm}", "{locked}/out"],
    # download: nothing is fetched, each fails before the network
    "download-unknown-corpus": ["download", "enwik9", "--dir", "data"],
    "download-dir-is-a-file": ["download", "enwik8", "--dir", "{afile}"],
    "download-dir-under-a-file": ["download", "text8", "--dir", "{afile}/data"],
    "download-dir-unwritable": ["download", "enwik8", "--dir", "{locked}"],
    # energy
    "energy-estimate-not-a-number": ["energy", "estimate", "--tokens", "lots", "--preset",
                                     "base", "--hardware", "p100"],
    "energy-estimate-unknown-hardware": ["energy", "estimate", "--preset", "base", "--tokens",
                                         "1e9", "--hardware", "p1000"],
    "energy-estimate-unknown-preset": ["energy", "estimate", "--preset", "huge", "--tokens",
                                       "1e9", "--hardware", "p100"],
    "energy-estimate-negative-tokens": ["energy", "estimate", "--preset", "base", "--tokens",
                                        "-5", "--hardware", "p100"],
    "energy-report-missing": ["energy", "report", "{nope}"],
    "energy-report-file": ["energy", "report", "{afile}"],
    "energy-report-empty-folder": ["energy", "report", "{emptydir}"],
    "energy-report-bad-records": ["energy", "report", "{copy_bad_energy}"],
    "energy-report-plot-folder": ["energy", "report", "{copy}", "--plot", "{folder}"],
    "energy-report-plot-under-a-file": ["energy", "report", "{copy}", "--plot", "{afile}/p.png"],
    "energy-report-plot-unwritable": ["energy", "report", "{copy}", "--plot", "{locked}/p.png"],
    # viz
    "viz-non-utf8-text": ["viz", "{lm}", "the \udcff", "-o", "out.html"],
    "viz-unknown-view": ["viz", "{lm}", "the", "--view", "haed", "-o", "out.html"],
    "viz-no-output": ["viz", "{lm}", "the"],
    "viz-output-folder": ["viz", "{lm}", "the", "-o", "{folder}"],
    "viz-output-under-a-file": ["viz", "{lm}", "the", "-o", "{afile}/x.html"],
    "viz-output-unwritable": ["viz", "{lm}", "the", "-o", "{locked}/x.html"],
    "viz-png-folder": ["viz", "{lm}", "the", "-o", "out.html", "--png", "{folder}"],
    "viz-png-unknown-format": ["viz", "{lm}", "the", "-o", "out.html", "--png", "p.xyz"],
    "viz-bad-layer": ["viz", "{lm}", "the", "-o", "out.html", "--png", "p.png", "--layer", "9"],
    "viz-missing": ["viz", "{nope}", "the", "-o", "out.html"],
    "viz-truncated-checkpoint": ["viz", "{lm_truncated}", "the", "-o", "out.html"],
    "viz-hf-escaping-shard": ["viz", "{hf_escape}", "the", "-o", "out.html"],
    "viz-hf-pickle-payload": ["viz", "{hf_evil}", "the", "-o", "out.html"],
    "viz-absent-device": ["viz", "{lm}", "the", "-o", "out.html", "--device", "cuda:99"],
    # devices
    "generate-unknown-device": ["generate", "{lm}", "the", "--device", "gpu"],
    "translate-meta-device": ["translate", "{copy}", "123", "--device", "meta"],
    "eval-absent-device": ["eval", "{copy}", "--device", "cuda:99"],
    # count
    "count-unknown-family": ["count", "gtp2"],
    "count-unknown-preset": ["count", "gpt2", "huge"],
    "count-no-presets": ["count", "pointer"],
    "count-bad-set": ["count", "gpt2", "xl", "--set", "vocab_size"],
    "count-bad-value": ["count", "gpt2", "tiny", "--set", "n_heads=5"],
    # recipes
    "recipes-unknown": ["recipes", "--show", "trasnlate"],
    "recipes-bad-option": ["recipes", "--shwo", "lm"],
    "no-command": [],
    "unknown-command": ["trian", "copy"],
}
if "resume" in COMMANDS:  # attnkit resume RUN (with the run lock): runs that cannot be resumed
    CASES.update({
        "resume-missing": ["resume", "{nope}"],
        "resume-file": ["resume", "{afile}"],
        "resume-foreign-folder": ["resume", "{folder}"],
        "resume-bad-config": ["resume", "{run_bad_config}"],
        "resume-list-config": ["resume", "{run_list_config}"],
    })


def test_the_table_covers_every_command() -> None:
    assert {args[0] for args in CASES.values() if args} >= set(COMMANDS)


def one_line_error(code: int, err: str) -> str:
    """Exit code 2, exactly one stderr line ``attnkit: error: ...``, no traceback."""
    assert "Traceback" not in err, err
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("attnkit: error: "), err
    return lines[0]


@pytest.mark.parametrize("case", CASES)
def test_hostile_input(case: str, world: dict[str, str], tmp_path: Path,
                       monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("ATTNKIT_DEBUG", raising=False)
    args = [arg.format(**world) for arg in CASES[case]]
    root = Path(world["root"])
    before = tree_digest(root)
    capsys.readouterr()
    try:
        code = main(args)
    except SystemExit as exit_:  # argparse's usage errors
        code = exit_.code
    message = one_line_error(code, capsys.readouterr().err)
    assert tree_digest(root) == before, "the world changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == [], "the working directory changed"
    assert not (root / "PWNED").exists(), "the pickle's payload ran"
    assert "weights_only=False" not in message
    assert ".tmp" not in message, "the message names a temporary file, not the user's path"


# ---- what each refusal says (the reasons, not only the shape) ------------------------------------
@pytest.mark.parametrize(("case", "fragments"), [
    ("translate-lm-run", ("{lm}",)),
    ("translate-non-utf8-argument", ("not valid UTF-8", "0xff")),
    ("train-run-dir-is-a-file", ("afile",)),
    ("train-run-dir-under-a-file", ("not a directory", "afile")),
    ("train-run-dir-unwritable", ("{locked}",)),
    ("download-dir-is-a-file", ("afile",)),
    ("energy-report-plot-folder", ("folder",)),
    ("viz-output-folder", ("cannot write", "folder: is a directory")),
    ("viz-png-folder", ("cannot write", "folder: is a directory")),
    ("generate-hf-no-weight-map", ("weight_map",)),
    ("generate-hf-weight-map-types", ("weight_map",)),
    ("generate-hf-missing-shard", ("model-2.safetensors", "missing")),
    ("generate-hf-escaping-shard", ("../outside/model-2.safetensors", "outside")),
    ("generate-hf-escaping-symlink", ("model-2.safetensors", "outside")),
    ("generate-hf-pickle-payload", ("pytorch_model.bin", "could run code", "safetensors")),
    ("energy-estimate-not-a-number", ("--tokens", "lots")),
])
def test_refusals_name_the_reason(case: str, fragments: tuple[str, ...], world: dict[str, str],
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    try:
        code = main([arg.format(**world) for arg in CASES[case]])
    except SystemExit as exit_:
        code = exit_.code
    message = one_line_error(code, capsys.readouterr().err)
    for fragment in fragments:
        assert fragment.format(**world) in message, message


def test_debug_shows_the_traceback_of_an_expected_failure(world: dict[str, str],
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ATTNKIT_DEBUG", "1")
    with pytest.raises(NotADirectoryError):
        main(["train", "copy", *_sets([*COPY, f"run_dir={world['afile']}/run"])])
    with pytest.raises(UserError, match="weight_map"):
        main(["generate", world["hf_no_weight_map"], "the"])


def test_a_bug_still_shows_a_traceback(monkeypatch: pytest.MonkeyPatch) -> None:
    def buggy(args: object) -> None:
        raise KeyError("a programming error")

    monkeypatch.setitem(COMMANDS, "recipes", buggy)
    with pytest.raises(KeyError):
        main(["recipes"])

    def broken_disk(args: object) -> None:
        raise OSError(5, "Input/output error")  # not one the user causes: shown in full

    monkeypatch.setitem(COMMANDS, "recipes", broken_disk)
    with pytest.raises(OSError, match="Input/output"):
        main(["recipes"])


@pytest.mark.parametrize(("failure", "line"), [
    (OSError(28, "No space left on device", "runs/x/step-000001.safetensors"),
     "no space left on device: runs/x/step-000001.safetensors"),
    (PermissionError(13, "Permission denied", "/tmp/.x.tmp", None, "plots/loss.png"),
     "permission denied: plots/loss.png"),  # a rename names the user's path, not the temporary
    (UnicodeDecodeError("utf-8", b"ab\xff", 2, 3, "invalid start byte"),
     "text is not valid UTF-8: 'utf-8' codec can't decode byte 0xff in position 2: invalid "
     "start byte"),
])
def test_failures_deep_inside_a_command_are_one_line(failure: Exception, line: str,
                                                     monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture) -> None:
    def command(args: object) -> None:
        raise failure

    monkeypatch.setitem(COMMANDS, "recipes", command)
    capsys.readouterr()
    assert one_line_error(main(["recipes"]), capsys.readouterr().err) == f"attnkit: error: {line}"


# ---- security --------------------------------------------------------------------------------
def test_shard_names_are_confined_to_the_model_folder(world: dict[str, str],
                                                      tmp_path: Path) -> None:
    # the same shards, named inside the folder, load: only the escape is refused
    assert from_pretrained(world["hf_sharded"]).model is not None
    assert main(["generate", world["hf_sharded"], "the", *TWO_TOKENS]) == 0
    for name in ("hf_escape", "hf_symlink"):
        with pytest.raises(UserError, match="leads outside"):
            from_pretrained(world[name])
    absolute = tmp_path / "absolute"
    shutil.copytree(world["hf_sharded"], absolute)
    index = absolute / "model.safetensors.index.json"
    record = json.loads(index.read_text(encoding="utf-8"))
    outside = str(Path(world["outside"]) / "model-2.safetensors")
    record["weight_map"] = {k: outside if v == "model-2.safetensors" else v
                            for k, v in record["weight_map"].items()}
    index.write_text(json.dumps(record), encoding="utf-8")
    with pytest.raises(UserError, match="leads outside"):
        from_pretrained(absolute)


def test_hub_cache_links_into_its_blobs_are_followed(world: dict[str, str],
                                                     tmp_path: Path) -> None:
    # huggingface_hub's cache: snapshots/<rev>/<file> are links to ../../blobs/<hash>
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / "abc123"
    shutil.copytree(world["hf_sharded"], snapshot)
    (repo / "blobs").mkdir()
    for shard in ("model-1.safetensors", "model-2.safetensors"):
        blob = repo / "blobs" / f"blob-{shard}"
        (snapshot / shard).rename(blob)
        (snapshot / shard).symlink_to(Path("../../blobs") / blob.name)
    assert from_pretrained(snapshot).model is not None


def test_a_pickle_payload_never_runs(world: dict[str, str], tmp_path: Path) -> None:
    marker = Path(world["root"]) / "PWNED"
    with pytest.raises(UserError) as err:
        from_pretrained(world["hf_evil"])
    assert not marker.exists()
    message = str(err.value)
    assert "could run code" in message and "weights_only=False" not in message
    assert "Untrusted files" in message  # where the safetensors conversion is shown
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "### Untrusted files" in readme
    # the payload is real: an unsafe loader would run it
    pickle.loads(pickle.dumps(Payload(tmp_path / "ran")))
    assert (tmp_path / "ran").is_dir()


def test_a_refused_run_state_says_why(world: dict[str, str], tmp_path: Path) -> None:
    from attnkit.train.checkpoint import load_state

    path = tmp_path / "step-000001.state.pt"
    torch.save({"step": 1, "x": Payload(tmp_path / "ran")}, path)
    with pytest.raises(UserError) as err:
        load_state(path)
    assert not (tmp_path / "ran").exists()
    assert "could run code" in str(err.value) and "weights_only=False" not in str(err.value)


# ---- what only a real process shows ----------------------------------------------------------
def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ATTNKIT_DEBUG"}
    return {**env, "PYTHONPATH": str(SRC), "ATTNKIT_CACHE": str(tmp_path / "cache"),
            "OMP_NUM_THREADS": "1", **extra}


def test_non_utf8_stdin_and_argv(world: dict[str, str], tmp_path: Path) -> None:
    env = _env(tmp_path, LC_ALL="C")  # where Python would keep bad bytes as surrogates
    proc = subprocess.run([*ATTNKIT, "translate", world["copy"]], input=b"12\n3\xff4\n",
                          env=env, cwd=tmp_path, capture_output=True, timeout=120)
    message = one_line_error(proc.returncode, proc.stderr.decode())
    assert "stdin is not valid UTF-8" in message and "0xff" in message
    assert proc.stdout == b""
    proc = subprocess.run([*ATTNKIT, "generate", world["lm"].encode(), b"the \xfe"], env=env,
                          cwd=tmp_path, capture_output=True, timeout=120)
    message = one_line_error(proc.returncode, proc.stderr.decode())
    assert "not valid UTF-8" in message and "0xfe" in message


@pytest.mark.parametrize("args", [
    ["generate", "{lm}", "the", "--max-new-tokens", "8", "--seed", "1"],
    ["generate", "{lm}", "--prompts-file", "{many}", "--max-new-tokens", "4", "--seed", "1"],
])
def test_a_closed_pipe_ends_quietly(args: list[str], world: dict[str, str],
                                    tmp_path: Path) -> None:
    # `attnkit generate ... | head -1`: the reader is gone before attnkit writes
    many = tmp_path / "many.txt"
    many.write_text("the\n" * 40, encoding="utf-8")
    argv = [a.format(**world, many=many) for a in args]
    proc = subprocess.Popen([*ATTNKIT, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_env(tmp_path), cwd=tmp_path)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 1, err
    assert err == "", err  # no traceback, no "Exception ignored" at exit
