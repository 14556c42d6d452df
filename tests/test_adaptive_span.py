"""Adaptive attention span: the soft mask, renormalisation as in the paper, gradients to the
spans, trimming of the memory, the penalty and bad settings."""

from __future__ import annotations

import pytest
import torch

from attnkit.errors import ConfigError
from attnkit.models.transformer_xl import TransformerXL, TransformerXLConfig
from attnkit.nn.attention.adaptive_span import AdaptiveSpan, attention_flops, span_penalty
from attnkit.nn.attention.relative import RelativeMultiHeadAttention, distances, relative_table


def test_soft_mask_is_the_clamped_ramp():
    span = AdaptiveSpan(2, max_span=10, ramp=4)
    with torch.no_grad():
        span.frac.copy_(torch.tensor([0.3, 1.0]))  # z = 3 and 10
    x = torch.arange(-1, 13)[None, :]  # distances as a (1, 14) grid
    m = span.soft_mask(x)[:, 0].double()
    for h, z in enumerate((3.0, 10.0)):
        for col, d in enumerate(x[0].tolist()):
            expect = 0.0 if d < 0 or d >= 10 else min(1.0, max(0.0, (4 + z - d) / 4))
            assert m[h, col].item() == pytest.approx(expect, abs=1e-7)
    assert span.window() == 10  # head 1 reaches the maximum
    with torch.no_grad():
        span.frac.copy_(torch.tensor([0.1, 0.2]))  # z = 1, 2 -> m > 0 up to distance 5
    assert span.window() == 6


def _pair(seed: int = 0):
    """The same relative attention with and without an adaptive span (float64)."""
    torch.manual_seed(seed)
    span = AdaptiveSpan(2, max_span=9, ramp=3)
    with torch.no_grad():
        span.frac.copy_(torch.tensor([0.25, 0.5]))
    with_span = RelativeMultiHeadAttention(8, 2, span=span, path="explicit").double().eval()
    plain = RelativeMultiHeadAttention(8, 2, path="explicit").double().eval()
    plain.load_state_dict({k: v for k, v in with_span.state_dict().items()
                           if not k.startswith("span.")})
    return with_span, plain


def test_span_weights_are_the_papers_masked_and_renormalised_softmax():
    with_span, plain = _pair()
    x, mem = torch.randn(2, 4, 8, dtype=torch.float64), torch.randn(2, 9, 8, dtype=torch.float64)
    keep = with_span.memory_needed(9)
    assert keep == with_span.span.window() - 1 < 9  # trimmed
    table = relative_table(4 + 9, 8).double()
    got = with_span(x, mem, table, need_weights=True)
    ref = plain(x, mem[:, 9 - keep:], table, need_weights=True)
    m = with_span.span.soft_mask(distances(4, 4 + keep)).double()  # (H, T, S)
    weights = ref.weights * m
    weights = weights / weights.sum(-1, keepdim=True)  # Sukhbaatar et al. 2019, eq. 2
    torch.testing.assert_close(got.weights, weights, rtol=0, atol=1e-12)
    ctx = (weights @ plain.kv_proj(torch.cat([mem[:, 9 - keep:], x], 1)).view(
        2, -1, 2, 2, 4)[:, :, 1].transpose(1, 2))  # weights @ values, (B, H, T, D)
    out = plain.out_proj(ctx.transpose(1, 2).reshape(2, 4, 8))
    torch.testing.assert_close(got.out, out, rtol=0, atol=1e-12)


def test_gradient_to_the_spans_matches_finite_differences():
    with_span, _ = _pair(1)
    x, mem = torch.randn(1, 3, 8, dtype=torch.float64), torch.randn(1, 9, 8, dtype=torch.float64)
    table = relative_table(12, 8).double()

    def loss(frac):
        with torch.no_grad():
            with_span.span.frac.copy_(frac)
        return with_span(x, mem, table).out.square().sum()

    frac = torch.tensor([0.25, 0.5], dtype=torch.float64)
    with_span.span.frac.data = with_span.span.frac.data.double()
    loss(frac).backward()
    grad = with_span.span.frac.grad.clone()
    assert grad.abs().min() > 0 and torch.isfinite(grad).all()
    eps = 1e-6
    for h in range(2):
        step = torch.zeros(2, dtype=torch.float64)
        step[h] = eps
        with torch.no_grad():
            numeric = (loss(frac + step) - loss(frac - step)) / (2 * eps)
        assert grad[h].item() == pytest.approx(numeric.item(), rel=1e-5)


def test_trimming_shrinks_the_keys_and_the_flops():
    cfg = TransformerXLConfig(vocab_size=7, d_model=16, n_heads=2, n_layers=3, d_ff=16,
                              mem_len=40, adaptive_span=True, span_ramp=4, dropout=0.0)
    model = TransformerXL(cfg)
    assert model.attention_keys(8) == [8 + 3] * 3  # z = 0: distances < 4, memory 3
    with torch.no_grad():
        model.layers[1].attn.span.frac.fill_(0.5)  # z = 20 -> window 24
        model.layers[2].attn.span.frac.fill_(1.0)  # z = 40 -> all the memory
    keys = model.attention_keys(8)
    assert keys == [11, 8 + 23, 8 + 39]
    saved = 1 - attention_flops(8, keys, 16) / attention_flops(8, [48] * 3, 16)
    assert saved == pytest.approx(1 - sum(keys) / 144)
    out = model(torch.zeros(2, 8, dtype=torch.long))
    out = model(torch.zeros(2, 8, dtype=torch.long), out.mems, output_attentions=True)
    assert [w.size(-1) for w in out.attentions] == [8 + 3, 16, 16]  # memory holds 8 so far


def test_spans_are_clamped_and_penalised():
    span = AdaptiveSpan(3, max_span=100, ramp=8, init=0.5)
    with torch.no_grad():
        span.frac.copy_(torch.tensor([-0.2, 0.4, 1.7]))
    assert span.spans().tolist() == pytest.approx([0.0, 40.0, 100.0])
    span.clamp_()
    assert span.frac.tolist() == pytest.approx([0.0, 0.4, 1.0])
    other = torch.tensor([10.0, 20.0])
    assert span_penalty([span.spans(), other], 0.01).item() == pytest.approx(
        0.01 * (140 / 3 + 15))
    assert span_penalty([], 0.5).item() == 0.0


@pytest.mark.parametrize("kw,match", [
    (dict(max_span=200, mem_len=64), "exceeds mem_len"),
    (dict(span_ramp=0), "span_ramp"),
    (dict(span_init=1.5), "span_init"),
    (dict(max_span=-4), "max_span must be >= 0"),
    (dict(mem_len=0), "mem_len or model.max_span"),
])
def test_impossible_span_settings_are_one_line_errors(kw, match):
    with pytest.raises(ConfigError, match=match) as err:
        TransformerXLConfig(**{"vocab_size": 5, "adaptive_span": True, "mem_len": 64, **kw})
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError):
        AdaptiveSpan(2, max_span=0)
