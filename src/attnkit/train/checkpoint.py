"""Checkpoints that survive a kill at any moment (atomic writes: :mod:`attnkit.rundir`).

A checkpoint for step ``n`` is two files in ``run_dir/checkpoints``:

- ``step-00000n.state.pt``: optimiser, scheduler, RNG states, data position, step, best value,
  metrics (tensors, numbers, strings, lists and dicts only: it is read back with
  ``torch.load(weights_only=True)``);
- ``step-00000n.safetensors``: the model weights.

Each file is written atomically (temporary file in the same directory, flush, fsync,
``os.replace``, fsync of the directory), the state first and the weights last, so the weights
file is the commit mark: a checkpoint is complete when its weights file exists next to its state
file. A kill between the two leaves an orphan state file that :func:`latest_checkpoint` ignores.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from attnkit.accel import device_of
from attnkit.errors import UserError
from attnkit.rundir import CHECKPOINTS, atomic_path, fsync_dir, save_torch_atomic

WEIGHTS = ".safetensors"
STATE = ".state.pt"
_STEP = re.compile(r"^step-(\d+)\.safetensors$")


# ---- weights ---------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) \
        else model


def _dedupe(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Drop tensors that alias an earlier one (tied weights); safetensors refuses shared memory."""
    seen: dict[tuple, str] = {}
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    for key, t in state.items():
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
                 tuple(t.stride()), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            aliases[key] = seen[ident]
            continue
        if ident is not None:
            seen[ident] = key
        tensors[key] = t.contiguous().cpu()
    return tensors, aliases


def save_weights(path: str | Path, model: nn.Module, metadata: dict[str, str] | None = None
                 ) -> None:
    """The model's state dict (DDP unwrapped, tied weights stored once) as safetensors."""
    tensors, aliases = _dedupe(_unwrap(model).state_dict())
    meta = {"format": "pt", **(metadata or {})}
    if aliases:
        meta["aliases"] = json.dumps(aliases)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


def _read_safetensors(path: Path, device: torch.device | str = "cpu"
                      ) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118
    except Exception as err:  # safetensors raises several kinds for a damaged file
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"corrupt or truncated checkpoint {path}: {first}") from None
    for alias, key in json.loads(meta.get("aliases", "{}")).items():
        tensors[alias] = tensors[key]
    return tensors


def load_weights(path: str | Path, model: nn.Module | None = None) -> dict[str, torch.Tensor]:
    """Read a safetensors checkpoint; when ``model`` is given, load it in (strict, shape-checked)
    with the tensors read straight onto the model's device (checkpoints hold CPU tensors).

    Raises :class:`UserError` for a missing, corrupt or truncated file, and for missing,
    unexpected or differently shaped tensors.
    """
    path = Path(path)
    tensors = _read_safetensors(path, "cpu" if model is None else device_of(_unwrap(model)))
    if model is not None:
        load_tensors(model, tensors, path)
    return tensors


def load_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Load tensors read from the checkpoint ``path`` into ``model`` (strict, shape-checked)."""
    target = _unwrap(model).state_dict()
    missing = sorted(set(target) - set(tensors))
    unexpected = sorted(set(tensors) - set(target))
    if missing or unexpected:
        raise UserError(f"checkpoint {path} does not fit the model: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}"
                        + (" ..." if len(missing) > 3 or len(unexpected) > 3 else ""))
    for key, t in target.items():
        if tuple(t.shape) != tuple(tensors[key].shape):
            raise UserError(f"checkpoint {path} does not fit the model: '{key}' has shape "
                            f"{tuple(tensors[key].shape)} in the file, {tuple(t.shape)} in the "
                            "model")
    _unwrap(model).load_state_dict(tensors, strict=True)


# ---- training state --------------------------------------------------------------------------
UNTRUSTED_HELP = "README.md, 'Untrusted files'"  # where the safetensors conversion is shown


def torch_load(path: Path, damaged: str) -> Any:
    """``torch.load(path, weights_only=True)`` with one-line errors: ``damaged`` (e.g. "corrupt
    or truncated checkpoint") for a damaged file, a refusal for a pickle that needs more than
    tensors and plain data, since loading it could run code."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:  # torch's weights-only unpickler: no advice quoted
        if "unsupported global" in str(err).lower():  # it names a class or function to call
            raise UserError(f"refused {path}: it is a pickle that names Python code to run, so "
                            "loading it could run code; if you trust its source, convert it "
                            f"to safetensors ({UNTRUSTED_HELP})") from None
        raise UserError(f"{damaged} {path}: not a valid torch file") from None
    except Exception as err:  # torch raises many kinds for a damaged zip
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UserError(f"{damaged} {path}: {first}") from None


def load_state(path: str | Path) -> dict:
    """Read a ``.state.pt`` file (or the one beside a ``.safetensors`` path) safely."""
    path = Path(path)
    if path.name.endswith(WEIGHTS):
        path = state_path(path)
    if not path.is_file():
        raise UserError(f"checkpoint state not found: {path}")
    state = torch_load(path, "corrupt or truncated checkpoint")
    if not isinstance(state, dict):
        raise UserError(f"corrupt checkpoint {path}: expected a dict")
    return state


def state_path(weights_path: str | Path) -> Path:
    """``step-000123.safetensors`` -> ``step-000123.state.pt``."""
    p = Path(weights_path)
    return p.with_name(p.name[: -len(WEIGHTS)] + STATE)


def checkpoint_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / CHECKPOINTS


def _complete_steps(run_dir: str | Path) -> list[tuple[int, Path]]:
    d = checkpoint_dir(run_dir)
    if not d.is_dir():
        return []
    found = []
    for p in d.iterdir():
        m = _STEP.match(p.name)
        if m and state_path(p).is_file():
            found.append((int(m.group(1)), p))
    return sorted(found)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    """The weights path of the newest complete checkpoint (weights and state), or None."""
    found = _complete_steps(run_dir)
    return found[-1][1] if found else None


def load_latest(run_dir: str | Path
                ) -> tuple[Path, dict, dict[str, torch.Tensor], list[str]] | None:
    """The newest complete checkpoint that reads back whole, for a resume.

    Returns (weights path, state, tensors, skipped) where ``skipped`` has one line for each newer
    checkpoint passed over because a file of it is corrupt or truncated; None when the run has
    no complete checkpoint. Raises the newest one's :class:`UserError` when every one is damaged.
    """
    skipped: list[str] = []
    newest_error: UserError | None = None
    for _, path in reversed(_complete_steps(run_dir)):
        try:
            state = load_state(path)
            tensors = _read_safetensors(path)
        except UserError as err:
            newest_error = newest_error or err
            skipped.append(f"skipping {err}")
            continue
        return path, state, tensors, skipped
    if newest_error is not None:
        raise newest_error
    return None


def load_run_weights(run_dir: str | Path, model: nn.Module,
                     which: Literal["best", "latest"] = "best") -> Path:
    """Load a run's ``best`` checkpoint (the latest when it has none) or its ``latest`` one
    into ``model``; returns the weights path. One-line UserError when there is no checkpoint."""
    best = checkpoint_dir(run_dir) / "best.safetensors"
    path = best if which == "best" and best.exists() else latest_checkpoint(run_dir)
    if path is None:
        raise UserError(f"{run_dir} has no checkpoint")
    load_weights(path, model)
    return path


def save_checkpoint(run_dir: str | Path, step: int, model: nn.Module, state: dict,
                    keep_last: int, *, tag: str | None = None) -> Path:
    """Write ``step-{step:06d}`` (or ``{tag}`` e.g. "best") state then weights; prune old ones.

    Returns the weights path. Tagged checkpoints are never pruned. Pruning removes the weights
    (the commit mark) before the state, so no half-deleted checkpoint looks complete.
    """
    d = checkpoint_dir(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    stem = tag if tag is not None else f"step-{step:06d}"
    weights = d / (stem + WEIGHTS)
    save_torch_atomic(d / (stem + STATE), state)
    save_weights(weights, model, metadata={"step": str(step)})
    fsync_dir(d)
    if tag is None:
        prune(run_dir, keep_last)
    return weights


def prune(run_dir: str | Path, keep_last: int) -> None:
    """Keep the newest ``keep_last`` complete checkpoints; drop older ones and stale orphans."""
    found = _complete_steps(run_dir)
    for _, weights in found[: max(0, len(found) - max(keep_last, 1))]:
        weights.unlink(missing_ok=True)
        state_path(weights).unlink(missing_ok=True)
    newest = found[-1][0] if found else -1
    for p in checkpoint_dir(run_dir).glob("step-*" + STATE):  # states whose weights never came
        m = re.match(r"^step-(\d+)\.state\.pt$", p.name)
        weights = p.with_name(p.name[: -len(STATE)] + WEIGHTS)
        if m and int(m.group(1)) < newest and not weights.exists():
            p.unlink(missing_ok=True)
