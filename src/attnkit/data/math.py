"""Problems from DeepMind's mathematics dataset (Saxton et al. 2019, "Analysing Mathematical
Reasoning Abilities of Neural Models"), generated with the ``mathematics-dataset`` package.

Protocol of the paper: questions of at most 160 characters and answers of at most 30 (longer
samples are redrawn), three training difficulties (entropy ranges split into thirds), an
interpolation test set (``modules.test()``) and an extrapolation test set
(``modules.test_extra()``: ``*_big``, ``*_longer``, ``*_more``...). Train and test values are
kept apart by the package itself.

Generation runs in child processes with ``PYTHONHASHSEED=0`` (variable letters depend on string
hashing) and seeded ``random`` and ``numpy.random`` (the package draws from their global
state). Problem ``j`` belongs to shard ``j // _SHARD``; each shard is seeded from
``(seed, shard, split)``, so the result does not depend on how many workers run. Results are
cached as JSONL under ``default_cache_dir() / "math"``.

The released package (1.0.1) needs two compatibility fixes on current libraries, applied in
the child before import (see ``_fix_compat``).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import warnings
from pathlib import Path

from attnkit.config import unknown
from attnkit.errors import UserError
from attnkit.rundir import write_text_atomic

SPLITS = ("train", "interpolate", "extrapolate")
DIFFICULTIES = ("easy", "medium", "hard", "mixed")
MAX_QUESTION_LENGTH = 160
MAX_ANSWER_LENGTH = 30
_EXTRA_SUFFIXES = ("_big", "_longer", "_more_samples", "_more")
_SHARD = 2000  # problems per independently seeded shard
_CACHE_VERSION = 1


def default_cache_dir() -> Path:
    """``$ATTNKIT_CACHE`` if set, else ``~/.cache/attnkit``."""
    env = os.environ.get("ATTNKIT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "attnkit"


def _fix_compat() -> None:
    """Make mathematics-dataset 1.0.1 importable with sympy >= 1.6 and numpy >= 1.24.

    Only adds what is missing: ``sympy.solvers.diophantine.base_solution_linear`` (moved to the
    ``diophantine.diophantine`` submodule) and the removed alias ``numpy.object``. The package
    also needs numpy < 2 (``ndarray.itemset``), which the ``math`` extra pins.
    """
    import numpy as np

    if "object" not in vars(np):
        np.object = object
    # import_module returns the package; `import ... as` would bind the same-named function.
    dioph = importlib.import_module("sympy.solvers.diophantine")
    if not hasattr(dioph, "base_solution_linear"):
        inner = importlib.import_module("sympy.solvers.diophantine.diophantine")
        dioph.base_solution_linear = inner.base_solution_linear


def _import_modules():
    """The package's ``modules``, or a one-line error naming the extra that installs it."""
    try:
        _fix_compat()
        from mathematics_dataset.modules import modules
    except ModuleNotFoundError as err:
        if (err.name or "").split(".")[0] not in ("mathematics_dataset", "sympy"):
            raise
        raise UserError("the math recipes need DeepMind's mathematics-dataset: "
                        "pip install 'attnkit[math]'") from None
    return modules


@functools.lru_cache(maxsize=1)
def _all_names() -> dict[str, tuple[str, ...]]:
    """Module names per split, read from the package (constructing modules draws no random)."""
    modules = _import_modules()

    def flat(tree: dict) -> tuple[str, ...]:
        return tuple(sorted(f"{area}__{name}" for area, sub in tree.items() for name in sub))

    return {"train": flat(modules.train(lambda r: r)), "interpolate": flat(modules.test()),
            "extrapolate": flat(modules.test_extra())}


def module_names(split: str = "train") -> list[str]:
    """Module names of ``split``, e.g. ``"arithmetic__add_or_sub"`` (56 for train/interpolate,
    15 for extrapolate)."""
    if split not in SPLITS:
        raise unknown("math split", split, SPLITS)
    return list(_all_names()[split])


def extrapolate_names(module: str) -> list[str]:
    """Extrapolation variants of a train module (``arithmetic__add_or_sub`` ->
    ``["arithmetic__add_or_sub_big"]``); ``[]`` when it has none."""
    out = []
    for extra in _all_names()["extrapolate"]:
        if extra == module or any(extra == module + s for s in _EXTRA_SUFFIXES):
            out.append(extra)
    return out


def _resolve(module: str, split: str) -> list[str]:
    """The package module names to draw from for (module, split)."""
    if split not in SPLITS:
        raise unknown("math split", split, SPLITS)
    names = _all_names()
    if split == "extrapolate" and module in names["extrapolate"]:
        return [module]
    if module not in names["train"]:
        raise unknown("math module", module, names["train"] + names["extrapolate"])
    if split != "extrapolate":
        return [module]
    variants = extrapolate_names(module)
    if not variants:
        raise UserError(f"math module '{module}' has no extrapolation set; modules with one: "
                        + ", ".join(names["extrapolate"]))
    return variants


def _entropy_fn(level: int, levels: int = 3):
    """Restrict an entropy range (lo, hi) to its ``level``-th of ``levels`` equal parts."""
    def narrow(range_: tuple[float, float]) -> tuple[float, float]:
        length = range_[1] - range_[0]
        return range_[0] + level / levels * length, range_[0] + (level + 1) / levels * length
    return narrow


def _problem_fns(split: str, names: list[str], levels: list[int]) -> list:
    """Fresh problem generators; problem j uses ``fns[j % len(fns)]``."""
    from mathematics_dataset.modules import modules

    def area(name: str):
        return modules.all_[name.split("__")[0]]

    def sub(name: str) -> str:
        return name.split("__", 1)[1]

    if split == "train":
        return [area(names[0]).train(_entropy_fn(lv))[sub(names[0])] for lv in levels]
    if split == "interpolate":
        return [area(names[0]).test()[sub(names[0])]]
    return [area(n).test_extra()[sub(n)] for n in names]


def _sample(fn) -> tuple[str, str]:
    """One problem within the paper's length limits (longer ones are redrawn)."""
    while True:
        problem = fn()
        question, answer = str(problem.question), str(problem.answer)
        if len(question) <= MAX_QUESTION_LENGTH and len(answer) <= MAX_ANSWER_LENGTH:
            return question, answer


def _worker(arg: str) -> None:
    """Child process entry: generate the shards in ``arg`` (JSON), one JSON line per problem."""
    import random

    import numpy as np

    job = json.loads(arg)
    _fix_compat()
    for shard, start, count in job["shards"]:
        state = np.random.SeedSequence([job["seed"], shard, job["salt"]]).generate_state(2)
        random.seed(int(state[0]))
        np.random.seed(int(state[1]))
        fns = _problem_fns(job["split"], job["names"], job["levels"])
        for j in range(start, start + count):
            q, a = _sample(fns[j % len(fns)])
            sys.stdout.write(json.dumps({"i": j, "q": q, "a": a}) + "\n")
            sys.stdout.flush()


def _spawn(job: dict, stderr) -> subprocess.Popen:
    """Start one worker with PYTHONHASHSEED=0 and attnkit importable."""
    root = str(Path(__file__).resolve().parents[2])  # the directory holding attnkit/
    env = dict(os.environ, PYTHONHASHSEED="0", PYTHONIOENCODING="utf-8")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    code = "import sys; from attnkit.data.math import _worker; _worker(sys.argv[1])"
    return subprocess.Popen([sys.executable, "-W", "ignore", "-c", code, json.dumps(job)],
                            stdout=subprocess.PIPE, stderr=stderr, env=env, text=True,
                            encoding="utf-8")


def _generate(names: list[str], split: str, levels: list[int], n: int, seed: int,
              workers: int = 2, shard_size: int = _SHARD, progress: bool = True,
              desc: str = "") -> list[tuple[str, str]]:
    """Generate ``n`` problems over ``workers`` child processes; order fixed by index."""
    from attnkit.progress import progress_bar

    shards = [(k, s, min(shard_size, n - s)) for k, s in enumerate(range(0, n, shard_size))]
    workers = max(1, min(workers, len(shards)))
    base = {"names": names, "split": split, "levels": levels, "seed": seed,
            "salt": SPLITS.index(split)}
    results: dict[int, tuple[str, str]] = {}
    lock = threading.Lock()
    bar = progress_bar(total=n, desc=desc, unit="problem", disable=not progress)

    def read(proc: subprocess.Popen) -> None:
        for line in proc.stdout:
            if not line.startswith('{"i"'):
                continue  # anything else the package might print
            item = json.loads(line)
            with lock:
                results[item["i"]] = (item["q"], item["a"])
                bar.update(1)

    with tempfile.TemporaryFile("w+", encoding="utf-8") as err:
        procs = [_spawn({**base, "shards": shards[w::workers]}, err) for w in range(workers)]
        threads = [threading.Thread(target=read, args=(p,), daemon=True) for p in procs]
        try:
            for t in threads:
                t.start()
            for t, p in zip(threads, procs, strict=True):
                t.join()
                p.wait()
        finally:
            bar.close()
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        if any(p.returncode != 0 for p in procs) or len(results) != n:
            err.seek(0)
            lines = [ln for ln in err.read().splitlines() if ln.strip()]
            raise UserError("mathematics-dataset generation failed: "
                            + (lines[-1] if lines else f"{len(results)} of {n} problems"))
    return [results[j] for j in range(n)]


def _cache_path(cache_dir: Path, module: str, split: str, difficulty: str, n: int,
                seed: int) -> Path:
    return (cache_dir / "math"
            / f"{module}.{split}.{difficulty}.n{n}.seed{seed}.v{_CACHE_VERSION}.jsonl")


def _read_cache(path: Path, n: int) -> list[tuple[str, str]] | None:
    """Cached problems, or None when absent or unusable (then they are generated again)."""
    try:
        with path.open(encoding="utf-8") as f:
            data = [(d["q"], d["a"]) for d in map(json.loads, f)]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return data if len(data) == n else None


def _write_cache(path: Path, data: list[tuple[str, str]]) -> None:
    """Write JSONL atomically; a cache that cannot be written only warns."""
    try:
        write_text_atomic(path, "".join(json.dumps({"q": q, "a": a}) + "\n" for q, a in data))
    except OSError as err:
        warnings.warn(f"could not cache math problems at {path}: {err}", stacklevel=3)


def math_problems(module: str, split: str, n: int, seed: int = 0, difficulty: str = "mixed",
                  cache_dir: Path | None = None, progress: bool = True
                  ) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs of one module, reproducible from ``seed``.

    ``split``: ``train`` (``difficulty`` easy / medium / hard, or mixed = the three cycled in
    equal thirds), ``interpolate`` or ``extrapolate`` (the module's extrapolation variants,
    cycled; an extrapolation name such as ``arithmetic__add_or_sub_big`` is accepted too).
    ``difficulty`` only matters for ``train``.
    """
    names = _resolve(module, split)
    if difficulty not in DIFFICULTIES:
        raise unknown("math difficulty", difficulty, DIFFICULTIES)
    if n < 0:
        raise UserError(f"number of problems must be >= 0, got {n}")
    if n == 0:
        return []
    if split != "train":
        difficulty = "mixed"
    levels = [0, 1, 2] if difficulty == "mixed" else [DIFFICULTIES.index(difficulty)]
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    path = _cache_path(cache_dir, module, split, difficulty, n, seed)
    cached = _read_cache(path, n)
    if cached is not None:
        return cached
    data = _generate(names, split, levels, n, seed, progress=progress,
                     desc=f"{module} {split}")
    _write_cache(path, data)
    return data
