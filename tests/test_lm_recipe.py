"""The "lm" and "finetune-lm" recipes end to end on tiny models, and their one-line errors.

Runs go through the CLI in process (``attnkit.cli.main``) with one-layer models and a few dozen
steps, so each test takes seconds.
"""

from __future__ import annotations

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from attnkit import load
from attnkit.cli import main
from attnkit.data.lm import encode_documents, eval_windows, n_characters, score
from attnkit.recipes.lm import (
    SampleConfig,
    load_corpus,
    sample_texts,
)

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "medical-mcq" / "items.jsonl"
TINY = ["arch.n_layers=1", "arch.d_model=32", "arch.n_heads=2", "block_size=32",
        "batch_size=8", "train.threads=1", "train.log_every=5", "eval.batch_size=64",
        "sample.max_new_tokens=20"]


def _sets(items: list[str]) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def _text(n_chars: int, seed: int = 0) -> str:
    """Lines of random words from a small vocabulary: easy to learn, not trivial."""
    words = "the cat dog sat ran on a mat red hat and by sun to big old".split()
    rng = random.Random(seed)
    lines = []
    while sum(map(len, lines)) < n_chars:
        lines.append(" ".join(rng.choice(words) for _ in range(rng.randint(3, 9))) + ".\n")
    return "".join(lines)


def _evals(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [r["eval"] for r in map(json.loads, lines) if "eval" in r]


def _user_error(capsys, args: list[str], fragment: str) -> None:
    capsys.readouterr()
    assert main([str(a) for a in args]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("attnkit: error:") and fragment in err, err


def test_lm_recipe_trains_evaluates_and_samples(tmp_path, capsys):
    torch.manual_seed(0)
    data = tmp_path / "words.txt"
    data.write_text(_text(12_000), encoding="utf-8")
    run = tmp_path / "run"
    args = ["train", "lm", *_sets([*TINY, f"data.train={data}", f"run_dir={run}",
                                   "train.steps=40", "train.eval_every=10",
                                   "train.save_every=20", "train.optim.lr=3e-3",
                                   "train.optim.warmup_steps=5"])]
    assert main(args) == 0
    evals = _evals(run)
    assert len(evals) == 4
    first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
    loaded = load(run)
    model, tok = loaded.model, loaded.tokenizer
    assert last < first and last < math.log(tok.vocab_size) - 0.5, evals
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    val = results["val"]
    text = data.read_text(encoding="utf-8")
    val_docs = [text[int(len(text) * 0.9):]]  # the last 10% of the characters
    assert val["chars"] == len(val_docs[0]) == val["tokens"]
    assert val["bpc"] == pytest.approx(val["loss"] * val["tokens"] / math.log(2) / val["chars"])
    assert (run / "checkpoints" / "best.safetensors").exists()
    assert "samples at step 10" in (run / "samples.txt").read_text(encoding="utf-8")
    assert len(results["samples"]) == 1 and results["samples"][0].startswith("\n")
    # the best checkpoint's score equals what the report wrote; `attnkit eval` repeats it
    again = score(model, eval_windows(encode_documents(tok, val_docs), 32, 16),
                  n_characters(val_docs))
    assert again.bpc == pytest.approx(val["bpc"], rel=1e-6)
    (run / "results.json").unlink()
    assert main(["eval", str(run)]) == 0
    assert json.loads((run / "results.json").read_text())["val"]["bpc"] == pytest.approx(
        val["bpc"], rel=1e-9)
    # greedy: cached generation and recomputation give the same text
    greedy = SampleConfig(prompt="the ", n=1, max_new_tokens=12, temperature=0.0)
    with torch.no_grad():
        cached = sample_texts(model, tok, greedy)[0]
        ids, plain = tok.encode("the "), []  # recomputed over the (last 32) tokens every step
        for _ in range(12):
            nxt = int(model(torch.tensor([ids[-32:]])).logits[0, -1].argmax())
            if nxt == tok.eos_id:
                break
            ids.append(nxt)
            plain.append(nxt)
    assert cached == "the " + tok.decode(plain)


def test_lm_bpe_with_valid_file_and_sliding_eval(tmp_path):
    train, valid = tmp_path / "train.txt", tmp_path / "valid.txt"
    train.write_text(_text(6000, seed=1), encoding="utf-8")
    valid.write_text(_text(800, seed=2), encoding="utf-8")
    run = tmp_path / "run"
    assert main(["train", "lm", *_sets([
        *TINY, f"data.train={train}", f"data.valid={valid}", "tokenizer.kind=bpe",
        "tokenizer.vocab_size=120", "eval.stride=8", "sample.n=0", "train.steps=6",
        "train.eval_every=3", "train.save_every=3", f"run_dir={run}"])]) == 0
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    chars = len(valid.read_text(encoding="utf-8"))
    for name in ("val", "val_sliding"):
        assert results[name]["chars"] == chars
        assert results[name]["tokens"] < chars  # BPE: bpc still counts characters
    assert results["val"]["tokens"] == results["val_sliding"]["tokens"]
    assert "samples" not in results


def test_lm_errors_are_one_line_and_create_nothing(tmp_path, capsys):
    (tmp_path / "empty.txt").write_bytes(b"")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    (tmp_path / "ok.txt").write_text(_text(2000), encoding="utf-8")
    (tmp_path / "folder").mkdir()
    (tmp_path / "items.jsonl").write_text('{"q": "x"}\n', encoding="utf-8")
    run = tmp_path / "run"
    ok = f"data.train={tmp_path / 'ok.txt'}"
    cases = [
        ([f"data.train={tmp_path / 'missing.txt'}"], "not found"),
        ([f"data.train={tmp_path / 'empty.txt'}"], "empty"),
        ([f"data.train={tmp_path / 'latin1.txt'}"], "not valid UTF-8"),
        ([f"data.train={tmp_path / 'folder'}"], "no files matching"),
        ([f"data.train={tmp_path / 'items.jsonl'}"], "data.template"),
        ([ok, "block_size=128", "arch.n_positions=64"], "exceeds the model's context"),
        ([ok, "model=gpt3"], "did you mean 'gpt2'"),
        ([ok, "preset=huge"], "unknown gpt2 preset"),
        ([ok, "data.val_fraction=1.5"], "data.val_fraction"),
        ([ok, "train.best_metric=bleu"], "train.best_metric"),
        ([ok, "tokenizer.kind=words"], "tokenizer.kind"),
        ([ok, "block_size=4000"], "lower block_size"),
    ]
    for sets, fragment in cases:
        _user_error(capsys, ["train", "lm", *_sets([*TINY, *sets, f"run_dir={run}"])],
                    fragment)
        assert not run.exists() or not any(run.iterdir()), sets
    _user_error(capsys, ["train", "finetune-lm", *_sets([ok, f"run_dir={run}"])], "set init=")
    _user_error(capsys, ["train", "finetune-lm", *_sets([ok, f"init={tmp_path / 'folder'}",
                                                         f"run_dir={run}"])], "folder")
    assert not run.exists() or not any(run.iterdir())
    _user_error(capsys, ["eval", str(tmp_path / "folder")], "not an attnkit run")


# ---------------------------------------------------------------- fine-tuning

def _tiny_hf_gpt2(path: Path) -> None:
    """A random-init Hugging Face GPT-2 with a byte-level BPE tokenizer trained on the items."""
    import tokenizers
    import transformers  # a dev dependency: its absence is a failure, not a skip
    from tokenizers import decoders, models, pre_tokenizers, trainers

    backend = tokenizers.Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator([EXAMPLES.read_text(encoding="utf-8")], trainer)
    path.mkdir()
    backend.save(str(path / "tokenizer.json"))
    eos = backend.token_to_id("<|endoftext|>")
    config = transformers.GPT2Config(vocab_size=backend.get_vocab_size(), n_positions=64,
                                     n_embd=32, n_layer=2, n_head=2, bos_token_id=eos,
                                     eos_token_id=eos)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(path)


def test_finetune_lm_from_hugging_face_gpt2_and_export(tmp_path):
    import transformers  # a dev dependency: its absence is a failure, not a skip

    from attnkit.convert.hf import from_pretrained
    from attnkit.recipes.finetune_lm import defaults
    init, run = tmp_path / "hf", tmp_path / "run"
    _tiny_hf_gpt2(init)
    assert main(["train", "finetune-lm", *_sets([
        f"init={init}", f"data.train={EXAMPLES}", "block_size=48", "batch_size=8",
        "train.steps=30", "train.eval_every=10", "train.save_every=10", "train.threads=1",
        "train.optim.lr=3e-3", "sample.max_new_tokens=24", "sample.n=2",
        f"run_dir={run}"])]) == 0
    results = json.loads((run / "results.json").read_text(encoding="utf-8"))
    assert len(results["samples"]) == 2 and all(isinstance(s, str) for s in results["samples"])
    # held-out items: better than the pretrained model (random init) on the same windows
    pre = from_pretrained(init)
    loaded = load(run)
    model, tok = loaded.model, loaded.tokenizer
    _, val_docs = load_corpus(replace(defaults().data, train=str(EXAMPLES)))
    batches = eval_windows(encode_documents(tok, val_docs), 48, 8)
    before = score(pre.model, batches, n_characters(val_docs))
    assert results["val"]["loss"] == pytest.approx(score(model, batches, 1).loss, rel=1e-6)
    assert results["val"]["loss"] < before.loss - 0.5
    evals = _evals(run)
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    # the run exports back to a directory transformers loads, with the same logits
    out = tmp_path / "export"
    assert main(["export", str(run), str(out)]) == 0
    assert main(["export", str(run), str(out)]) == 2  # an existing directory is kept
    _assert_export_overwrite_deletes_nothing_else(run, out, tmp_path)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    ids = torch.tensor([tok.encode("Question: Which vitamin")])
    with torch.no_grad():
        torch.testing.assert_close(hf(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file()}


def _assert_export_overwrite_deletes_nothing_else(run: Path, out: Path, tmp_path: Path) -> None:
    """`export --overwrite` replaces only an earlier export: never the run, its parent, or a
    folder holding anything else (each refused in one line, every file unchanged)."""
    import contextlib
    import io

    before = _tree(tmp_path)
    for target in (run, tmp_path, run / "checkpoints", init_dir := tmp_path / "hf"):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            assert main(["export", str(run), str(target), "--overwrite"]) == 2, target
        assert len(err.getvalue().strip().splitlines()) == 1, err.getvalue()
    assert _tree(tmp_path) == before
    assert init_dir.is_dir()
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert main(["export", str(run), str(out)]) == 2
    assert "--overwrite" in err.getvalue()
    assert main(["export", str(run), str(out), "--overwrite"]) == 0  # an earlier export
    assert _tree(tmp_path) == before


def test_samples_do_not_change_training(tmp_path):
    data = tmp_path / "words.txt"
    data.write_text(_text(4000), encoding="utf-8")
    weights = []
    for n in (0, 2):
        run = tmp_path / f"run{n}"
        assert main(["train", "lm", *_sets([
            *TINY, f"data.train={data}", "arch.dropout=0.2", f"sample.n={n}",
            "train.steps=8", "train.eval_every=3", "train.save_every=8",
            f"run_dir={run}"])]) == 0
        weights.append(load(run, "latest").model.state_dict())
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    assert (tmp_path / "run2" / "samples.txt").exists()
    assert not (tmp_path / "run0" / "samples.txt").exists()
