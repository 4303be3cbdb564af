"""Chunk KV stores: `open_store(spec, fingerprint)` returns the configured backend.

`local` (default): memory LRU + shared disk directory. `ucm`: the real UCM v1
`UcmPipelineStore` (needs the uc-manager package, Python 3.12). The spec's
`gpu_bytes` is not the backend's: the worker's GPU tier reads it.
"""

from __future__ import annotations

from blend.store.base import ChunkStore, StoreMiss
from blend.store.spec import default_dir, parse


def open_store(spec: str | dict | None, fingerprint: str) -> ChunkStore:
    """Validate `spec` (ValueError on bad config) and open the store it names."""
    cfg = parse(spec)
    if cfg["backend"] == "local":
        from blend.store.local import LocalStore

        return LocalStore(fingerprint, cfg["path"], cfg["memory_bytes"], cfg["disk_bytes"],
                          pin_memory=cfg["pin_memory"], promote=cfg["promote"],
                          memory_policy=cfg["memory_policy"])
    from blend.store.ucm import UcmStore

    return UcmStore(fingerprint, **{k: v for k, v in cfg.items()
                                    if k not in ("backend", "gpu_bytes")})


__all__ = ["ChunkStore", "StoreMiss", "default_dir", "open_store"]
