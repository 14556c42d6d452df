"""The `attnkit` command: train, resume, eval, translate, generate, export, download, recipes,
energy, viz.

Bad input ends with a one-line message on stderr and exit code 2, never a traceback: :func:`main`
is the one place that turns expected failures into that line (:func:`expected_failure`).
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Any, NoReturn

from attnkit import __version__
from attnkit.errors import Interrupted, UserError, os_error_message

EPILOG = """examples:
  attnkit train math-demo
  attnkit resume runs/math-demo-20261124-101500
  attnkit train translate --set data.dir=data/multi30k --set data.src=de --set data.tgt=en
  attnkit train math --set data.modules='["arithmetic__mul"]' --set train.steps=5000
  attnkit train copy --set data.task=reverse --set arch.d_model=64
  attnkit eval runs/translate-20261124-101500
  echo "Ein Hund läuft." | attnkit translate runs/translate-20261124-101500
  attnkit energy estimate --preset big --tokens 1.5e10 --hardware p100 --devices 8
  attnkit energy estimate --paper
  attnkit energy report runs/copy-20261124-101500 runs/copy-20261124-113000 --plot cost.png
  attnkit viz runs/translate-20261124-101500 "Ein Hund läuft." --view head -o head.html
  attnkit generate models/gpt2 "The meaning of life is" --top-p 0.9 --seed 1 --device cuda:1
  attnkit count gpt2 xl
  attnkit viz models/bert-base-uncased "The cat sat." --pair "It was tired." --view model -o m.html
  attnkit train lm --set data.train=my.txt && attnkit export runs/lm-20261124-101500 models/mine
  attnkit download enwik8 && attnkit train xl-lm --set data.train=data/enwik8/train.txt ...

--set takes dotted keys of the recipe's config (see `attnkit recipes --show NAME`); values
are JSON when they parse (numbers, true/false, lists) and strings otherwise. `arch.*` keys
override the model preset (d_model, n_heads, n_encoder_layers, ...). An existing run_dir
resumes its run exactly where it stopped; `attnkit resume RUN` does so with the recipe and
config RUN records. Ctrl-C (or SIGTERM) finishes the step and saves a checkpoint first.
"""


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line like every other error (exit code 2)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"attnkit: error: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="attnkit", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=EPILOG,
        description="The Transformer and the attention family from scratch in PyTorch.")
    p.add_argument("--version", action="version", version=f"attnkit {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    t = sub.add_parser("train", help="train a recipe, then evaluate it")
    t.add_argument("recipe", help="recipe name (see `attnkit recipes`)")
    t.add_argument("--config", metavar="FILE", help="JSON file of config values")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value (repeatable)")

    rs = sub.add_parser("resume", help="continue an interrupted run (its recipe and config)")
    rs.add_argument("run", help="run directory")
    rs.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="change where or how long it trains: device, precision, compile, "
                         "gradient_checkpointing, threads, steps, eval_every, log_every, "
                         "save_every, keep_last (e.g. device=cpu; repeatable)")

    e = sub.add_parser("eval", help="evaluate a trained run on its recipe's test sets")
    e.add_argument("run", help="run directory")
    _add_device(e)

    tr = sub.add_parser("translate", help="decode text with a trained run (args or stdin)")
    tr.add_argument("run", help="run directory")
    tr.add_argument("text", nargs="*", help="sentences; read from stdin (one a line) if none")
    tr.add_argument("--beam", type=int, help="beam size (default: the run's decode.beam_size)")
    tr.add_argument("--greedy", action="store_true", help="greedy decoding")
    _add_device(tr)

    _add_generate(sub)

    x = sub.add_parser("export", help="write a trained LM or BERT-family run as a Hugging "
                                      "Face model directory")
    x.add_argument("run", help="run directory (lm, finetune-lm, bert-pretrain, "
                               "roberta-pretrain, distil)")
    x.add_argument("out", help="directory to create (transformers loads it)")
    x.add_argument("--latest", action="store_true", help="the latest checkpoint, not the best")
    x.add_argument("--overwrite", action="store_true", help="replace an existing directory")

    d = sub.add_parser("download", help="download, check and split a standard corpus "
                                        "(enwik8, text8)")
    d.add_argument("corpus", help="enwik8 or text8")
    d.add_argument("--dir", default="data", help="parent directory (default: data)")

    r = sub.add_parser("recipes", help="list recipes, or show one's default config")
    r.add_argument("--show", metavar="NAME", help="print this recipe's default config as JSON")

    c = sub.add_parser("count", help="parameters and memory of a model preset, built on the "
                                     "meta device (nothing allocated)")
    c.add_argument("family", help="model family (gpt2, transformer, bert, ...)")
    c.add_argument("preset", nargs="?", help="one preset (default: every preset of the family)")
    c.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. vocab_size=32000 (repeatable)")

    v = sub.add_parser("viz", help="attention views as one offline HTML file (and a PNG)")
    v.add_argument("run", metavar="PATH",
                   help="attnkit run directory, or Hugging Face model directory (gpt2, bert, "
                        "roberta, distilbert)")
    v.add_argument("text", help="the text (the source of an encoder-decoder model; numbers "
                                "for a pointer network, bit vectors for an NTM)")
    v.add_argument("--target", help="target text of an encoder-decoder model (default: its "
                                    "greedy output)")
    v.add_argument("--pair", help="second text: sentence B of a BERT-style pair, or the "
                                  "target of an encoder-decoder model")
    v.add_argument("--view", default="head", help="head, model, neuron or rollout (default head)")
    v.add_argument("--group", action="append", metavar="NAME",
                   help="attention group to show (repeatable): encoder, decoder, cross "
                        "(Transformer), self (GPT-2), encoder (BERT)")
    v.add_argument("-o", "--output", help="HTML file to write")
    v.add_argument("--png", help="also write a PNG heatmap here")
    v.add_argument("--layer", type=int, default=0, help="layer of the PNG for head/neuron views")
    _add_device(v)

    from attnkit.energy.commands import add_arguments as add_energy

    add_energy(sub)
    return p


def _train(args: argparse.Namespace) -> None:
    from attnkit.recipes import get_recipe, resolve_config

    recipe = get_recipe(args.recipe)
    _run_recipe(recipe, resolve_config(recipe, args.config, args.overrides))


def _resume(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from attnkit import accel, runlock
    from attnkit.config import to_dict
    from attnkit.recipes import config_of_run
    from attnkit.rundir import read_run, record_config

    recipe, cfg = config_of_run(read_run(args.run), args.overrides)
    cfg = replace(cfg, run_dir=args.run)
    try:
        accel.resolve_device(cfg.train.device)
    except UserError as err:
        raise UserError(f"{err} (here: attnkit resume {shlex.quote(args.run)} --set "
                        "device=auto)") from None
    if args.overrides:  # the record says where and how long the run now trains
        runlock.lock_run(args.run)
        record_config(args.run, to_dict(cfg))
    _run_recipe(recipe, cfg)


def _run_recipe(recipe: Any, cfg: Any) -> None:
    """Train (or resume) ``cfg.run_dir``; the run lock is given up when the recipe ends."""
    from attnkit import runlock

    try:
        recipe.main(cfg, recipe=recipe.name)
    finally:
        runlock.release_all()


def _eval(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from attnkit.recipes import config_of_run
    from attnkit.rundir import read_run

    recipe, cfg = config_of_run(read_run(args.run))
    recipe.evaluate(Path(args.run), replace(cfg, train=replace(cfg.train, device=args.device)))


def _translate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from attnkit.loading import load
    from attnkit.models import names
    from attnkit.recipes import config_of_run
    from attnkit.recipes.seq2seq import decode_texts

    run = load(args.run, families=names("seq2seq"), device=args.device)
    _, cfg = config_of_run(run.record)
    decode = cfg.decode
    if args.beam is not None:
        if args.beam < 1:
            raise UserError(f"--beam must be >= 1, got {args.beam}")
        decode = replace(decode, method="beam", beam_size=args.beam)
    if args.greedy:
        decode = replace(decode, method="greedy")
    lines = args.text or _stdin_lines()
    lines = [line.strip() for line in lines]
    if not any(lines):
        raise UserError("nothing to translate: give text as arguments or on stdin")
    for out in decode_texts(run.model, run.require_tokenizer(args.run), lines, decode):
        print(out, flush=True)


def _add_generate(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser("generate", help="generate text with a language model (run or HF dir)")
    g.add_argument("model", metavar="RUN_OR_HF_DIR",
                   help="a language-model run directory or a Hugging Face GPT-2 directory")
    g.add_argument("prompt", nargs="?", help="the prompt text (or --prompts-file)")
    g.add_argument("--prompts-file", metavar="F", help="prompts, one a line (batched)")
    g.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    g.add_argument("--greedy", action="store_true", help="argmax instead of sampling")
    g.add_argument("--temperature", type=float, default=1.0, metavar="T")
    g.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = off")
    g.add_argument("--top-p", type=float, default=1.0, metavar="P", help="1 = off")
    g.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R",
                   help="CTRL penalty on tokens already seen (1 = off)")
    g.add_argument("--beams", type=int, default=1, metavar="N", help="beam search with N beams")
    g.add_argument("--length-penalty", type=float, default=0.6, metavar="A",
                   help="GNMT length-penalty alpha of beam scores")
    g.add_argument("--stop", action="append", default=[], metavar="S",
                   help="stop before this string (repeatable)")
    g.add_argument("--seed", type=int, help="sampling seed (prompt i of a file uses seed + i)")
    g.add_argument("--truncate", action="store_true",
                   help="cut prompts so that prompt and new tokens fit the context "
                   "(default: the window slides past it)")
    g.add_argument("--batch-size", type=int, default=8, metavar="B",
                   help="prompts generated together (with --prompts-file)")
    g.add_argument("--no-stream", action="store_true",
                   help="print each text when finished instead of token by token")
    _add_device(g)


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto",
                   help="where the model runs: auto (default: CUDA, then MPS, then CPU), cpu, "
                        "cuda, cuda:N or mps")


def _generate(args: argparse.Namespace) -> None:
    from dataclasses import replace

    from attnkit.generation import GenerationConfig, generate_text, window_note
    from attnkit.loading import load
    from attnkit.models import FAMILIES

    cfg = GenerationConfig(
        max_new_tokens=args.max_new_tokens, do_sample=not args.greedy and args.beams == 1,
        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
        repetition_penalty=args.repetition_penalty, num_beams=args.beams,
        length_penalty=args.length_penalty, stop=tuple(args.stop), seed=args.seed,
        truncate=args.truncate)
    if (args.prompt is None) == (args.prompts_file is None):
        raise UserError("give either a prompt or --prompts-file")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.prompts_file is not None:
        try:
            text = Path(args.prompts_file).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise UserError(f"cannot read prompts file {args.prompts_file}: {err}") from None
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise UserError(f"no prompts in {args.prompts_file}")
    else:
        prompts = [args.prompt]
    run = load(args.model, device=args.device)
    if FAMILIES[run.family].decoding != "lm":
        raise UserError(f"{args.model} holds a '{run.family}' model, not a decoder-only "
                        "language model (attnkit translate decodes encoder-decoder runs)")
    model, tokenizer = run.model, run.require_tokenizer(args.model)
    note = window_note(model, [len(tokenizer.encode(p)) for p in prompts], cfg)
    if note:
        print(f"attnkit: note: {note}", file=sys.stderr)
    if len(prompts) == 1 and not args.no_stream:
        shown = []  # the prompt is printed with the first piece: errors come before any output

        def show(row: int, piece: str) -> None:
            if not shown:
                shown.append(sys.stdout.write(prompts[0]))
            sys.stdout.write(piece)
            sys.stdout.flush()

        generate_text(model, tokenizer, prompts, cfg, stream=show)
        print("" if shown else prompts[0], flush=True)
        return
    for start in range(0, len(prompts), args.batch_size):
        chunk = prompts[start:start + args.batch_size]
        seeded = cfg if cfg.seed is None else replace(cfg, seed=cfg.seed + start)
        for i, out in enumerate(generate_text(model, tokenizer, chunk, seeded)):
            print(("\n" if start + i else "") + chunk[i] + out, flush=True)


def _export(args: argparse.Namespace) -> None:
    from attnkit.loading import export_run

    path = export_run(args.run, args.out, "latest" if args.latest else "best", args.overwrite)
    print(f"wrote {path}")


def _download(args: argparse.Namespace) -> None:
    from attnkit.data.corpora import fetch_corpus

    paths = fetch_corpus(args.corpus, args.dir)
    for split, path in paths.items():
        print(f"{split}: {path}")
    print(f"train with: attnkit train xl-lm --set data.train={paths['train']} "
          f"--set data.valid={paths['valid']}")


def _recipes(args: argparse.Namespace) -> None:
    import json

    from attnkit.config import to_dict
    from attnkit.recipes import RECIPES, get_recipe

    if args.show:
        print(json.dumps(to_dict(get_recipe(args.show).defaults()), indent=2))
        return
    width = max(map(len, RECIPES))
    for name, recipe in RECIPES.items():
        print(f"{name:<{width}}  {recipe.summary}")


def _count(args: argparse.Namespace) -> None:
    from attnkit.config import parse_value
    from attnkit.errors import ConfigError
    from attnkit.models import build_on_meta, get_family

    overrides = {}
    for item in args.overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set expects key=value, got '{item}'")
        overrides[key] = parse_value(raw)
    presets = [args.preset] if args.preset else list(get_family(args.family).presets)
    rows = []
    for preset in presets or [""]:
        model = build_on_meta(args.family, preset, **overrides)
        n = sum(p.numel() for p in model.parameters())  # tied weights counted once
        rows.append((preset, f"{n:,}", f"{n * 4 / 2**30:.2f}", f"{n * 2 / 2**30:.2f}",
                     f"{n * 16 / 2**30:.2f}"))
    head = ("preset", "parameters", "fp32 GiB", "bf16 GiB", "AdamW training GiB")
    widths = [max(len(r[i]) for r in (head, *rows)) for i in range(len(head))]
    for row in (head, *rows):
        print("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(row, widths, strict=True))))
    print(f"({args.family} built on the meta device: nothing allocated. Training holds fp32 "
          "weights, gradients and two AdamW\n moments, 16 bytes a parameter (bf16 autocast keeps "
          "fp32 weights), plus the activations.)")


def _energy(args: argparse.Namespace) -> None:
    from attnkit.energy.commands import main as energy_main

    energy_main(args)


def _viz(args: argparse.Namespace) -> None:
    from attnkit import viz
    from attnkit.viz.plots import plot_view

    if args.view not in viz.VIEWS:
        from attnkit.config import unknown

        raise unknown("view", args.view, viz.VIEWS)
    if not args.output:
        raise UserError("give the HTML file to write with -o OUT.html")
    if args.target is not None and args.pair is not None:
        raise UserError("give either --target or --pair, not both")
    model, tok = viz.load(args.run, device=args.device)
    cap = viz.capture_text(model, tok, args.text, args.target, pair=args.pair)
    for name in args.group or []:
        cap.group(name)
    page = viz.render(cap, args.view, groups=args.group, title=f"{args.view} view: {args.run}")
    if args.png:
        group = args.group[0] if args.group else None
        n = cap.group(group or next(iter(cap.groups))).n_layers
        if not 0 <= args.layer < n:
            raise UserError(f"--layer must be in 0..{n - 1}, got {args.layer}")
        plot_view(cap, args.view, args.png, group, args.layer)
    page.save(args.output)
    print(f"wrote {args.output}" + (f" and {args.png}" if args.png else ""))


COMMANDS = {"train": _train, "eval": _eval, "translate": _translate, "recipes": _recipes,
            "energy": _energy, "viz": _viz, "generate": _generate, "export": _export,
            "download": _download, "resume": _resume, "count": _count}


def _check_text(args: argparse.Namespace) -> None:
    """Refuse arguments that are not valid UTF-8 (Python keeps their bytes as surrogates)."""
    for name, value in vars(args).items():
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                try:
                    item.encode("utf-8")
                except UnicodeEncodeError as err:
                    byte = ord(item[err.start]) - 0xDC00
                    raise UserError(f"argument {name} is not valid UTF-8 (byte 0x{byte:02x} at "
                                    f"position {err.start})") from None


def _stdin_lines() -> list[str]:
    """The lines of stdin, which must be UTF-8 whatever the locale."""
    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8").splitlines()
    except UnicodeDecodeError as err:
        raise UserError(f"stdin is not valid UTF-8 (byte 0x{data[err.start]:02x} at position "
                        f"{err.start})") from None


def expected_failure(err: Exception) -> str | None:
    """The one-line message of a failure the user caused, or None for a bug (a traceback)."""
    if isinstance(err, UserError):
        return str(err)
    if isinstance(err, OSError):
        return os_error_message(err)
    if isinstance(err, UnicodeDecodeError):
        return f"text is not valid UTF-8: {err}"
    return None


def _stdout_closed() -> int:
    """Python's recipe for a reader that stopped reading (`attnkit generate ... | head -1`):
    send what is left to /dev/null, so that the flush at exit raises nothing, and exit 1."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # no real file behind sys.stdout (in process)
        pass
    return 1


def main(argv: list[str] | None = None) -> int:
    """Run one command. Expected failures (:func:`expected_failure`) print one line
    ``attnkit: error: ...`` and return 2; ``ATTNKIT_DEBUG=1`` shows their traceback instead."""
    args = _parser().parse_args(argv)
    try:
        _check_text(args)
        COMMANDS[args.command](args)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
    except BrokenPipeError:
        return _stdout_closed()
    except Interrupted as err:  # training saved a checkpoint first
        print(f"attnkit: {err}; continue with: attnkit resume {shlex.quote(err.run_dir)}",
              file=sys.stderr)
        return 128 + err.signum
    except KeyboardInterrupt:
        print("attnkit: interrupted (an existing run_dir resumes from its last checkpoint)",
              file=sys.stderr)
        return 130
    except Exception as err:
        message = expected_failure(err)
        if message is None or os.environ.get("ATTNKIT_DEBUG") == "1":
            raise
        print(f"attnkit: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
