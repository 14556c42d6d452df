"""decode_linears: the same products as nn.Linear (float64 reference), only while active."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from attnkit.nn.fast_linear import decode_linears


def _model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 8, bias=False),
                         nn.Linear(8, 40, bias=False))


def _reference(model: nn.Sequential, x: torch.Tensor) -> torch.Tensor:
    y = x.double()
    for layer in model:
        y = y @ layer.weight.double().t()
        if layer.bias is not None:
            y = y + layer.bias.double()
    return y


@pytest.mark.parametrize("shape", [(1, 1, 8), (2, 8), (1, 8), (5, 8), (3, 4, 8)])
def test_outputs_equal_float64_reference_for_small_and_large_inputs(shape):
    model = _model()
    x = torch.randn(*shape)
    with decode_linears(model, max_rows=2):
        got = model(x)
    torch.testing.assert_close(got.double(), _reference(model, x), rtol=1e-5, atol=1e-5)
    assert got.shape == (*shape[:-1], 40)


def test_only_widening_layers_are_patched_and_restored_even_after_an_error():
    model = _model()
    with pytest.raises(RuntimeError, match="boom"), decode_linears(model):
        assert "forward" in vars(model[0]) and "forward" in vars(model[2])
        assert "forward" not in vars(model[1])  # 32 -> 8: the plain layout is faster
        raise RuntimeError("boom")
    assert all("forward" not in vars(layer) for layer in model)
