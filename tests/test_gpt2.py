"""GPT-2: parity with transformers' GPT2LMHeadModel, cached decoding, presets, bad input."""

from __future__ import annotations

import math

import pytest
import torch
import transformers  # a dev dependency: its absence is a failure, not a skip

from attnkit.convert.gpt2 import config_from_hf, state_from_hf
from attnkit.errors import ConfigError, UserError
from attnkit.models.gpt2 import (
    GPT2,
    PRESETS,
    GPT2Config,
    gpt2_config,
    left_pad_positions,
)
from attnkit.models.transformer import count_parameters

V, C, L, H, P = 97, 32, 3, 4, 64
ATOL = 1e-5


def hf_model(seed: int = 0, attn: str = "sdpa", **kw) -> torch.nn.Module:
    """A random tiny GPT2LMHeadModel with O(1) weights (N(0, 0.02) would hide mistakes)."""
    torch.manual_seed(seed)
    options = dict(vocab_size=V, n_positions=P, n_embd=C, n_layer=L, n_head=H, resid_pdrop=0.0,
                   embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=1, eos_token_id=2)
    cfg = transformers.GPT2Config(**{**options, **kw}, attn_implementation=attn)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            gain = 1.0 if ("ln" in name and name.endswith("weight")) else 0.0
            p.copy_(gain + 0.2 * torch.randn_like(p))
    return model


def ours_from(hf: torch.nn.Module) -> GPT2:
    model = GPT2(config_from_hf(hf.config.to_dict()))
    model.load_state_dict(state_from_hf(hf.state_dict(), model.config), strict=True)
    return model.eval()


def test_config_validation_and_presets() -> None:
    with pytest.raises(ConfigError, match="divisible"):
        GPT2Config(d_model=100, n_heads=3)
    with pytest.raises(ConfigError, match="did you mean 'gelu_tanh'"):
        GPT2Config(activation="gelu_tan")
    with pytest.raises(ConfigError, match="dropout"):
        GPT2Config(dropout=1.0)
    with pytest.raises(ConfigError, match="did you mean 'small'"):
        gpt2_config("smal")
    assert gpt2_config("tiny").ff_dim == 4 * 128
    assert set(PRESETS) >= {"small", "medium", "large", "xl", "mini", "tiny"}


def test_small_counts_124_439_808_parameters() -> None:
    with torch.device("meta"):
        model = GPT2(gpt2_config("small"))
    assert count_parameters(model) == 124_439_808
    assert model.lm_head.weight is model.tok_embed.weight


def test_reference_initialisation() -> None:
    torch.manual_seed(0)
    cfg = gpt2_config("tiny", vocab_size=1000, n_layers=8)
    model = GPT2(cfg)
    for block in model.blocks:
        for w in (block.self_attn.out_proj.weight, block.ffn.fc2.weight):
            assert w.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
        assert block.self_attn.qkv_proj.weight.std().item() == pytest.approx(0.02, rel=0.05)
        assert block.self_attn.qkv_proj.bias.abs().max() == 0
        assert torch.equal(block.attn_res.norm.weight, torch.ones(128))
    assert model.tok_embed.weight.std().item() == pytest.approx(0.02, rel=0.05)


def test_logits_match_transformers() -> None:
    hf = hf_model()
    ours = ours_from(hf)
    ids = torch.randint(0, V, (3, 20))
    with torch.no_grad():
        ref, got = hf(ids).logits, ours(ids).logits
    assert got.shape == (3, 20, V)
    assert ref.abs().max() > 1.0  # the comparison is not between near-zero numbers
    torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_logits_match_transformers(side: str) -> None:
    hf = hf_model(1)
    ours = ours_from(hf)
    torch.manual_seed(1)
    ids = torch.randint(0, V, (3, 16))
    mask = torch.ones(3, 16, dtype=torch.long)
    if side == "left":
        mask[0, :5], mask[2, :1] = 0, 0
    else:
        mask[0, 11:], mask[2, 15:] = 0, 0
    pos = left_pad_positions(mask)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos).logits
        got = ours(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    assert not got.isnan().any()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=0)


def test_left_padding_does_not_change_results() -> None:
    """Independent of transformers: a left-padded row gives the unpadded row's logits."""
    torch.manual_seed(2)
    model = GPT2(gpt2_config("tiny", vocab_size=V, dropout=0.0, attention_dropout=0.0)).eval()
    ids = torch.randint(4, V, (1, 9))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), ids], 1)
    mask = torch.cat([torch.zeros(1, 3), torch.ones(1, 9)], 1).long()
    with torch.no_grad():
        alone = model(ids).logits
        got = model(padded, attention_mask=mask, position_ids=left_pad_positions(mask)).logits
    torch.testing.assert_close(got[:, 3:], alone, atol=ATOL, rtol=0)


def test_hidden_states_and_attentions_match_transformers() -> None:
    hf = hf_model(3, attn="eager")
    ours = ours_from(hf)
    ids = torch.randint(0, V, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    pos = left_pad_positions(mask)
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask, position_ids=pos, output_hidden_states=True,
                 output_attentions=True)
        got = ours(ids, attention_mask=mask, position_ids=pos, output_attentions=True,
                   output_hidden_states=True)
    assert len(got.hidden_states) == L + 1 and len(got.attentions) == L
    real = mask.bool()
    for a, b in zip(got.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)
    for a, b in zip(got.attentions, ref.attentions, strict=True):
        assert a.shape == (2, H, 12, 12)
        rows = real[:, None, :, None].expand_as(a)  # queries that are real tokens
        torch.testing.assert_close(a[rows], b[rows], atol=ATOL, rtol=0)
    torch.testing.assert_close(got.logits[real], ref.logits[real], atol=ATOL, rtol=0)


def test_cached_decoding_equals_full_recomputation() -> None:
    torch.manual_seed(4)
    model = GPT2(gpt2_config("tiny", vocab_size=V, n_positions=P)).eval()
    ids = torch.randint(0, V, (2, 14))
    mask = torch.ones(2, 14, dtype=torch.long)
    mask[0, :3] = 0  # a left-padded prompt
    pos = left_pad_positions(mask)
    with torch.no_grad():
        full = model(ids, attention_mask=mask, position_ids=pos).logits
        cache = model.new_cache(2, 14)
        steps = [model(ids[:, :6], attention_mask=mask[:, :6], position_ids=pos[:, :6],
                       past_key_values=cache).logits]
        for i in range(6, 14):
            steps.append(model(ids[:, i:i + 1], attention_mask=mask[:, :i + 1],
                               position_ids=pos[:, i:i + 1], past_key_values=cache).logits)
    assert cache[0].length == 14
    real = mask.bool()
    torch.testing.assert_close(torch.cat(steps, 1)[real], full[real], atol=ATOL, rtol=0)


def test_future_tokens_do_not_change_the_past_and_last_only() -> None:
    torch.manual_seed(5)
    model = GPT2(gpt2_config("tiny", vocab_size=V)).eval()
    ids = torch.randint(0, V, (2, 10))
    other = ids.clone()
    other[:, 6:] = torch.randint(0, V, (2, 4))
    with torch.no_grad():
        a, b = model(ids).logits, model(other).logits
        last = model(ids, last_only=True, output_hidden_states=True)
    torch.testing.assert_close(a[:, :6], b[:, :6], atol=1e-6, rtol=0)
    assert not torch.allclose(a[:, 6:], b[:, 6:])
    assert last.logits.shape == (2, 1, V)
    torch.testing.assert_close(last.logits, a[:, -1:], atol=1e-6, rtol=0)


def test_greedy_50_tokens_identical_to_transformers_generate() -> None:
    hf = hf_model(6, eos_token_id=None)  # no early stop: 50 tokens whatever comes
    ours = ours_from(hf)
    prompt = torch.randint(0, V, (1, 7))
    with torch.no_grad():
        ref = hf.generate(prompt, max_new_tokens=50, do_sample=False, pad_token_id=0)
        cache, ids, out = ours.new_cache(1, 57), prompt, []
        for _ in range(50):
            logits = ours(ids, past_key_values=cache, last_only=True).logits
            ids = logits[:, -1].argmax(-1, keepdim=True)
            out.append(ids)
    assert torch.equal(torch.cat([prompt, *out], 1), ref)


def test_training_mode_backward_and_dropout() -> None:
    torch.manual_seed(7)
    model = GPT2(gpt2_config("tiny", vocab_size=V))
    ids = torch.randint(0, V, (2, 8))
    logits = model(ids).logits
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids.flatten()).backward()
    assert all(p.grad is not None for p in model.parameters())
    assert not torch.equal(model(ids).logits, logits)  # dropout is on in training mode


def test_transformers_keywords_give_gpt2lmheadmodel_outputs() -> None:
    """The same keyword call on GPT2LMHeadModel and attnkit's GPT2 (copied weights): equal
    logits, loss (labels shifted inside, -100 ignored), hidden states and attentions in the
    same order, and past_key_values that carry the next step."""
    hf = hf_model(8, attn="eager")
    ours = ours_from(hf)
    g = torch.Generator().manual_seed(8)
    ids = torch.randint(0, V, (2, 11), generator=g)
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0  # right padding, not scored
    labels = ids.masked_fill(mask == 0, -100)
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels, use_cache=True,
              output_attentions=True, output_hidden_states=True)
    with torch.no_grad():
        ref, got = hf(**kw), ours(**kw)
    torch.testing.assert_close(got.logits, ref.logits, atol=ATOL, rtol=0)
    assert got.loss.shape == () and ref.loss > 1.0
    torch.testing.assert_close(got.loss, ref.loss, atol=ATOL, rtol=0)
    assert len(got.hidden_states) == len(ref.hidden_states) == L + 1
    assert len(got.attentions) == len(ref.attentions) == L
    assert isinstance(got.hidden_states, tuple) and isinstance(got.attentions, tuple)
    real = mask.bool()
    for a, b in zip(got.hidden_states, ref.hidden_states, strict=True):
        torch.testing.assert_close(a[real], b[real], atol=ATOL, rtol=0)
    for a, b in zip(got.attentions, ref.attentions, strict=True):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=0)
    nxt = torch.randint(0, V, (2, 1), generator=g)
    step = dict(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones(2, 1).long()], 1))
    with torch.no_grad():
        ref2 = hf(**step, cache=ref.cache)  # transformers 5.24's name for past_key_values
        got2 = ours(**step, past_key_values=got.past_key_values)
    assert got2.past_key_values[0].length == 12
    torch.testing.assert_close(got2.logits, ref2.logits, atol=ATOL, rtol=0)


def test_bad_inputs_are_one_line_errors() -> None:
    model = GPT2(gpt2_config("tiny", vocab_size=V, n_positions=16)).eval()
    with pytest.raises(UserError, match=r"token ids must be in \[0, 97\)"):
        model(torch.tensor([[1, 97]]))
    with pytest.raises(UserError, match="17 positions exceed the model's context of 16"):
        model(torch.zeros(1, 17, dtype=torch.long))
    with pytest.raises(UserError, match="attention_mask must be"):
        model(torch.zeros(2, 4, dtype=torch.long), attention_mask=torch.ones(2, 3))
    with pytest.raises(UserError, match=r"\(B, T\) integer"):
        model(torch.zeros(4))
    with pytest.raises(UserError, match="exceed"):
        model.new_cache(1, 17)
