"""The worker's GPU tier: chunk KV kept on the device, in front of every store.

A recurring chunk found here is placed device to device, with no copy at all
(`blend.chunk_loader`). It is sized by the store spec's `gpu_bytes` against
the memory vLLM leaves free.
"""

from __future__ import annotations

import torch

from blend.store.memory import MemoryTier

GiB = 1 << 30


class DeviceTier(MemoryTier):
    """Byte-bounded LRU of chunk KV already on the GPU (the worker's, in front of any store)."""


def resolve_gpu_bytes(value: int | str, device: torch.device) -> int:
    """The GPU tier's size, checked against the memory vLLM left free.

    Runs after vLLM allocated its KV cache: what is free then is the memory
    outside `gpu_memory_utilization`, which activations and this tier share.
    "auto" takes a quarter of what is free above 4 GiB, at most 4 GiB.
    """
    if device.type != "cuda":
        return 0
    free, _ = torch.cuda.mem_get_info(device)
    if value == "auto":
        return int(min(4 * GiB, max(0, free - 4 * GiB) // 4))
    if value > free - 2 * GiB:
        raise ValueError(
            f"store.gpu_bytes: {value / GiB:.1f} GiB does not fit: {free / GiB:.1f} GiB of device "
            "memory is free after vLLM's KV cache and 2 GiB stay for activations; allowed "
            f"0..{max(0, free - 2 * GiB) / GiB:.1f} GiB (or lower gpu_memory_utilization)")
    return int(value)
