"""Adaptive computation time (Graves 2016) against hand computations of the halting rule."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from attnkit.data.algorithmic import batch_generator, parity_examples
from attnkit.errors import ConfigError
from attnkit.nn.act import ACTBlock, ACTCell, halting_distribution, ponder, ponder_loss


def hand_halting(h: list[float], eps: float, max_steps: int) -> tuple[list[float], int, float]:
    """The paper's N(t), R(t) and p^n, written out with plain floats."""
    total, probs = 0.0, []
    for n, value in enumerate(h[:max_steps], start=1):
        if total + value >= 1 - eps or n == max_steps:
            remainder = 1 - total
            probs.append(remainder)
            return probs + [0.0] * (len(h) - n), n, remainder
        probs.append(value)
        total += value
    raise AssertionError("max_steps must cut the sequence")


CASES = [
    [0.3, 0.5, 0.3, 0.1, 0.2],     # halts at n = 3 (0.3 + 0.5 + 0.3 >= 0.99), R = 0.2
    [0.995, 0.1, 0.1, 0.1, 0.1],   # halts at once: N = 1, R = 1
    [0.1, 0.1, 0.1, 0.1, 0.1],     # never reaches 1 - eps: cut at max_steps
    [0.5, 0.49, 0.4, 0.1, 0.1],    # exactly 1 - eps at n = 2 counts as halting
    [0.2, 0.2, 0.2, 0.2, 0.19],    # sum 0.99 at n = 5
]


@pytest.mark.parametrize("max_steps", [5, 3, 1])
def test_halting_distribution_matches_hand_computation(max_steps: int) -> None:
    h = torch.tensor(CASES, dtype=torch.float64)
    probs, steps, remainder = halting_distribution(h, eps=0.01, max_steps=max_steps)
    for row, values in enumerate(CASES):
        p, n, r = hand_halting(values, 0.01, max_steps)
        assert steps[row].item() == n
        assert remainder[row].item() == pytest.approx(r, abs=1e-12)
        assert probs[row].tolist() == pytest.approx(p[: probs.size(1)], abs=1e-12)
        assert probs[row].sum().item() == pytest.approx(1.0, abs=1e-12)
    assert steps.max().item() <= max_steps


def test_ponder_cost_gradient_flows_through_the_remainder_only() -> None:
    # rho = N + R, R = 1 - sum_{n<N} h^n: d rho / d h^n = -1 for n < N, 0 from N on
    h = torch.tensor([[0.3, 0.5, 0.3, 0.1]], dtype=torch.float64, requires_grad=True)
    seq = iter(h.unbind(-1))
    out = ponder(lambda s, n: (s, None, next(seq)), torch.zeros(1, dtype=torch.float64), 0.01, 4)
    out.cost.sum().backward()
    assert out.cost.item() == pytest.approx(3 + 0.2)
    assert h.grad.tolist() == [[-1.0, -1.0, 0.0, 0.0]]


def test_ponder_loss_scales_and_masks() -> None:
    cost = torch.tensor([[2.5, 1.0], [3.0, 4.0]])
    assert ponder_loss(cost, 0.1).item() == pytest.approx(1.05)
    mask = torch.tensor([[True, False], [True, True]])
    assert ponder_loss(cost, 0.1, mask).item() == pytest.approx(0.95)


def test_act_cell_is_the_mean_field_of_the_ponder_steps() -> None:
    torch.manual_seed(0)
    cell = ACTCell(nn.RNNCell(3 + 1, 5), eps=0.01, max_steps=6, halt_bias=-1.0).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    out = cell.step(x, torch.zeros(4, 5, dtype=torch.float64))
    w_ih, w_hh = cell.cell.weight_ih, cell.cell.weight_hh
    b = cell.cell.bias_ih + cell.cell.bias_hh
    w_h, b_h = cell.halt.proj.weight[0], cell.halt.proj.bias[0]
    for row in range(4):
        s, states, hs = torch.zeros(5, dtype=torch.float64), [], []
        for n in range(1, 7):
            inp = torch.cat([x[row], torch.tensor([1.0 if n == 1 else 0.0],
                                                  dtype=torch.float64)])
            s = torch.tanh(w_ih @ inp + w_hh @ s + b)
            states.append(s)
            hs.append(torch.sigmoid(w_h @ s + b_h).item())
        p, n_steps, r = hand_halting(hs, 0.01, 6)
        mean = sum(pi * si for pi, si in zip(p, states, strict=True))
        torch.testing.assert_close(out.state[row], mean.detach(), rtol=1e-10, atol=1e-12)
        assert out.steps[row].item() == n_steps
        assert out.remainder[row].item() == pytest.approx(r, abs=1e-10)
        assert out.cost[row].item() == pytest.approx(n_steps + r, abs=1e-10)


def test_act_cell_over_a_sequence_with_lstm_and_gru() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    for cell in (nn.LSTMCell(4, 6), nn.GRUCell(4, 6)):
        act = ACTCell(cell, max_steps=4)
        out = act(x)
        assert out.hidden.shape == (2, 5, 6)
        assert out.steps.shape == out.remainder.shape == out.cost.shape == (2, 5)
        assert ((out.steps >= 1) & (out.steps <= 4)).all()
        assert not out.steps.requires_grad
        # the mean-field state carries over: the second half continues the first
        first = act(x[:, :2])
        rest = act(x[:, 2:], first.state)
        torch.testing.assert_close(rest.hidden, out.hidden[:, 2:])


def test_act_block_halts_per_position() -> None:
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(8, 8), nn.Tanh())
    act = ACTBlock(block, 8, max_steps=5, halt_bias=0.0)
    nn.init.normal_(act.halt.proj.weight, std=2.0)  # spread halting values over (0, 1)
    x = torch.randn(2, 7, 8)
    out = act(x)
    assert out.hidden.shape == (2, 7, 8)
    assert out.steps.shape == (2, 7)
    assert len(set(out.steps.flatten().tolist())) > 1  # positions ponder for different times
    # reference: the mean field over steps of the position-wise block, by hand
    s, states, hs = x, [], []
    for n in range(5):
        s = block(s + act.step_embedding.weight[n])
        states.append(s)
        hs.append(act.halt(s))
    probs, steps, _ = halting_distribution(torch.stack(hs, -1), 0.01, 5)
    mean = sum(probs[..., n, None] * states[n] for n in range(5))
    torch.testing.assert_close(out.hidden, mean)
    torch.testing.assert_close(out.steps, steps)


def test_act_block_around_an_encoder_block() -> None:
    from attnkit.nn.attention.multihead import MultiHeadAttention
    from attnkit.nn.blocks import EncoderBlock
    from attnkit.nn.ffn import FeedForward

    torch.manual_seed(0)
    block = EncoderBlock(MultiHeadAttention(16, 2), FeedForward(16, 32), 16, 0.0)
    act = ACTBlock(block, 16, max_steps=3)
    out = act(torch.randn(2, 5, 16), mask=torch.ones(2, 1, 1, 5, dtype=torch.bool))
    assert out.hidden.shape == (2, 5, 16)
    (out.hidden.sum() + out.cost.sum()).backward()
    assert act.halt.proj.weight.grad is not None


def test_bad_settings_raise_config_errors() -> None:
    with pytest.raises(ConfigError):
        ACTCell(nn.RNNCell(2, 3), eps=1.0)
    with pytest.raises(ConfigError):
        ACTBlock(nn.Identity(), 4, max_steps=0)


def test_parity_examples_by_brute_force() -> None:
    batch = parity_examples(batch_generator(3, 0), 200, 16)
    x = batch.inputs
    assert set(x.unique().tolist()) <= {-1.0, 0.0, 1.0}
    nonzero = (x != 0).sum(1)
    assert nonzero.min() >= 1 and nonzero.max() <= 16
    for row in range(200):
        ones = sum(1 for v in x[row].tolist() if v == 1.0)
        assert batch.targets[row].item() == ones % 2


def test_parity_training_runs_and_ponders() -> None:
    """A short training on parity vectors of 3 entries: the loss falls, ponder time counts."""
    from attnkit.models.act import ParityACT, ParityModelConfig
    from attnkit.recipes.act import loss_fn

    torch.manual_seed(0)
    model = ParityACT(ParityModelConfig(size=3, hidden_size=32, max_steps=10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    compute = loss_fn(tau=1e-3)
    losses = []
    for step in range(150):
        batch = parity_examples(batch_generator(0, step), 64, 3)
        loss, n = compute(model, batch)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item() / n)
    assert sum(losses[-20:]) / 20 < sum(losses[:20]) / 20 - 0.2  # about 0.65 -> 0.3
    _, cost, steps = model(parity_examples(batch_generator(1, 0), 64, 3).inputs)
    assert ((steps >= 1) & (steps <= 10)).all() and (cost >= steps).all()


def test_act_parity_recipe_end_to_end(tmp_path: Path) -> None:
    from attnkit.recipes import RECIPES, resolve_config
    from attnkit.recipes.act import evaluate, main

    recipe = RECIPES["act-parity"]
    cfg = resolve_config(recipe, overrides=[
        "hidden_size=16", "max_steps=5", "data.size=8", "data.eval_size=64", "batch_size=16",
        "train.steps=6", "train.eval_every=3", "train.save_every=3", "train.threads=1",
        f"run_dir={tmp_path / 'run'}"])
    results = main(cfg)
    assert set(results["held_out"]) >= {"accuracy", "ponder_steps", "sequence_error_rate"}
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert evaluate(tmp_path / "run", cfg) == saved
    with pytest.raises(ConfigError, match="best_metric"):
        resolve_config(recipe, overrides=["train.best_metric=bleu"])
