"""The `vllm.general_plugins` entry point: vLLM calls `register()` in every process it starts.

That covers the API server or `LLM` process, the engine core (scheduler side
of the connector) and every worker (worker side), which is exactly where the
patches must be. It must be safe to call many times, and must never take
vLLM down: an unsupported version or a failed patch is logged, and the
connector refuses at construction with the reason.
"""

from __future__ import annotations

import blend.patches as patches
from blend.log import get_logger

log = get_logger("Patch")


def register() -> None:
    """Apply cacheblend's patches in this vLLM process (idempotent)."""
    patches.plugin_loaded = True
    if patches.patches_disabled():
        log.info("BLEND_DISABLE_PATCHES is set: cacheblend patches are off in this process")
        return
    try:
        patches.apply_all_patches()
    except Exception as exc:  # noqa: BLE001 - a plugin must not break vLLM start-up
        log.error("applying cacheblend patches failed: %s", exc)
