"""The demo's recipe (`attnkit train math`): its problems drawn straight from the
`mathematics_dataset` package, its cache, and a tiny run end to end whose exact match is
recounted by hand from the decoded outputs.

References are drawn in a child process that uses only the package's own entry points
(``modules.train/test/test_extra``, ``generate._make_entropy_fn``,
``generate.sample_from_module``) with the seeding attnkit documents: ``PYTHONHASHSEED=0`` and
``random`` / ``numpy.random`` seeded from ``SeedSequence([seed, shard, split index])``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from attnkit.cli import main as cli_main
from attnkit.data import math as mathdata
from attnkit.recipes.math import MathData, task

SRC = Path(__file__).resolve().parents[1] / "src"
ADD, LINEAR = "arithmetic__add_or_sub", "algebra__linear_1d"
TRAIN, EVAL = 24, 4  # problems per module; EVAL <= 5 so the report prints every output

_DRAW = r"""
import json, random, sys
import numpy as np
from attnkit.data.math import _fix_compat
_fix_compat()  # the released package needs it to import on current sympy / numpy
from mathematics_dataset import generate
from mathematics_dataset.modules import modules
generate.FLAGS(["draw"])  # sample_from_module reads a flag when it drops a long problem

def draw(module, split, n, seed):
    area, name = module.split("__", 1)
    state = np.random.SeedSequence([seed, 0, ["train", "interpolate", "extrapolate"].index(split)
                                    ]).generate_state(2)
    random.seed(int(state[0]))
    np.random.seed(int(state[1]))
    if split == "train":  # mixed difficulty: easy, medium, hard thirds of the entropy, cycled
        fns = [modules.train(generate._make_entropy_fn(lv, 3))[area][name] for lv in range(3)]
    elif split == "interpolate":
        fns = [modules.test()[area][name]]
    else:
        fns = [modules.test_extra()[area][name + "_big"]]
    out = []
    for j in range(n):
        problem, _ = generate.sample_from_module(fns[j % len(fns)])
        out.append([str(problem.question), str(problem.answer)])
    return out

print(json.dumps([draw(*job) for job in json.loads(sys.argv[1])]))
"""


def package_draws(jobs: list[tuple[str, str, int, int]]) -> list[list[tuple[str, str]]]:
    """(module, split, n, seed) -> the problems the package itself generates for them."""
    env = {**os.environ, "PYTHONHASHSEED": "0", "PYTHONPATH": str(SRC)}
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", _DRAW, json.dumps(jobs)],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [[tuple(p) for p in draw] for draw in json.loads(proc.stdout)]


@pytest.fixture(scope="module")
def reference() -> dict[tuple[str, str], list[tuple[str, str]]]:
    """The package's problems for the recipe's seeds: module i uses seed + 1000 i, its
    interpolation set seed + 1, its extrapolation set seed + 2 (data.seed = 0)."""
    jobs = [(ADD, "train", TRAIN, 0), (ADD, "interpolate", EVAL, 1),
            (ADD, "extrapolate", EVAL, 2), (LINEAR, "train", TRAIN, 1000),
            (LINEAR, "interpolate", EVAL, 1001)]
    return {(m, s): draw for (m, s, _, _), draw in zip(jobs, package_draws(jobs), strict=True)}


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


def test_the_recipe_draws_the_packages_problems_and_caches_them(reference, cache, monkeypatch):
    data = MathData(modules=(ADD,), train_size=TRAIN, eval_size=EVAL, cache_dir=str(cache))
    got = task(data)
    assert got.metric == "exact_match"
    assert got.train == reference[ADD, "train"]
    assert got.evals == {"interpolate": reference[ADD, "interpolate"],
                         "extrapolate": reference[ADD, "extrapolate"]}
    assert not set(got.train) & set(got.evals["interpolate"])  # the package keeps them apart
    files = sorted(p.name for p in (cache / "math").iterdir())
    assert files == sorted(f"{ADD}.{split}.mixed.n{n}.seed{seed}.v1.jsonl" for split, n, seed
                           in (("train", TRAIN, 0), ("interpolate", EVAL, 1),
                               ("extrapolate", EVAL, 2)))

    def regenerate(*args, **kwargs):
        raise AssertionError("generated again instead of reading the cache")

    monkeypatch.setattr(mathdata, "_generate", regenerate)
    again = task(data)  # read back from the cache alone
    assert (again.train, again.evals) == (got.train, got.evals)


def test_two_modules_concatenate_with_their_own_seeds(reference, cache):
    got = task(MathData(modules=(ADD, LINEAR), train_size=TRAIN, eval_size=EVAL,
                        cache_dir=str(cache)))
    assert got.train == reference[ADD, "train"] + reference[LINEAR, "train"]
    assert got.evals["interpolate"] == (reference[ADD, "interpolate"]
                                        + reference[LINEAR, "interpolate"])
    # linear_1d has no extrapolation set: only add_or_sub's is there
    assert got.evals["extrapolate"] == reference[ADD, "extrapolate"]


def _report(out: str) -> dict[str, list[tuple[str, str, str]]]:
    """The printed report: per test set, every (input, reference, output) it shows."""
    sets: dict[str, list[tuple[str, str, str]]] = {}
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if not line.startswith(" ") and ": exact_match " in line:
            current = sets.setdefault(line.split(":")[0], [])
        elif line.startswith("  input: "):
            output = lines[i + 2].removeprefix("  output: ")
            wrong = output.endswith("   (wrong)")
            output = output.removesuffix("   (wrong)")
            reference = lines[i + 1].removeprefix("  reference: ")
            assert wrong == (output.strip() != reference.strip()), lines[i:i + 3]
            current.append((line.removeprefix("  input: "), reference, output))
    return sets


def _exact(rows: list[tuple[str, str, str]]) -> float:
    return sum(out.strip() == ref.strip() for _, ref, out in rows) / len(rows)


def test_tiny_math_run_end_to_end(reference, cache, tmp_path, capsys):
    run = tmp_path / "run"
    sets = ["preset=tiny", "arch.d_model=32", "arch.d_ff=64", "arch.n_heads=2",
            "arch.n_encoder_layers=1", "arch.n_decoder_layers=1", "train.steps=4",
            "train.eval_every=2", "train.save_every=2", "train.log_every=1", "train.threads=1",
            "batch_tokens=256", f"data.train_size={TRAIN}", f"data.eval_size={EVAL}",
            f"data.cache_dir={cache}", f"eval_examples={EVAL}", f"run_dir={run}"]
    assert cli_main(["train", "math", *[a for s in sets for a in ("--set", s)]]) == 0
    out = capsys.readouterr().out
    names = {p.name for p in run.iterdir()}
    assert {"config.json", "tokenizer.json", "metrics.jsonl", "results.json", "checkpoints",
            "energy.json"} <= names
    assert {p.name for p in (run / "checkpoints").iterdir()} >= {
        "step-000004.safetensors", "step-000004.state.pt"}
    config = json.loads((run / "config.json").read_text())
    assert config["recipe"] == "math" and config["config"]["data"]["modules"] == [ADD]
    evals = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
             if "eval" in r]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(0 <= r["eval"]["interpolate_exact_match"] <= 1 for r in evals)

    report = _report(out)
    results = json.loads((run / "results.json").read_text())
    assert set(report) == set(results) == {"interpolate", "extrapolate"}
    for name in report:  # every output printed, against the package's own answers
        assert [(q, a) for q, a, _ in report[name]] == reference[ADD, name]
        assert results[name]["examples"] == EVAL
        assert results[name]["exact_match"] == pytest.approx(_exact(report[name]), abs=1e-12)

    # A barely trained model gets everything wrong; to count right answers too, make the
    # cached answers of problems 0 and 2 the model's own outputs, padded with spaces (exact
    # match ignores outer whitespace), and evaluate the run again from the cache.
    rows = report["interpolate"]
    path = cache / "math" / f"{ADD}.interpolate.mixed.n{EVAL}.seed1.v1.jsonl"
    planted = [(q, f"  {out} " if i in (0, 2) else a) for i, (q, a, out) in enumerate(rows)]
    original = path.read_text()
    path.write_text("".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in planted))
    try:
        assert cli_main(["eval", str(run)]) == 0
    finally:
        path.write_text(original)  # the cache is shared with the other tests of this file
    again = _report(capsys.readouterr().out)["interpolate"]
    assert [out for _, _, out in again] == [out for _, _, out in rows]  # same model, outputs
    right = sum(out.strip() == a.strip() for (_, a), (_, _, out) in zip(planted, again,
                                                                          strict=True))
    assert right >= 2
    results = json.loads((run / "results.json").read_text())
    assert results["interpolate"]["exact_match"] == pytest.approx(right / EVAL, abs=1e-12)
