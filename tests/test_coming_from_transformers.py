"""docs/coming-from-transformers.md: every Python snippet runs (no network: the test writes tiny
Hugging Face directories with transformers itself), and the transformers and attnkit versions of
a task give the same numbers."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import transformers
from tokenizers import (
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)

DOC = Path(__file__).resolve().parents[1] / "docs" / "coming-from-transformers.md"
TEXTS = ["The meaning of life is a question.", "A dog runs.", "A cat sleeps on the mat.",
         "To be, or not to be, that is the question."] * 4


def snippets() -> dict[str, list[str]]:
    """The ```python blocks of each "## " section, in order."""
    out: dict[str, list[str]] = {}
    for section in re.split(r"^## ", DOC.read_text(encoding="utf-8"), flags=re.M)[1:]:
        title = section.splitlines()[0]
        out[title] = re.findall(r"^```python\n(.*?)^```", section, flags=re.M | re.S)
    return out


def _gpt2_dir(path: Path) -> None:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(TEXTS, trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = transformers.GPT2TokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(path)
    eos = fast.convert_tokens_to_ids("<|endoftext|>")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=len(fast), n_positions=64, n_embd=32, n_layer=2,
                                  n_head=4, bos_token_id=eos, eos_token_id=eos)
    transformers.GPT2LMHeadModel(cfg).save_pretrained(path)


def _bert_dir(path: Path) -> None:
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)  # bert-base-uncased's
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece()
    tok.train_from_iterator(TEXTS, trainers.WordPieceTrainer(vocab_size=120,
                                                             special_tokens=specials))
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)])
    fast = transformers.BertTokenizerFast(tokenizer_object=tok)
    fast.save_pretrained(path)
    torch.manual_seed(1)
    cfg = transformers.BertConfig(vocab_size=len(fast), hidden_size=32, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=37,
                                  max_position_embeddings=64, initializer_range=0.2,
                                  pad_token_id=tok.token_to_id("[PAD]"))
    transformers.BertModel(cfg).save_pretrained(path)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("docs")
    _gpt2_dir(root / "path" / "to" / "gpt2")
    _bert_dir(root / "path" / "to" / "bert")
    return root


def run_section(title: str, root: Path, monkeypatch) -> list[dict]:
    """Each snippet of the section in its own namespace, run from ``root``."""
    monkeypatch.chdir(root)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    blocks = next(v for k, v in snippets().items() if k.startswith(title))
    spaces = []
    for code in blocks:
        namespace: dict = {"__name__": "snippet"}
        exec(compile(code, f"{DOC.name}:{title}", "exec"), namespace)  # noqa: S102
        spaces.append(namespace)
    return spaces


def test_every_python_block_belongs_to_a_tested_section() -> None:
    found = {title.split(".")[0]: len(blocks) for title, blocks in snippets().items() if blocks}
    assert found == {"1": 3, "2": 2, "3": 2}


def test_generate_from_a_gpt2_directory(workdir, monkeypatch) -> None:
    theirs, ours, steps = run_section("1.", workdir, monkeypatch)
    assert len(theirs["text"]) > 0
    assert ours["text"] == theirs["text"]  # greedy: the same 20 tokens
    hf = theirs["model"]
    with torch.no_grad():
        ref = hf(input_ids=steps["input_ids"], labels=steps["input_ids"])
    assert steps["out"].logits.shape == (1, 1, hf.config.vocab_size)
    assert torch.allclose(steps["gpt"].model(steps["input_ids"]).logits, ref.logits, atol=1e-5)


def test_bert_on_a_padded_batch(workdir, monkeypatch) -> None:
    theirs, ours = run_section("2.", workdir, monkeypatch)
    assert torch.equal(ours["input_ids"], theirs["batch"]["input_ids"])
    assert torch.equal(ours["mask"], theirs["mask"]) and not theirs["mask"].all()
    a, b = ours["out"], theirs["out"]
    real = theirs["mask"].bool()
    torch.testing.assert_close(a.last_hidden_state[real], b.last_hidden_state[real],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(a.pooler_output, b.pooler_output, atol=1e-5, rtol=0)
    assert len(a.hidden_states) == len(b.hidden_states) == 3
    for x, y in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(x[real], y[real], atol=1e-5, rtol=0)
    for x, y in zip(a.attentions, b.attentions, strict=True):
        torch.testing.assert_close(x, y, atol=1e-5, rtol=0)


def test_train_a_small_model(workdir, monkeypatch) -> None:
    theirs, ours = run_section("3.", workdir, monkeypatch)
    for ns in (theirs, ours):
        losses = ns["losses"]
        assert len(losses) == 10 and losses[-1] < 0.7 * losses[0], losses
