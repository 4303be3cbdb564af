"""`local` backend (the default): memory LRU tier in front of a shared disk directory."""

from __future__ import annotations

import os

import torch

from blend.store import format as fmt
from blend.store.base import ChunkStore, StoreMiss
from blend.store.disk import DiskTier
from blend.store.memory import MemoryTier


class LocalStore(ChunkStore):
    """Write-through: `put` fills both tiers; reads try memory, then disk, and
    promote disk hits into memory. With `pin_memory` (CUDA only; "auto" = on
    where CUDA is) the memory tier holds pinned tensors, so `fetch` hands the
    loader memory that one async DMA per layer reads, with no copy on the host."""

    backend = "local"

    def __init__(self, fingerprint: str, path: str | os.PathLike, memory_bytes: int,
                 disk_bytes: int, pin_memory: bool | str = False, promote: bool = True,
                 memory_policy: str = "slru") -> None:
        super().__init__(fingerprint)
        self.mem = MemoryTier(memory_bytes, policy=memory_policy)
        self.disk = DiskTier(path, disk_bytes, fingerprint)
        self.pin = pin_memory in (True, "auto") and torch.cuda.is_available()
        self.promote = promote

    def _alloc(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        return fmt.alloc(shape, dtype, pin=self.pin)

    def _lookup(self, keys: list[str]) -> list[bool]:
        return [k in self.mem or self.disk.contains(k) for k in keys]

    def _load(self, key: str, out: torch.Tensor) -> bool:
        t = self.mem.get(key)
        if t is not None:
            _check_like(t, out)
            out.copy_(t, non_blocking=out.device.type != "cpu" and t.is_pinned())
            self._count(memory_hits=1)
            return True
        if out.device.type == "cpu":
            if not self.disk.read_into(key, out):
                return False
            if self.promote and self.mem.fits(out.numel() * out.element_size()):
                own = self._alloc(tuple(out.shape), out.dtype)
                own.copy_(out)
                self.mem.put(key, own)
        else:  # device buffer: stage in (pinned) host memory, keep it as the cache entry
            t = self.disk.read(key, self._alloc)
            if t is None:
                return False
            _check_like(t, out)
            if self.promote:
                self.mem.put(key, t)
            out.copy_(t, non_blocking=t.is_pinned())
        self._count(disk_hits=1)
        return True

    def _get(self, key: str) -> torch.Tensor | None:
        t = self._fetch(key)
        if t is None or self.mem.peek(key) is not t:
            return t  # absent, or a disk read the memory tier did not keep: the caller's own
        own = fmt.alloc(tuple(t.shape), t.dtype)  # the tier's tensor stays the tier's
        own.copy_(t)
        return own

    def _fetch(self, key: str) -> torch.Tensor | None:
        t = self.mem.get(key)
        if t is not None:
            self._count(memory_hits=1)
            return t
        t = self.disk.read(key, self._alloc)
        if t is None:
            return None
        self._count(disk_hits=1)
        if self.promote:
            self.mem.put(key, t)
        return t

    def _put(self, key: str, kv: torch.Tensor, give: bool = False) -> bool:
        kv = kv.detach()
        nbytes = kv.numel() * kv.element_size()
        own = None
        handed = kv.device.type == "cpu" and kv.is_contiguous() and (kv.is_pinned() or not self.pin)
        if give and handed:
            own = kv  # handed over: the tier keeps it, no copy
            self.mem.put(key, own)
        elif self.mem.fits(nbytes):
            own = self._alloc(tuple(kv.shape), kv.dtype)
            own.copy_(kv)
            self.mem.put(key, own)
        if own is None:
            own = kv.contiguous() if kv.device.type == "cpu" else kv.to("cpu").contiguous()
        self.disk.write(key, own)  # durable in the shared tier, or raises (counted)
        return True

    def _delete(self, key: str) -> bool:
        a = self.mem.pop(key)
        b = self.disk.remove(key)
        return a or b

    def _clear(self) -> None:
        self.mem.clear()
        self.disk.clear()

    def _extra_stats(self) -> dict:
        return {
            "memory_bytes_used": self.mem.used,
            "memory_capacity": self.mem.capacity,
            "memory_entries": len(self.mem),
            "memory_evictions": self.mem.evictions,
            "disk_capacity": self.disk.capacity,
            "disk_evictions": self.disk.evictions,
            "path": str(self.disk.root),
        }


def _check_like(t: torch.Tensor, out: torch.Tensor) -> None:
    if t.dtype != out.dtype:
        raise StoreMiss("dtype_mismatch", f"stored {t.dtype}, buffer {out.dtype}")
    if t.shape != out.shape:
        raise StoreMiss("shape_mismatch", f"stored {tuple(t.shape)}, buffer {tuple(out.shape)}")
