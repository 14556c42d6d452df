"""Label-smoothed NLL against an explicit float64 computation of -sum_v q(v) log p(v) with
q = (1 - eps) one_hot(y) + eps / V (Szegedy et al. 2016; Vaswani et al. 2017, section 5.4)."""

from __future__ import annotations

import math

import pytest
import torch

from attnkit.losses import label_smoothed_nll


def reference(logits, target, eps, ignore_index):
    """Summed smoothed cross-entropy over non-ignored positions, with Python loops."""
    v = logits.size(-1)
    flat, ys = logits.reshape(-1, v).tolist(), target.reshape(-1).tolist()
    total, count = 0.0, 0
    for row, y in zip(flat, ys, strict=True):
        if y == ignore_index:
            continue
        count += 1
        top = max(row)
        log_z = top + math.log(sum(math.exp(x - top) for x in row))
        for j, x in enumerate(row):
            q = (1 - eps) * (j == y) + eps / v
            total -= q * (x - log_z)
    return total, count


def _data(shape=(3, 5), v=7, seed=0):
    torch.manual_seed(seed)
    logits = torch.randn(*shape, v, dtype=torch.float64) * 3
    target = torch.randint(1, v, shape)
    if target.dim() == 2:
        target[0, -2:] = 0   # padding
        target[2, 1] = 0
    return logits, target


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
def test_label_smoothed_nll_matches_reference(eps):
    logits, target = _data()
    loss, n = label_smoothed_nll(logits, target, epsilon=eps)
    ref, ref_n = reference(logits, target, eps, ignore_index=0)
    assert n == ref_n == 12
    assert loss.dim() == 0
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_no_smoothing_is_plain_nll():
    logits, target = _data()
    loss, _ = label_smoothed_nll(logits, target, epsilon=0.0)
    logp = torch.log_softmax(logits, -1)
    keep = target != 0
    nll = -logp.gather(-1, target[..., None])[..., 0][keep].sum()
    assert loss.item() == pytest.approx(nll.item(), rel=1e-5)


def test_ignore_index_other_than_zero_and_1d_input():
    logits, target = _data(shape=(11,), seed=1)
    target[3] = target[7] = 5
    loss, n = label_smoothed_nll(logits, target, epsilon=0.2, ignore_index=5)
    ref, ref_n = reference(logits, target, 0.2, ignore_index=5)
    assert n == ref_n == 11 - 2
    assert loss.item() == pytest.approx(ref, rel=1e-5)


def test_pad_positions_do_not_contribute():
    logits, target = _data()
    loss, _ = label_smoothed_nll(logits, target)
    changed = logits.clone()
    changed[target == 0] = torch.randn_like(changed[target == 0]) * 100
    assert label_smoothed_nll(changed, target)[0].item() == pytest.approx(loss.item(), rel=1e-6)


def test_uniform_logits_give_log_v():
    v = 9
    logits = torch.zeros(2, 4, v)
    target = torch.randint(1, v, (2, 4))
    loss, n = label_smoothed_nll(logits, target, epsilon=0.1)
    assert n == 8
    assert loss.item() == pytest.approx(8 * math.log(v), rel=1e-6)
