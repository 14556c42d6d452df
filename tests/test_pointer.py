"""Pointer network (Vinyals et al. 2015): the pointer distribution against a float64 LSTM and
additive score written out by hand, decoding invariants, sort data and the pointer-sort recipe."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from attnkit.cli import main as cli_main
from attnkit.data.algorithmic import GeneratedBatches, batch_generator, sort_examples
from attnkit.errors import ConfigError, UserError
from attnkit.models.pointer import (
    PointerConfig,
    PointerNet,
    chosen_mask,
    pointer_loss,
    sort_accuracy,
)


def lstm_by_hand(lstm: torch.nn.LSTM, xs: list[torch.Tensor], h: torch.Tensor, c: torch.Tensor
                 ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """One-layer LSTM (PyTorch's gate order i, f, g, o), one vector at a time."""
    w_ih, w_hh = lstm.weight_ih_l0, lstm.weight_hh_l0
    b = lstm.bias_ih_l0 + lstm.bias_hh_l0
    outs = []
    for x in xs:
        i, f, g, o = (w_ih @ x + w_hh @ h + b).chunk(4)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(o) * torch.tanh(c)
        outs.append(h)
    return outs, h, c


def test_pointer_logits_are_the_additive_score_over_encoder_states() -> None:
    torch.manual_seed(0)
    model = PointerNet(PointerConfig(d_model=6, d_attention=5)).double()
    batch = sort_examples(batch_generator(0, 0), 2, 4)
    inputs, targets = batch.inputs.double(), batch.targets
    logits = model(inputs, targets)
    w_e, b_e = model.embed.weight[:, 0], model.embed.bias
    w1, w2, v = model.score.w_k.weight, model.score.w_q.weight, model.score.v.weight[0]
    for row in range(2):
        x = [w_e * inputs[row, j] + b_e for j in range(4)]
        zero = torch.zeros(6, dtype=torch.float64)
        enc, h, c = lstm_by_hand(model.encoder, x, zero, zero)
        dec_in = [model.start] + [x[targets[row, i]] for i in range(3)]
        dec, _, _ = lstm_by_hand(model.decoder, dec_in, h, c)
        for i in range(4):  # u^i_j = v^T tanh(W1 e_j + W2 d_i)
            want = torch.stack([v @ torch.tanh(w1 @ enc[j] + w2 @ dec[i]) for j in range(4)])
            torch.testing.assert_close(logits[row, i], want, rtol=1e-10, atol=1e-12)


def test_chosen_mask_by_brute_force() -> None:
    targets = torch.tensor([[2, 0, 3, 1], [1, 1, 0, 2]])
    got = chosen_mask(targets, 4)
    for b in range(2):
        for t in range(4):
            for s in range(4):
                assert got[b, t, s].item() == (s in targets[b, :t].tolist())


@pytest.mark.parametrize("mask_chosen", [False, True])
def test_greedy_decoding_equals_teacher_forcing_on_its_own_choices(mask_chosen: bool) -> None:
    torch.manual_seed(1)
    model = PointerNet(PointerConfig(d_model=16, mask_chosen=mask_chosen)).eval()
    inputs = sort_examples(batch_generator(1, 0), 5, 7).inputs
    picks = model.greedy(inputs, mask_chosen=mask_chosen)
    assert picks.shape == (5, 7)
    with torch.no_grad():
        logits = model(inputs, picks)  # re-running the decoder on its own choices
    torch.testing.assert_close(logits.argmax(-1), picks)
    if mask_chosen:  # a permutation of the positions
        assert (picks.sort(dim=1).values == torch.arange(7)).all()


def test_pointer_loss_is_the_summed_nll_of_the_targets() -> None:
    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
    loss, n = pointer_loss(logits, torch.tensor([[1, 2]]))
    assert n == 2
    assert loss.item() == pytest.approx(-(torch.log(torch.tensor(0.25 * 0.8))).item(), rel=1e-6)


def test_sort_accuracy_judges_values_and_accepts_tied_orders() -> None:
    inputs = torch.tensor([[3, 1, 2], [5, 5, 1], [0.0, 2, 1]])
    pointers = torch.tensor([[1, 2, 0], [2, 1, 0], [0, 2, 2]])  # right, right (tie), one wrong
    got = sort_accuracy(inputs, pointers)
    assert got["exact"] == pytest.approx(2 / 3)
    assert got["per_position"] == pytest.approx(8 / 9)


def test_integer_inputs_and_bad_inputs() -> None:
    torch.manual_seed(0)
    model = PointerNet(PointerConfig(input_kind="int", n_values=10, d_model=8))
    batch = sort_examples(batch_generator(0, 0), 3, 5, kind="int", max_value=10)
    assert model(batch.inputs, batch.targets).shape == (3, 5, 5)
    with pytest.raises(UserError, match="integer inputs must be in"):
        model.greedy(torch.tensor([[3, 10]]))
    with pytest.raises(UserError, match="reads integer inputs"):
        model.greedy(torch.rand(1, 3))
    with pytest.raises(UserError, match="distinct positions"):
        model.greedy(batch.inputs, steps=6)
    with pytest.raises(ConfigError, match="n_values"):
        PointerConfig(input_kind="int")


def test_sort_targets_are_the_stable_argsort() -> None:
    batch = sort_examples(batch_generator(0, 5), 50, 6, kind="int", max_value=3)
    for x, t in zip(batch.inputs.tolist(), batch.targets.tolist(), strict=True):
        assert t == sorted(range(6), key=lambda i: (x[i], i))
    floats = sort_examples(batch_generator(0, 6), 4, 9)
    assert floats.inputs.dtype == torch.float32
    assert ((floats.inputs >= 0) & (floats.inputs < 1)).all()


def test_generated_stream_resumes_exactly() -> None:
    make = lambda g: sort_examples(g, 2, 3)  # noqa: E731
    stream = GeneratedBatches(make, seed=4)
    it = iter(stream)
    for _ in range(3):
        next(it)
    state = stream.state_dict()
    expected = next(it)
    again = GeneratedBatches(make, seed=4)
    again.load_state_dict(state)
    torch.testing.assert_close(next(iter(again)).inputs, expected.inputs)
    with pytest.raises(UserError, match="seed"):
        GeneratedBatches(make, seed=5).load_state_dict(state)


def test_a_small_pointer_network_learns_to_sort_short_lists() -> None:
    torch.manual_seed(0)
    model = PointerNet(PointerConfig(d_model=32))
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for step in range(150):
        batch = sort_examples(batch_generator(0, step), 64, 4)
        loss, n = pointer_loss(model(batch.inputs, batch.targets), batch.targets)
        (loss / n).backward()
        opt.step()
        opt.zero_grad()
    test = sort_examples(batch_generator(1, 0), 500, 4)
    got = sort_accuracy(test.inputs, model.eval().greedy(test.inputs))
    assert got["per_position"] > 0.6  # chance is about 0.25 per position, 1/24 per list


def tiny_overrides(run: Path) -> list[str]:
    return ["arch.d_model=8", "data.min_len=2", "data.max_len=3", "data.eval_size=10",
            "batch_size=8", "train.steps=4", "train.eval_every=2", "train.save_every=2",
            "train.threads=1", f"run_dir={run}"]


def test_pointer_sort_recipe_end_to_end_and_eval(tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    run = tmp_path / "run"
    args = ["train", "pointer-sort"] + [a for o in tiny_overrides(run) for a in ("--set", o)]
    assert cli_main(args) == 0
    results = json.loads((run / "results.json").read_text())
    assert set(results) == {"seen_lengths", "longer", "by_length"}
    assert set(results["by_length"]) == {"2", "3", "4", "5", "6"}
    assert set(results["longer"]) == {"exact", "per_position", "exact_free",
                                      "per_position_free", "loss"}
    capsys.readouterr()
    assert cli_main(["eval", str(run)]) == 0
    assert "seen_lengths: exact" in capsys.readouterr().out
    assert json.loads((run / "results.json").read_text()) == results
    assert (run / "checkpoints" / "best.safetensors").exists()


@pytest.mark.parametrize("setting, fragment", [
    ("arch.input_kind=int", "follows from the data"),
    ("arch.d_modle=8", "did you mean 'arch.d_model'"),
    ("data.kind=text", "data.kind"),
    ("data.min_len=0", "data.min_len"),
    ("train.best_metric=bleu", "train.best_metric"),
])
def test_bad_settings_exit_2_with_one_line(tmp_path: Path, capsys: pytest.CaptureFixture,
                                           setting: str, fragment: str) -> None:
    run = tmp_path / "run"
    code = cli_main(["train", "pointer-sort", "--set", setting, "--set", f"run_dir={run}"])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("attnkit: error:") and len(err.splitlines()) == 1, err
    assert fragment in err
    assert not run.exists()


def test_an_interrupted_pointer_run_resumes_to_the_same_weights(
        tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from _resume import assert_resumed, mark_log
    from attnkit.recipes import RECIPES, resolve_config
    from attnkit.recipes.pointer import main
    from attnkit.train.checkpoint import load_weights

    run = tmp_path / "run"
    cfg = resolve_config(RECIPES["pointer-sort"],
                         overrides=[*tiny_overrides(run), "train.log_every=1"])
    main(cfg)
    last = run / "checkpoints" / "step-000004.safetensors"
    uninterrupted = load_weights(last)
    last.unlink()  # as if the run had stopped after its step-2 checkpoint
    (run / "checkpoints" / "step-000004.state.pt").unlink()
    before = mark_log(run)
    capsys.readouterr()
    main(cfg)
    assert_resumed(run, 2, capsys.readouterr().err, before)
    resumed = load_weights(last)
    assert resumed.keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(resumed[key], value), key


def test_shared_length_sets_of_the_algorithmic_recipes():
    """draw: one length per batch, uniform over min_len..max_len; eval_set: fixed by the seed
    and the length; measure_sets: one figure dict per length."""
    from dataclasses import replace

    from attnkit.recipes.algorithmic import draw, eval_set, eval_sets, measure_sets
    from attnkit.recipes.pointer import SortData

    d = SortData(min_len=2, max_len=5, eval_size=7, seed=3)

    def example(g, b, n):
        return sort_examples(g, b, n, "float", 100)

    drawn = [draw(example, d, 4)(batch_generator(0, i)) for i in range(60)]
    assert {b.inputs.shape[1] for b in drawn} == {2, 3, 4, 5}
    assert all(b.inputs.shape[0] == 4 for b in drawn)
    a, again = eval_set(example, d, 4), eval_set(example, d, 4)
    assert a.inputs.shape[:2] == (7, 4) and torch.equal(a.inputs, again.inputs)
    assert not torch.equal(eval_set(example, replace(d, seed=4), 4).inputs, a.inputs)
    figures = measure_sets(torch.nn.Linear(1, 1), lambda m, b: {"n": float(b.inputs.shape[1])},
                           eval_sets(example, d, (2, 5)))  # the sets go to the model's device
    assert figures == {2: {"n": 2.0}, 5: {"n": 5.0}}
