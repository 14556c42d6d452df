"""Position-wise feed-forward network (Vaswani et al. 2017, eq. 2).

    FFN(x) = act(x W1 + b1) W2 + b2

Both products go through :func:`~attnkit.nn.fast_linear.inference_linear` (oneDNN's GEMM for
2-D inputs without autograd, e.g. packed sequences; the plain layer otherwise).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from attnkit.nn.fast_linear import inference_linear

ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu,
               "gelu_tanh": lambda x: F.gelu(x, approximate="tanh")}


class FeedForward(nn.Module):
    """Two linear layers with an activation and dropout between them."""

    def __init__(self, d_model: int, d_ff: int, dropout: float = 0.0,
                 activation: str = "relu") -> None:
        super().__init__()
        self.fc1 = nn.Linear(d_model, d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)
        self.act = ACTIVATIONS[activation]
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return inference_linear(self.dropout(self.act(inference_linear(x, self.fc1))), self.fc2)
