"""One way in: :func:`load` reads an attnkit run or a Hugging Face directory.

It decides once which of the two ``path`` is (a run's ``config.json`` has a ``recipe``, a Hugging
Face one a ``model_type``), rebuilds the model through the family table
(:data:`attnkit.models.FAMILIES`) and returns it in eval mode with its config, tokenizer and
family name::

    import attnkit
    run = attnkit.load("runs/lm-20261124-101500")        # or a Hugging Face directory
    run.model, run.tokenizer, run.family, run.config
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn

from attnkit.accel import resolve_device
from attnkit.errors import UserError
from attnkit.rundir import TOKENIZER, read_config_json, read_run


@dataclass
class Loaded:
    """What :func:`load` returns."""

    model: nn.Module          # in eval mode
    config: Any               # the family's config object
    tokenizer: Any | None     # attnkit.tokenizers.Tokenizer, or None (runs on tensor data)
    family: str               # the key of attnkit.models.FAMILIES
    record: dict | None       # the run's config.json (None for a Hugging Face directory)

    def require_tokenizer(self, path: str | Path) -> Any:
        """The tokenizer, or a one-line error saying text cannot be read without one."""
        if self.tokenizer is None:
            raise UserError(f"{path} has no tokenizer (tokenizer.json, vocab.txt, or vocab.json "
                            "with merges.txt): cannot turn text into tokens")
        return self.tokenizer


def load(path: str | Path, which: Literal["best", "latest"] = "best", *,
         families: Iterable[str] | None = None, reader: str = "attnkit",
         device: str | torch.device = "cpu") -> Loaded:
    """The model, config, tokenizer and family of an attnkit run directory (its ``which``
    checkpoint: "best", the latest when it has no best, or "latest") or of a Hugging Face model
    directory. ``families`` refuses any other family in one line; ``reader`` names the command
    in the message about an unreadable Hugging Face ``model_type``. The model is put on
    ``device`` ("cpu", "auto", "cuda:1", ...: :func:`attnkit.accel.resolve_device`); a run's
    weights are read straight onto it, whatever device trained them."""
    device = resolve_device(device)
    path, allowed = Path(path), None if families is None else list(families)
    if not path.is_dir():
        missing = "" if path.exists() else "model directory not found: "
        why = "a file" if path.exists() else "no such directory"
        raise UserError(f"{missing}{path} is not a directory ({why}; expected an attnkit run "
                        "directory or a Hugging Face model directory)")
    record = read_config_json(path)
    if "model_type" in record and "recipe" not in record:
        loaded = _load_pretrained(path, record["model_type"], reader, device)
    else:
        loaded = _load_run(path, which, allowed, device)
    if allowed is not None and loaded.family not in allowed:
        raise UserError(f"{path} holds a '{loaded.family}' model, not {' or '.join(allowed)}")
    return loaded


def _load_pretrained(path: Path, model_type: Any, reader: str, device: torch.device
                     ) -> Loaded:
    from attnkit.convert.hf import from_pretrained, hf_types

    types = hf_types()
    if model_type not in types:
        raise UserError(f"{path} holds a Hugging Face '{model_type}' model; {reader} reads "
                        f"model types {', '.join(types)}")
    try:
        pre = from_pretrained(path)
    except UserError as err:
        raise UserError(f"cannot load the Hugging Face model in {path}: {err}") from None
    return Loaded(pre.model.to(device).eval(), pre.config, pre.tokenizer, types[model_type],
                  None)


def _load_run(path: Path, which: Literal["best", "latest"], families: list[str] | None,
              device: torch.device) -> Loaded:
    from attnkit.models import FAMILIES, config_of, read_record
    from attnkit.train.checkpoint import load_run_weights

    record = read_run(path)
    spec = record.get("model")
    if not (isinstance(spec, dict) and isinstance(spec.get("config"), dict)
            and isinstance(spec.get("family"), str)):
        raise UserError(f"{path} has no trained model yet")
    family, cfg = read_record(spec)  # a one-line error for a family attnkit does not know
    if families is not None and family not in families:  # before building anything
        raise UserError(f"{path} holds a '{family}' model, not {' or '.join(families)}")
    model = FAMILIES[family].build(cfg)
    if "head" in spec:
        from attnkit.models.heads import task_head

        head = spec["head"]
        model = task_head(head["task"], model, max(1, len(head["labels"])), head["pooling"])
    load_run_weights(path, model.to(device), which)  # read onto the model's device
    tokenizer = None
    if (path / TOKENIZER).is_file():
        from attnkit.tokenizers import Tokenizer

        tokenizer = Tokenizer.load(path / TOKENIZER)
    return Loaded(model.eval(), config_of(model), tokenizer, family, record)


def export_run(run_dir: str | Path, out_dir: str | Path,
               which: Literal["best", "latest"] = "best", overwrite: bool = False) -> Path:
    """Write a trained run's model and tokenizer as a Hugging Face directory (transformers
    loads it); for runs of a family with a Hugging Face format (its ``converter`` in the
    family table)."""
    from attnkit.convert.hf import save_pretrained
    from attnkit.models import FAMILIES

    record = read_run(run_dir)
    run, out = Path(run_dir).resolve(), Path(out_dir).resolve()
    if out == run or out in run.parents:
        raise UserError(f"{out_dir} is or contains the run {run_dir}; export to another "
                        "directory")
    spec = record["model"] if isinstance(record.get("model"), dict) else {}
    family = spec.get("family")
    if "head" in spec or (family in FAMILIES and not FAMILIES[family].converter):
        formats = sorted(n for n, f in FAMILIES.items() if f.converter)
        raise UserError(f"'{record['recipe']}' runs have no Hugging Face format (their "
                        f"'{family}' model{' with a task head' if 'head' in spec else ''} has "
                        f"none); export takes {', '.join(formats)} models")
    loaded = load(run_dir, which)
    return save_pretrained(loaded.model, out_dir, loaded.tokenizer, overwrite=overwrite)
