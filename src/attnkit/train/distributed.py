"""Data parallelism on ``torch.distributed``: process-group setup, DDP wrapping, reductions.

Launch with ``torchrun --nproc-per-node N ...``: torchrun sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK``; :func:`init_distributed` reads them and joins the group (NCCL when training
on CUDA, each rank on ``cuda:LOCAL_RANK``; gloo otherwise). Run without torchrun, everything
here degrades to a single process (rank 0 of 1).
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel


def _env_world() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: str = "auto") -> tuple[int, int]:
    """Join the process group torchrun describes; return ``(rank, world)``.

    ``device`` is the training device's setting (:func:`attnkit.accel.resolve_device`; a device
    that is not there is a UserError, also in a single process). Idempotent. Returns
    ``(0, 1)`` when not launched by torchrun (no ``WORLD_SIZE`` > 1).
    """
    from attnkit.accel import resolve_device

    resolved = resolve_device(device)
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if _env_world() <= 1 or not dist.is_available():
        return 0, 1
    if resolved.type == "cuda":
        torch.cuda.set_device(resolved)
        dist.init_process_group("nccl")
    else:
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size()


def shutdown_distributed() -> None:
    """Leave the process group if one was joined (call once at the end of a script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the rank that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process)."""
    if world_size() > 1:
        dist.barrier()


def wrap_ddp(model: nn.Module) -> nn.Module:
    """``DistributedDataParallel(model)`` when world > 1, else the model unchanged.

    DDP broadcasts rank 0's parameters and buffers at construction, so every rank starts equal.
    """
    if world_size() <= 1 or isinstance(model, DistributedDataParallel):
        return model
    p = next(model.parameters(), None)
    if p is not None and p.device.type == "cuda":
        return DistributedDataParallel(model, device_ids=[p.device], output_device=p.device)
    return DistributedDataParallel(model)


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a DDP wrapper (state-dict keys without the ``module.`` prefix)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


def all_reduce_sum(x: torch.Tensor | float) -> torch.Tensor | float:
    """Sum over ranks. A tensor is reduced in place and returned; a number comes back a number."""
    if world_size() <= 1:
        return x
    if isinstance(x, torch.Tensor):
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x
    t = torch.tensor(float(x), dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.item()


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj`` as a list indexed by rank (``[obj]`` in a single process)."""
    if world_size() <= 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU under NCCL, else the CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
