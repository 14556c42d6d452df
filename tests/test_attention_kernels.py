"""Which kernel the attention core took, as recorded for metrics.jsonl, checked against PyTorch
itself: a call restricted to the recorded SDPA backend (``sdpa_kernel``) gives bitwise the same
output as the unrestricted call, and where "math" is recorded the fused CPU kernel refuses
those inputs. The trainer logs the first step's kernels once per run segment."""

from __future__ import annotations

import json

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from attnkit.data.lm import LMWindows
from attnkit.losses import token_nll
from attnkit.models.gpt2 import GPT2, GPT2Config
from attnkit.nn.attention.core import attention
from attnkit.nn.attention.kernels import record_kernels
from attnkit.train import OptimConfig, TrainConfig, fit

BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH, "cudnn": SDPBackend.CUDNN_ATTENTION}


def _qkv(t: int = 12, s: int = 12, dtype: torch.dtype = torch.float32):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 3, t, 8, generator=g, dtype=dtype),
            *(torch.randn(2, 3, s, 8, generator=g, dtype=dtype) for _ in range(2)))


CASES = {
    "plain": dict(),
    "causal": dict(causal=True),
    "causal after a cache (T < S)": dict(causal=True, t=4),
    "boolean mask": dict(mask=torch.rand(2, 1, 12, 12, generator=torch.Generator()
                                         .manual_seed(1)) > 0.3),
    "additive bias": dict(bias=torch.randn(3, 12, 12, generator=torch.Generator()
                                          .manual_seed(2))),
    "dropout": dict(dropout=0.1),
}


@pytest.mark.parametrize("case", CASES)
def test_recorded_sdpa_backend_is_the_one_that_ran(case):
    kw = dict(CASES[case])
    q, k, v = _qkv(t=kw.pop("t", 12))
    with record_kernels() as taken:
        torch.manual_seed(3)
        out = attention(q, k, v, **kw).out
    assert sum(taken.values()) == 1
    kernel = next(iter(taken))
    torch.manual_seed(3)
    with sdpa_kernel([BACKENDS[kernel]]):  # only that backend allowed: it runs, same output
        assert torch.equal(attention(q, k, v, **kw).out, out)
    if kernel == "math":  # the CPU's fused kernel does not take these inputs
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]), pytest.raises(RuntimeError):
            attention(q, k, v, **kw)
    else:
        assert kernel == ("flash" if q.device.type == "cpu" else kernel)


def test_explicit_flex_and_nothing_recorded_outside():
    q, k, v = _qkv(t=16, s=16)
    attention(q, k, v)  # not recording: nothing to count, nothing fails
    with record_kernels() as taken:
        attention(q, k, v, need_weights=True)
        attention(q, k, v, path="explicit")
        with torch.no_grad():
            attention(q, k, v, window=3, path="flex")
    assert taken == {"explicit": 2, "flex": 1}


def test_autocast_is_taken_into_account():
    """Under bf16 autocast SDPA runs in bf16: the choice is asked for bf16 inputs (the CPU's
    flash kernel takes them), although q, k, v are fp32 here."""
    q, k, v = _qkv()
    with record_kernels() as taken, torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v).out
    assert out.dtype == torch.bfloat16 and taken == {"flash": 1}


def test_training_logs_the_first_steps_kernels_once(tmp_path):
    """A 3-layer GPT-2 calls the attention core once per layer in a forward pass (without
    attention dropout, which the CPU's flash kernel lacks: see the "dropout" case above)."""
    torch.manual_seed(0)
    model = GPT2(GPT2Config(vocab_size=32, n_positions=32, d_model=32, n_heads=2, n_layers=3,
                            dropout=0.0, attention_dropout=0.0))
    stream = torch.tensor([(i * 7) % 29 for i in range(2000)])
    cfg = TrainConfig(steps=3, log_every=1, eval_every=0, save_every=0, threads=1,
                      device="cpu", precision="fp32",
                      optim=OptimConfig(lr=1e-3, schedule="constant", warmup_steps=0))
    fit(model, lambda m, b: token_nll(m(b.ids).logits, b.targets), LMWindows(stream, 16, 4),
        cfg, tmp_path, progress=False)
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert records[0]["device"] == "cpu" and records[0]["precision"] == "fp32"
    assert records[0]["attention_kernels"] == {"flash": 3}
    assert not any("attention_kernels" in r or "device" in r for r in records[1:])
