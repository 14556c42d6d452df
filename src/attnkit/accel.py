"""Devices and precision: the one place that decides where and in which number format to run.

- :func:`resolve_device`: ``"auto"`` is CUDA, then Apple MPS, then the CPU; ``"cuda:1"``,
  ``"mps"``, ``"cpu"`` name one. Under ``torchrun`` each rank takes ``cuda:LOCAL_RANK``. A device
  that is not there is a one-line :class:`UserError`.
- :func:`resolve_precision`: ``"auto"`` is bf16 on a GPU that supports it, fp32 elsewhere (on
  CPUs without bf16 instructions bf16 is emulated and slow); ``"fp32"``, ``"bf16"``, ``"fp16"``.
  Mixed precision is autocast (:func:`autocast`): weights, optimiser and checkpoints stay fp32.
- :func:`to_device`: a batch (tensors, dataclasses, named tuples, dicts, lists) on a device,
  from pinned memory without blocking when the device is a GPU (:func:`pin_memory` pins a
  batch ahead, as the data streams' background thread does).
- :func:`peak_memory`, :data:`PEAK_TFLOPS`, :func:`flops_per_token` and :func:`mfu`: what a
  training step used and how close it came to the device's peak.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import resource
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from attnkit.config import unknown
from attnkit.errors import UserError

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---- devices -----------------------------------------------------------------------------------

def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def _local_rank() -> int | None:
    """``LOCAL_RANK`` when launched by torchrun with more than one process, else None."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and "LOCAL_RANK" in os.environ:
        return int(os.environ["LOCAL_RANK"])
    return None


def resolve_device(spec: str = "auto") -> torch.device:
    """The device ``spec`` names (see the module docstring); UserError when it is not here."""
    spec = str(spec).strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UserError(f"unknown device '{spec}': use auto, cpu, cuda, cuda:N or mps") from None
    if device.type == "cpu":
        return torch.device("cpu")
    if device.type == "mps":
        if not _mps_available():
            raise UserError("device 'mps' is not available here (Apple MPS needs a Mac with "
                            "Metal); use device=cpu or device=auto")
        return torch.device("mps")
    if device.type == "meta":
        raise UserError("the meta device holds no data, so nothing runs on it; use cpu, cuda or "
                        "mps (attnkit count sizes presets on meta)")
    if device.type != "cuda":
        raise UserError(f"unknown device '{spec}': use auto, cpu, cuda, cuda:N or mps")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise UserError(f"device '{spec}' is not available here: torch sees no CUDA GPU "
                        f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); use "
                        "device=cpu or device=auto")
    index = device.index if device.index is not None else (_local_rank() or 0)
    if index >= count:
        raise UserError(f"device 'cuda:{index}' is not available here: torch sees {count} "
                        f"CUDA GPU{'s' if count > 1 else ''} (cuda:0..cuda:{count - 1})")
    return torch.device("cuda", index)


def device_of(model: nn.Module) -> torch.device:
    """The device of a model's first parameter (or buffer); the CPU when it has neither."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return torch.device("cpu") if tensor is None else tensor.device


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (a timing on CUDA or MPS then measures the work,
    not its launch); nothing to wait for on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def resolve_precision(spec: str, device: torch.device) -> str:
    """``"fp32"``, ``"bf16"`` or ``"fp16"`` for ``spec`` on ``device`` (``"auto"``: bf16 on a
    CUDA GPU that supports it, else fp32). UserError for bf16 on a GPU without it."""
    if spec != "auto" and spec not in PRECISIONS:
        raise unknown("precision", spec, ("auto", *PRECISIONS))
    # native bf16 only (compute capability 8.0+): an emulated one (V100, T4) is slower than fp32
    bf16_gpu = device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)
    if spec == "auto":
        return "bf16" if bf16_gpu else "fp32"
    if spec == "bf16" and device.type == "cuda" and not bf16_gpu:
        raise UserError(f"{torch.cuda.get_device_name(device)} does not support bf16; use "
                        "precision=fp16 (with its loss scaler) or fp32")
    return spec


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast to ``precision`` on ``device`` (nothing for fp32). Matrix products run in the
    low precision; softmax, norms and losses stay fp32 (PyTorch's autocast lists; attnkit's
    losses upcast their logits)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=PRECISIONS[precision])


def grad_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler:
    """A gradient scaler, enabled for fp16 only (bf16 has fp32's range and needs none)."""
    return torch.amp.GradScaler(device.type, enabled=precision == "fp16")


def map_tensors(batch: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """``batch`` with ``fn`` applied to every tensor: tensors, dicts, lists, tuples and named
    tuples are rebuilt; a dataclass is copied with its tensor and container fields mapped,
    except those its ``on_host`` names (bookkeeping read on the host), while other fields (e.g.
    a Transformer-XL memory carry) stay the same objects."""
    if isinstance(batch, torch.Tensor):
        return fn(batch)
    if isinstance(batch, dict):
        return {k: map_tensors(v, fn) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # a named tuple
        return type(batch)(*(map_tensors(v, fn) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(map_tensors(v, fn) for v in batch)
    if dataclasses.is_dataclass(batch) and not isinstance(batch, type):
        mapped = {f.name: map_tensors(getattr(batch, f.name), fn)
                  for f in dataclasses.fields(batch)
                  if f.init and f.name not in getattr(batch, "on_host", ())
                  and isinstance(getattr(batch, f.name), (torch.Tensor, dict, list, tuple))}
        return dataclasses.replace(batch, **mapped)
    return batch


def pin_memory(batch: Any) -> Any:
    """``batch`` (as :func:`map_tensors` walks it) with its CPU tensors in page-locked memory,
    from which a copy to a CUDA GPU does not block the host (needs CUDA)."""
    return map_tensors(batch, lambda t: t.pin_memory() if t.device.type == "cpu"
                       and not t.is_pinned() else t)


def to_device(batch: Any, device: torch.device | str, non_blocking: bool = True) -> Any:
    """``batch`` (as :func:`map_tensors` walks it) with every tensor on ``device``. CPU tensors
    bound for a CUDA GPU are pinned (unless they already are) and copied without blocking."""
    device = torch.device(device)

    def move(t: torch.Tensor) -> torch.Tensor:
        if t.device == device:
            return t
        if device.type == "cuda" and t.device.type == "cpu" and non_blocking:
            return (t if t.is_pinned() else t.pin_memory()).to(device, non_blocking=True)
        return t.to(device)

    return map_tensors(batch, move)


# ---- memory ------------------------------------------------------------------------------------

def peak_memory(device: torch.device) -> int:
    """Bytes at the high-water mark: CUDA's peak allocated memory; on MPS the memory Metal holds
    now (MPS keeps no peak); on the CPU the process's maximum resident set size."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)  # macOS: bytes; Linux: KiB


def reset_peak_memory(device: torch.device) -> None:
    """Start a new CUDA high-water mark (the CPU's maximum RSS cannot be reset)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ---- FLOPs and model-FLOPs utilisation ---------------------------------------------------------

# Dense peak TFLOP/s per GPU (no structured sparsity), as (bf16, fp16, fp32): tensor cores with
# fp32 accumulation for bf16/fp16, plain (non-TF32) fp32, from the vendors' datasheets. The one
# table of peaks: MFU here, the energy estimator's GPUs and bench/gpu_check.py read it.
# A100 SXM4/PCIe: NVIDIA A100 Tensor Core GPU datasheet (312 bf16/fp16, 19.5 fp32).
# H100 SXM: NVIDIA H100 datasheet (1979 "with sparsity" -> 989 dense, 67 fp32);
# H100 PCIe: same datasheet (1513 -> 756, 51). H200 SXM: NVIDIA H200 datasheet (1979 -> 989,
# 67; H200 NVL 1671 -> 835, 60). L4: NVIDIA L4 datasheet (242 -> 121, 30.3).
# L40S: NVIDIA L40S datasheet (733 -> 366, 91.6). A10: NVIDIA A10 datasheet (250 -> 125, 31.2).
# V100 SXM2: NVIDIA V100 datasheet (125 fp16 tensor, 15.7 fp32; no bf16).
# T4: NVIDIA T4 datasheet (65 fp16, 8.1 fp32; no bf16). P100 PCIe: NVIDIA Tesla P100
# datasheet (18.7 fp16, 9.3 fp32; SXM2: 21.2, 10.6; no bf16, no tensor cores).
# RTX 4090: NVIDIA Ada Lovelace architecture whitepaper, appendix table (165.2 fp16/bf16 with
# fp32 accumulate, 82.6 fp32). RTX 3090: NVIDIA Ampere GA102 whitepaper (71 fp16 with fp32
# accumulate, 35.6 fp32).
PEAK_TFLOPS: dict[str, tuple[float | None, float, float]] = {
    "H200 NVL": (835.0, 835.0, 60.0),
    "H200": (989.0, 989.0, 67.0),
    "H100 PCIe": (756.0, 756.0, 51.0),
    "H100": (989.0, 989.0, 67.0),
    "A100": (312.0, 312.0, 19.5),
    "L40S": (366.0, 366.0, 91.6),
    "L4": (121.0, 121.0, 30.3),
    "A10": (125.0, 125.0, 31.2),
    "V100": (None, 125.0, 15.7),
    "T4": (None, 65.0, 8.1),
    "P100-SXM2": (None, 21.2, 10.6),
    "P100": (None, 18.7, 9.3),
    "RTX 4090": (165.2, 165.2, 82.6),
    "RTX 3090": (71.0, 71.0, 35.6),
}


def peak_flops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak FLOP/s in ``precision`` from :data:`PEAK_TFLOPS` (matched by name,
    the longest matching entry first), or None for a device the table does not know."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(PEAK_TFLOPS, key=len, reverse=True):
        if key in name:
            tflops = PEAK_TFLOPS[key][("bf16", "fp16", "fp32").index(precision)]
            return None if tflops is None else tflops * 1e12
    return None


def matmul_params(model: nn.Module) -> int:
    """Parameters that take part in matrix products: all of them (a tied weight once) except
    embedding tables that are only looked up (position tables, untied input embeddings)."""
    params = {id(p): p.numel() for p in model.parameters()}
    linear = {id(m.weight) for m in model.modules() if isinstance(m, nn.Linear)}
    lookups = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)} - linear
    return sum(n for key, n in params.items() if key not in lookups)


def attention_layers(model: nn.Module) -> tuple[int, int]:
    """(number of attention modules, their summed width H * D): every module with integer
    ``n_heads`` and ``head_dim`` (attnkit's attention layers) counts once."""
    found = [m.n_heads * m.head_dim for m in model.modules()
             if isinstance(getattr(m, "n_heads", None), int)
             and isinstance(getattr(m, "head_dim", None), int)]
    return len(found), sum(found)


def flops_per_token(n_params: int, n_layers: int, d_model: int, seq_len: int) -> float:
    """Training FLOPs per token, ``6 N + 12 L H Q T`` (nanoGPT's ``estimate_mfu``; PaLM,
    Chowdhery et al. 2022, appendix B): 2 forward and 4 backward FLOPs per matmul parameter and
    token, plus the attention scores and weighted sums (H Q = d_model) over T positions."""
    return 6.0 * n_params + 12.0 * n_layers * d_model * seq_len


def mfu(flops_per_token: float, tokens_per_s: float, peak: float) -> float:
    """Model-FLOPs utilisation: achieved training FLOP/s over the device's peak."""
    return flops_per_token * tokens_per_s / peak
