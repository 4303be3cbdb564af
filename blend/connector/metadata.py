"""What the scheduler-side connector tells the workers each step.

Plain dataclasses of ints and strings: vLLM pickles the metadata into every
worker process with the scheduler output.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata


@dataclass
class ChunkRef:
    """One chunk of a blended request: prompt tokens `[start, end)` stored under `key`."""

    start: int
    end: int
    key: str
    hit: bool  # the scheduler's lookup; the worker's load decides for real
    # Found by content (`connector/content.py`): the prompt's tokens are rows
    # `[src_start, src_start + end - start)` of a stored chunk `src_len` tokens long.
    src_start: int = 0
    src_len: int = 0  # 0: the whole chunk, end - start

    @property
    def stored_len(self) -> int:
        return self.src_len or self.end - self.start

    @property
    def whole(self) -> bool:
        """The prompt holds the stored chunk whole (it can be saved under its key)."""
        return self.src_start == 0 and self.stored_len == self.end - self.start


@dataclass
class BlendRequest:
    """A request whose context `[num_local, context_end)` the worker provides this step.

    `num_local` tokens are already in vLLM's cache (its prefix cache). The
    worker blends the rest of the context, up to `context_end`, into the
    request's blocks; vLLM then computes the question itself.
    """

    req_id: str
    # Prompt tokens up to the last chunk's end (chunks may pass context_end); the whole
    # prompt when the selection reads the question (query, hybrid, cheap). An int64 array
    # from the scheduler (a long list of ints is slow to pickle and to turn into a tensor);
    # lists are accepted too.
    token_ids: np.ndarray | list[int]
    chunks: list[ChunkRef]
    num_local: int
    context_end: int
    block_ids: list[int]
    on_miss: str = "recompute"
    config: dict | None = None  # per-request cache_fuse_metadata (full, validated), or None

    @property
    def num_blend(self) -> int:
        return self.context_end - self.num_local


@dataclass
class SaveRequest:
    """Chunks of a request that vLLM (or the blend) has computed by this step: the worker
    saves their KV out of the request's blocks after the step's forward."""

    req_id: str
    block_ids: list[int]
    chunks: list[ChunkRef]


@dataclass
class BlendConnectorMetadata(KVConnectorMetadata):
    requests: list[BlendRequest] = field(default_factory=list)
    saves: list[SaveRequest] = field(default_factory=list)
