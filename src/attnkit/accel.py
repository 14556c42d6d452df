"""Where tensors live: the device a setting names, and the device a model is on.

``auto`` picks the first accelerator present: CUDA, then Apple's MPS, then the CPU. An explicit
device (``cpu``, ``cuda``, ``cuda:1``, ``mps``) is taken as given when it exists here, and
refused in one line (:class:`UserError`) when it does not. The ``meta`` device holds no data, so
nothing runs there: :func:`attnkit.models.build_on_meta` builds presets on it to size them.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from attnkit.errors import UserError


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return mps is not None and mps.is_available()


def resolve_device(spec: str | torch.device = "auto") -> torch.device:
    """The device ``spec`` names: "auto" (CUDA, then MPS, then CPU), or "cpu", "cuda",
    "cuda:N", "mps"; a one-line :class:`UserError` for one this machine lacks."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    if not isinstance(spec, str) or not spec.strip():
        raise UserError(f"device must be auto, cpu, cuda, cuda:N or mps, got {spec!r}")
    spec = spec.strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("mps") if _mps_available() else torch.device("cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device {spec!r} (expected auto, cpu, cuda, cuda:N or mps)"
                        ) from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UserError(f"device {spec!r}: no CUDA GPU is available on this machine "
                            "(use cpu or auto)")
        index = torch.cuda.current_device() if device.index is None else device.index
        if index >= count:
            raise UserError(f"device {spec!r}: this machine has {count} CUDA GPU"
                            f"{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
        return torch.device("cuda", index)
    if device.type == "mps":
        if not _mps_available():
            raise UserError(f"device {spec!r}: Apple MPS is not available on this machine "
                            "(use cpu or auto)")
        return torch.device("mps")
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "meta":
        raise UserError("the meta device holds no data, so nothing runs on it; use cpu, cuda or "
                        "mps (attnkit count sizes presets on meta)")
    raise UserError(f"device {spec!r} is not supported (expected auto, cpu, cuda, cuda:N or mps)")


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a timing on CUDA or MPS then measures the work,
    not its launch); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU when it has neither."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device
