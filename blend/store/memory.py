"""Byte-bounded in-process LRU of chunk tensors: the hot tier in front of disk.

Entries are private copies (callers may reuse their buffers), optionally in
pinned host memory so a load into a device buffer is one async DMA.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch


class MemoryTier:
    def __init__(self, capacity_bytes: int) -> None:
        self.capacity = int(capacity_bytes)
        self.used = 0
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._lock = threading.Lock()
        self.evictions = 0

    def __contains__(self, key: str) -> bool:
        return key in self._d

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor itself (shared: callers copy out of it, never into it)."""
        with self._lock:
            t = self._d.get(key)
            if t is not None:
                self._d.move_to_end(key)
            return t

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def put(self, key: str, t: torch.Tensor) -> bool:
        """Take ownership of `t`; evict least recently used entries to make room."""
        n = t.numel() * t.element_size()
        if n > self.capacity:
            return False
        with self._lock:
            old = self._d.pop(key, None)
            if old is not None:
                self.used -= old.numel() * old.element_size()
            while self._d and self.used + n > self.capacity:
                _, v = self._d.popitem(last=False)
                self.used -= v.numel() * v.element_size()
                self.evictions += 1
            self._d[key] = t
            self.used += n
        return True

    def pop(self, key: str) -> bool:
        with self._lock:
            t = self._d.pop(key, None)
            if t is not None:
                self.used -= t.numel() * t.element_size()
            return t is not None

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self.used = 0
