"""Local attention (Luong et al. 2015 section 3.2; sliding windows) against explicit masks and
float64 loops, and hard attention (Xu et al. 2015): REINFORCE is unbiased on a toy problem with a
known gradient, Gumbel straight-through samples the right distribution, bad configs fail."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.errors import ConfigError
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.flex import band_mask, band_mask_mod
from attnkit.nn.attention.hard import HardAttention
from attnkit.nn.attention.local import LocalAttention
from attnkit.nn.attention.multihead import MultiHeadAttention
from attnkit.nn.cache import KVCache

F64 = torch.float64


# -- band masks -------------------------------------------------------------------------------
@pytest.mark.parametrize("t,s,w,causal", [(5, 5, 1, False), (5, 5, 2, True), (3, 7, 2, False),
                                          (3, 7, 1, True), (6, 6, 9, False)])
def test_band_mask_equals_loop_and_mask_mod(t, s, w, causal):
    got = band_mask(t, s, w, causal)
    for i in range(t):
        pos = i + s - t
        for j in range(s):
            assert bool(got[i, j]) == (abs(pos - j) <= w and (j <= pos or not causal)), (i, j)
    qi, kj = torch.arange(t)[:, None], torch.arange(s)[None, :]
    assert torch.equal(band_mask_mod(w, causal, s - t)(0, 0, qi, kj), got)


def _ref_attention(q, k, v, allowed):
    """float64 softmax over the allowed keys, one query row at a time."""
    out = torch.zeros(*q.shape[:-1], v.size(-1), dtype=F64)
    for idx in torch.cartesian_prod(*(torch.arange(n) for n in q.shape[:-1])):
        idx = tuple(idx.tolist())
        keys = [j for j in range(k.size(-2)) if allowed[idx[-1], j]]
        sc = [float(q[idx] @ k[idx[:-1]][j]) / math.sqrt(q.size(-1)) for j in keys]
        z = [math.exp(x - max(sc)) for x in sc]
        out[idx] = sum(zi / sum(z) * v[idx[:-1]][j] for zi, j in zip(z, keys, strict=True))
    return out


@pytest.mark.parametrize("t,s,causal", [(6, 6, False), (6, 6, True), (2, 6, True)])
def test_core_window_paths_equal_loop_reference(t, s, causal):
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 2, n, 4, dtype=F64) for n in (t, s, s))
    ref = _ref_attention(q, k, v, band_mask(t, s, 2, causal))
    fused = attention(q, k, v, window=2, causal=causal)
    explicit = attention(q, k, v, window=2, causal=causal, need_weights=True)
    torch.testing.assert_close(fused.out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(explicit.out, ref, rtol=1e-10, atol=1e-10)
    assert (explicit.weights[..., ~band_mask(t, s, 2, causal)] == 0).all()


def test_sliding_window_attention_equals_mha_with_band_mask_and_caches():
    torch.manual_seed(0)
    local = MultiHeadAttention(16, 4, window=2).double().eval()
    full = MultiHeadAttention(16, 4).double().eval()
    full.load_state_dict(local.state_dict())
    x = torch.randn(2, 7, 16, dtype=F64)
    got = local(x, need_weights=True, causal=True)
    ref = full(x, mask=band_mask(7, 7, 2, causal=True), need_weights=True)
    torch.testing.assert_close(got.out, ref.out)
    torch.testing.assert_close(got.weights, ref.weights)
    cache = KVCache(batch=2, heads=4, max_len=7, head_dim=4, dtype=F64)
    steps = [local(x[:, i:i + 1], cache=cache).out for i in range(7)]  # one token at a time
    torch.testing.assert_close(torch.cat(steps, dim=1), got.out)


def test_window_errors_are_one_line():
    q = torch.randn(1, 1, 4, 2)
    for bad in (0, -3):
        with pytest.raises(ConfigError, match="positive"):
            attention(q, q, q, window=bad)
        with pytest.raises(ConfigError, match="positive"):
            MultiHeadAttention(8, 2, window=bad)
    with pytest.raises(ConfigError, match="covers the whole sequence") as err:
        MultiHeadAttention(8, 2, window=64, max_len=64)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="covers the whole sequence"):
        LocalAttention(4, 4, window=10, max_len=8)
    with pytest.raises(ConfigError, match="mode"):
        LocalAttention(4, 4, window=2, mode="predicted")
    with pytest.raises(ConfigError, match="unknown attention path 'fuzed'"):
        attention(q, q, q, path="fuzed")


# -- Luong local-m / local-p ------------------------------------------------------------------
def _luong_reference(module, q, k, v, lengths, p, gaussian):
    """Per (b, t): general score q^T W k_s, softmax over |s - p_t| <= D and s < S_b, times the
    Gaussian exp(-(s - p_t)^2 / (2 (D/2)^2)) for local-p; explicit loops in float64."""
    w, d = module.score.proj.weight.detach(), module.window
    b_, t_, s_ = q.size(0), q.size(1), k.size(1)
    weights = torch.zeros(b_, t_, s_, dtype=F64)
    for b in range(b_):
        for t in range(t_):
            keys = [s for s in range(s_) if abs(s - p[b, t]) <= d and s < lengths[b]]
            sc = [float(q[b, t] @ (w @ k[b, s])) for s in keys]
            z = [math.exp(x - max(sc)) for x in sc]
            for zi, s in zip(z, keys, strict=True):
                g = math.exp(-(s - p[b, t]) ** 2 / (2 * (d / 2) ** 2)) if gaussian else 1.0
                weights[b, t, s] = zi / sum(z) * g
    return weights @ v, weights


@pytest.mark.parametrize("mode", ["monotonic", "predictive"])
def test_luong_local_attention_equals_loop_reference(mode):
    torch.manual_seed(0)
    module = LocalAttention(5, 6, window=2, mode=mode).double()
    q, k, v = torch.randn(2, 4, 5, dtype=F64), torch.randn(2, 7, 6, dtype=F64), \
        torch.randn(2, 7, 3, dtype=F64)
    lengths = torch.tensor([7, 5])
    mask = torch.arange(7)[None, :] < lengths[:, None]  # (B, S) padding mask
    if mode == "predictive":  # eq. 9 written out: p_t = S_b sigmoid(v_p^T tanh(W_p h_t))
        wp, vp = module.w_p.weight.detach(), module.v_p.weight[0].detach()
        p = torch.tensor([[lengths[b].item() / (1 + math.exp(-float(vp @ torch.tanh(wp @ q[b, t]))))
                           for t in range(4)] for b in range(2)], dtype=F64)
    else:
        p = torch.arange(4, dtype=F64).expand(2, 4)
    ref_out, ref_w = _luong_reference(module, q, k, v, lengths, p, mode == "predictive")
    got = module(q, k, v, mask=mask, need_weights=True)
    torch.testing.assert_close(got.weights, ref_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(got.out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(module(q, k, v, mask=mask).out, ref_out, rtol=1e-10, atol=1e-10)
    assert module(q, k, v, mask=mask).weights is None


def test_local_p_position_gets_gradient_and_local_m_steps_by_position():
    torch.manual_seed(0)
    module = LocalAttention(4, 4, window=2)
    q, k, v = torch.randn(1, 3, 4), torch.randn(1, 9, 4), torch.randn(1, 9, 2)
    module(q, k, v).out.sum().backward()
    assert module.v_p.weight.grad.abs().sum() > 0  # through the Gaussian
    mono = LocalAttention(4, 4, window=1, mode="monotonic")
    full = mono(q, k, v, need_weights=True)
    step = mono(q[:, 2:3], k, v, positions=torch.tensor([2]), need_weights=True)
    torch.testing.assert_close(step.weights, full.weights[:, 2:3])


# -- hard attention ---------------------------------------------------------------------------
def _toy(n, k_keys=5, d=3):
    torch.manual_seed(0)
    q = torch.randn(1, 1, d, dtype=F64).expand(n, 1, d)  # the same query n times
    keys = torch.randn(1, k_keys, d, dtype=F64, requires_grad=True)
    reward = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.0], dtype=F64)[:k_keys]
    return q, keys, reward


def test_reinforce_gradient_is_unbiased_on_toy_problem():
    # E_s[r_s] with s ~ softmax(q . k_j): exact d/dk_j = p_j (r_j - sum_i p_i r_i) q.
    n, batches = 2000, 40
    q, keys, reward = _toy(n)
    module = HardAttention(3, 3, score="dot").double().train()
    gen = torch.Generator().manual_seed(1)
    grads = []
    for _ in range(batches):
        keys.grad = None
        res = module(q, keys.expand(n, -1, -1), reward[None, :, None].expand(n, -1, 1),
                     generator=gen)
        module.reinforce_loss(res.out.reshape(n), res.log_prob).backward()
        grads.append(-keys.grad[0].clone())  # gradient ascent direction of E[reward]
    grads = torch.stack(grads)  # (batches, K, D): each an average over n samples
    p = torch.softmax(q[0, 0] @ keys[0].detach().T, dim=-1)
    exact = (p * (reward - (p * reward).sum()))[:, None] * q[0, 0][None, :]
    mean, sem = grads.mean(0), grads.std(0) / math.sqrt(batches)
    assert exact.abs().max() > 10 * sem.max()  # the test can tell a wrong gradient apart
    assert ((mean - exact).abs() <= 4.5 * sem + 1e-12).all(), (mean, exact, sem)


@pytest.mark.parametrize("mode", ["reinforce", "gumbel"])
def test_hard_attention_samples_the_softmax_and_outputs_chosen_value(mode):
    n = 20000
    q, keys, _ = _toy(n)
    module = HardAttention(3, 3, score="dot", mode=mode, tau=0.5).double().train()
    v = torch.randn(n, 5, 2, dtype=F64)
    mask = torch.tensor([True, True, True, True, False])[None, None, :]  # key 4 never
    res = module(q, keys.expand(n, -1, -1), v, mask=mask, need_weights=True,
                 generator=torch.Generator().manual_seed(2))
    idx = res.index[:, 0]
    torch.testing.assert_close(res.out[:, 0], v[torch.arange(n), idx])
    p = res.weights[0, 0].detach()
    freq = torch.bincount(idx, minlength=5).to(F64) / n
    assert freq[4] == 0 and p[4] == 0
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-12).all(), (freq, p)
    if mode == "gumbel":  # straight-through: the soft relaxation passes a gradient
        res.out.sum().backward()
        assert keys.grad.abs().sum() > 0


def test_hard_attention_eval_is_argmax_and_fused_path_is_refused():
    q, keys, _ = _toy(4)
    module = HardAttention(3, 3, score="dot").double().eval()
    res = module(q, keys.expand(4, -1, -1), torch.eye(5, dtype=F64).expand(4, 5, 5),
                 need_weights=True)
    assert (res.index == res.weights.argmax(-1)).all()
    for path in ("fused", "flex"):
        with pytest.raises(ConfigError, match="cannot use the") as err:
            HardAttention(3, 3, path=path)
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="post_fn"):
        attention(q, q, q, post_fn=lambda w: w, path="fused")
