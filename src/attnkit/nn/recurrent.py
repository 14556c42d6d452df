"""Recurrent layers that run in every precision attnkit trains in.

:class:`LSTM` is ``torch.nn.LSTM`` (same arguments, parameters and state dict) that also runs
under fp16 autocast on a CPU: there PyTorch sends the LSTM to oneDNN in fp16, which has no such
primitive (torch 2.13: "could not create a primitive descriptor for the LSTM forward propagation
primitive"), so this one runs it in fp32 instead. bf16 on a CPU and every precision on a GPU
(cuDNN) keep autocast's choice.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence


def _fp16_cpu_autocast(x: Tensor | PackedSequence) -> bool:
    data = x.data if isinstance(x, PackedSequence) else x
    return (data.device.type == "cpu" and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.float16)


def _fp32(x: Any) -> Any:
    """Floating tensors (also inside a PackedSequence or a tuple) as fp32; others unchanged."""
    if isinstance(x, PackedSequence):
        return x._replace(data=x.data.float())
    if isinstance(x, Tensor):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, tuple):
        return tuple(_fp32(v) for v in x)
    return x


class LSTM(nn.LSTM):
    """``torch.nn.LSTM`` that runs in fp32 under fp16 autocast on a CPU (module docstring)."""

    def forward(self, input: Any, hx: Any = None) -> Any:  # noqa: A002 (nn.LSTM's name)
        if _fp16_cpu_autocast(input):
            with torch.autocast("cpu", enabled=False):
                return super().forward(_fp32(input), _fp32(hx))
        return super().forward(input, hx)
