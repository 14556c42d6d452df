"""Devices and precision in training (attnkit.accel and fit): autocast against fp32, the fp16
loss scaler (overflow skips the update; exact resume), devices that are not there, fp32
checkpoints, the MFU estimate against a hand count, activation checkpointing against none.

Every test that trains runs on each device present: the CPU always, CUDA and MPS when there.
"""

from __future__ import annotations

import collections
import dataclasses
import json
from pathlib import Path
from typing import ClassVar

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from _resume import assert_resumed, mark_log
from attnkit import accel
from attnkit.data.lm import LMWindows
from attnkit.errors import ConfigError, UserError
from attnkit.losses import token_nll
from attnkit.models.gpt2 import GPT2, GPT2Config
from attnkit.models.transformer import Transformer, TransformerConfig
from attnkit.nn.checkpointing import set_gradient_checkpointing
from attnkit.train import OptimConfig, TrainConfig, fit, latest_checkpoint
from test_cli import assert_user_error, copy_args, run_cli

DEVICES = (["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
           + (["mps"] if accel._mps_available() else []))
STREAM = torch.tensor([(i * 7 + i // 13) % 29 for i in range(6000)])  # a learnable pattern
OPT = OptimConfig(name="adamw", lr=3e-3, schedule="constant", warmup_steps=0)


def _gpt(dropout: float = 0.0) -> GPT2:
    torch.manual_seed(0)
    return GPT2(GPT2Config(vocab_size=32, n_positions=32, d_model=32, n_heads=2, n_layers=2,
                           dropout=dropout, attention_dropout=dropout))


def _lm_loss(model, batch):
    return token_nll(model(batch.ids).logits, batch.targets)


def _cfg(device: str, precision: str, **kw) -> TrainConfig:
    base = dict(steps=40, log_every=1, eval_every=0, save_every=0, seed=1, threads=1,
                device=device, precision=precision, optim=OPT)
    return TrainConfig(**{**base, **kw})


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _train(tmp_path: Path, name: str, cfg: TrainConfig, loss_fn=_lm_loss, dropout=0.0,
           prefetch: int | None = None):
    model = _gpt(dropout)
    stream = LMWindows(STREAM, 16, 8, seed=0)
    stream.prefetch = prefetch
    fit(model, loss_fn, stream, cfg, tmp_path / name, progress=False)
    return model, _records(tmp_path / name)


# ---- devices and precisions --------------------------------------------------------------------

def test_resolve_device_and_precision(monkeypatch):
    assert accel.resolve_device("cpu") == torch.device("cpu")
    first = next((d for d in ("cuda", "mps") if d in DEVICES), "cpu")  # CUDA, MPS, CPU
    assert accel.resolve_device("auto").type == first
    for bad in ("tpu", "gpu:0", "cuda:x"):
        with pytest.raises(UserError, match="unknown device"):
            accel.resolve_device(bad)
    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="not available here: torch sees no CUDA GPU"):
            accel.resolve_device("cuda")
    assert accel.resolve_precision("auto", torch.device("cpu")) == "fp32"
    assert accel.resolve_precision("bf16", torch.device("cpu")) == "bf16"
    with pytest.raises(ConfigError, match="precision"):
        accel.resolve_precision("fp8", torch.device("cpu"))
    # under torchrun each rank takes cuda:LOCAL_RANK (a machine with 2 GPUs, as torch sees it)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert accel.resolve_device("auto") == torch.device("cuda", 1)
    assert accel.resolve_device("cuda:0") == torch.device("cuda", 0)
    with pytest.raises(UserError, match="torch sees 2 CUDA GPUs"):
        accel.resolve_device("cuda:2")
    gpu = torch.device("cuda", 0)  # auto precision: bf16 where the GPU has it natively
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla V100-SXM2-16GB")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: False)
    assert accel.resolve_precision("auto", gpu) == "fp32"
    with pytest.raises(UserError, match="V100.* does not support bf16; use precision=fp16"):
        accel.resolve_precision("bf16", gpu)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation: True)
    assert accel.resolve_precision("auto", gpu) == "bf16"


def test_config_refuses_bad_device_and_precision():
    with pytest.raises(ConfigError, match="train.device"):
        TrainConfig(device="gpu")
    with pytest.raises(ConfigError, match="train.precision"):
        TrainConfig(precision="half")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal where there is no GPU")
def test_cli_train_on_a_missing_gpu_fails_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    done = run_cli(copy_args(run_dir, "train.device=cuda"), tmp_path)
    assert_user_error(done.returncode, done.stderr, "device 'cuda' is not available here")
    assert not run_dir.exists()  # refused before anything was written


def test_to_device_moves_tensors_and_keeps_other_objects():
    @dataclasses.dataclass
    class Carry:
        mems: list | None = None

    @dataclasses.dataclass
    class Batch:
        ids: torch.Tensor
        extra: dict
        reset: bool = False
        carry: Carry = dataclasses.field(default_factory=Carry)
        index: torch.Tensor | None = None
        on_host: ClassVar[tuple[str, ...]] = ("index",)  # bookkeeping read on the host

    pair = collections.namedtuple("Pair", "a b")
    carry = Carry([torch.ones(2)])
    batch = Batch(torch.ones(2, 3), {"m": [torch.zeros(1)], "p": pair(torch.ones(1), 3)},
                  True, carry, torch.arange(2))
    meta = torch.device("meta")  # a device every machine has: shows what moves
    moved = accel.to_device(batch, meta)
    assert moved.ids.is_meta and moved.extra["m"][0].is_meta and moved.extra["p"].a.is_meta
    assert isinstance(moved.extra["p"], pair) and moved.extra["p"].b == 3
    assert moved.reset is True and moved.carry is carry  # the memory carry is shared, not copied
    assert not moved.index.is_meta  # on_host
    assert not carry.mems[0].is_meta and batch.ids.device.type == "cpu"  # the input is untouched


# ---- mixed precision ---------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
def test_bf16_training_ends_near_fp32_and_checkpoints_fp32(tmp_path, device):
    """bf16 keeps 8 significant bits in the matrix products (fp32 accumulation, fp32 losses,
    softmax and norms), a relative rounding of 2^-9 = 0.2% per product. Over 40 steps of a
    tiny GPT the mean loss of the last 10 steps must stay within 0.02 nats of fp32's: ten times
    that rounding, and 50 times smaller than what training gained (>= 1 nat from ln 32)."""
    _, fp32 = _train(tmp_path, "fp32", _cfg(device, "fp32", save_every=40))
    _, bf16 = _train(tmp_path, "bf16", _cfg(device, "bf16", save_every=40))
    tail = {name: sum(r["loss"] for r in recs[-10:]) / 10
            for name, recs in (("fp32", fp32), ("bf16", bf16))}
    assert fp32[0]["loss"] - tail["fp32"] >= 1.0  # it learned
    assert abs(tail["bf16"] - tail["fp32"]) <= 0.02, tail
    assert [r["loss"] for r in bf16] != [r["loss"] for r in fp32]  # autocast did run in bf16
    with safe_open(str(latest_checkpoint(tmp_path / "bf16")), "pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F32"}  # noqa: SIM118


def _overflow_at(step: int):
    """A loss whose gradients are infinite at optimiser step ``step`` (one micro-batch each);
    the loss itself stays finite."""
    calls = {"n": 0}

    def loss_fn(model, batch):
        calls["n"] += 1
        logits = model(batch.ids).logits
        if calls["n"] == step:
            logits.register_hook(lambda g: torch.full_like(g, float("inf")))
        return token_nll(logits, batch.targets)

    return loss_fn


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "mps"])
def test_fp16_scaler_skips_an_overflowing_step(tmp_path, device):
    """The first steps overflow on their own (the scale starts at 2^16) and are skipped; the
    injected overflow at step 12 is skipped too: weights equal step 11's, the scale halves."""
    cfg = _cfg(device, "fp16", steps=13, save_every=1, keep_last=20)
    _train(tmp_path, "run", cfg, _overflow_at(12))
    recs = {r["step"]: r for r in _records(tmp_path / "run")}
    ckpt = tmp_path / "run" / "checkpoints"
    w = {s: load_file(ckpt / f"step-{s:06d}.safetensors") for s in (10, 11, 12, 13)}
    assert recs[11]["skipped_steps"] == recs[10]["skipped_steps"] > 0  # step 11 was taken
    assert recs[12]["skipped_steps"] == recs[11]["skipped_steps"] + 1
    assert recs[12]["loss_scale"] == recs[11]["loss_scale"] / 2
    assert all(torch.equal(w[12][k], w[11][k]) for k in w[11])
    assert not all(torch.equal(w[11][k], w[10][k]) for k in w[11])
    assert not all(torch.equal(w[13][k], w[12][k]) for k in w[12])  # and training goes on


def _crashing_at(call: int):
    """The LM loss, raising Crash at its ``call``-th call (a kill in the middle of a run)."""
    calls = {"n": 0}

    def crashing(model, batch):
        calls["n"] += 1
        if calls["n"] == call:
            raise Crash
        return _lm_loss(model, batch)

    return crashing


class Crash(Exception):
    pass


@pytest.mark.parametrize("device", [d for d in DEVICES if d != "mps"])
def test_fp16_resume_is_bitwise_identical(tmp_path, device, capsys):
    """Killed after the step-8 checkpoint, resumed: the same weights and records as one
    uninterrupted run, dropout included. The scale at step 8 (after the first skipped steps) is
    not the scaler's initial one, so a resume that lost it would skip steps again."""
    cfg = _cfg(device, "fp16", steps=12, save_every=4)
    ref, ref_recs = _train(tmp_path, "ref", cfg, dropout=0.1)
    with pytest.raises(Crash):
        _train(tmp_path, "run", cfg, _crashing_at(10), dropout=0.1)
    before = mark_log(tmp_path / "run")
    capsys.readouterr()
    torch.manual_seed(123)
    again, recs = _train(tmp_path, "run", cfg, dropout=0.1)
    assert_resumed(tmp_path / "run", 8, capsys.readouterr().err, before)
    assert ref_recs[7]["loss_scale"] < 2.0 ** 16
    keys = ("step", "loss", "lr", "grad_norm", "loss_scale")
    assert [[r[k] for k in keys] for r in recs[8:]] == [[r[k] for k in keys] for r in ref_recs[8:]]
    for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_resume_with_batches_built_ahead_is_bitwise_identical(tmp_path, capsys):
    """What a GPU run does, on the CPU: batches built 3 ahead on a background thread. Killed
    after the step-8 checkpoint (the thread had built past it) and resumed: the same records
    and weights as an uninterrupted run that built no batch ahead."""
    cfg = _cfg("cpu", "fp32", steps=12, save_every=4)
    ref, ref_recs = _train(tmp_path, "ref", cfg, dropout=0.1, prefetch=0)
    with pytest.raises(Crash):
        _train(tmp_path, "run", cfg, _crashing_at(10), dropout=0.1, prefetch=3)
    before = mark_log(tmp_path / "run")
    capsys.readouterr()
    again, recs = _train(tmp_path, "run", cfg, dropout=0.1, prefetch=3)
    assert_resumed(tmp_path / "run", 8, capsys.readouterr().err, before)
    keys = ("step", "loss", "lr", "grad_norm")
    assert [[r[k] for k in keys] for r in recs] == [[r[k] for k in keys] for r in ref_recs]
    for (k, a), b in zip(ref.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


# ---- fp16 on the CPU: the LSTM (oneDNN has no fp16 LSTM) -------------------------------------

def test_lstm_runs_fp32_under_cpu_fp16_autocast_and_keeps_bf16():
    """torch.nn.LSTM fails under fp16 autocast on this CPU; attnkit's LSTM (same state dict)
    runs it in fp32 there: equal to a float64 torch.nn.LSTM with the same weights up to fp32
    rounding. Under bf16 autocast it keeps autocast's bf16."""
    from attnkit.nn.recurrent import LSTM

    torch.manual_seed(0)
    ours, ref = LSTM(6, 10, 2, batch_first=True), torch.nn.LSTM(6, 10, 2, batch_first=True)
    ref.load_state_dict(ours.state_dict())
    assert ours.state_dict().keys() == ref.state_dict().keys()
    x = torch.randn(3, 7, 6)
    with torch.autocast("cpu", dtype=torch.float16):
        out, (h, c) = ours(x)
        with pytest.raises(RuntimeError):
            torch.nn.LSTM(6, 10, batch_first=True)(x)  # what a pointer run met before
    want, (wh, wc) = ref.double()(x.double())
    assert out.dtype == torch.float32
    for a, b in ((out, want), (h, wh), (c, wc)):
        torch.testing.assert_close(a.double(), b, atol=1e-5, rtol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert ours(x)[0].dtype == torch.bfloat16


def test_pointer_network_trains_in_fp16_on_the_cpu_near_fp32(tmp_path):
    """The pointer network (LSTM encoder and decoder) trains with precision=fp16 on the CPU:
    its first loss (same weights, same batch) is fp32's up to fp16 rounding (2^-11 per product,
    the LSTMs in fp32), and over 30 steps it learns (the scaler's first skipped steps, while
    its scale falls from 2^16, make later losses differ from fp32's by more than rounding)."""
    from attnkit.data.algorithmic import GeneratedBatches, sort_examples
    from attnkit.models.pointer import PointerConfig, PointerNet, pointer_loss

    def loss(model, batch):
        return pointer_loss(model(batch.inputs, batch.targets), batch.targets)

    records = {}
    for precision in ("fp32", "fp16"):
        torch.manual_seed(0)
        model = PointerNet(PointerConfig(d_model=32))
        stream = GeneratedBatches(lambda g: sort_examples(g, 16, 6), seed=0)
        cfg = _cfg("cpu", precision, steps=30, optim=OptimConfig(lr=1e-2, warmup_steps=0,
                                                                 schedule="constant"))
        fit(model, loss, stream, cfg, tmp_path / precision, progress=False)
        records[precision] = _records(tmp_path / precision)
    first = {p: r[0]["loss"] for p, r in records.items()}
    assert first["fp16"] != first["fp32"]  # autocast ran in fp16
    assert first["fp16"] == pytest.approx(first["fp32"], rel=1e-3)
    tail = sum(r["loss"] for r in records["fp16"][-5:]) / 5
    assert tail < 0.9 * first["fp16"]  # it learnt
    assert records["fp16"][0]["precision"] == "fp16"


# ---- visibility --------------------------------------------------------------------------------

def test_mfu_matches_a_hand_count(tmp_path, monkeypatch):
    """nanoGPT's estimate by hand for the tiny GPT: per layer 12 C^2 + 13 C parameters (the
    attention and MLP weights and biases, two LayerNorms), the final LayerNorm 2 C, the tied
    token embedding V C as the output projection; the position table is only looked up."""
    c, layers, vocab, t = 32, 2, 32, 16
    n = layers * (12 * c * c + 13 * c) + 2 * c + vocab * c
    model = _gpt()
    assert accel.matmul_params(model) == n
    assert accel.attention_layers(model) == (layers, layers * c)
    per_token = 6 * n + 12 * layers * c * t
    assert accel.flops_per_token(n, layers, c, t) == per_token
    assert accel.mfu(per_token, 1000.0, 1e12) == per_token * 1000.0 / 1e12
    monkeypatch.setattr(accel, "peak_flops", lambda device, precision: 1e12)
    _, recs = _train(tmp_path, "run", _cfg("cpu", "fp32", steps=3))
    for r in recs:
        assert r["mfu"] == pytest.approx(per_token * r["tokens_per_s"] / 1e12, rel=1e-12)
        assert 0.01 < r["peak_memory_gib"] < 64  # this process's maximum RSS on the CPU


def test_peak_table_reads_by_device_name(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "NVIDIA H100 PCIe")
    assert accel.peak_flops(torch.device("cuda", 0), "bf16") == 756e12
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d: "Tesla V100-SXM2-16GB")
    assert accel.peak_flops(torch.device("cuda", 0), "bf16") is None  # V100 has no bf16
    assert accel.peak_flops(torch.device("cuda", 0), "fp16") == 125e12
    assert accel.peak_flops(torch.device("cpu"), "fp32") is None


# ---- activation checkpointing ------------------------------------------------------------------

def _loss_and_grads(model, loss_fn, checkpointing: bool) -> tuple[torch.Tensor, list, int]:
    assert set_gradient_checkpointing(model, checkpointing) > 0
    calls = []
    hook = model.get_submodule(_first_block(model)).register_forward_pre_hook(
        lambda *_: calls.append(1))
    torch.manual_seed(5)  # dropout masks: the same draws with and without
    loss = loss_fn(model)
    loss.backward()
    hook.remove()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    return loss.detach(), grads, len(calls)


def _first_block(model) -> str:
    return "blocks.0" if isinstance(model, GPT2) else "decoder.0"


@pytest.mark.parametrize("family", ["gpt2", "transformer"])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(family):
    torch.manual_seed(0)
    ids = torch.randint(1, 32, (3, 12))
    if family == "gpt2":
        model = _gpt(dropout=0.1).double()

        def loss_fn(m):
            return token_nll(m(ids[:, :-1]).logits, ids[:, 1:])[0]
    else:
        model = Transformer(TransformerConfig(src_vocab_size=32, d_model=32, n_heads=2,
                                              attention_dropout=0.1, n_encoder_layers=2,
                                              n_decoder_layers=2, d_ff=64)).double()

        def loss_fn(m):
            return token_nll(m(ids, ids[:, :-1]).logits, ids[:, 1:])[0]
    model.train()
    plain, plain_grads, plain_calls = _loss_and_grads(model, loss_fn, False)
    ckpt, ckpt_grads, ckpt_calls = _loss_and_grads(model, loss_fn, True)
    assert (plain_calls, ckpt_calls) == (1, 2)  # the block ran again in the backward pass
    assert torch.equal(plain, ckpt)
    for a, b in zip(plain_grads, ckpt_grads, strict=True):
        assert torch.equal(a, b)


def test_gradient_checkpointing_needs_blocks(tmp_path):
    model = torch.nn.Linear(2, 2)
    with pytest.raises(ConfigError, match="no blocks"):
        fit(model, lambda m, b: (m(b).sum(), 1), LMWindows(STREAM, 4, 2),
            _cfg("cpu", "fp32", gradient_checkpointing=True), tmp_path / "run", progress=False)


@pytest.mark.slow
def test_compiled_training_matches_eager(tmp_path, monkeypatch):
    """``compile=True`` trains the torch.compile'd model: the losses of 4 steps equal eager
    ones to float32 rounding (the compiler may fuse and reorder sums)."""
    _, eager = _train(tmp_path, "eager", _cfg("cpu", "fp32", steps=4))
    compiled_models, compile = [], torch.compile
    monkeypatch.setattr(torch, "compile", lambda m: compiled_models.append(m) or compile(m))
    _, compiled = _train(tmp_path, "compiled", _cfg("cpu", "fp32", steps=4, compile=True))
    assert len(compiled_models) == 1
    assert [r["loss"] for r in compiled] == pytest.approx([r["loss"] for r in eager], rel=1e-4)
