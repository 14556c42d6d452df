"""Neural Turing machine: each addressing step against float64 loops over the paper's equations
(Graves et al. 2014, sec. 3), memory access, the copy task data and the ntm-copy recipe."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from attnkit.data.algorithmic import batch_generator, copy_examples
from attnkit.errors import ConfigError
from attnkit.models.ntm import (
    NTM,
    NTMConfig,
    address,
    bit_errors,
    content_weights,
    copy_loss,
    interpolate,
    read_memory,
    sharpen,
    shift,
    write_memory,
)

F64 = torch.float64


def rand(*shape: int, positive: bool = False) -> torch.Tensor:
    x = torch.randn(*shape, dtype=F64)
    return x.abs() + 0.1 if positive else x


def distribution(*shape: int) -> torch.Tensor:
    return torch.softmax(torch.randn(*shape, dtype=F64), dim=-1)


def test_content_addressing_matches_equations_5_and_6() -> None:
    torch.manual_seed(0)
    b, h, n, m = 2, 3, 7, 5
    memory, key, beta = rand(b, n, m), rand(b, h, m), rand(b, h, positive=True) * 3
    got = content_weights(memory, key, beta)
    for i in range(b):
        for j in range(h):
            k = key[i, j].tolist()
            sims = []
            for loc in range(n):
                row = memory[i, loc].tolist()
                dot = sum(a * c for a, c in zip(k, row, strict=True))
                norm = math.sqrt(sum(a * a for a in k)) * math.sqrt(sum(c * c for c in row))
                sims.append(math.exp(beta[i, j].item() * dot / norm))
            want = [s / sum(sims) for s in sims]
            assert got[i, j].tolist() == pytest.approx(want, rel=1e-10)


def test_interpolation_matches_equation_7() -> None:
    torch.manual_seed(1)
    wc, wp, g = distribution(2, 2, 6), distribution(2, 2, 6), torch.rand(2, 2, dtype=F64)
    got = interpolate(wc, wp, g)
    for i in range(2):
        for j in range(2):
            gg = g[i, j].item()
            want = [gg * a + (1 - gg) * c for a, c in zip(wc[i, j].tolist(), wp[i, j].tolist(),
                                                         strict=True)]
            assert got[i, j].tolist() == pytest.approx(want, rel=1e-12)


def hand_shift(w: list[float], s: list[float]) -> list[float]:
    """w~(i) = sum_j w(j) s(i - j), indices mod N; s lists the shifts -R..R."""
    n, r = len(w), (len(s) - 1) // 2
    out = []
    for i in range(n):
        total = 0.0
        for j in range(n):
            offset = (i - j) % n
            for k, weight in enumerate(s):
                if (k - r) % n == offset:
                    total += w[j] * weight
        out.append(total)
    return out


@pytest.mark.parametrize("radius", [1, 2])
def test_shift_is_the_circular_convolution_of_equation_8(radius: int) -> None:
    torch.manual_seed(2)
    w, s = distribution(2, 3, 8), distribution(2, 3, 2 * radius + 1)
    got = shift(w, s)
    for i in range(2):
        for j in range(3):
            assert got[i, j].tolist() == pytest.approx(hand_shift(w[i, j].tolist(),
                                                                  s[i, j].tolist()), rel=1e-12)
    torch.testing.assert_close(got.sum(-1), torch.ones(2, 3, dtype=F64))


def test_shift_wraps_around_both_ends() -> None:
    n = 5
    last, first = torch.zeros(1, 1, n, dtype=F64), torch.zeros(1, 1, n, dtype=F64)
    last[..., n - 1], first[..., 0] = 1.0, 1.0
    plus_one = torch.tensor([[[0.0, 0.0, 1.0]]], dtype=F64)  # all weight on shift +1
    minus_one = torch.tensor([[[1.0, 0.0, 0.0]]], dtype=F64)
    assert shift(last, plus_one)[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert shift(first, minus_one)[0, 0].tolist() == [0.0, 0.0, 0.0, 0.0, 1.0]
    stay = torch.tensor([[[0.0, 1.0, 0.0]]], dtype=F64)
    assert shift(last, stay)[0, 0].tolist() == last[0, 0].tolist()


def test_sharpening_matches_equation_9() -> None:
    torch.manual_seed(3)
    w, gamma = distribution(2, 2, 6), 1 + rand(2, 2, positive=True) * 4
    got = sharpen(w, gamma)
    for i in range(2):
        for j in range(2):
            powered = [v ** gamma[i, j].item() for v in w[i, j].tolist()]
            assert got[i, j].tolist() == pytest.approx([p / sum(powered) for p in powered],
                                                       rel=1e-10)
    # gamma = 1 changes nothing; a large gamma approaches the one-hot of the maximum
    torch.testing.assert_close(sharpen(w, torch.ones(2, 2, dtype=F64)), w)
    peaked = sharpen(w, torch.full((2, 2), 200.0, dtype=F64))
    torch.testing.assert_close(peaked.argmax(-1), w.argmax(-1))
    assert (peaked.max(-1).values > 0.99).all()


def test_address_composes_the_four_steps() -> None:
    torch.manual_seed(4)
    b, h, n, m = 2, 2, 9, 4
    memory, key = rand(b, n, m), rand(b, h, m)
    beta, g = rand(b, h, positive=True), torch.rand(b, h, dtype=F64)
    w_prev, s, gamma = distribution(b, h, n), distribution(b, h, 3), 1 + torch.rand(b, h,
                                                                                    dtype=F64)
    got = address(memory, w_prev, key, beta, g, s, gamma)
    want = sharpen(shift(interpolate(content_weights(memory, key, beta), w_prev, g), s), gamma)
    torch.testing.assert_close(got, want)
    inputs = (memory, w_prev, key, beta, g, s, gamma)
    assert torch.autograd.gradcheck(address, [x.clone().requires_grad_() for x in inputs])


def test_read_matches_equation_2() -> None:
    torch.manual_seed(5)
    memory, w = rand(2, 6, 4), distribution(2, 3, 6)
    got = read_memory(memory, w)
    for i in range(2):
        for j in range(3):
            want = [sum(w[i, j, loc].item() * memory[i, loc, c].item() for loc in range(6))
                    for c in range(4)]
            assert got[i, j].tolist() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("heads", [1, 2])
def test_write_erases_then_adds_as_equations_3_and_4(heads: int) -> None:
    torch.manual_seed(6)
    b, n, m = 2, 5, 3
    memory, w = rand(b, n, m), distribution(b, heads, n)
    erase, add = torch.rand(b, heads, m, dtype=F64), rand(b, heads, m)
    got = write_memory(memory, w, erase, add)
    for i in range(b):
        for loc in range(n):
            for c in range(m):
                value = memory[i, loc, c].item()
                for h in range(heads):  # erases multiply (sec. 3.2)
                    value *= 1 - w[i, h, loc].item() * erase[i, h, c].item()
                for h in range(heads):  # then the adds sum
                    value += w[i, h, loc].item() * add[i, h, c].item()
                assert got[i, loc, c].item() == pytest.approx(value, rel=1e-12)


def test_full_erase_at_a_sharp_location_replaces_the_row() -> None:
    memory = torch.arange(12, dtype=F64).view(1, 4, 3)
    w = torch.tensor([[[0.0, 1.0, 0.0, 0.0]]], dtype=F64)
    add = torch.tensor([[[7.0, 8.0, 9.0]]], dtype=F64)
    got = write_memory(memory, w, torch.ones(1, 1, 3, dtype=F64), add)
    assert got[0, 1].tolist() == [7.0, 8.0, 9.0]
    torch.testing.assert_close(got[0, [0, 2, 3]], memory[0, [0, 2, 3]])


def test_ntm_runs_and_keeps_weightings_normalised() -> None:
    torch.manual_seed(0)
    cfg = NTMConfig(controller_size=16, memory_size=10, memory_width=4, read_heads=2)
    model = NTM(cfg)
    x = copy_examples(batch_generator(0, 0), 3, 4).inputs  # (3, 9, 9)
    out = model(x, output_attentions=True)
    assert out.logits.shape == (3, 9, 8)
    assert out.read_weights.shape == (3, 9, 2, 10)
    assert out.write_weights.shape == (3, 9, 1, 10)
    torch.testing.assert_close(out.read_weights.sum(-1), torch.ones(3, 9, 2))
    assert model(x).read_weights is None
    torch.testing.assert_close(model(x).logits, out.logits)
    # step by step equals the whole sequence; the state holds the written memory
    state = model.initial_state(3)
    assert torch.all(state.memory == cfg.memory_init)
    for t in range(9):
        logits, state = model.step(x[:, t], state)
        torch.testing.assert_close(logits, out.logits[:, t])
    assert not torch.allclose(state.memory, torch.full_like(state.memory, cfg.memory_init))


def test_copy_examples_layout() -> None:
    batch = copy_examples(batch_generator(0, 1), 4, 3, width=5)
    x, y = batch.inputs, batch.targets
    assert x.shape == (4, 7, 6) and y.shape == (4, 3, 5)
    torch.testing.assert_close(x[:, :3, :5], y)
    assert (x[:, :3, 5] == 0).all() and (x[:, 3, 5] == 1).all() and (x[:, 3, :5] == 0).all()
    assert (x[:, 4:] == 0).all()
    assert batch.n_tokens == 4 * 3 * 5


def test_bit_errors_and_loss_read_the_last_steps() -> None:
    targets = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    logits = torch.tensor([[[-9.0, 9.0], [9.0, -9.0], [-9.0, 9.0],  # 2L+1 = 5 steps: these
                            [5.0, -5.0], [5.0, 5.0]]])                # three are not judged
    assert bit_errors(logits, targets).tolist() == [1]  # only the second bit of the last step
    loss, n = copy_loss(logits, targets)
    assert n == 4
    want = 3 * math.log1p(math.exp(-5.0)) + math.log1p(math.exp(5.0))
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_bad_ntm_configs() -> None:
    with pytest.raises(ConfigError, match="shift_range"):
        NTMConfig(memory_size=2, shift_range=1)
    with pytest.raises(ConfigError, match="read_heads"):
        NTMConfig(read_heads=0)


def test_ntm_copy_recipe_end_to_end(tmp_path: Path) -> None:
    from attnkit.recipes import RECIPES, resolve_config
    from attnkit.recipes.ntm import evaluate, main

    recipe = RECIPES["ntm-copy"]
    run = tmp_path / "run"
    cfg = resolve_config(recipe, overrides=[
        "arch.controller_size=16", "arch.memory_size=16", "arch.memory_width=6",
        "data.width=4", "data.max_len=3", "data.eval_size=8", "batch_size=4",
        "train.steps=4", "train.eval_every=2", "train.save_every=2", "train.threads=1",
        f"run_dir={run}"])
    results = main(cfg)
    assert set(results) == {"seen_lengths", "length_6", "by_length"}
    assert set(results["by_length"]) == {"1", "2", "3", "6"}
    assert 0 <= results["length_6"]["bit_errors"] <= 6 * 4
    assert evaluate(run, cfg) == json.loads((run / "results.json").read_text())
    record = json.loads((run / "config.json").read_text())
    assert record["model"]["config"]["input_size"] == 5
    with pytest.raises(ConfigError, match="follows from the data"):
        resolve_config(recipe, overrides=["arch.input_size=3"])
    with pytest.raises(ConfigError, match="did you mean 'arch.memory_size'"):
        resolve_config(recipe, overrides=["arch.memory_sise=3"])
