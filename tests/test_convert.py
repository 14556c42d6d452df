"""Hugging Face directories <-> attnkit (GPT-2): round trips through transformers, bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers  # a dev dependency: its absence is a failure, not a skip
from safetensors.torch import save_file

from attnkit.convert import from_pretrained, save_pretrained
from attnkit.errors import UserError
from attnkit.models.gpt2 import GPT2, gpt2_config

V, P = 61, 32


def random_gpt2(seed: int = 0, **kw) -> GPT2:
    """A tiny GPT-2 with O(1) random weights (so that any mapping mistake shows)."""
    torch.manual_seed(seed)
    model = GPT2(gpt2_config("tiny", vocab_size=V, n_positions=P, d_model=32, n_heads=4,
                             **kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def hf_gpt2(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    cfg = transformers.GPT2Config(vocab_size=V, n_positions=P, n_embd=32, n_layer=2, n_head=4,
                                  bos_token_id=1, eos_token_id=2)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return model


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(seed))


def logits(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(x)
    return out.logits


@pytest.mark.parametrize("tie", [True, False])
def test_attnkit_to_transformers_and_back(tmp_path: Path, tie: bool) -> None:
    ours = random_gpt2(tie_embeddings=tie)
    save_pretrained(ours, tmp_path / "m")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    assert (hf.lm_head.weight is hf.transformer.wte.weight) == tie
    x = ids()
    torch.testing.assert_close(logits(hf, x), logits(ours, x), atol=1e-5, rtol=0)
    back = from_pretrained(tmp_path / "m")
    assert back.model_type == "gpt2" and back.config == ours.config and back.tokenizer is None
    theirs = back.model.state_dict()
    assert all(torch.equal(theirs[k], v) for k, v in ours.state_dict().items())
    assert torch.equal(logits(back.model, x), logits(ours, x))


def test_transformers_directory_loads(tmp_path: Path) -> None:
    hf = hf_gpt2(1)
    hf.save_pretrained(tmp_path)
    got = from_pretrained(tmp_path)
    assert not got.model.training
    x = ids(1)
    torch.testing.assert_close(logits(got.model, x), logits(hf, x), atol=1e-5, rtol=0)


def test_pytorch_model_bin_with_bare_keys_and_legacy_buffers(tmp_path: Path) -> None:
    """The original hub layout: GPT2Model keys (no 'transformer.'), attn.bias buffers, .bin."""
    hf = hf_gpt2(2)
    state = {k.removeprefix("transformer."): v for k, v in hf.state_dict().items()
             if k != "lm_head.weight"}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(P, P)).view(1, 1, P, P)
        state[f"h.{i}.attn.masked_bias"] = torch.tensor(-1e4)
    torch.save(state, tmp_path / "pytorch_model.bin")
    hf.config.to_json_file(tmp_path / "config.json")
    got = from_pretrained(tmp_path)
    x = ids(2)
    torch.testing.assert_close(logits(got.model, x), logits(hf, x), atol=1e-5, rtol=0)


def test_sharded_safetensors(tmp_path: Path) -> None:
    hf = hf_gpt2(3)
    state = {k: v.contiguous() for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    keys = sorted(state)
    halves = {"model-00001-of-00002.safetensors": keys[::2],
              "model-00002-of-00002.safetensors": keys[1::2]}
    for name, part in halves.items():
        save_file({k: state[k] for k in part}, str(tmp_path / name))
    index = {"weight_map": {k: n for n, part in halves.items() for k in part}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    hf.config.to_json_file(tmp_path / "config.json")
    x = ids(3)
    torch.testing.assert_close(logits(from_pretrained(tmp_path).model, x), logits(hf, x),
                               atol=1e-5, rtol=0)


def _write(tmp_path: Path, state: dict, config: dict) -> Path:
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    return tmp_path


def test_missing_unexpected_and_mismatched_keys_are_named(tmp_path: Path) -> None:
    hf = hf_gpt2(4)
    state = {k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"}
    del state["transformer.h.1.mlp.c_fc.weight"]
    state["transformer.h.0.attn.extra.weight"] = torch.zeros(3)
    state["transformer.ln_f.bias"] = torch.zeros(7)
    _write(tmp_path, state, hf.config.to_dict())
    with pytest.raises(UserError) as err:
        from_pretrained(tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "missing: transformer.h.1.mlp.c_fc.weight" in msg
    assert "unexpected: transformer.h.0.attn.extra.weight" in msg
    assert "transformer.ln_f.bias (7,) vs (32,)" in msg


def test_bad_directories_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such directory"):
        from_pretrained(tmp_path / "absent")
    (tmp_path / "file").write_text("x")
    with pytest.raises(UserError, match="got a file"):
        from_pretrained(tmp_path / "file")
    with pytest.raises(UserError, match="has no config.json"):
        from_pretrained(tmp_path)
    hf = hf_gpt2(5)
    cfg = hf.config.to_dict()
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "model_type": "gtp2"}))
    with pytest.raises(UserError, match="did you mean 'gpt2'"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="has no weights"):
        from_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x07garbage")
    with pytest.raises(UserError, match="corrupt or unreadable weights"):
        from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(
        {**cfg, "scale_attn_by_inverse_layer_idx": True, "activation_function": "swish"}))
    with pytest.raises(UserError, match="scale_attn_by_inverse_layer_idx=True, "
                                        "activation_function='swish'"):
        from_pretrained(tmp_path)


def test_save_pretrained_refuses_to_overwrite_and_leaves_nothing(tmp_path: Path) -> None:
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    model = random_gpt2(6)
    with pytest.raises(UserError, match="not empty.*--overwrite"):
        save_pretrained(model, target)
    # --overwrite replaces only an earlier export: a folder with the user's files is kept
    with pytest.raises(UserError, match="attnkit did not export"):
        save_pretrained(model, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    assert (target / "keep.txt").read_text() == "mine"
    with pytest.raises(UserError, match="cannot save a Linear"):
        save_pretrained(torch.nn.Linear(2, 2), tmp_path / "other")
    (target / "keep.txt").unlink()
    save_pretrained(model, target)  # an empty directory is filled
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"]
    hf = json.loads((target / "config.json").read_text())
    assert hf["model_type"] == "gpt2" and hf["architectures"] == ["GPT2LMHeadModel"]
    # an earlier export is replaced, with the new weights
    other = random_gpt2(7)
    save_pretrained(other, target, overwrite=True)
    torch.testing.assert_close(from_pretrained(target).model.state_dict(), other.state_dict())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary leftovers


def test_overwrite_keeps_an_export_someone_added_to_or_linked(tmp_path: Path) -> None:
    model = random_gpt2(6)
    target = tmp_path / "out"
    save_pretrained(model, target)
    (target / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="attnkit did not export"):
        save_pretrained(model, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine"
    link = tmp_path / "link"
    link.symlink_to(target)
    with pytest.raises(UserError, match="symbolic link"):
        save_pretrained(model, link, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == [
        "config.json", "model.safetensors", "notes.txt"]
    # a Hugging Face folder from elsewhere (no attnkit mark) is not replaced either
    hf_dir = tmp_path / "hf"
    save_pretrained(model, hf_dir)
    cfg = json.loads((hf_dir / "config.json").read_text())
    del cfg["attnkit_export"]
    (hf_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="attnkit did not export"):
        save_pretrained(model, hf_dir, overwrite=True)
    assert "attnkit_export" not in json.loads((hf_dir / "config.json").read_text())


def test_tokenizer_saved_and_loaded(tmp_path: Path) -> None:
    from attnkit.tokenizers import Tokenizer
    tok = Tokenizer.train("char", ["hello world", "the quick brown fox"], vocab_size=V)
    model = random_gpt2(7)
    save_pretrained(model, tmp_path / "m", tok)
    hf = json.loads((tmp_path / "m" / "config.json").read_text())
    assert (hf["bos_token_id"], hf["eos_token_id"], hf["pad_token_id"]) == (1, 2, 0)
    got = from_pretrained(tmp_path / "m")
    assert got.tokenizer is not None
    assert got.tokenizer.encode("hello fox") == tok.encode("hello fox")
