"""Which missed chunks are worth saving: the store's admission policy.

A saved chunk costs write bandwidth (64 MB for a 500-token chunk of an 8B
model) and, worse, a place in a memory tier that holds only a few hundred: in
a RAG stream most documents are seen once, and saving each of them flushes the
chunks that recur (LMCache#4663). `second_sight` is TinyLFU's doorkeeper: the
first miss of a chunk is only remembered, the second one saves it. What it
remembers is bounded (an LRU set of key hashes: the default 65,536 keys cost
several MB) and ages by itself: a key not seen again within
the last `remember` first sightings is forgotten and starts over.

The scheduler calls `admit(key)` once per sighting of a missed chunk and saves
the chunk's KV only when it returns True.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

ADMIT = ("always", "second_sight")
DEFAULT_REMEMBER = 65536  # keys; several MB (a key hash and its LRU links each)


class Admission:
    """Base policy: counts sightings and admissions; `admit` says whether to save now."""

    name = "?"

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sightings = 0
        self.admitted = 0

    def admit(self, key: str) -> bool:
        raise NotImplementedError

    def stats(self) -> dict:
        with self._lock:
            return {"admit": self.name, "sightings": self.sightings, "admitted": self.admitted}


class AlwaysAdmit(Admission):
    """Save every missed chunk (the behaviour before admission existed)."""

    name = "always"

    def admit(self, key: str) -> bool:
        with self._lock:
            self.sightings += 1
            self.admitted += 1
        return True


class SecondSight(Admission):
    """Save a missed chunk from its second sighting on, among the last `remember` keys."""

    name = "second_sight"

    def __init__(self, remember: int = DEFAULT_REMEMBER) -> None:
        super().__init__()
        if isinstance(remember, bool) or not isinstance(remember, int) or remember < 1:
            raise ValueError(f"admit_remember: {remember!r} out of range; allowed: an int >= 1")
        self.remember = remember
        self.forgotten = 0
        # hash(key): an int is a third of a 64-char str; a 64-bit collision admits one
        # chunk early, which is harmless. Salted per process, and this lives in one.
        self._seen: OrderedDict[int, None] = OrderedDict()

    def admit(self, key: str) -> bool:
        h = hash(key)
        with self._lock:
            self.sightings += 1
            if h in self._seen:  # seen before: save, and keep it known (it recurs)
                self._seen.move_to_end(h)
                self.admitted += 1
                return True
            self._seen[h] = None
            if len(self._seen) > self.remember:
                self._seen.popitem(last=False)
                self.forgotten += 1
            return False

    def __len__(self) -> int:
        return len(self._seen)

    def stats(self) -> dict:
        d = super().stats()
        with self._lock:
            d.update(remembered=len(self._seen), forgotten=self.forgotten)
        return d


def remember_for(capacity_bytes: int, chunk_bytes: int, times: float = 2.0) -> int:
    """A doorkeeper bound of `times` the chunks a tier of `capacity_bytes` holds.

    A chunk that recurs only after more distinct misses than the tier holds would be
    evicted before its reuse, so remembering it only costs a write; in
    `bench/store_policy.py` a bound of 2x the tier's chunks hit as often as an
    unbounded one and wrote less. Clamped to
    [16, DEFAULT_REMEMBER].
    """
    n = int(times * capacity_bytes / max(1, chunk_bytes))
    return max(16, min(DEFAULT_REMEMBER, n))


def make_admission(admit: str = "always", remember: int = DEFAULT_REMEMBER) -> Admission:
    """The policy named by the config value `admit` (ValueError naming the allowed values)."""
    if admit == "always":
        return AlwaysAdmit()
    if admit == "second_sight":
        return SecondSight(remember)
    raise ValueError(f"admit: unknown admission policy {admit!r}; allowed: {', '.join(ADMIT)}")
