"""The recipes `attnkit train` runs: name -> defaults, main and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from attnkit.config import apply_overrides, from_dict, load_json, to_dict, unknown
from attnkit.errors import UserError
from attnkit.recipes import (
    act,
    bert_pretrain,
    copy,
    distil,
    finetune,
    finetune_bert,
    finetune_lm,
    lm,
    lm_scratch,
    math,
    ntm,
    pointer,
    translate,
    xl_lm,
)
from attnkit.rundir import refuse_retired
from attnkit.train.loop import RESUMABLE


@dataclass(frozen=True)
class Recipe:
    name: str
    summary: str
    defaults: Callable[[], Any]           # the recipe's default config (a frozen dataclass)
    main: Callable[..., dict]             # main(cfg, recipe=name): train, then report
    evaluate: Callable[[Path, Any], dict]  # evaluate(run_dir, cfg): report a trained run


RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("math-demo", "the demo: mathematics-dataset add_or_sub, ~5 minutes on 2 CPU cores",
           math.demo_defaults, math.main, math.evaluate),
    Recipe("math", "DeepMind mathematics problems (any module list), exact-match accuracy",
           math.defaults, math.main, math.evaluate),
    Recipe("translate", "parallel-text translation (e.g. Multi30k de->en), BLEU",
           translate.defaults, translate.main, translate.evaluate),
    Recipe("copy", "synthetic copy / reverse / sort strings, exact match on longer inputs",
           copy.defaults, copy.main, copy.evaluate),
    Recipe("lm", "language model on any text (default tiny Shakespeare), perplexity and bpc",
           lm_scratch.defaults, lm_scratch.main, lm.final_report),
    Recipe("finetune-lm", "fine-tune a Hugging Face GPT-2 on documents (init=DIR), generate",
           finetune_lm.defaults, finetune_lm.main, lm.final_report),
    Recipe("pointer-sort", "pointer network sorting number lists, exact-sort accuracy by length",
           pointer.defaults, pointer.main, pointer.evaluate),
    Recipe("ntm-copy", "neural Turing machine on the copy task, bit errors at 2x the length",
           ntm.defaults, ntm.main, ntm.evaluate),
    Recipe("act-parity", "adaptive computation time on parity vectors, accuracy and ponder",
           act.defaults, act.main, act.evaluate),
    Recipe("xl-lm", "Transformer-XL / adaptive span / all-attention LM with segment memory, bpc",
           xl_lm.defaults, xl_lm.main, xl_lm.evaluate),
    Recipe("bert-pretrain", "BERT pre-training (MLM + NSP) on any text, held-out MLM accuracy",
           bert_pretrain.bert_defaults, bert_pretrain.main, bert_pretrain.evaluate),
    Recipe("roberta-pretrain", "RoBERTa pre-training (dynamic masks, full sentences, no NSP)",
           bert_pretrain.roberta_defaults, bert_pretrain.main, bert_pretrain.evaluate),
    Recipe("distil", "DistilBERT distillation of a BERT teacher, side-by-side comparison",
           distil.defaults, distil.main, distil.evaluate),
    Recipe("finetune", "fine-tune a BERT-family encoder: classify / tokens / qa on CSV/JSONL",
           finetune_bert.defaults, finetune_bert.main, finetune.evaluate),
)}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise unknown("recipe", name, RECIPES)
    return RECIPES[name]


def _merge(base: dict, extra: dict) -> dict:
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def resolve_config(recipe: Recipe, config_file: str | None = None,
                   overrides: list[str] | tuple[str, ...] = ()) -> Any:
    """Defaults, then a JSON config file, then ``key=value`` overrides; validated."""
    default = recipe.defaults()
    data = to_dict(default)
    given = load_json(config_file) if config_file else {}
    refuse_retired(given, overrides)
    data = _merge(data, given)
    data = apply_overrides(data, overrides, open_sections=("arch",))
    return from_dict(type(default), data)


def config_of_run(record: dict, overrides: Sequence[str] = ()) -> tuple[Recipe, Any]:
    """The recipe and config a run directory's config.json records, with ``overrides``
    (``key=value``, `attnkit resume --set`) of the train settings a resumed run may change
    (:data:`attnkit.train.loop.RESUMABLE`, ``train.`` optional); others are refused."""
    recipe = get_recipe(record.get("recipe", "?"))
    data = record["config"]
    if overrides:
        data = apply_overrides(data, [_resumable(item) for item in overrides])
    return recipe, from_dict(type(recipe.defaults()), data)


def _resumable(item: str) -> str:
    key, sep, value = item.partition("=")
    name = key.strip().removeprefix("train.")
    if not sep or name not in RESUMABLE:
        raise UserError(f"resume --set {key.strip() or item}: a resumed run may change only "
                        f"{', '.join(RESUMABLE)} (where and how long it trains); train other "
                        "settings in a new run_dir")
    return f"train.{name}={value}"
