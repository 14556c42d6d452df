"""Atomic writes, complete-checkpoint detection, corruption errors, pruning, shape checks."""

from __future__ import annotations

import os

import pytest
import torch
from torch import nn

from attnkit import rundir
from attnkit.errors import UserError
from attnkit.train import checkpoint as ck


def _net(width: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, width), nn.LayerNorm(width), nn.Linear(width, 2))


def test_write_atomic_keeps_old_file_when_replace_fails(tmp_path, monkeypatch):
    target = tmp_path / "config.json"
    rundir.write_atomic(target, b"old")

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr(rundir.os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk gone"):
        rundir.write_atomic(target, b"new content")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]  # no temp file left


def test_atomic_path_keeps_old_file_when_writer_fails(tmp_path):
    target = tmp_path / "tokenizer.json"
    rundir.write_text_atomic(target, "old")
    with pytest.raises(RuntimeError), rundir.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer.json"]
    rundir.write_json_atomic(target, {"b": 1})
    assert target.read_text() == '{\n  "b": 1\n}\n'


def test_latest_checkpoint_ignores_incomplete(tmp_path):
    net = _net()
    assert ck.latest_checkpoint(tmp_path) is None
    ck.save_checkpoint(tmp_path, 2, net, {"step": 2}, keep_last=5)
    ck.save_checkpoint(tmp_path, 4, net, {"step": 4}, keep_last=5)
    d = tmp_path / "checkpoints"
    (d / "step-000006.state.pt").write_bytes(b"state written, weights never came")
    (d / "step-000008.safetensors").write_bytes(b"weights without state")
    (d / ".step-000010.safetensors.abc.tmp.safetensors").write_bytes(b"temp")
    latest = ck.latest_checkpoint(tmp_path)
    assert latest == d / "step-000004.safetensors"
    assert ck.load_state(latest)["step"] == 4


def test_keep_last_pruning_and_best(tmp_path):
    net = _net()
    for step in (1, 2, 3, 4, 5):
        ck.save_checkpoint(tmp_path, step, net, {"step": step}, keep_last=2)
        if step == 2:
            ck.save_checkpoint(tmp_path, step, net, {"step": step}, keep_last=2, tag="best")
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == ["best.safetensors", "best.state.pt",
                     "step-000004.safetensors", "step-000004.state.pt",
                     "step-000005.safetensors", "step-000005.state.pt"]
    assert ck.load_state(tmp_path / "checkpoints" / "best.safetensors")["step"] == 2


def test_round_trip_unwraps_and_handles_tied_weights(tmp_path):
    net = _net()
    tied = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    tied[1].weight = tied[0].weight

    class Wrapper(nn.Module):  # stands in for DDP: the model is under .module
        def __init__(self, module):
            super().__init__()
            self.module = module

    path = ck.save_checkpoint(tmp_path, 1, Wrapper(net), {}, keep_last=1)
    tensors = ck.load_weights(path)
    assert set(tensors) == set(net.state_dict())  # no "module." prefix
    other = _net()
    with torch.no_grad():
        other[0].weight.add_(1.0)
    ck.load_weights(path, other)
    for k, v in net.state_dict().items():
        assert torch.equal(other.state_dict()[k], v)
    path2 = ck.save_checkpoint(tmp_path / "tied", 1, tied, {}, keep_last=1)
    fresh = nn.Sequential(nn.Embedding(5, 4), nn.Linear(4, 5, bias=False))
    ck.load_weights(path2, fresh)
    assert torch.equal(fresh[1].weight, tied[0].weight)


def test_corrupt_and_truncated_files_give_user_error(tmp_path):
    path = ck.save_checkpoint(tmp_path, 3, _net(), {"step": 3, "x": torch.ones(1000)}, 1)
    state = ck.state_path(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated weights
    with pytest.raises(UserError, match="step-000003.safetensors") as err:
        ck.load_weights(path, _net())
    assert "\n" not in str(err.value)
    path.write_bytes(b"\x00garbage" * 20)  # corrupt weights
    with pytest.raises(UserError, match="corrupt or truncated"):
        ck.load_weights(path)
    blob = state.read_bytes()
    state.write_bytes(blob[: len(blob) // 2])  # truncated state
    with pytest.raises(UserError, match="step-000003.state.pt") as err:
        ck.load_state(state)
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="not found"):
        ck.load_weights(tmp_path / "nope.safetensors")


def test_unsafe_state_is_refused_by_weights_only(tmp_path):
    path = tmp_path / "evil.state.pt"
    torch.save({"obj": os.environ.__class__}, path)  # a class: not loadable with weights_only
    with pytest.raises(UserError, match="evil.state.pt"):
        ck.load_state(path)


def test_shape_mismatch_and_missing_keys_give_user_error(tmp_path):
    path = ck.save_checkpoint(tmp_path, 1, _net(4), {}, keep_last=1)
    with pytest.raises(UserError, match="shape"):
        ck.load_weights(path, _net(5))
    with pytest.raises(UserError, match="missing"):
        ck.load_weights(path, nn.Sequential(*_net(4), nn.Linear(2, 2)))
