"""Slot arithmetic shared by the references, and host->device helpers shared by the launchers."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
LOG2E = 1.0 / math.log(2.0)


def split_slots(slots: torch.Tensor, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Slot index -> (block, offset) for advanced indexing into a strided paged view."""
    slots = slots.long()
    return slots // block_size, slots % block_size


def gather_tokens(cache: torch.Tensor, block_row: torch.Tensor, length: int) -> torch.Tensor:
    """The first `length` tokens of one request, `[length, H, D]`, via its block table row."""
    bs = cache.shape[1]
    pos = torch.arange(length, device=cache.device)
    return cache[block_row.long()[pos // bs], pos % bs]


_DEVICE_INTS: dict[tuple, torch.Tensor] = {}


def to_device(values: Sequence[int] | torch.Tensor, device: torch.device,
              dtype: torch.dtype = torch.int64) -> torch.Tensor:
    """Host ints -> device tensor without a device sync (pinned staging, non_blocking copy).

    A tensor already on `device` passes through untouched (no dtype change).
    Host sequences are cached by value: a blend passes the same `cu_q` and
    `seq_lens` to every layer, and a fresh pinned buffer per call costs a
    cudaHostAlloc whenever the host runs ahead of the GPU (it always does).
    Callers must not write to the result.
    """
    if isinstance(values, torch.Tensor):
        if values.device == device:
            return values
        values = values.to(dtype)
    else:
        values = tuple(int(v) for v in values)
        key = (device, dtype, values)
        hit = _DEVICE_INTS.get(key)
        if hit is not None:
            return hit
        if len(_DEVICE_INTS) >= 512:
            _DEVICE_INTS.clear()
        out = _DEVICE_INTS[key] = to_device(torch.tensor(values, dtype=dtype), device, dtype)
        return out
    if device.type != "cuda":
        return values.to(device)
    if not values.is_pinned():
        values = values.pin_memory()
    return values.to(device, non_blocking=True)
