"""Where models run (issue 15, inference side): device names, ``--device`` on generate,
translate, eval and viz, runs that load and resume on another device type than the one that
wrote them, and presets sized on the meta device.

This machine may have no accelerator: the commands run on every device present (the CPU always,
CUDA or MPS where there is one), a device that is not there is refused in one line, and the
outputs on the CPU equal those of the default path (``auto``) wherever ``auto`` is the CPU.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

import attnkit
from _resume import assert_resumed, mark_log
from _runs import SRC, TINY, one_error_line
from attnkit.accel import resolve_device
from attnkit.cli import main
from attnkit.errors import UserError
from attnkit.models import build_on_meta
from attnkit.train.checkpoint import load_weights

MPS = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
PRESENT = ["cpu", *(["cuda"] if torch.cuda.is_available() else []), *(["mps"] if MPS else [])]
AUTO_IS_CPU = not torch.cuda.is_available() and not MPS
ABSENT = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU: absent on every machine


# ---- device names ------------------------------------------------------------------------------
def test_auto_takes_cuda_then_mps_then_the_cpu() -> None:
    if torch.cuda.is_available():
        expected = torch.device("cuda", torch.cuda.current_device())
    else:
        expected = torch.device("mps" if MPS else "cpu")
    assert resolve_device() == resolve_device("auto") == expected
    assert resolve_device(" CPU ") == resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("spec,fragment", [
    (ABSENT, "cuda"), ("gpu", "unknown device 'gpu'"), ("cuda:x", "unknown device"),
    ("", "device"), ("xpu", "xpu"), ("meta", "meta"),
    *([] if torch.cuda.is_available() else [("cuda", "no CUDA GPU")]),
    *([] if MPS else [("mps", "'mps' is not available")])])
def test_devices_that_are_not_there_are_refused_in_one_line(spec: str, fragment: str) -> None:
    with pytest.raises(UserError) as info:
        resolve_device(spec)
    assert fragment in str(info.value) and "\n" not in str(info.value)


# ---- the commands on tiny runs -----------------------------------------------------------------
LM = ["arch.n_layers=1", "arch.d_model=16", "arch.n_heads=2", "block_size=16", "batch_size=4",
      "sample.n=0", "eval.batch_size=16"]
RUNS = {  # name -> recipe and settings ({text} is filled in)
    "gpt2": ("lm", [*LM, "data.train={text}"]),
    "xl": ("xl-lm", ["seg_len=8", "batch_size=2", "arch.d_model=16", "arch.n_heads=2",
                     "arch.n_layers=1", "arch.d_ff=32", "arch.mem_len=8", "eval.max_chars=200",
                     "sample.n=0", "data.train={text}"]),
    "copy": ("copy", ["arch.d_model=16", "arch.d_ff=32", "arch.n_heads=2",
                      "arch.n_encoder_layers=1", "arch.n_decoder_layers=1", "arch.max_len=32",
                      "data.max_len=5", "data.train_size=60", "data.eval_size=4",
                      "eval_examples=2", "batch_tokens=128", "decode.beam_size=2"]),
    "pointer": ("pointer-sort", ["arch.d_model=8", "data.min_len=2", "data.max_len=3",
                                 "data.eval_size=4", "batch_size=4"]),
}
SHORT = ["train.steps=2", "train.eval_every=2", "train.save_every=2", "train.threads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    text = root / "text.txt"
    text.write_text("\n\n".join(f"the {w} sat on the {v} mat ." for w in ("cat", "dog", "fox")
                                for v in ("red", "blue")) * 6, encoding="utf-8")
    out = {}
    for name, (recipe, settings) in RUNS.items():
        torch.manual_seed(0)
        sets = [s.format(text=text) for s in settings] + SHORT + [f"run_dir={root / name}"]
        assert main(["train", recipe, *[a for s in sets for a in ("--set", s)]]) == 0
        out[name] = root / name
    return out


# command -> (run, arguments after the run); viz writes OUT (the page is compared)
COMMANDS = {
    "generate-greedy": ("gpt2", ["generate", "{run}", "the cat", "--greedy",
                                 "--max-new-tokens", "6"]),
    "generate-sample": ("gpt2", ["generate", "{run}", "the", "--max-new-tokens", "6", "--seed",
                                 "3", "--top-k", "5"]),
    "generate-beams": ("gpt2", ["generate", "{run}", "the", "--beams", "2",
                                "--max-new-tokens", "4"]),
    "generate-xl": ("xl", ["generate", "{run}", "the", "--greedy", "--max-new-tokens", "5"]),
    "translate-beam": ("copy", ["translate", "{run}", "123", "4321"]),
    "translate-greedy": ("copy", ["translate", "{run}", "123", "--greedy"]),
    "eval-copy": ("copy", ["eval", "{run}"]),
    "eval-lm": ("gpt2", ["eval", "{run}"]),
    "eval-xl": ("xl", ["eval", "{run}"]),
    "eval-pointer": ("pointer", ["eval", "{run}"]),
    "viz-copy": ("copy", ["viz", "{run}", "123", "-o", "{out}", "--view", "neuron"]),
    "viz-gpt2": ("gpt2", ["viz", "{run}", "the cat", "-o", "{out}", "--view", "model"]),
    "viz-pointer": ("pointer", ["viz", "{run}", "0.5 0.1 0.9", "-o", "{out}"]),
}


def _output(command: str, runs: dict[str, Path], device: list[str], tmp_path: Path,
            capsys: pytest.CaptureFixture) -> str:
    """What the command prints (and for viz the page it writes), with the run's results.json
    as eval leaves it (timings dropped)."""
    run, args = COMMANDS[command]
    page = tmp_path / f"view{len(list(tmp_path.iterdir()))}.html"
    capsys.readouterr()
    torch.manual_seed(0)  # sampling without --seed would draw from it; with --seed it must not
    assert main([a.format(run=runs[run], out=page) for a in args] + device) == 0
    printed = capsys.readouterr().out
    if command.startswith("viz"):
        return printed.replace(str(page), "OUT") + page.read_text(encoding="utf-8")
    if command.startswith("eval"):
        results = json.loads((runs[run] / "results.json").read_text(encoding="utf-8"))
        return printed + re.sub(r'"(decode_)?seconds": [0-9.e-]+', "", json.dumps(results))
    return printed


@pytest.mark.parametrize("command", list(COMMANDS))
def test_device_on_every_command(command: str, runs: dict[str, Path], tmp_path: Path,
                                 capsys: pytest.CaptureFixture) -> None:
    default = _output(command, runs, [], tmp_path, capsys)
    assert default.strip()
    assert _output(command, runs, ["--device", "auto"], tmp_path, capsys) == default
    for device in PRESENT:
        out = _output(command, runs, ["--device", device], tmp_path, capsys)
        if device == "cpu" and AUTO_IS_CPU:
            assert out == default
        else:  # another device may round differently: the output has the same form
            assert out.count("\n") == default.count("\n")
    run, args = COMMANDS[command]
    argv = [a.format(run=runs[run], out=tmp_path / "x.html") for a in args]
    for device, fragment in ((ABSENT, "cuda"), ("meta", "meta"), ("tpu", "device")):
        capsys.readouterr()
        assert main([*argv, "--device", device]) == 2
        assert fragment in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "x.html").exists()


def test_the_python_api_loads_onto_a_device(runs: dict[str, Path]) -> None:
    best = load_weights(runs["gpt2"] / "checkpoints" / "best.safetensors")
    for device in PRESENT:
        run = attnkit.load(runs["gpt2"], device=device)
        state = run.model.state_dict()
        assert {t.device.type for t in state.values()} == {device}
        assert not run.model.training
        for key, value in best.items():  # the checkpoint's CPU fp32 tensors, exactly
            assert value.device.type == "cpu" and value.dtype == torch.float32, key
            assert torch.equal(state[key].cpu(), value), key


# ---- a run written on another device type ------------------------------------------------------
RETAG = """
import sys, torch
from torch.serialization import register_package
state = torch.load(sys.argv[1], map_location="cpu", weights_only=True)
for rng in state["rng"]:  # what a CUDA and an MPS machine add to the CPU generators
    rng["cuda"] = [torch.arange(16, dtype=torch.uint8)]
    rng["mps"] = torch.arange(16, dtype=torch.uint8)
register_package(-1, lambda storage: "cuda:0", lambda storage, location: None)
torch.save(state, sys.argv[1])  # every storage tagged cuda:0, as a GPU run saves it
"""


def _copy_run(run: Path, steps: int) -> list[str]:
    sets = [*TINY, f"train.steps={steps}", "train.save_every=2", "train.keep_last=5",
            f"run_dir={run}"]
    return ["train", "copy", *[a for s in sets for a in ("--set", s)]]


def test_a_run_saved_on_a_gpu_resumes_and_decodes_on_the_cpu(tmp_path: Path,
                                                             capsys: pytest.CaptureFixture
                                                             ) -> None:
    run = tmp_path / "run"
    assert main(_copy_run(run, 4)) == 0
    ckpt = run / "checkpoints"
    uninterrupted = load_weights(ckpt / "step-000004.safetensors")
    for name in ("step-000004.safetensors", "step-000004.state.pt"):
        (ckpt / name).unlink()  # as if the GPU run had stopped after its step-2 checkpoint
    state = ckpt / "step-000002.state.pt"
    subprocess.run([sys.executable, "-c", RETAG, str(state)], check=True,
                   env={"PYTHONPATH": str(SRC)})
    with zipfile.ZipFile(state) as z:
        pickled = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
    # really written as a GPU run: storage locations are pickled strings (length, then bytes)
    assert b"X\x06\x00\x00\x00cuda:0" in pickled and b"X\x03\x00\x00\x00cpu" not in pickled
    if not torch.cuda.is_available():  # unmapped, such a file does not load here
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(state, weights_only=True)
    before = mark_log(run)
    capsys.readouterr()
    assert main(["resume", str(run)]) == 0
    assert_resumed(run, 2, capsys.readouterr().err, before)
    resumed = load_weights(ckpt / "step-000004.safetensors")
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key
    assert main(["translate", str(run), "123", "--device", "cpu"]) == 0


def test_resume_set_moves_a_gpu_run_to_the_cpu_and_refuses_other_settings(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A run whose config says cuda (and whose checkpoint was saved on a GPU) resumes on the CPU
    with `resume --set device=cpu`, for more steps too; settings that change what is learnt
    are refused in one line, before anything is written."""
    run, ref = tmp_path / "run", tmp_path / "ref"
    assert main(_copy_run(ref, 6)) == 0
    assert main(_copy_run(run, 2)) == 0
    record = json.loads((run / "config.json").read_text())
    record["config"]["train"]["device"] = "cuda"  # what a run trained with device=cuda records
    (run / "config.json").write_text(json.dumps(record))
    subprocess.run([sys.executable, "-c", RETAG, str(run / "checkpoints/step-000002.state.pt")],
                   check=True, env={"PYTHONPATH": str(SRC)})
    saved = (run / "config.json").read_bytes()
    capsys.readouterr()
    for args, fragment in (
            ([], None if torch.cuda.is_available() else f"attnkit resume {run} --set device=auto"),
            (["--set", "lr=0.1"], "resume --set lr: a resumed run may change only device, "),
            (["--set", "train.optim.lr=0.1"], "resume --set train.optim.lr: a resumed run"),
            (["--set", "device=tpu"], "train.device must be auto, cpu, cuda, cuda:N or mps")):
        if fragment is None:
            continue
        assert main(["resume", str(run), *args]) == 2
        assert fragment in one_error_line(capsys.readouterr().err)
        assert (run / "config.json").read_bytes() == saved  # refused before any write
    before = mark_log(run)
    assert main(["resume", str(run), "--set", "device=cpu", "--set", "train.steps=6"]) == 0
    assert_resumed(run, 2, capsys.readouterr().err, before)
    train = json.loads((run / "config.json").read_text())["config"]["train"]
    assert (train["device"], train["steps"]) == ("cpu", 6)
    logged = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["device"] for r in logged if "device" in r] == ["cpu", "cpu"]  # once a segment
    assert [r["step"] for r in logged if "loss" in r] == list(range(1, 7))
    want = load_weights(ref / "checkpoints" / "step-000006.safetensors")
    got = load_weights(run / "checkpoints" / "step-000006.safetensors")
    for key, value in want.items():  # inverse_sqrt: the schedule does not depend on the total
        assert torch.equal(got[key], value), key


# ---- presets sized on the meta device ----------------------------------------------------------
@pytest.mark.parametrize("family,preset,published", [
    ("gpt2", "small", 124_439_808),       # Radford et al. 2019 / transformers gpt2
    ("gpt2", "xl", 1_557_611_200),        # transformers gpt2-xl (the paper's "1542M")
    ("transformer", "big", 214_245_376),  # Vaswani et al. 2017 big (213M) with a 37000 vocab
    ("bert", "bert-large", 335_141_888),  # transformers bert-large-uncased (the paper's 340M)
])
def test_presets_count_their_published_parameters_on_meta(family: str, preset: str,
                                                          published: int) -> None:
    model = build_on_meta(family, preset)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == published


def test_building_gpt2_xl_on_meta_allocates_nothing() -> None:
    code = ("import resource, sys\n"
            "from attnkit.models import build_on_meta\n"
            "peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
            "build_on_meta('gpt2', 'tiny')  # the imports a first build makes (~75 MiB)\n"
            "before = peak()\n"
            "n = sum(p.numel() for p in build_on_meta('gpt2', 'xl').parameters())\n"
            "print(n, (peak() - before) * (1 if sys.platform == 'darwin' else 1024))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True,
                         text=True, env={"PYTHONPATH": str(SRC)}).stdout.split()
    n, grown = int(out[0]), int(out[1])
    assert n == 1_557_611_200  # 6.2 GB in fp32 had it been allocated
    assert grown < 16 * 2**20, f"peak RSS grew by {grown / 2**20:.0f} MiB"  # 2 MiB measured


def test_count_prints_the_presets(capsys: pytest.CaptureFixture) -> None:
    assert main(["count", "transformer"]) == 0
    rows = {line.split()[0]: line.split()[1] for line in capsys.readouterr().out.splitlines()
            if line.split() and line.split()[0] in ("base", "big", "small", "tiny")}
    assert rows["big"] == "214,245,376" and rows["base"] == "63,082,496" and len(rows) == 4
    assert main(["count", "gpt2", "small", "--set", "vocab_size=50304"]) == 0
    (row,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("small")]
    assert row.split()[1] == f"{124_439_808 + (50304 - 50257) * 768:,}"  # one embedding grows
    for args, fragment in ((["gpt2", "huge"], "unknown gpt2 preset 'huge'"),
                           (["pointer"], "has no presets"),
                           (["gpt2", "xl", "--set", "vocab=3"], "did you mean 'vocab_size'"),
                           (["rnn", "bahdanau"], "builds a 'rnn-attention' model")):
        assert main(["count", *args]) == 2
        assert fragment in one_error_line(capsys.readouterr().err)


def test_float64_tables_stay_on_the_cpu_under_a_default_device() -> None:
    """viz captures run with the model's device as the default device; Transformer-XL's
    relative table is computed in float64, which MPS lacks, so it is made on the CPU."""
    from attnkit.nn.attention.relative import relative_table

    expected = relative_table(6, 8)
    with torch.device("meta"):
        table = relative_table(6, 8)
    assert table.device.type == "cpu" and torch.equal(table, expected)
