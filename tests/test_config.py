"""Config layer: every float setting of every recipe refuses NaN and infinities, naming the key."""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any

import pytest

from attnkit.config import from_dict
from attnkit.errors import ConfigError
from attnkit.recipes import RECIPES, resolve_config


def _takes_float(annotation: Any) -> bool:
    """``float``, ``float | None``, ``tuple[float, ...]``: a field holding float values."""
    if annotation is float:
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, tuple, list):
        return any(_takes_float(arg) for arg in typing.get_args(annotation))
    return False


def float_keys(cfg: Any, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, current value) of every float setting: typed dataclass fields, and the
    float entries of free-form sections such as ``arch`` (their family config types them)."""
    keys = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value, key = getattr(cfg, f.name), prefix + f.name
        if dataclasses.is_dataclass(value):
            keys += float_keys(value, key + ".")
        elif isinstance(value, dict):
            keys += [(f"{key}.{k}", v) for k, v in value.items() if isinstance(v, float)]
        elif _takes_float(hints[f.name]):
            keys.append((key, value))
    return keys


ALL_KEYS = [(name, key, value) for name, recipe in RECIPES.items()
            for key, value in float_keys(recipe.defaults())]


def test_the_walk_finds_the_float_settings():
    keys = {(name, key) for name, key, _ in ALL_KEYS}
    for expected in [("lm", "train.optim.lr"), ("lm", "train.clip_norm"),
                     ("copy", "label_smoothing"), ("copy", "arch.dropout"),
                     ("lm", "arch.dropout"), ("translate", "train.optim.betas")]:
        assert expected in keys, expected
    assert len(keys) > 100


@pytest.mark.parametrize("text", ["Infinity", "-Infinity", "NaN", "1e999"])
def test_every_float_setting_refuses_non_finite_values(text):
    for name, key, value in ALL_KEYS:
        bad = f"[{text}, {text}]" if isinstance(value, (tuple, list)) else text
        with pytest.raises(ConfigError) as info:
            resolve_config(RECIPES[name], overrides=[f"{key}={bad}"])
        message = str(info.value)
        assert key in message and "finite" in message, (name, key, message)


def test_finite_values_still_pass_and_huge_integers_are_refused():
    @dataclasses.dataclass(frozen=True)
    class Tiny:
        rate: float = 0.5

    assert from_dict(Tiny, {"rate": 3}).rate == 3.0
    with pytest.raises(ConfigError, match="rate: expected a finite number"):
        from_dict(Tiny, {"rate": 10**400})
