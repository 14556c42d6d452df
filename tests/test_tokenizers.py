"""Tokenizers: round trips, fixed special ids, UNK, save/load identity, errors."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models

from attnkit.errors import UserError
from attnkit.tokenizers import KINDS, SPECIAL_TOKENS, Tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "multi30k").exists(), reason="shared data missing")

TEXTS = ["The quick brown fox jumps over the lazy dog.",
         "Zwei  Männer stehen\tam Herd, und   kochen.\nNeue Zeile!",
         "  leading and trailing spaces  ", "numbers 12345 67890"] * 3


def _lines(name: str, n: int) -> list[str]:
    with gzip.open(DATA / "multi30k" / name, "rt", encoding="utf-8") as f:
        return [next(f).rstrip("\n") for _ in range(n)]


@pytest.mark.parametrize("kind", KINDS)
def test_special_ids_are_fixed(kind):
    tok = Tokenizer.train(kind, TEXTS, vocab_size=200)
    for i, name in enumerate(SPECIAL_TOKENS):
        assert tok.backend.token_to_id(name) == i
        assert tok.token(i) == name
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    assert tok.standard_ids
    assert tok.vocab_size <= 200
    ids = tok.encode("The fox")
    assert tok.bos_id not in ids and tok.eos_id not in ids  # encode adds nothing


def test_char_round_trip_is_exact_and_unk():
    tok = Tokenizer.train("char", TEXTS)
    for s in TEXTS + [" ", "  a  b  ", "\n\n", "Männer\tkochen"]:
        assert tok.decode(tok.encode(s)) == s
        assert len(tok.encode(s)) == len(s)  # one token per character
    # "€" and "X" never occur in training: each becomes one UNK
    assert tok.encode("a€X") == [tok.encode("a")[0], Tokenizer.unk_id, Tokenizer.unk_id]
    assert tok.decode(tok.encode("a€")) == "a[UNK]"


def test_char_vocab_is_characters_by_frequency():
    tok = Tokenizer.train("char", ["aaab", "ab c"], vocab_size=len(SPECIAL_TOKENS) + 2)
    # only the two most frequent characters fit: 'a' (4) and 'b' (2)
    assert {tok.token(i) for i in range(5, tok.vocab_size)} == {"a", "b"}
    assert tok.encode("c") == [Tokenizer.unk_id]


def test_decode_stops_at_eos_and_drops_pad_bos():
    tok = Tokenizer.train("char", ["abc"])
    a, b, c = (tok.encode(ch)[0] for ch in "abc")
    assert tok.decode([1, a, 0, b, 2, c, c]) == "ab"
    assert tok.decode([2, a]) == ""
    assert tok.decode([]) == ""


@needs_data
def test_bpe_joint_round_trip_on_multi30k():
    en, de = _lines("train.en.gz", 2000), _lines("train.de.gz", 2000)
    tok = Tokenizer.train("bpe", en + de, vocab_size=2000)
    assert tok.kind == "bpe" and tok.vocab_size == 2000
    seen = set("".join(en + de))
    val = [s for s in _lines("val.en.gz", 200) + _lines("val.de.gz", 200) if set(s) <= seen]
    assert len(val) > 350
    for s in val:  # ordinary text with single spaces: detokenised exactly
        assert tok.decode(tok.encode(s)) == s
    # SentencePiece style: a word-initial piece carries "▁"; pieces of both languages exist
    pieces = {tok.token(i) for i in tok.encode("A man is eating. Ein Mann isst.")}
    assert "▁man" in pieces and "▁Mann" in pieces
    assert sum(len(tok.encode(s)) for s in val) < sum(len(s) for s in val) / 2.5
    assert Tokenizer.unk_id in tok.encode("snowman ☃")


def test_wordpiece_is_bert_style():
    texts = ["playing played player plays", "the dog is playing in the park."] * 20
    tok = Tokenizer.train("wordpiece", texts, vocab_size=60)
    pieces = [tok.token(i) for i in tok.encode("playing dogs.")]
    assert any(p.startswith("##") for p in pieces)
    assert "." in pieces  # punctuation is split off
    assert tok.decode(tok.encode("the dog is playing.")) == "the dog is playing."
    lower = Tokenizer.train("wordpiece", texts, vocab_size=60, lowercase=True)
    assert lower.encode("THE Dog") == lower.encode("the dog")
    assert tok.encode("THE") != tok.encode("the")  # cased by default


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_identity(kind, tmp_path):
    tok = Tokenizer.train(kind, TEXTS, vocab_size=150)
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]  # no temporary left
    again = Tokenizer.load(path)
    assert again.kind == kind
    assert again.vocab_size == tok.vocab_size
    assert again.backend.get_vocab() == tok.backend.get_vocab()
    for s in TEXTS:
        assert again.encode(s) == tok.encode(s)
        assert again.decode(again.encode(s)) == tok.decode(tok.encode(s))
    assert again.encode_batch(TEXTS) == [tok.encode(s) for s in TEXTS]


def test_load_foreign_tokenizer_finds_special_ids(tmp_path):
    vocab = {"a": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<pad>": 4, "b": 5}
    backend = tokenizers.Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.save(str(tmp_path / "t.json"))
    tok = Tokenizer.load(tmp_path / "t.json")
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (4, 2, 3, 1, None)
    assert not tok.standard_ids
    assert tok.kind == "wordlevel"
    assert tok.decode([2, 0, 5, 4, 3, 0]) == "a b"
    assert Tokenizer.pad_id == 0  # the class constants are untouched


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        Tokenizer.load(tmp_path / "missing.json")
    with pytest.raises(UserError, match="directory"):
        Tokenizer.load(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(UserError, match="not a valid tokenizer.json") as err:
        Tokenizer.load(bad)
    assert "\n" not in str(err.value)


def test_train_errors():
    with pytest.raises(UserError, match="did you mean 'bpe'"):
        Tokenizer.train("bep", TEXTS)
    with pytest.raises(UserError, match="empty"):
        Tokenizer.train("char", [])
    with pytest.raises(UserError, match="vocab_size"):
        Tokenizer.train("char", TEXTS, vocab_size=3)
    tok = Tokenizer.train("char", TEXTS)
    with pytest.raises(UserError, match="outside the vocabulary"):
        tok.token(tok.vocab_size)
