"""`kv_connector_extra_config`: the keys the connector understands, checked at start-up.

One place for the keys, their defaults and their allowed values, so a typo or an
out-of-range value fails when the engine starts (naming the key and what is allowed),
not as a silent plain prefill on the first request.
"""

from __future__ import annotations

import os
from typing import Any

from blend.segments import ON_MISS

# Below about half the context found in the store, a blend (the missed chunks recomputed
# through every layer, ~15% of the rest, and its fixed cost) is expected to cost more than
# vLLM's own prefill (docs/config.md).
DEFAULT_MIN_HIT_RATIO = 0.5
DEFAULT_ADMIT = "second_sight"
# Chunk KV extracted for saving and not yet on the host: beyond this a best-effort save is
# dropped (the chunk is recomputed when it recurs) rather than growing device memory or
# stalling a step; a precompute's saves wait for room instead.
DEFAULT_SAVE_PENDING_BYTES = 4 << 30

# kv_connector_extra_config keys the connector understands (besides the store's own).
EXTRA_KEYS = {
    "store": "chunk KV store spec: 'local', 'local:PATH', 'ucm:PATH' or a dict",
    "cache_fuse_metadata": "blend knobs (recomp_ratio, check_layers, ...)",
    "on_miss": f"what a chunk missing from the store does: one of {ON_MISS}",
    "separator": "text that splits plain-text prompts into prefix | chunks... | question",
    "min_chunk_tokens": "chunks shorter than this are recomputed, not cached (int >= 1)",
    "min_hit_ratio": "blend only when stored chunks cover at least this fraction of the "
                     "context to compute; below it vLLM prefills (float in [0, 1])",
    "admit": "which missed chunks are saved: 'always' or 'second_sight' (seen twice)",
    "unmarked": "prompts with no spans and no separator: 'paragraphs' (stored chunks found "
                "by content, new paragraphs saved) or 'none' (plain prefill)",
    "trace_dir": "directory for per-request blend traces (JSON), or None",
    "save_pending_bytes": "device memory for chunk KV waiting to be saved (bytes or '4GiB'; "
                          ">= 1MiB): over it a missed chunk's save is dropped, a precompute waits",
}


def check_extra_config(extra: dict[str, Any]) -> dict[str, Any]:
    """Validate `kv_connector_extra_config`; raise ValueError naming the key and what is allowed."""
    from blend.config import BlendConfig
    from blend.store.spec import parse as parse_store

    unknown = sorted(set(extra) - set(EXTRA_KEYS))
    if unknown:
        allowed = ", ".join(f"{k} ({v})" for k, v in EXTRA_KEYS.items())
        raise ValueError(f"kv_connector_extra_config: unknown key(s) {unknown}; allowed: {allowed}")
    out = dict(extra)
    parse_store(out.get("store"))
    BlendConfig.from_dict(out.get("cache_fuse_metadata"))
    on_miss = out.setdefault("on_miss", "recompute")
    if on_miss not in ON_MISS:
        raise ValueError(f"on_miss: {on_miss!r} not allowed; allowed: {list(ON_MISS)}")
    sep = out.get("separator")
    if sep is not None and (not isinstance(sep, str) or not sep):
        raise ValueError(f"separator: expected a non-empty string, got {sep!r}")
    mct = out.setdefault("min_chunk_tokens", 1)
    if isinstance(mct, bool) or not isinstance(mct, int) or mct < 1:
        raise ValueError(f"min_chunk_tokens: {mct!r} must be an int >= 1")
    mhr = out.setdefault("min_hit_ratio", DEFAULT_MIN_HIT_RATIO)
    if isinstance(mhr, bool) or not isinstance(mhr, (int, float)) or not 0.0 <= mhr <= 1.0:
        raise ValueError(f"min_hit_ratio: {mhr!r} out of range; allowed a number in [0, 1]")
    from blend.store.admission import ADMIT

    unmarked = out.setdefault("unmarked", "paragraphs")
    if unmarked not in ("paragraphs", "none"):
        raise ValueError(f"unmarked: {unmarked!r} not allowed; allowed: ['paragraphs', 'none']")
    admit = out.setdefault("admit", DEFAULT_ADMIT)
    if admit not in ADMIT:
        raise ValueError(f"admit: {admit!r} not allowed; allowed: {list(ADMIT)}")
    from blend.store.spec import parse_size

    out["save_pending_bytes"] = parse_size(
        "save_pending_bytes", out.get("save_pending_bytes", DEFAULT_SAVE_PENDING_BYTES), lo=1 << 20)
    td = out.get("trace_dir")
    if td is not None and not isinstance(td, (str, os.PathLike)):
        raise ValueError(f"trace_dir: expected a directory path or None, got {td!r}")
    return out
