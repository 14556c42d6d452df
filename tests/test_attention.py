"""Attention core, masks, multi-head attention, KV cache, positions and blocks against
independent float64 references written out here (Vaswani et al. 2017, eq. 1, section 3.2.2,
section 3.5, section 5.4)."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.nn.attention.core import attention
from attnkit.nn.attention.masks import causal_mask, combine, padding_mask
from attnkit.nn.attention.multihead import MultiHeadAttention
from attnkit.nn.blocks import DecoderBlock, EncoderBlock
from attnkit.nn.cache import KVCache
from attnkit.nn.ffn import FeedForward
from attnkit.nn.positional import SinusoidalPositions, sinusoidal_table

F64 = torch.float64


def reference_attention(q, k, v, mask=None, bias=None):
    """softmax(Q K^T / sqrt(D) + bias, masked) V with explicit loops; returns (out, weights)."""
    b, h, t, d = q.shape
    s = k.size(2)
    mask = torch.ones(b, h, t, s, dtype=torch.bool) if mask is None else mask.expand(b, h, t, s)
    bias = torch.zeros(b, h, t, s, dtype=F64) if bias is None else bias.expand(b, h, t, s)
    out = torch.zeros(b, h, t, d, dtype=F64)
    weights = torch.zeros(b, h, t, s, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            for ti in range(t):
                scores = [sum(q[bi, hi, ti, j].item() * k[bi, hi, si, j].item()
                              for j in range(d)) / math.sqrt(d) + bias[bi, hi, ti, si].item()
                          for si in range(s)]
                allowed = [si for si in range(s) if mask[bi, hi, ti, si]]
                top = max(scores[si] for si in allowed)
                z = sum(math.exp(scores[si] - top) for si in allowed)
                for si in allowed:
                    weights[bi, hi, ti, si] = math.exp(scores[si] - top) / z
                out[bi, hi, ti] = torch.einsum("s,sd->d", weights[bi, hi, ti], v[bi, hi])
    return out, weights


def qkv(b=2, h=3, t=4, s=5, d=6, dtype=F64):
    torch.manual_seed(0)
    return (torch.randn(b, h, t, d, dtype=dtype), torch.randn(b, h, s, d, dtype=dtype),
            torch.randn(b, h, s, d, dtype=dtype))


# -- attention core ---------------------------------------------------------------------------
def _masks(b=2, t=4, s=5):
    pad = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])[:, :s] != 0  # (B, S)
    return {
        "none": None,
        "padding": pad[:, None, None, :],                        # (B, 1, 1, S)
        "causal": causal_mask(t, s)[None, None],                 # (1, 1, T, S)
        "both": combine(pad[:, None, None, :], causal_mask(t, s)[None, None]),
    }


@pytest.mark.parametrize("kind", ["none", "padding", "causal", "both"])
@pytest.mark.parametrize("with_bias", [False, True])
def test_attention_paths_equal_float64_reference(kind, with_bias):
    q, k, v = qkv()
    mask = _masks()[kind]
    torch.manual_seed(1)
    bias = torch.randn(1, 3, 4, 5, dtype=F64) if with_bias else None
    ref_out, ref_w = reference_attention(q, k, v, mask, bias)
    fused = attention(q, k, v, mask=mask, bias=bias)
    explicit = attention(q, k, v, mask=mask, bias=bias, need_weights=True)
    assert fused.weights is None
    assert explicit.weights.shape == (2, 3, 4, 5)
    torch.testing.assert_close(fused.out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit.out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit.weights, ref_w, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("t,s", [(4, 4), (1, 5), (3, 5)])
@pytest.mark.parametrize("padded", [False, True])
def test_causal_flag_equals_reference_with_last_t_queries(t, s, padded):
    q, k, v = qkv(t=t, s=s)
    pad = _masks(t=t, s=s)["padding"] if padded else None
    allowed = torch.tensor([[j <= i + (s - t) for j in range(s)] for i in range(t)])
    ref_out, ref_w = reference_attention(q, k, v, combine(pad, allowed[None, None]))
    fused = attention(q, k, v, mask=pad, causal=True)
    explicit = attention(q, k, v, mask=pad, causal=True, need_weights=True)
    torch.testing.assert_close(fused.out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit.out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit.weights, ref_w, rtol=1e-10, atol=1e-12)


def test_attention_weights_rows_sum_to_one_and_zero_where_masked():
    q, k, v = qkv()
    mask = _masks()["both"]
    w = attention(q, k, v, mask=mask, need_weights=True).weights
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 3, 4, dtype=F64))
    full = mask.expand(2, 3, 4, 5)
    assert (w[~full] == 0).all()
    assert (w[full] > 0).all()
    # the padded keys 3, 4 of row 1 get nothing; query 0 (absolute position 1) sees keys 0..1
    assert (w[1, :, :, 3:] == 0).all()
    assert (w[0, :, 0, 2:] == 0).all() and (w[0, :, 0, :2] > 0).all()


def test_attention_mask_true_means_attend():
    q, k, v = qkv(b=1, h=1, t=1, s=3)
    mask = torch.tensor([False, True, False])[None, None, None, :]
    out = attention(q, k, v, mask=mask).out
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 1])  # only key 1 is visible


def test_additive_bias_of_minus_inf_equals_mask_and_constant_bias_is_noop():
    q, k, v = qkv()
    mask = _masks()["both"]
    bias = torch.zeros(mask.shape, dtype=F64).masked_fill(~mask, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, bias=bias).out,
                               attention(q, k, v, mask=mask).out)
    shifted = attention(q, k, v, bias=torch.full((1, 1, 1, 1), 7.0, dtype=F64)).out
    torch.testing.assert_close(shifted, attention(q, k, v).out)


def test_fully_masked_row_paths_agree():
    # A query row whose keys are all masked (e.g. an all-PAD source): the fused kernel gives 0;
    # the explicit path must too (not the NaN of a softmax over -inf).
    q, k, v = qkv()
    mask = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    mask[1] = False
    fused = attention(q, k, v, mask=mask).out
    explicit = attention(q, k, v, mask=mask, need_weights=True).out
    torch.testing.assert_close(explicit, fused)


def test_attention_dropout():
    q, k, v = qkv()
    base = attention(q, k, v).out
    for need in (False, True):
        torch.manual_seed(3)
        dropped = attention(q, k, v, dropout=0.5, need_weights=need).out
        assert not torch.allclose(dropped, base)
        torch.testing.assert_close(attention(q, k, v, need_weights=need).out, base, rtol=0,
                                   atol=1e-12)
    # dropout 0 is deterministic: no randomness consumed
    assert torch.equal(attention(q, k, v, dropout=0.0).out, attention(q, k, v, dropout=0.0).out)


def test_explicit_custom_scale():
    q, k, v = qkv()
    out = attention(q, k, v, scale=1.0, need_weights=True)
    ref, _ = reference_attention(q * math.sqrt(6), k, v)  # sqrt(D) cancels the 1/sqrt(D)
    torch.testing.assert_close(out.out, ref)
    torch.testing.assert_close(attention(q, k, v, scale=1.0).out, ref)


# -- masks ------------------------------------------------------------------------------------
@pytest.mark.parametrize("t,s", [(1, 1), (3, 3), (2, 5), (4, 7)])
def test_causal_mask_offset(t, s):
    got = causal_mask(t, s)
    assert got.shape == (t, s) and got.dtype == torch.bool
    for i in range(t):
        absolute = i + (s - t)  # queries are the last t of s positions
        for j in range(s):
            assert bool(got[i, j]) == (j <= absolute), (i, j)
    assert torch.equal(causal_mask(t), causal_mask(t, t))


def test_padding_mask_shape_and_values():
    tokens = torch.tensor([[5, 6, 7, 0], [8, 0, 0, 0]])
    m = padding_mask(tokens, pad_id=0)
    assert m.shape == (2, 1, 1, 4) and m.dtype == torch.bool
    assert m[:, 0, 0].tolist() == [[True, True, True, False], [True, False, False, False]]
    assert padding_mask(tokens, pad_id=8)[1, 0, 0].tolist() == [False, True, True, True]
    assert combine(None, None) is None


# -- multi-head attention ---------------------------------------------------------------------
def _linear(x, weight, bias):
    return torch.einsum("btc,oc->bto", x, weight) + bias


def reference_mha(x, context, wq, bq, wk, bk, wv, bv, wo, bo, heads, mask=None):
    """Concat(head_1..head_H) W^O with every head's slice of the projections taken by hand."""
    c = x.size(-1)
    d = c // heads
    q, k, v = _linear(x, wq, bq), _linear(context, wk, bk), _linear(context, wv, bv)
    outs, ws = [], []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        m = None if mask is None else mask[:, :1]
        o, w = reference_attention(q[..., sl][:, None], k[..., sl][:, None], v[..., sl][:, None],
                                   m)
        outs.append(o[:, 0])
        ws.append(w[:, 0])
    concat = torch.cat(outs, dim=-1)  # (B, T, C)
    return _linear(concat, wo, bo), torch.stack(ws, dim=1)


def test_mha_self_attention_equals_per_head_reference():
    torch.manual_seed(0)
    c, heads = 8, 2
    mha = MultiHeadAttention(c, heads).double().eval()
    x = torch.randn(2, 4, c, dtype=F64)
    mask = causal_mask(4)[None, None]
    w, b = mha.qkv_proj.weight, mha.qkv_proj.bias
    ref, ref_w = reference_mha(x, x, w[:c], b[:c], w[c:2 * c], b[c:2 * c], w[2 * c:],
                               b[2 * c:], mha.out_proj.weight, mha.out_proj.bias, heads, mask)
    with torch.no_grad():
        got = mha(x, mask=mask, need_weights=True)
        fused = mha(x, mask=mask)
    assert got.out.shape == (2, 4, c) and got.weights.shape == (2, heads, 4, 4)
    torch.testing.assert_close(got.out, ref)
    torch.testing.assert_close(fused.out, ref)
    torch.testing.assert_close(got.weights, ref_w)


def test_mha_cross_attention_equals_per_head_reference():
    torch.manual_seed(0)
    c, heads = 12, 3
    mha = MultiHeadAttention(c, heads, cross=True).double().eval()
    x, ctx = torch.randn(2, 3, c, dtype=F64), torch.randn(2, 5, c, dtype=F64)
    mask = padding_mask(torch.tensor([[4, 4, 4, 4, 4], [4, 4, 0, 0, 0]]), 0)
    wkv, bkv = mha.kv_proj.weight, mha.kv_proj.bias
    ref, ref_w = reference_mha(x, ctx, mha.q_proj.weight, mha.q_proj.bias, wkv[:c], bkv[:c],
                               wkv[c:], bkv[c:], mha.out_proj.weight, mha.out_proj.bias, heads,
                               mask)
    with torch.no_grad():
        got = mha(x, ctx, mask=mask, need_weights=True)
        via_kv = mha(x, kv=mha.project_kv(ctx), mask=mask)
    assert got.weights.shape == (2, heads, 3, 5)
    torch.testing.assert_close(got.out, ref)
    torch.testing.assert_close(via_kv.out, ref)
    torch.testing.assert_close(got.weights, ref_w)


def test_mha_rejects_indivisible_width():
    with pytest.raises(ValueError):
        MultiHeadAttention(10, 3)


def test_mha_dropout_only_in_training():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2, dropout=0.5).double()
    x = torch.randn(2, 5, 8, dtype=F64)
    with torch.no_grad():
        mha.eval()
        a, b = mha(x).out, mha(x).out
        mha.train()
        c = mha(x).out
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("chunks", [[1] * 6, [2, 1, 3], [6]])
def test_kv_cache_incremental_equals_full(chunks):
    torch.manual_seed(0)
    c, heads, t = 8, 2, 6
    mha = MultiHeadAttention(c, heads).double().eval()
    x = torch.randn(3, t, c, dtype=F64)
    with torch.no_grad():
        full = mha(x, mask=causal_mask(t)[None, None]).out
        cache = KVCache(3, heads, t, c // heads, dtype=F64)
        pieces, pos = [], 0
        for n in chunks:
            mask = causal_mask(n, pos + n)[None, None] if n > 1 else None
            pieces.append(mha(x[:, pos:pos + n], mask=mask, cache=cache).out)
            pos += n
    assert cache.length == t
    torch.testing.assert_close(torch.cat(pieces, dim=1), full)


def test_kv_cache_overflow_raises_and_keeps_state():
    cache = KVCache(1, 2, 3, 4, dtype=F64)
    k = torch.randn(1, 2, 2, 4, dtype=F64)
    cache.append(k, k)
    with pytest.raises(ValueError, match="overflow"):
        cache.append(k, k)
    assert cache.length == 2
    keys, _ = cache.append(k[:, :, :1], k[:, :, :1])
    torch.testing.assert_close(keys, torch.cat([k, k[:, :, :1]], dim=2))


def test_kv_cache_reorder():
    cache = KVCache(3, 1, 4, 2, dtype=F64)
    k = torch.arange(3, dtype=F64).view(3, 1, 1, 1).expand(3, 1, 2, 2)
    cache.append(k, -k)
    cache.reorder(torch.tensor([2, 0, 2, 1]))
    new = torch.full((4, 1, 1, 2), 9.0, dtype=F64)
    keys, values = cache.append(new, new)
    assert keys.shape == (4, 1, 3, 2) and (keys[:, :, 2] == 9.0).all()
    assert keys[:, 0, 0, 0].tolist() == [2.0, 0.0, 2.0, 1.0]
    assert values[:, 0, 1, 0].tolist() == [-2.0, 0.0, -2.0, -1.0]


# -- positions --------------------------------------------------------------------------------
@pytest.mark.parametrize("d_model", [16, 7])
def test_sinusoidal_table_matches_paper_formula(d_model):
    table = sinusoidal_table(60, d_model)
    assert table.shape == (60, d_model)
    for pos in (0, 1, 5, 37, 59):
        for i in range((d_model + 1) // 2):
            angle = pos / 10000 ** (2 * i / d_model)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            if 2 * i + 1 < d_model:
                assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_positions_offset():
    pe = SinusoidalPositions(20, 8)
    torch.testing.assert_close(pe(3, offset=5), sinusoidal_table(20, 8)[5:8])
    assert pe(1, 0)[0, 1].item() == pytest.approx(1.0)  # cos(0)


# -- blocks -----------------------------------------------------------------------------------
def layer_norm(x, norm):
    """(x - mean) / sqrt(var + eps) * gamma + beta, written out."""
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def _perturb_norms(module):
    torch.manual_seed(5)
    for m in module.modules():
        if isinstance(m, torch.nn.LayerNorm):
            with torch.no_grad():
                m.weight.normal_()
                m.bias.normal_()


@pytest.mark.parametrize("norm_first", [False, True])
def test_encoder_block_matches_hand_composition(norm_first):
    torch.manual_seed(0)
    c = 8
    block = EncoderBlock(MultiHeadAttention(c, 2, 0.1), FeedForward(c, 16, 0.1), c, 0.1,
                         norm_first).double().eval()
    _perturb_norms(block)
    x = torch.randn(2, 5, c, dtype=F64)
    mask = padding_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]), 0)

    def attn(h):
        return block.self_attn(h, mask=mask).out

    def ffn(h):  # FFN(x) = max(0, x W1 + b1) W2 + b2
        f1, f2 = block.ffn.fc1, block.ffn.fc2
        return _linear(torch.relu(_linear(h, f1.weight, f1.bias)), f2.weight, f2.bias)

    n1, n2 = block.attn_res.norm, block.ffn_res.norm
    with torch.no_grad():
        if norm_first:
            h = x + attn(layer_norm(x, n1))
            ref = h + ffn(layer_norm(h, n2))
        else:
            h = layer_norm(x + attn(x), n1)
            ref = layer_norm(h + ffn(h), n2)
        got = block(x, mask=mask)
    assert got.self_weights is None
    torch.testing.assert_close(got.hidden, ref)


@pytest.mark.parametrize("norm_first", [False, True])
def test_decoder_block_matches_hand_composition(norm_first):
    torch.manual_seed(0)
    c = 8
    block = DecoderBlock(MultiHeadAttention(c, 2), MultiHeadAttention(c, 2, cross=True),
                         FeedForward(c, 16), c, 0.1, norm_first).double().eval()
    _perturb_norms(block)
    x, memory = torch.randn(2, 4, c, dtype=F64), torch.randn(2, 5, c, dtype=F64)
    self_mask = causal_mask(4)[None, None]
    mem_mask = padding_mask(torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]), 0)
    kv = block.cross_attn.project_kv(memory)
    subs = [lambda h: block.self_attn(h, mask=self_mask).out,
            lambda h: block.cross_attn(h, memory, mask=mem_mask).out,
            block.ffn]
    norms = [block.self_res.norm, block.cross_res.norm, block.ffn_res.norm]
    with torch.no_grad():
        ref = x
        for sub, norm in zip(subs, norms, strict=True):
            ref = ref + sub(layer_norm(ref, norm)) if norm_first else layer_norm(ref + sub(ref),
                                                                                norm)
        got = block(x, kv, self_mask=self_mask, memory_mask=mem_mask, need_weights=True)
    torch.testing.assert_close(got.hidden, ref)
    assert got.self_weights.shape == (2, 2, 4, 4) and got.cross_weights.shape == (2, 2, 4, 5)
    assert (got.cross_weights[1, :, :, 2:] == 0).all()
