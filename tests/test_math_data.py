"""Mathematics-dataset problems: reproducibility, correct answers, splits, cache, errors."""

from __future__ import annotations

import json
import re
from decimal import Decimal

import pytest

from attnkit.data import math as mathdata
from attnkit.data.math import extrapolate_names, math_problems, module_names
from attnkit.errors import UserError

ADD = "arithmetic__add_or_sub"
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def reference_add_or_sub(question: str) -> Decimal:
    """The answer of an add_or_sub question, computed from its text with Decimal."""
    p, q = (Decimal(x) for x in NUMBER.findall(question))
    if "less than" in question or question.startswith("Subtract"):
        return q - p  # "What is {q} less than {p}?", "Subtract {q} from {p}."
    if "between" in question:
        return abs(p - q)  # distance / difference
    if "+" in question or re.search(r"plus|Add|Sum|Total|Put together", question):
        return p + q
    return p - q  # "-", "minus", "take away"


@pytest.fixture(scope="module")
def train_add(tmp_path_factory):
    return math_problems(ADD, "train", 300, seed=0, cache_dir=tmp_path_factory.mktemp("a"),
                         progress=False)


def test_add_or_sub_answers_match_decimal_reference(train_add):
    assert len(train_add) == 300
    for question, answer in train_add:
        assert len(NUMBER.findall(question)) == 2, question
        assert Decimal(answer) == reference_add_or_sub(question), question
        assert len(question) <= 160 and len(answer) <= 30


def test_reference_parser_can_fail():
    assert reference_add_or_sub("What is 3 less than 10?") == 7
    assert reference_add_or_sub("What is 3 minus -10?") == 13
    assert reference_add_or_sub("Subtract 2 from 5.") != -3


def test_same_seed_same_problems_and_different_seed_differs(train_add, tmp_path):
    again = math_problems(ADD, "train", 300, seed=0, cache_dir=tmp_path / "b", progress=False)
    assert again == train_add  # generated afresh in another process
    other = math_problems(ADD, "train", 300, seed=1, cache_dir=tmp_path / "c", progress=False)
    assert other != train_add
    assert len(set(other) & set(train_add)) < 10


def test_result_does_not_depend_on_worker_count():
    kwargs = dict(names=[ADD], split="train", levels=[0, 1, 2], n=90, seed=3, shard_size=30,
                  progress=False)
    assert mathdata._generate(workers=1, **kwargs) == mathdata._generate(workers=2, **kwargs)


def test_cache_is_read_not_regenerated(tmp_path, monkeypatch):
    first = math_problems(ADD, "train", 30, seed=5, difficulty="easy", cache_dir=tmp_path,
                          progress=False)
    files = list((tmp_path / "math").iterdir())
    assert len(files) == 1 and files[0].suffix == ".jsonl"
    lines = files[0].read_text(encoding="utf-8").splitlines()
    assert [tuple(json.loads(x).values()) for x in lines] == first

    def fail(*args, **kwargs):
        raise AssertionError("regenerated instead of reading the cache")

    monkeypatch.setattr(mathdata, "_generate", fail)
    assert math_problems(ADD, "train", 30, seed=5, difficulty="easy", cache_dir=tmp_path,
                         progress=False) == first
    # the file really is the source: an edited cache is returned as edited
    lines[0] = json.dumps({"q": "edited?", "a": "1"})
    files[0].write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = math_problems(ADD, "train", 30, seed=5, difficulty="easy", cache_dir=tmp_path,
                        progress=False)
    assert got[0] == ("edited?", "1") and got[1:] == first[1:]
    with pytest.raises(AssertionError, match="regenerated"):  # other arguments, other key
        math_problems(ADD, "train", 30, seed=5, difficulty="hard", cache_dir=tmp_path,
                      progress=False)


def test_default_cache_dir_follows_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ATTNKIT_CACHE", str(tmp_path))
    assert mathdata.default_cache_dir() == tmp_path
    monkeypatch.delenv("ATTNKIT_CACHE")
    assert mathdata.default_cache_dir().parts[-2:] == (".cache", "attnkit")


def test_module_lists_and_extrapolate_names():
    train = module_names("train")
    assert len(train) == 56 and ADD in train and "calculus__differentiate" in train
    assert module_names("interpolate") == train
    assert len(module_names("extrapolate")) == 15
    assert extrapolate_names(ADD) == ["arithmetic__add_or_sub_big"]
    assert extrapolate_names("arithmetic__mul") == ["arithmetic__mul_big"]
    assert extrapolate_names("probability__swr_p_sequence") == [
        "probability__swr_p_sequence_more_samples"]
    assert extrapolate_names("algebra__linear_1d") == []


def test_extrapolate_and_interpolate_splits(tmp_path):
    big = math_problems(ADD, "extrapolate", 30, seed=0, cache_dir=tmp_path, progress=False)
    assert len(big) == 30
    for question, answer in big:
        assert Decimal(answer) == reference_add_or_sub(question)
    inter = math_problems(ADD, "interpolate", 30, seed=0, cache_dir=tmp_path, progress=False)
    assert len(inter) == 30 and inter != big
    for question, answer in inter:
        assert Decimal(answer) == reference_add_or_sub(question)


def test_errors(tmp_path):
    with pytest.raises(UserError, match="did you mean 'arithmetic__add_or_sub'"):
        math_problems("arithmetic__add_or_subb", "train", 10, cache_dir=tmp_path)
    with pytest.raises(UserError, match="no extrapolation set"):
        math_problems("algebra__linear_1d", "extrapolate", 10, cache_dir=tmp_path)
    with pytest.raises(UserError, match="split"):
        math_problems(ADD, "test", 10, cache_dir=tmp_path)
    with pytest.raises(UserError, match="difficulty"):
        math_problems(ADD, "train", 10, difficulty="medum", cache_dir=tmp_path)
    assert math_problems(ADD, "train", 0, cache_dir=tmp_path) == []
    assert not (tmp_path / "math").exists()


def test_difficulty_levels_grow(tmp_path):
    def mean_answer_length(difficulty: str) -> float:
        data = math_problems(ADD, "train", 60, seed=0, difficulty=difficulty,
                             cache_dir=tmp_path, progress=False)
        return sum(len(a) for _, a in data) / len(data)

    assert mean_answer_length("easy") < mean_answer_length("hard")


def test_cache_write_is_atomic_and_a_failed_one_only_warns(tmp_path):
    data = [("What is 1 + 1?", "2"), ("Subtract 3 from 5.", "2")]
    path = tmp_path / "math" / "x.jsonl"
    mathdata._write_cache(path, data)
    assert mathdata._read_cache(path, 2) == data
    assert sorted(p.name for p in path.parent.iterdir()) == ["x.jsonl"]  # no temporary left
    (tmp_path / "file").write_text("not a folder", encoding="utf-8")
    with pytest.warns(UserWarning, match="could not cache"):
        mathdata._write_cache(tmp_path / "file" / "x.jsonl", data)
    assert (tmp_path / "file").read_text(encoding="utf-8") == "not a folder"
