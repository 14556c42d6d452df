"""The run directory, at the bottom of attnkit: file names, atomic writes, the run record.

It knows no model family and no recipe; train, data, energy, viz, the loader and the recipes
all name a run's files through its constants::

    runs/<name>/
      config.json            {"recipe", "config", "model": {"family", "config", ...}}
      tokenizer.json
      checkpoints/           step-000123.safetensors + .state.pt, best.safetensors
      metrics.jsonl          one JSON object per logged step / evaluation
      results.json           the final report
      energy.json            wall, CPU time, kWh, CO2e, method
      samples.txt            language-model samples
      plots/                 loss.png, ...
      tensorboard/

Every file is written atomically (temporary file in the same directory, flush, fsync,
``os.replace``, fsync of the directory): readers see the old file or the whole new one.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from attnkit.config import from_dict, parse_value, to_dict
from attnkit.errors import ConfigError, UserError

CONFIG = "config.json"
TOKENIZER = "tokenizer.json"
CHECKPOINTS = "checkpoints"
METRICS = "metrics.jsonl"
RESULTS = "results.json"
ENERGY = "energy.json"
SAMPLES = "samples.txt"
PLOTS = "plots"
TENSORBOARD = "tensorboard"


# ---- atomic writes ---------------------------------------------------------------------------
def fsync_dir(directory: Path) -> None:
    with contextlib.suppress(OSError):  # some file systems cannot open directories
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` atomically.

    Use it for writers that want a file name (``save_file``, ``savefig``, ``tokenizer.save``).
    On an exception the temporary file is removed and ``path`` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix,
                               dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, 0o644)  # mkstemp makes 0600; writers may have re-created the file
        with open(tmp_path, "rb+") as f:
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        tmp_path.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see either the old file or the whole new one."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def write_text_atomic(path: str | Path, text: str) -> None:
    """:func:`write_atomic` for UTF-8 text."""
    write_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically (e.g. ``config.json``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_torch_atomic(path: str | Path, obj: Any) -> None:
    """``torch.save(obj)`` written atomically."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_atomic(path, buffer.getvalue())


# ---- the run record (config.json) -------------------------------------------------------------
def read_config_json(path: str | Path) -> dict:
    """The ``config.json`` of directory ``path`` as a dict ({} when absent or unreadable):
    enough to tell an attnkit run (``recipe``) from a Hugging Face directory (``model_type``)."""
    try:
        record = json.loads((Path(path) / CONFIG).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return record if isinstance(record, dict) else {}


def is_run(path: str | Path) -> bool:
    """Whether ``path`` holds an attnkit run (a ``config.json`` with a recipe)."""
    return "recipe" in read_config_json(path)


# ---- runs written by earlier releases ---------------------------------------------------------
# Settings and values that runs of earlier releases recorded and attnkit no longer has:
# (the dotted key's last parts, its old value or None for any, what reading a run makes of it:
# the value now or None to drop the key, why). Reading a run applies them, so old runs evaluate
# and resume as before; a config file or --set that gives one is refused in one line with why.
RETIRED: tuple[tuple[str, Any, Any, str], ...] = (
    ("energy.country_iso_code", None, None,
     "it told codecarbon the grid's country, and the codecarbon energy backend was dropped"),
    ("energy.method", "codecarbon", "auto", "the codecarbon energy backend was dropped"),
)


def retired(key: str, value: Any) -> tuple[Any, str] | None:
    """``(value now or None to drop the setting, why)`` when attnkit no longer has setting
    ``key`` (dotted) or its ``value`` (:data:`RETIRED`); None when both are current."""
    for suffix, old, now, why in RETIRED:
        if (key == suffix or key.endswith("." + suffix)) and (old is None or value == old):
            return now, why
    return None


def _settings(section: dict, prefix: str = "") -> Iterator[tuple[str, Any]]:
    """The (dotted key, value) leaves of a nested config dict."""
    for key, value in section.items():
        if isinstance(value, dict):
            yield from _settings(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


def _upgrade_settings(section: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in section.items():
        if isinstance(value, dict):
            out[key] = _upgrade_settings(value, f"{prefix}{key}.")
        elif (change := retired(prefix + key, value)) is None:
            out[key] = value
        elif change[0] is not None:
            out[key] = change[0]
    return out


def refuse_retired(settings: dict, overrides: Iterable[str] = ()) -> None:
    """A one-line error for a retired setting or value (:data:`RETIRED`) given in a config
    file (``settings``) or a ``key=value`` override."""
    given = [*_settings(settings)]
    given += [(key, parse_value(raw)) for key, _, raw in (o.partition("=") for o in overrides)]
    for key, value in given:
        if (change := retired(key, value)) is not None:
            now, why = change
            if now is None:
                raise UserError(f"{key} is no longer a setting ({why}); leave it out")
            raise UserError(f"{key}={value} is no longer available ({why}); use {now}")


def upgrade_record(record: dict) -> dict:
    """A run record of any release in today's layout (a new dict): retired settings dropped or
    replaced (:data:`RETIRED`), and a fine-tuning run's ``head`` inside its model record, where
    runs before the family table kept it beside."""
    record = {**record, "config": _upgrade_settings(record["config"])}
    if isinstance(record.get("head"), dict) and isinstance(record.get("model"), dict):
        record["model"] = {**record["model"], "head": record.pop("head")}
    return record


def read_run(run_dir: str | Path) -> dict:
    """A run directory's config.json (recipe, config, model) with one-line errors, in today's
    layout (:func:`upgrade_record`)."""
    path = Path(run_dir) / CONFIG
    if not path.is_file():
        raise UserError(f"{run_dir} is not an attnkit run directory (no {CONFIG})")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is corrupt: {err}") from None
    if not (isinstance(record, dict) and isinstance(record.get("recipe"), str)
            and isinstance(record.get("config"), dict)):
        raise UserError(f"{path} is not an attnkit run config (no recipe and config)")
    return upgrade_record(record)


def record_model(run_dir: str | Path, spec: dict) -> None:
    """Write the built model's record ``{"family", "config", ...}`` into config.json."""
    record = read_run(run_dir)
    if record.get("model") != spec:
        record["model"] = spec
        write_json_atomic(Path(run_dir) / CONFIG, record)


def record_config(run_dir: str | Path, config: dict) -> None:
    """Replace the settings config.json records (``attnkit resume --set`` changed some), the
    rest of the record kept as it is."""
    record = read_run(run_dir)
    record["config"] = config
    write_json_atomic(Path(run_dir) / CONFIG, record)


def prepare_run_dir(recipe: str, cfg: Any) -> Path:
    """Create the run directory and its config.json (``cfg`` is a recipe config with a
    ``run_dir``); an existing run must have the same recipe and config."""
    run_dir = Path(cfg.run_dir or f"runs/{recipe}-{time.strftime('%Y%m%d-%H%M%S')}")
    record = {"recipe": recipe, "config": to_dict(cfg)}
    path = run_dir / CONFIG
    if path.exists():
        old = read_run(run_dir)
        # where the run lives is not part of what it is (a moved run resumes too), and settings
        # added to attnkit since the run started take their defaults
        try:
            old_config = to_dict(from_dict(type(cfg), old["config"]))
        except ConfigError:
            old_config = old["config"]
        same = old["recipe"] == recipe and {**old_config, "run_dir": ""} == {
            **record["config"], "run_dir": ""}
        if not same:
            raise UserError(f"{run_dir} holds a run with another recipe or config; choose "
                            "another run_dir (or resume it: attnkit resume RUN [--set "
                            "device=...])")
        return run_dir
    if run_dir.exists() and any(run_dir.iterdir()):
        raise UserError(f"{run_dir} exists and is not an attnkit run; choose another run_dir")
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, record)
    return run_dir


# ---- metrics ---------------------------------------------------------------------------------
def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of ``run_dir/metrics.jsonl`` (a torn last line from a kill is skipped)."""
    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records
