"""Optimiser parameter groups and learning-rate schedules against explicit formulas."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from attnkit.errors import ConfigError
from attnkit.train.optim import OptimConfig, build_optimizer, build_scheduler, noam_lr


def _lrs(cfg: OptimConfig, total: int, steps: int) -> list[float]:
    """The learning rate each optimiser step 1..steps actually runs with."""
    p = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=cfg.lr)
    sched = build_scheduler(opt, cfg, total)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_noam_lr_explicit_numbers():
    # d = 512, warmup = 4000 (the paper's base model): peak 1/sqrt(512 * 4000) at step 4000
    assert noam_lr(4000, 512, 4000) == pytest.approx(6.987712429686844e-4, rel=1e-12)
    assert noam_lr(1, 512, 4000) == pytest.approx(1 / math.sqrt(512) / 4000**1.5, rel=1e-12)
    assert noam_lr(16000, 512, 4000) == pytest.approx(1 / math.sqrt(512 * 16000), rel=1e-12)
    assert noam_lr(100, 512, 4000, factor=2.0) == pytest.approx(2 * 100 / math.sqrt(512)
                                                               / 4000**1.5, rel=1e-12)


def test_inverse_sqrt_equals_the_paper_with_lr_as_peak():
    d, w = 512, 4000
    peak = noam_lr(w, d, w)
    cfg = OptimConfig(lr=peak, warmup_steps=w, schedule="inverse_sqrt")
    lrs = _lrs(cfg, total=10**6, steps=5)  # the first steps through the real LambdaLR
    for s, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(noam_lr(s, d, w), rel=1e-12)
    p = nn.Parameter(torch.zeros(1))
    sched = build_scheduler(torch.optim.SGD([p], lr=peak), cfg, 10**6)
    for s in (10, 100, 3999, 4000, 4001, 10000, 123457, 10**6):
        assert peak * sched.lr_lambdas[0](s - 1) == pytest.approx(noam_lr(s, d, w), rel=1e-12)


def test_cosine_and_linear_endpoints():
    cfg = OptimConfig(lr=0.5, warmup_steps=4, schedule="cosine", min_lr_ratio=0.1)
    lrs = _lrs(cfg, total=14, steps=14)
    assert lrs[0] == pytest.approx(0.5 * 1 / 4)  # warm-up: step 1 of 4
    assert lrs[3] == pytest.approx(0.5)  # peak at the end of warm-up
    assert lrs[8] == pytest.approx(0.5 * (0.1 + 0.9 * 0.5))  # halfway: cos(pi/2) = 0
    assert lrs[13] == pytest.approx(0.05)  # floor at the last step
    lin = _lrs(OptimConfig(lr=1.0, warmup_steps=0, schedule="linear"), total=11, steps=11)
    assert lin[0] == pytest.approx(1.0) and lin[5] == pytest.approx(0.5)
    assert lin[10] == pytest.approx(0.0)
    const = _lrs(OptimConfig(lr=0.3, warmup_steps=2, schedule="constant"), total=5, steps=5)
    assert const == pytest.approx([0.15, 0.3, 0.3, 0.3, 0.3])


class HomeNorm(nn.Module):  # a norm attnkit might write itself (RMSNorm-like)
    def __init__(self, n: int):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(n))


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(5, 4)
        self.pos_emb = nn.Parameter(torch.randn(3, 4))  # learned positions
        self.lin = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.home = HomeNorm(4)
        self.head = nn.Linear(4, 5, bias=False)
        self.head.weight = self.emb.weight  # tied to the embedding


def test_no_weight_decay_on_biases_norms_embeddings():
    torch.manual_seed(0)
    net = Net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    cfg = OptimConfig(name="adamw", lr=0.1, weight_decay=0.5, warmup_steps=0,
                      schedule="constant")
    opt = build_optimizer(net, cfg)
    decayed = [p for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]]
    assert len(decayed) == 1 and decayed[0] is net.lin.weight
    for p in net.parameters():
        p.grad = torch.zeros_like(p)  # zero gradient: Adam moves nothing, decay shrinks
    opt.step()
    after = net.state_dict()
    for key in before:
        if key == "lin.weight":
            torch.testing.assert_close(after[key], before[key] * (1 - 0.1 * 0.5))
        else:
            assert torch.equal(after[key], before[key]), key


def test_fused_on_cpu_and_paper_defaults():
    opt = build_optimizer(nn.Linear(3, 3), OptimConfig())
    assert isinstance(opt, torch.optim.Adam) and opt.defaults["fused"] is True
    assert opt.defaults["betas"] == (0.9, 0.98) and opt.defaults["eps"] == 1e-9


def test_config_errors():
    with pytest.raises(ConfigError, match="did you mean 'adamw'"):
        OptimConfig(name="adamww")
    with pytest.raises(ConfigError, match="lr"):
        OptimConfig(lr=0.0)
    with pytest.raises(ConfigError, match="schedule"):
        OptimConfig(schedule="cosin")
