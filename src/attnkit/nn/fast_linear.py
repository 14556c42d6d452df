"""Faster linear layers for inference on a CPU (same products, other kernels).

:func:`inference_linear` runs a linear layer through oneDNN's GEMM when no gradient is needed.

At batch 1 a decoding step is a chain of matrix-vector products bounded by reading the weights
from memory. For ``nn.Linear``'s (out, in) layout with out > in, PyTorch's CPU kernel reads the
weight about 2.5x slower than ``x @ Wt`` with a contiguous (in, out) copy ``Wt`` (measured on
this project's machine: 14.6 vs 5.5 ms for GPT-2's 50257 x 384 output layer, 1 thread); for
out < in the plain layout is the faster one. :func:`decode_linears` swaps in the faster form
for small inputs while it is active; the results are the same products up to float rounding.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _transposed_forward(layer: nn.Linear, wt: Tensor, max_rows: int):
    def forward(x: Tensor) -> Tensor:
        if x.numel() > max_rows * layer.in_features:
            return F.linear(x, layer.weight, layer.bias)
        rows = x.reshape(-1, layer.in_features)
        y = rows @ wt if layer.bias is None else torch.addmm(layer.bias, rows, wt)
        return y.view(*x.shape[:-1], layer.out_features)

    return forward


@contextmanager
def decode_linears(model: nn.Module, max_rows: int = 2) -> Iterator[None]:
    """While active, every ``nn.Linear`` of ``model`` with out > in features computes inputs of
    at most ``max_rows`` rows from a transposed contiguous copy of its weight.

    The copies cost memory equal to those weights (for GPT-2 mostly the output layer) and are
    dropped on exit. Use it around inference only: the copies do not follow weight updates.
    """
    patched = []
    for layer in model.modules():
        if type(layer) is nn.Linear and layer.out_features > layer.in_features:
            wt = layer.weight.detach().t().contiguous()  # (in, out)
            layer.forward = _transposed_forward(layer, wt, max_rows)  # instance attribute
            patched.append(layer)
    try:
        yield
    finally:
        for layer in patched:
            del layer.forward  # back to nn.Linear.forward


def _onednn_linear_available() -> bool:
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn,
                                                                "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


ONEDNN_LINEAR = _onednn_linear_available()


def inference_linear(x: Tensor, lin: nn.Linear) -> Tensor:
    """``lin(x)``; without autograd, on CPU in fp32, through oneDNN's GEMM instead of MKL's.

    On this project's AMD CPUs oneDNN's fp32 GEMM measured 1.1-1.5x faster than MKL's for
    BERT's shapes (bench/bert_inference.py); the private op is used only where it exists.
    Results differ only by rounding (~1e-6).
    """
    if (ONEDNN_LINEAR and not torch.is_grad_enabled() and x.device.type == "cpu"
            and x.dtype == torch.float32 and x.dim() == 2):
        return torch.ops.mkldnn._linear_pointwise(x, lin.weight, lin.bias, "none", [], "")
    return lin(x)
