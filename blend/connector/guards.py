"""Refusals of vLLM set-ups under which a blend would be silently wrong.

Each check names what it found and what to change. They sit at the two places vLLM hands the
connector its assumptions: the KV caches at start-up, and the step order at every load.
"""

from __future__ import annotations

from typing import Any


def check_kv_dtype(cache_dtype: str | None) -> None:
    """Quantized KV (fp8 and the like) cannot be blended: chunk KV is stored and placed in the
    model's dtype, and a placement into an fp8 cache would fail mid-request, not at start-up."""
    if cache_dtype not in (None, "auto"):
        raise RuntimeError(f"cacheblend: kv_cache_dtype {cache_dtype!r} is not supported "
                           "(quantized KV cannot be blended); use 'auto'")


def check_block_size(view_block: int, block_size: int, backend: str) -> None:
    """The worker addresses the cache by the scheduler's block ids and `block_size`; a backend
    that splits vLLM's blocks into smaller kernel blocks (FLASHINFER on Hopper caps them at 64)
    hands views whose block ids mean something else, so every read and write would land in
    the wrong tokens."""
    if view_block != block_size:
        raise RuntimeError(
            f"cacheblend: the {backend} KV cache holds blocks of {view_block} tokens but the "
            f"scheduler's block_size is {block_size}; start vLLM with --block-size {view_block} "
            "or another attention backend")


def check_load_before_forward(has_loads: bool, scheduler_output: Any | None) -> None:
    """vLLM >= 0.32 starts a connector's loads before the forward only in steps whose
    `SchedulerOutput.has_sync_kv_loads` is set, and after it otherwise. The blend writes the
    context KV the forward reads, so a blend started after the forward would decode from
    unwritten blocks. vLLM sets the flag for every request with external tokens that loads
    synchronously, which ours do; this catches a scheduler or version that does not."""
    if has_loads and scheduler_output is not None \
            and not getattr(scheduler_output, "has_sync_kv_loads", True):
        raise RuntimeError(
            "cacheblend: vLLM starts this step's KV loads after the forward "
            "(SchedulerOutput.has_sync_kv_loads is False) while blended requests are "
            "scheduled; the blend must run before the forward. This vLLM build or scheduler "
            "is not supported.")
