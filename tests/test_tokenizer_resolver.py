"""One tokenizer resolver for every recipe: a run's own file wins, then ``tokenizer.path`` (a
file or a checkpoint directory), then training; one set of special-token checks."""

from __future__ import annotations

import pytest
import tokenizers
from tokenizers import models

from attnkit.errors import ConfigError, UserError
from attnkit.tokenizers import (
    Tokenizer,
    TokenizerConfig,
    check_specials,
    load_tokenizer_path,
    resolve_tokenizer,
)

TEXTS = ["the cat sat on the mat", "a dog ran far"]


def _never():
    raise AssertionError("the texts must not be read when a tokenizer file is used")


def _foreign(tmp_path, specials: list[str]):
    """A word-level tokenizer.json from elsewhere, with only ``specials`` as special tokens."""
    vocab = {t: i for i, t in enumerate([*specials, "the", "cat"])}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token=specials[0]))
    path = tmp_path / "foreign.json"
    path.write_text(backend.to_str(), encoding="utf-8")
    return path


def test_trains_when_there_is_no_file(tmp_path):
    tok = resolve_tokenizer(TokenizerConfig(kind="char"), lambda: TEXTS, tmp_path,
                            ("standard", "eos", "mask"))
    assert tok.kind == "char" and tok.decode(tok.encode("the cat")) == "the cat"
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)


def test_the_runs_own_file_wins_over_path_and_training(tmp_path):
    own = Tokenizer.train("char", ["xyz"])
    own.save(tmp_path / "tokenizer.json")
    other = Tokenizer.train("char", TEXTS)
    other.save(tmp_path / "other.json")
    cfg = TokenizerConfig(kind="bpe", path=str(tmp_path / "other.json"))
    tok = resolve_tokenizer(cfg, _never, tmp_path)
    assert tok.backend.get_vocab() == own.backend.get_vocab()
    tok = resolve_tokenizer(cfg, _never, tmp_path / "new-run")  # no file there yet: the path
    assert tok.backend.get_vocab() == other.backend.get_vocab()


def test_path_may_be_a_checkpoint_directory(tmp_path):
    Tokenizer.train("char", TEXTS).save(tmp_path / "tokenizer.json")
    tok = load_tokenizer_path(tmp_path)
    assert tok.decode(tok.encode("cat")) == "cat"
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no tokenizer"):
        load_tokenizer_path(tmp_path / "empty")


@pytest.mark.parametrize(("needs", "missing"), [
    (("eos",), "end-of-text"), (("mask",), "mask token"), (("pad",), "padding token"),
    (("standard",), r"\[PAD\] \[BOS\] \[EOS\] \[UNK\] at ids 0-3"),
])
def test_missing_special_tokens_are_named(tmp_path, needs, missing):
    path = _foreign(tmp_path, ["<unk>"])
    with pytest.raises(UserError, match=missing):
        resolve_tokenizer(TokenizerConfig(path=str(path)), _never, None, needs)
    assert resolve_tokenizer(TokenizerConfig(path=str(path)), _never).vocab_size == 3


def test_check_specials_accepts_foreign_names(tmp_path):
    tok = Tokenizer.load(_foreign(tmp_path, ["<unk>", "<pad>", "</s>", "<mask>"]))
    assert check_specials(tok, ("eos", "pad", "mask"), "x") is tok
    with pytest.raises(UserError, match="tokenizer x has no attnkit's special tokens"):
        check_specials(tok, ("standard",), "x")


def test_unknown_kind_is_a_config_error():
    with pytest.raises(ConfigError, match="tokenizer.kind"):
        TokenizerConfig(kind="sentencepiece")
