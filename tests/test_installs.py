"""What `pip install attnkit` asks of an environment: the core installs where people already work
(numpy 2, the GPU image of gpu.md: Python 3.12, torch 2.11, numpy 2.5, transformers 5.17), and
the math recipes, whose generator needs numpy < 2, say in one line which extra to install.

These tests import no mathematics-dataset, so `make test-numpy2` runs them too.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from attnkit.cli import main
from attnkit.data import math as math_data

ROOT = Path(__file__).resolve().parents[1]
GPU_IMAGE = {"python": "3.12", "torch": "2.11.0", "numpy": "2.5.0", "transformers": "5.17.0"}


def _project() -> dict:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)["project"]


def _admits(requirements: list[str], versions: dict[str, str]) -> list[str]:
    """The requirements (among those naming a package of ``versions``) that reject its version."""
    rejected = []
    for line in requirements:
        req = Requirement(line)
        if req.name in versions and not req.specifier.contains(versions[req.name]):
            rejected.append(line)
    return rejected


def test_core_requirements_admit_the_gpu_image_and_numpy2() -> None:
    project = _project()
    core = project["dependencies"]
    assert not any(Requirement(r).name == "mathematics-dataset" for r in core), core
    assert _admits(core, GPU_IMAGE) == []
    assert _admits(core, {"numpy": "1.26.4"}) == []  # the pinned set of `make test`
    assert _admits(project["optional-dependencies"]["dev"], GPU_IMAGE) == []
    python = project["requires-python"]
    assert Requirement(f"python{python}").specifier.contains(GPU_IMAGE["python"]), python


def test_math_extra_holds_the_generator_and_its_numpy_bound() -> None:
    math = _project()["optional-dependencies"]["math"]
    assert "mathematics-dataset==1.0.1" in math
    # mathematics-dataset 1.0.1 calls ndarray.itemset, removed in numpy 2.0
    assert _admits(math, {"numpy": "2.0.0"}) and not _admits(math, {"numpy": "1.26.4"})


@pytest.mark.parametrize("recipe", ["math-demo", "math"])
def test_math_recipe_without_the_extra_says_what_to_install(
        recipe: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path / "cache"))
    # the import fails as if the package were absent, also where an earlier test imported it
    for name in [n for n in sys.modules if n.split(".")[0] == "mathematics_dataset"]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "mathematics_dataset", None)
    math_data._all_names.cache_clear()
    try:
        code = main(["train", recipe, "--set", "train.steps=1"])
    finally:
        math_data._all_names.cache_clear()
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err == ("attnkit: error: the math recipes need DeepMind's mathematics-dataset: "
                   "pip install 'attnkit[math]'")
    assert list(tmp_path.iterdir()) == []  # no run directory, no cache
