"""Hugging Face checkpoint directories <-> attnkit models.

A Hugging Face directory holds ``config.json`` (with ``model_type``), the weights
(``model.safetensors``, a sharded ``model.safetensors.index.json``, or the older
``pytorch_model.bin``) and usually ``tokenizer.json``. Conversion is a pure mapping from one state
dict to another, done by the *converter module* a family of the family table
(:data:`attnkit.models.FAMILIES`, its ``hf_types`` and ``converter``) names; imported lazily, it
provides:

- ``MODEL_TYPES``: the Hugging Face ``model_type`` values it reads;
- ``config_from_hf(hf: dict) -> config``: UserError naming any unsupported option;
- ``config_to_hf(cfg) -> dict``: a ``config.json`` transformers loads (``model_type``,
  ``architectures``);
- ``build(cfg) -> nn.Module``;
- ``state_from_hf(sd, cfg) -> dict``: our state dict. It drops known non-persistent buffers
  (GPT-2's ``attn.bias``) and keeps keys it does not know under their Hugging Face names, so that
  they are reported as unexpected;
- ``state_to_hf(sd, cfg) -> dict``: the Hugging Face state dict (tied weights stored once, as
  transformers saves them); it maps any subset of keys;

:func:`from_pretrained` checks the key sets and shapes and names every missing, unexpected or
mismatched tensor in a one-line :class:`UserError`.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import nn

from attnkit.config import unknown
from attnkit.errors import UserError
from attnkit.paths import confined
from attnkit.train.checkpoint import torch_load

CONFIG = "config.json"
SAFETENSORS = "model.safetensors"
TORCH_BIN = "pytorch_model.bin"
TOKENIZER = "tokenizer.json"


@dataclass
class Pretrained:
    """What :func:`from_pretrained` returns."""

    model: nn.Module
    config: Any            # the family's attnkit config (e.g. GPT2Config)
    tokenizer: Any | None  # attnkit.tokenizers.Tokenizer, or None without tokenizer.json
    model_type: str        # the Hugging Face model_type


def hf_types() -> dict[str, str]:
    """Hugging Face ``model_type`` -> the attnkit family that reads it (from the table)."""
    from attnkit.models import FAMILIES

    return {t: name for name, fam in FAMILIES.items() for t in fam.hf_types}


def family_module(model_type: str) -> ModuleType:
    """The converter module of Hugging Face ``model_type`` (UserError when unknown)."""
    from attnkit.models import FAMILIES

    types = hf_types()
    if model_type not in types:
        raise unknown("Hugging Face model_type", model_type, types)
    return importlib.import_module(FAMILIES[types[model_type]].converter)


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def read_hf_config(path: Path) -> dict:
    """``config.json`` of a Hugging Face directory, as a dict with a ``model_type``."""
    if not path.exists():
        raise UserError(f"no such directory: {path}")
    if not path.is_dir():
        raise UserError(f"expected a Hugging Face model directory, got a file: {path}")
    file = path / CONFIG
    if not file.is_file():
        raise UserError(f"{path} has no {CONFIG}: not a Hugging Face model directory")
    try:
        hf = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read {file}: {_first_line(err)}") from None
    if not isinstance(hf, dict) or not isinstance(hf.get("model_type"), str):
        raise UserError(f"{file} has no model_type")
    return hf


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    """One weights file (safetensors, or a torch pickle read with ``weights_only``)."""
    if file.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            state = load_file(str(file), device="cpu")
        except Exception as err:  # the library raises many kinds for a damaged file
            raise UserError(f"corrupt or unreadable weights {file}: {_first_line(err)}") from None
    else:
        state = torch_load(file, "corrupt or unreadable weights")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor)
                                              for v in state.values()):
        raise UserError(f"corrupt weights {file}: expected a dict of tensors")
    return state


def _load_sharded(index: Path) -> dict[str, torch.Tensor]:
    """The tensors of every shard ``index`` names (each confined to the index's folder)."""
    try:
        record = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"cannot read the shard index {index}: {_first_line(err)}") from None
    weight_map = record.get("weight_map") if isinstance(record, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise UserError(f"the shard index {index} has no weight_map (tensor name -> file name)")
    shards = {confined(index.parent, name, index) for name in weight_map.values()}
    state: dict[str, torch.Tensor] = {}
    for shard in sorted(shards):
        if not shard.is_file():
            raise UserError(f"shard {shard.name} listed in {index.name} is missing from "
                            f"{index.parent}")
        state.update(_load_file(shard))
    return state


def read_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """The Hugging Face state dict of directory ``path`` (safetensors preferred)."""
    for name in (SAFETENSORS, TORCH_BIN):
        if (path / name).is_file():
            return _load_file(path / name)
        if (path / f"{name}.index.json").is_file():
            return _load_sharded(path / f"{name}.index.json")
    raise UserError(f"{path} has no weights ({SAFETENSORS} or {TORCH_BIN})")


def _names(items: list[str], limit: int = 6) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


def check_state(state: dict[str, torch.Tensor], model: nn.Module, where: str,
                hf_name: Any = None) -> None:
    """UserError naming missing, unexpected and differently shaped tensors (one line)."""
    target = model.state_dict()
    hf_name = hf_name or (lambda key: key)
    missing = sorted(hf_name(k) for k in set(target) - set(state))
    unexpected = sorted(set(state) - set(target))
    shapes = sorted(f"{hf_name(k)} {tuple(state[k].shape)} vs {tuple(t.shape)}"
                    for k, t in target.items()
                    if k in state and tuple(state[k].shape) != tuple(t.shape))
    problems = [f"{label}: {_names(items)}" for label, items in
                (("missing", missing), ("unexpected", unexpected),
                 ("shape mismatch (file vs model)", shapes)) if items]
    if problems:
        raise UserError(f"weights in {where} do not fit the model: " + "; ".join(problems))


def _hf_namer(family: ModuleType, target: dict[str, torch.Tensor], cfg: Any) -> Any:
    """Our key -> its Hugging Face name (for messages), or our key when unmappable."""
    def name(key: str) -> str:
        try:
            mapped = list(family.state_to_hf({key: target[key]}, cfg))
        except Exception:  # noqa: BLE001 - only a nicer name for an error message
            return key
        return mapped[0] if len(mapped) == 1 else key
    return name


def from_pretrained(path: str | Path, *, family: str | None = None) -> Pretrained:
    """Load a Hugging Face model directory as an attnkit model (eval mode) and tokenizer.

    ``family`` overrides the directory's ``model_type`` (e.g. a fine-tuned model saved with an
    unusual type name that is architecturally one of ours).
    """
    path = Path(path)
    hf = read_hf_config(path)
    model_type = family or hf["model_type"]
    fam = family_module(model_type)
    cfg = fam.config_from_hf(hf)
    model = fam.build(cfg)
    state = fam.state_from_hf(read_hf_weights(path), cfg)
    check_state(state, model, str(path), _hf_namer(fam, model.state_dict(), cfg))
    model.load_state_dict(state, strict=True)
    model.eval()
    from attnkit.tokenizers import load_pretrained_tokenizer
    return Pretrained(model, cfg, load_pretrained_tokenizer(path), model_type)


def family_for(model: nn.Module) -> ModuleType:
    """The converter module that can save ``model`` (UserError when its family has none)."""
    from attnkit.models import FAMILIES, family_of

    model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    try:
        name = family_of(model)
    except UserError:
        name = type(model).__name__
    if name not in FAMILIES or not FAMILIES[name].converter:
        raise UserError(f"cannot save a {name} model in Hugging Face format; supported "
                        f"families: {', '.join(sorted(set(hf_types().values())))}")
    return importlib.import_module(FAMILIES[name].converter)


EXPORT_MARK = "attnkit_export"  # key in config.json: this directory is one attnkit wrote
_EXPORT_FILES = frozenset({CONFIG, SAFETENSORS, TOKENIZER})


def _write_dir(tmp: Path, model: nn.Module, fam: ModuleType, tokenizer: Any) -> None:
    from safetensors.torch import save_file
    cfg = getattr(model, "config", None) or model.cfg
    hf = fam.config_to_hf(cfg)
    if tokenizer is not None:
        for name in ("bos", "eos", "pad"):
            if getattr(tokenizer, f"{name}_id", None) is not None:
                hf[f"{name}_token_id"] = int(getattr(tokenizer, f"{name}_id"))
        tokenizer.save(tmp / TOKENIZER)
    hf[EXPORT_MARK] = True
    state = fam.state_to_hf(model.state_dict(), cfg)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    save_file(tensors, str(tmp / SAFETENSORS), metadata={"format": "pt"})
    (tmp / CONFIG).write_text(json.dumps(hf, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def is_attnkit_export(path: str | Path) -> bool:
    """Whether ``path`` is a directory :func:`save_pretrained` wrote and nothing else touched:
    only its files (regular files, no links), and its mark in ``config.json``."""
    path = Path(path)
    if path.is_symlink() or not path.is_dir():
        return False
    entries = list(path.iterdir())
    if not entries or any(e.name not in _EXPORT_FILES or e.is_symlink() or not e.is_file()
                          for e in entries):
        return False
    try:
        return json.loads((path / CONFIG).read_text(encoding="utf-8")).get(EXPORT_MARK) is True
    except (OSError, ValueError, AttributeError):
        return False


def check_export_target(path: str | Path, overwrite: bool) -> None:
    """Refuse (UserError) a target :func:`save_pretrained` must not write: a file, a link, or
    a non-empty directory unless ``overwrite`` and it is an export attnkit wrote before."""
    path = Path(path)
    if path.is_symlink():
        raise UserError(f"{path} is a symbolic link; give a new directory")
    if path.exists() and not path.is_dir():
        raise UserError(f"{path} exists and is not a directory")
    if not (path.is_dir() and any(path.iterdir())):
        return
    if not overwrite:
        raise UserError(f"{path} exists and is not empty (pass --overwrite, or overwrite=True "
                        "in Python, to replace an earlier export)")
    if not is_attnkit_export(path):
        raise UserError(f"{path} holds files attnkit did not export there, or an export from "
                        "before attnkit marked its exports; --overwrite replaces only a marked "
                        "export: give a new directory, or remove this one yourself")


def save_pretrained(model: nn.Module, path: str | Path, tokenizer: Any = None, *,
                    overwrite: bool = False) -> Path:
    """Write ``model`` (and ``tokenizer``) as a Hugging Face directory transformers can load.

    Written atomically: into a temporary directory beside ``path``, then swapped in by renames.
    An existing non-empty ``path`` is refused unless ``overwrite`` and it is an earlier export
    of attnkit's (:func:`is_attnkit_export`): nothing attnkit did not write is ever deleted. On
    failure nothing changes.
    """
    path = Path(path)
    fam = family_for(model)
    model = model.module if isinstance(getattr(model, "module", None), nn.Module) else model
    check_export_target(path, overwrite)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    old: Path | None = None
    try:
        _write_dir(tmp, model, fam, tokenizer)
        os.chmod(tmp, 0o755)
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old)  # an empty directory is replaced by a rename
        os.replace(tmp, path)
    except BaseException:
        if old is not None and not path.exists():
            os.replace(old, path)  # put the previous directory back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)  # the earlier export, checked above
    return path
