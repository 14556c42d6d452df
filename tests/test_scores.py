"""Score functions (Luong et al. 2015, eq. 8-9; Bahdanau et al. 2015; Graves et al. 2014;
Vaswani et al. 2017) against independent float64 computations written with explicit loops, and
their use in the attention core (fused and explicit paths equal)."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.errors import ConfigError
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.scores import SCORES, build_score

F64 = torch.float64
B, T, S, DQ, DK = 2, 3, 4, 5, 5


def _loop(fn, q, k):
    """(B, T, S) tensor of fn(q[b, t], k[b, s]) computed one pair at a time."""
    out = torch.zeros(q.size(0), q.size(1), k.size(1), dtype=F64)
    for b in range(q.size(0)):
        for t in range(q.size(1)):
            for s in range(k.size(1)):
                out[b, t, s] = fn(q[b, t], k[b, s], s)
    return out


def _dot(x, y):
    return sum(x[i].item() * y[i].item() for i in range(len(x)))


def _inputs(dq=DQ, dk=DK):
    torch.manual_seed(0)
    return torch.randn(B, T, dq, dtype=F64), torch.randn(B, S, dk, dtype=F64)


def _reference(name, module, q, k):
    """The paper's formula for ``name`` with the module's parameters, pair by pair."""
    if name == "dot":
        return _loop(lambda x, y, s: _dot(x, y), q, k)
    if name == "scaled_dot":
        return _loop(lambda x, y, s: _dot(x, y) / math.sqrt(k.size(-1)), q, k)
    if name == "general":
        w = module.proj.weight  # (Dq, Dk): q^T W k
        return _loop(lambda x, y, s: _dot(x, torch.mv(w, y)), q, k)
    if name in ("additive", "concat"):
        wq, wk, v = module.w_q.weight, module.w_k.weight, module.v.weight[0]
        return _loop(lambda x, y, s: _dot(v, torch.tanh(torch.mv(wq, x) + torch.mv(wk, y))),
                     q, k)
    if name == "location":
        wa = module.proj.weight  # (max_len, Dq)
        return _loop(lambda x, y, s: _dot(wa[s], x), q, k)
    if name == "cosine":
        beta = module.beta
        return _loop(lambda x, y, s: beta * _dot(x, y) / math.sqrt(_dot(x, x) * _dot(y, y)),
                     q, k)
    raise AssertionError(name)


OPTIONS = {"location": {"max_len": 7}, "cosine": {"beta": 2.5}}


@pytest.mark.parametrize("name", sorted(SCORES))
def test_score_equals_float64_formula(name):
    q, k = _inputs(dk=DK if name in ("dot", "scaled_dot", "cosine") else 6)
    torch.manual_seed(1)
    module = build_score(name, q.size(-1), k.size(-1), **OPTIONS.get(name, {})).double()
    got = module(q, k)
    assert got.shape == (B, T, S)
    torch.testing.assert_close(got, _reference(name, module, q, k), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_score_with_heads_equals_per_head(name):
    torch.manual_seed(2)
    q, k = torch.randn(B, 3, T, DQ, dtype=F64), torch.randn(B, 3, S, DK, dtype=F64)
    module = build_score(name, DQ, DK, **OPTIONS.get(name, {})).double()
    got = module(q, k)
    assert got.shape == (B, 3, T, S)
    for h in range(3):
        torch.testing.assert_close(got[:, h], module(q[:, h], k[:, h]), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name", sorted(SCORES))
def test_core_with_score_fn_equals_softmax_of_reference(name):
    q, k = _inputs()
    torch.manual_seed(3)
    v = torch.randn(B, S, 3, dtype=F64)
    mask = torch.tensor([[True] * S, [True] * (S - 1) + [False]])[:, None, :]  # (B, 1, S)
    module = build_score(name, DQ, DK, **OPTIONS.get(name, {})).double()
    ref = _reference(name, module, q, k).masked_fill(~mask, float("-inf"))
    ref_w = torch.softmax(ref, dim=-1)
    explicit = attention(q, k, v, mask=mask, score_fn=module, need_weights=True)
    fast = attention(q, k, v, mask=mask, score_fn=module)
    assert fast.weights is None and explicit.weights.shape == (B, T, S)
    torch.testing.assert_close(explicit.weights, ref_w, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(explicit.out, ref_w @ v, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fast.out, ref_w @ v, rtol=1e-10, atol=1e-10)


def test_dot_form_scores_run_fused_and_full_matrix_scores_refuse_fused_path():
    q, k = _inputs()
    v = torch.randn(B, S, 3, dtype=F64)
    for name in ("dot", "scaled_dot", "general", "cosine"):
        module = build_score(name, DQ, DK).double()
        assert hasattr(module, "dot_form")
        attention(q, k, v, score_fn=module, path="fused")  # allowed
    for name in ("additive", "location"):
        module = build_score(name, DQ, DK, **OPTIONS.get(name, {})).double()
        with pytest.raises(ConfigError, match="full score matrix"):
            attention(q, k, v, score_fn=module, path="fused")


def test_cosine_key_strength_per_query_and_gradients_flow():
    q, k = _inputs()
    module = build_score("cosine", DQ, DK)
    beta = torch.rand(B, T, dtype=F64) * 5
    got = module(q, k, beta=beta)
    unit = module(q, k, beta=1.0)
    torch.testing.assert_close(got, unit * beta[..., None])
    assert unit.abs().max() <= 1 + 1e-12
    qg = q.clone().requires_grad_()
    module(qg, k).sum().backward()
    assert torch.isfinite(qg.grad).all() and qg.grad.abs().sum() > 0


def test_additive_precomputed_keys_equal():
    q, k = _inputs()
    module = build_score("additive", DQ, DK, d_hidden=7, bias=True).double()
    torch.testing.assert_close(module(q, k, k_proj=module.project_keys(k)), module(q, k))
    assert module.w_q.out_features == 7


def test_bad_names_and_options_are_one_line_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'additive'") as err:
        build_score("adittive", 4, 4)
    assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="did you mean 'beta'"):
        build_score("cosine", 4, 4, beat=2.0)
    with pytest.raises(ConfigError, match="max_len"):
        build_score("location", 4, 4)
    with pytest.raises(ConfigError, match="equal query and key widths"):
        build_score("dot", 4, 5)
    loc = build_score("location", 4, 4, max_len=3)
    with pytest.raises(ConfigError, match="max_len 3"):
        loc(torch.randn(1, 2, 4), torch.randn(1, 5, 4))
    assert SCORES["concat"] is SCORES["additive"]
