"""The options of the shared multi-head module (sliding ``window``, ``packing`` of padded
batches) and the one flex policy, against float64 references written out here: per-query
softmax loops over the allowed keys, every sequence of a padded batch run alone, brute-force
tile classification of the band block masks."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.errors import ConfigError
from attnkit.nn.attention import flex
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.flex import band_block_mask, use_flex
from attnkit.nn.attention.multihead import MultiHeadAttention, Packing
from attnkit.nn.attention.relative import RelativeMultiHeadAttention, relative_table
from attnkit.nn.blocks import EncoderBlock
from attnkit.nn.ffn import FeedForward

F64 = torch.float64


def ref_self_attention(mha: MultiHeadAttention, x: torch.Tensor, allowed: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Multi-head self-attention of ``x`` (B, T, C) where ``allowed`` (B, T, T) says which keys
    each query sees: projections by hand, one float64 softmax per (row, head, query) in Python
    floats. Returns the output (B, T, C) and the weights (B, H, T, T)."""
    b, t, c = x.shape
    h, d = mha.n_heads, mha.head_dim
    w, bias = mha.qkv_proj.weight.detach().double(), mha.qkv_proj.bias.detach().double()
    x = x.detach().double()
    q, k, v = (x @ w[i * c:(i + 1) * c].T + bias[i * c:(i + 1) * c] for i in range(3))
    heads = torch.zeros(b, t, c, dtype=F64)
    weights = torch.zeros(b, h, t, t, dtype=F64)
    for bi in range(b):
        for hi in range(h):
            sl = slice(hi * d, (hi + 1) * d)
            for i in range(t):
                keys = [j for j in range(t) if allowed[bi, i, j]]
                if not keys:
                    continue  # a query that sees nothing outputs zero (as the kernels do)
                sc = [float(q[bi, i, sl] @ k[bi, j, sl]) / math.sqrt(d) for j in keys]
                z = [math.exp(s - max(sc)) for s in sc]
                for zj, j in zip(z, keys, strict=True):
                    weights[bi, hi, i, j] = zj / sum(z)
                    heads[bi, i, sl] += zj / sum(z) * v[bi, j, sl]
    wo, bo = mha.out_proj.weight.detach().double(), mha.out_proj.bias.detach().double()
    return heads @ wo.T + bo, weights


def _band(t: int, window: int, causal: bool) -> torch.Tensor:
    """(T, T) by loops: |i - j| <= window, and j <= i if causal."""
    return torch.tensor([[abs(i - j) <= window and (j <= i or not causal) for j in range(t)]
                         for i in range(t)])


# -- the window option ------------------------------------------------------------------------
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_window_option_equals_float64_band_reference(causal, padded):
    torch.manual_seed(0)
    mha = MultiHeadAttention(12, 3, window=2).double().eval()
    x = torch.randn(2, 7, 12, dtype=F64)
    real = torch.ones(2, 7, dtype=torch.bool)
    if padded:
        real[1, 5:] = False
    allowed = _band(7, 2, causal)[None] & real[:, None, :]  # (B, T, S)
    ref, ref_w = ref_self_attention(mha, x, allowed)
    mask = real[:, None, None, :] if padded else None
    with torch.no_grad():
        fused = mha(x, mask=mask, causal=causal)
        explicit = mha(x, mask=mask, causal=causal, need_weights=True)
    torch.testing.assert_close(fused.out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(explicit.out, ref, rtol=0, atol=1e-12)
    torch.testing.assert_close(explicit.weights, ref_w, rtol=0, atol=1e-12)


def test_window_option_errors_are_one_line():
    with pytest.raises(ConfigError, match="self-attention"):
        MultiHeadAttention(8, 2, cross=True, window=2)
    with pytest.raises(ConfigError, match="unknown attention path 'flux'"):
        MultiHeadAttention(8, 2, path="flux")
    with pytest.raises(ConfigError, match="unknown attention path 'fast'"):
        RelativeMultiHeadAttention(8, 2, path="fast")


# -- the packing option -----------------------------------------------------------------------
def test_packing_keeps_the_real_rows_in_order_and_zero_fills():
    real = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0]], dtype=torch.bool)
    x = torch.arange(3 * 4 * 2, dtype=F64).view(3, 4, 2)
    packing = Packing.of(real[:, None, None, :], 3, 4)
    rows = [x[b, j] for b in range(3) for j in range(4) if real[b, j]]  # brute force
    packed = packing.pack(x)
    assert torch.equal(packed, torch.stack(rows))
    assert torch.equal(packing.unpack(packed), x * real[..., None])
    full = Packing.of(None, 3, 4)
    assert torch.equal(full.pack(x), x.reshape(12, 2))
    assert torch.equal(full.unpack(full.pack(x)), x)


def _layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + norm.eps) * norm.weight.double() + norm.bias.double()


def ref_post_norm_block(block: EncoderBlock, x: torch.Tensor) -> torch.Tensor:
    """One sequence (1, L, C) alone, no padding: LN(h + FFN(h)) with h = LN(x + MHA(x))."""
    attn, _ = ref_self_attention(block.self_attn, x, torch.ones(1, x.size(1), x.size(1),
                                                                dtype=torch.bool))
    h = _layer_norm(x.double() + attn, block.attn_res.norm)
    f1, f2 = block.ffn.fc1, block.ffn.fc2
    ffn = torch.relu(h @ f1.weight.double().T + f1.bias.double()) @ f2.weight.double().T
    return _layer_norm(h + ffn + f2.bias.double(), block.ffn_res.norm)


@pytest.mark.parametrize("training", [False, True])
def test_packed_block_equals_every_sequence_alone(training):
    """The packed (N, C) path in inference (oneDNN GEMMs) and in training (autograd, dropout
    0) equals each sequence computed alone at its own length, and never sees the padding."""
    torch.manual_seed(1)
    c = 8
    block = EncoderBlock(MultiHeadAttention(c, 2), FeedForward(c, 16), c, 0.0).train(training)
    for m in block.modules():
        if isinstance(m, torch.nn.LayerNorm):
            torch.nn.init.normal_(m.weight)
            torch.nn.init.normal_(m.bias)
    lengths = [5, 2, 4]
    x = torch.randn(3, 5, c)
    real = torch.arange(5)[None, :] < torch.tensor(lengths)[:, None]  # (B, S)
    x[~real] = 1e6  # padding content must not matter
    packing = Packing.of(real[:, None, None, :], 3, 5)
    with torch.set_grad_enabled(training):
        got = packing.unpack(block(packing.pack(x), packing=packing).hidden)
    assert got.shape == (3, 5, c) and not got[~real].any()
    for b, n in enumerate(lengths):
        ref = ref_post_norm_block(block, x[b: b + 1, :n])[0]
        torch.testing.assert_close(got[b, :n].double(), ref, rtol=0, atol=2e-5)
    if training:  # gradients flow through the packed path to every weight
        got.sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in block.parameters())


def test_packing_is_refused_by_cross_attention():
    mha = MultiHeadAttention(8, 2, cross=True)
    with pytest.raises(ConfigError, match="self-attention"):
        mha(torch.randn(3, 8), torch.randn(1, 3, 8), packing=Packing.of(None, 1, 3))


# -- the band block masks (flex) --------------------------------------------------------------
@pytest.mark.parametrize("t,s,window,causal,extra", [(300, 300, 40, True, 0),
                                                     (130, 270, 100, True, 7),
                                                     (200, 200, 150, False, 130)])
def test_band_block_mask_tiles_equal_brute_force(t, s, window, causal, extra):
    """Tiles listed as full are entirely allowed, partial ones partly, and together they are
    exactly the tiles with an allowed (query, key) pair; mask_mod equals the loop predicate."""
    qi, kj = torch.arange(t)[:, None], torch.arange(s + extra)[None, :]
    rel = qi + s - t - kj
    allowed = ((rel.abs() <= window) & ((rel >= 0) | (not causal)) & (kj < s)) | (kj >= s)
    block = band_block_mask(t, s, window, causal, extra)
    assert torch.equal(block.mask_mod(0, 0, qi, kj), allowed)
    n = flex.BLOCK
    n_q, n_kv = -(-t // n), -(-(s + extra) // n)
    for r in range(n_q):
        part = set(block.kv_indices[0, 0, r, :block.kv_num_blocks[0, 0, r]].tolist())
        full = set(block.full_kv_indices[0, 0, r, :block.full_kv_num_blocks[0, 0, r]].tolist())
        tiles = [allowed[r * n:(r + 1) * n, c * n:(c + 1) * n] for c in range(n_kv)]
        assert not part & full
        assert part | full == {c for c in range(n_kv) if tiles[c].any()}
        assert all(tiles[c].all() and tiles[c].shape == (n, n) for c in full)


# -- the one flex policy ----------------------------------------------------------------------
def test_one_flex_policy_and_budget_for_the_core_and_transformer_xl(monkeypatch):
    """Both callers decide through flex.use_flex with one compile budget: once the band
    attention of the core has taken the budget (1 here), Transformer-XL stays on its
    materialised-bias path (and equals the float64 explicit path), and "flex" insists."""
    calls = []

    def fake_flex(q, k, v, window, causal=False, scale=None, score_mod=None, extra=0):
        calls.append((window, causal, score_mod is None, extra))
        return torch.zeros_like(q)

    monkeypatch.setattr(flex, "_compiled", set())
    monkeypatch.setattr(flex, "MAX_COMPILES", 1)
    monkeypatch.setattr(flex, "MIN_SCORES", 16)
    monkeypatch.setattr(flex, "flex_band_attention", fake_flex)
    q = torch.randn(1, 2, 8, 4)
    with torch.no_grad():
        attention(q, q, q, window=3)  # admitted: the budget is now spent
        attention(q, q, q, window=2)  # same compile key (the window is a tensor): admitted
        attention(q, q, q, window=2, path="fused")  # never flex
        xl = RelativeMultiHeadAttention(8, 2).eval()
        x, table = torch.randn(1, 8, 8), relative_table(8, 8)
        got = xl(x, None, table).out  # a new compile key: over budget, so the bias path
        xl.path = "explicit"
        ref = xl.double()(x.double(), None, table.double()).out
    assert calls == [(3, False, True, 0), (2, False, True, 0)]
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)
    with torch.no_grad():
        xl.float().path = "flex"
        xl(x, None, table)  # "flex" insists, whatever the budget
    assert calls[-1][1:] == (True, False, 0)
    with pytest.raises(ConfigError, match="'flex' is not possible: the attention weights"):
        xl(x, None, table, need_weights=True)
    big = torch.randn(1, 1, 8, 4, dtype=F64)
    assert not use_flex("auto", big, 8, {}, ("band",))  # no float64 kernel on CPU
    with pytest.raises(ConfigError, match="takes no torch.float64"):
        use_flex("flex", big, 8, {}, ("band",))
