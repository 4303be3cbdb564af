"""Byte-bounded in-process cache of chunk tensors: the hot tier in front of disk.

Entries are private copies (callers may reuse their buffers), optionally in
pinned host memory so a load into a device buffer is one async DMA.

Two eviction policies. `lru` evicts the least recently used entry. `slru`
(segmented LRU) exists because chunk entries are large (64 MB for a 500-token
chunk of an 8B model) and few fit: under a stream of once-seen chunks an LRU
evicts the hot ones (LMCache#4663). In `slru` a new entry enters *probation*;
a hit promotes it to *protected* (at most `protected_fraction` of the bytes;
its least recently used entries are demoted back to probation's recent end),
and eviction takes from probation first, so a chunk seen once can only push
out other chunks seen once until the protected ones stop being used.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

import torch

POLICIES = ("lru", "slru")


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class MemoryTier:
    """Thread-safe byte-bounded cache; `policy` is "lru" (default) or "slru"."""

    def __init__(self, capacity_bytes: int, policy: str = "lru",
                 protected_fraction: float = 0.8) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy: unknown eviction policy {policy!r}; allowed: "
                             f"{', '.join(POLICIES)}")
        if not 0.0 < protected_fraction < 1.0:
            raise ValueError(f"protected_fraction: {protected_fraction!r} out of range; "
                             "allowed: strictly between 0 and 1")
        self.capacity = int(capacity_bytes)
        self.policy = policy
        self.protected_capacity = int(self.capacity * protected_fraction) if policy == "slru" else 0
        self.used = 0
        self.protected_used = 0
        self._d: OrderedDict[str, torch.Tensor] = OrderedDict()  # lru: all; slru: probation
        self._p: OrderedDict[str, torch.Tensor] = OrderedDict()  # slru: protected
        self._lock = threading.Lock()
        self.evictions = 0
        self.promotions = 0
        self.demotions = 0

    def __contains__(self, key: str) -> bool:
        with self._lock:  # a promotion moves a key between two dicts: never see it in neither
            return key in self._d or key in self._p

    def __len__(self) -> int:
        with self._lock:
            return len(self._d) + len(self._p)

    def get(self, key: str) -> torch.Tensor | None:
        """The cached tensor itself (shared: callers copy out of it, never into it); a hit
        refreshes it (lru) or promotes it to the protected segment (slru)."""
        with self._lock:
            t = self._p.get(key)
            if t is not None:
                self._p.move_to_end(key)
                return t
            t = self._d.get(key)
            if t is not None:
                if self.policy == "slru":
                    self._promote(key, t)
                else:
                    self._d.move_to_end(key)
            return t

    def peek(self, key: str) -> torch.Tensor | None:
        """The cached tensor without counting a use (no refresh, no promotion)."""
        with self._lock:
            t = self._p.get(key)
            return t if t is not None else self._d.get(key)

    def fits(self, nbytes: int) -> bool:
        return nbytes <= self.capacity

    def put(self, key: str, t: torch.Tensor) -> bool:
        """Take ownership of `t`, evicting to make room (slru: probation first).

        A new key enters probation (slru) or the recent end (lru); a key already
        present is replaced in its segment, so a rewrite is not a promotion.
        """
        n = _nbytes(t)
        if n > self.capacity:
            return False
        with self._lock:
            seg = self._remove(key)
            self._make_room(n)
            seg = self._p if seg is self._p else self._d
            seg[key] = t
            self.used += n
            if seg is self._p:
                self.protected_used += n
                self._demote_overflow()
        return True

    def pop(self, key: str) -> bool:
        with self._lock:
            return self._remove(key) is not None

    def clear(self) -> None:
        with self._lock:
            self._d.clear()
            self._p.clear()
            self.used = 0
            self.protected_used = 0

    # ---- under the lock --------------------------------------------------------------
    def _remove(self, key: str) -> OrderedDict | None:
        """Drop `key`; the segment it was in, or None."""
        for seg in (self._d, self._p):
            t = seg.pop(key, None)
            if t is not None:
                self.used -= _nbytes(t)
                if seg is self._p:
                    self.protected_used -= _nbytes(t)
                return seg
        return None

    def _make_room(self, n: int) -> None:
        while (self._d or self._p) and self.used + n > self.capacity:
            seg = self._d if self._d else self._p
            _, v = seg.popitem(last=False)
            self.used -= _nbytes(v)
            if seg is self._p:
                self.protected_used -= _nbytes(v)
            self.evictions += 1

    def _promote(self, key: str, t: torch.Tensor) -> None:
        self._p[key] = t  # into protected before leaving probation
        del self._d[key]
        self.protected_used += _nbytes(t)
        self.promotions += 1
        self._demote_overflow()

    def _demote_overflow(self) -> None:
        """Protected over its share: its least recent entries go to probation's recent end."""
        while self.protected_used > self.protected_capacity:
            k, v = self._p.popitem(last=False)
            self.protected_used -= _nbytes(v)
            self._d[k] = v
            self.demotions += 1
