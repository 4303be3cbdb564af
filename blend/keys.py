"""Position-independent chunk keys: `sha256(fingerprint || token ids)`.

The fingerprint folds in everything that changes a chunk's KV bytes or layout,
so caches of different models, dtypes or parallel layouts can never mix.
"""

from __future__ import annotations

import hashlib
import json
from array import array
from collections.abc import Sequence
from typing import Any

import numpy as np


def model_fingerprint(
    *,
    model_id: str,
    revision: str | None,
    dtype: str,
    num_layers: int,
    num_kv_heads: int,
    head_dim: int,
    rope: dict[str, Any],
    tp_rank: int = 0,
    tp_size: int = 1,
    kv_layout: str = "L2NHD-postrope",
) -> str:
    """Hex digest of the model identity and KV layout (canonical JSON, sorted keys)."""
    ident = {
        "model_id": model_id,
        "revision": revision,
        "dtype": str(dtype).replace("torch.", ""),
        "num_layers": num_layers,
        "num_kv_heads": num_kv_heads,
        "head_dim": head_dim,
        "rope": rope,
        "tp_rank": tp_rank,
        "tp_size": tp_size,
        "kv_layout": kv_layout,
    }
    blob = json.dumps(ident, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def chunk_key(fingerprint: str, token_ids: Sequence[int] | np.ndarray) -> str:
    """Key of one chunk: independent of where the chunk sits in a prompt.

    An int64 array slice (the scheduler converts a prompt once, see `token_array`) is
    hashed in place: no per-chunk conversion or copy.
    """
    h = hashlib.sha256(bytes.fromhex(fingerprint))
    h.update(np.ascontiguousarray(token_ids, dtype=np.int64).data)
    return h.hexdigest()


def token_array(token_ids: Sequence[int] | np.ndarray) -> np.ndarray:
    """A prompt's token ids as one int64 array, converted once.

    `array('q', list)` is the cheapest conversion of a Python list (about 3x
    faster than `torch.tensor`), and the array then pickles as raw bytes to the
    workers and becomes a tensor there without a copy.
    """
    if isinstance(token_ids, np.ndarray):
        return token_ids.astype(np.int64, copy=False)
    if isinstance(token_ids, list):
        return np.frombuffer(array("q", token_ids), dtype=np.int64)
    return np.asarray(token_ids, dtype=np.int64)
