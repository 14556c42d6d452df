"""Persistent memory / all-attention: joint softmax over context and persistent vectors."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.errors import ConfigError
from attnkit.models.transformer_xl import TransformerXL, TransformerXLConfig
from attnkit.nn.attention.persistent import PersistentMemory
from attnkit.nn.attention.relative import RelativeMultiHeadAttention, relative_table


def test_joint_softmax_over_context_and_persistent_vectors():
    torch.manual_seed(0)
    n = 5
    attn = RelativeMultiHeadAttention(8, 2, persistent=PersistentMemory(2, 4, n),
                                      path="explicit").double().eval()
    plain = RelativeMultiHeadAttention(8, 2, path="explicit").double().eval()
    plain.load_state_dict({k: v for k, v in attn.state_dict().items()
                           if not k.startswith("persistent.")})
    x, mem = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    table = relative_table(7, 8).double()
    got = attn(x, mem, table, need_weights=True)
    assert got.weights.shape == (2, 2, 3, 7 + n)
    # reference: the context scores (the plain layer's log-weights up to a constant per row)
    # extended by (q + u) . M_k / sqrt(D), one softmax over both, then values [v, M_v]
    ctx = plain(x, mem, table, need_weights=True).weights  # (B, H, T, S)
    q = plain.q_proj(x).view(2, 3, 2, 4).transpose(1, 2)  # (B, H, T, D)
    k, v = plain.kv_proj(torch.cat([mem, x], 1)).view(2, 7, 2, 2, 4).unbind(2)
    k, v = k.transpose(1, 2), v.transpose(1, 2)
    rk = plain.r_proj(table).view(7, 2, 4).transpose(0, 1)
    scores = torch.full((2, 2, 3, 7 + n), -math.inf, dtype=torch.float64)
    for i in range(3):
        for j in range(7):
            d = 4 + i - j
            if d >= 0:
                scores[:, :, i, j] = ((q[:, :, i] + plain.u) * k[:, :, j]).sum(-1) + (
                    (q[:, :, i] + plain.v) * rk[:, d]).sum(-1)
        for p in range(n):
            scores[:, :, i, 7 + p] = ((q[:, :, i] + plain.u) * attn.persistent.key[:, p]).sum(-1)
    weights = torch.softmax(scores / 2.0, dim=-1)  # sqrt(D) = 2
    torch.testing.assert_close(got.weights, weights, rtol=0, atol=1e-12)
    # the context part renormalised is the plain layer's attention
    part = got.weights[..., :7] / got.weights[..., :7].sum(-1, keepdim=True)
    torch.testing.assert_close(part, ctx, rtol=0, atol=1e-12)
    values = torch.cat([v, attn.persistent.value.unsqueeze(0).expand(2, -1, -1, -1)], 2)
    out = attn.out_proj((weights @ values).transpose(1, 2).reshape(2, 3, 8))
    torch.testing.assert_close(got.out, out, rtol=0, atol=1e-12)


def test_all_attention_layers_have_no_feed_forward_and_train():
    torch.manual_seed(1)
    cfg = TransformerXLConfig(vocab_size=9, d_model=16, n_heads=2, n_layers=2, d_ff=0,
                              n_persistent=6, mem_len=4, dropout=0.0, attention_path="explicit")
    model = TransformerXL(cfg)
    assert all(block.ffn is None for block in model.layers)
    names = [n for n, _ in model.named_parameters()]
    assert not any("ffn" in n for n in names)
    assert sum("persistent.key" in n for n in names) == 2
    out = model(torch.randint(0, 9, (2, 5)))
    first = model(torch.randint(0, 9, (1, 1)), output_attentions=True).attentions[0]
    assert first.shape[-1] == 1 + 6  # the first query sees itself and the persistent vectors
    out.logits.sum().backward()
    assert model.layers[0].attn.persistent.key.grad.abs().sum() > 0


def test_persistent_initialisation_and_bad_sizes():
    torch.manual_seed(2)
    p = PersistentMemory(4, 64, 512)
    assert p.key.std().item() == pytest.approx(1 / 8, rel=0.05)  # N(0, 1/D)
    assert p.value.std().item() == pytest.approx(1 / math.sqrt(512), rel=0.05)  # N(0, 1/N)
    with pytest.raises(ConfigError):
        PersistentMemory(2, 4, 0)
    with pytest.raises(ConfigError, match="n_persistent must be >= 0"):
        TransformerXLConfig(vocab_size=5, n_persistent=-1)
