"""The one chunk-KV store interface, and the rule that store failures are misses.

The connector (serving path) and the offline blender both talk to a `ChunkStore`.
Backends implement the `_`-prefixed hooks and may raise anything; the public
methods here turn every failure into a miss (False/None), count it under a
reason in `stats()["errors"]` and log it, so no store fault can take a
request down.
"""

from __future__ import annotations

import errno
import re
import threading
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence

import torch

from blend.log import get_logger

log = get_logger("Store")

KEY_RE = re.compile(r"^[0-9a-f]{64}$")
_LOG_FIRST = 10  # log every occurrence of a reason up to this count, then every 1000th


class StoreMiss(Exception):
    """Raised inside backends to end an operation as a counted miss."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def classify_oserror(exc: OSError) -> str:
    """Map an OSError to a stable error-reason name."""
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "permission"
    if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
        return "disk_full"
    if exc.errno == errno.ENOENT:
        return "not_found"
    return "io"


def valid_key(key: object) -> bool:
    return isinstance(key, str) and KEY_RE.match(key) is not None


class ChunkStore(ABC):
    """Chunk KV store: keys are 64-char hex sha256 digests, values are tensors
    shaped `[num_layers, 2, n, num_kv_heads, head_dim]` treated as opaque bytes."""

    backend = "?"

    def __init__(self, fingerprint: str) -> None:
        if not isinstance(fingerprint, str) or not fingerprint:
            raise ValueError("fingerprint: expected a non-empty string")
        self.fingerprint = fingerprint
        self._lock = threading.Lock()
        self._c: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()

    # ---- public API: never raises on the serving path -------------------------------
    def lookup(self, keys: Sequence[str]) -> list[bool]:
        """Which keys are present (a hint: a later load can still miss)."""
        out = [False] * len(keys)
        try:
            idx = [i for i, k in enumerate(keys) if valid_key(k)]
            if len(idx) != len(keys):
                self._error("bad_key", f"{len(keys) - len(idx)} malformed key(s) in lookup")
            if idx:
                found = self._lookup([keys[i] for i in idx])
                for i, f in zip(idx, found):
                    out[i] = bool(f)
        except Exception as exc:  # noqa: BLE001 - the failure rule
            self._fail(exc, "lookup")
        hits = sum(out)
        self._count(lookups=len(keys), lookup_hits=hits)
        return out

    def load(self, key: str, out: torch.Tensor) -> bool:
        """Fill `out` (contiguous, same shape and dtype as stored) with the entry.

        On a miss `out` may have been partly written; callers must not use it.
        """
        if not valid_key(key):
            return self._miss_with("bad_key", "load")
        if not out.is_contiguous():
            return self._miss_with("bad_buffer", "load into a non-contiguous tensor")
        try:
            ok = bool(self._load(key, out))
        except Exception as exc:  # noqa: BLE001
            return self._miss_exc(exc, "load")
        if ok:
            self._count(hits=1, bytes_read=out.numel() * out.element_size())
        else:
            self._count(misses=1)
        return ok

    def get(self, key: str) -> torch.Tensor | None:
        """A new tensor the caller owns, or None on a miss."""
        return self._read_entry("get", self._get, key)

    def fetch(self, key: str) -> torch.Tensor | None:
        """The entry without a host copy where the backend can (the serving path), or None.

        The result may be the store's own tensor (pinned where the store pins):
        read it, never write it, and drop it when done. Backends without such a
        tier return a fresh tensor, as `get` does.
        """
        return self._read_entry("fetch", self._fetch, key)

    def _read_entry(self, op: str, fn, key: str) -> torch.Tensor | None:
        if not valid_key(key):
            self._miss_with("bad_key", op)
            return None
        try:
            t = fn(key)
        except Exception as exc:  # noqa: BLE001
            self._miss_exc(exc, op)
            return None
        if t is None:
            self._count(misses=1)
        else:
            self._count(hits=1, bytes_read=t.numel() * t.element_size())
        return t

    def put(self, key: str, kv: torch.Tensor, give: bool = False) -> bool:
        """Store `kv` under `key`; True once the entry is durable in the shared tier.

        `give=True`: the caller hands `kv` over (it never writes it again), so a tier may
        keep the tensor itself instead of a copy (the connector's saver gives pinned buffers).
        """
        if not valid_key(key):
            self._error("bad_key", "put")
            return False
        if not isinstance(kv, torch.Tensor) or kv.dtype not in _SUPPORTED or kv.numel() == 0:
            self._error("bad_value", f"put of {type(kv).__name__} {getattr(kv, 'dtype', '')}")
            return False
        try:
            ok = bool(self._put(key, kv, give))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "put")
            ok = False
        self._count(puts=1, bytes_written=kv.numel() * kv.element_size() if ok else 0,
                    put_failures=0 if ok else 1)
        return ok

    def delete(self, key: str) -> bool:
        """Remove the entry; True if something was removed."""
        if not valid_key(key):
            self._error("bad_key", "delete")
            return False
        try:
            return bool(self._delete(key))
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "delete")
            return False

    def clear(self) -> None:
        """Drop every entry this store can see (all tiers)."""
        try:
            self._clear()
        except Exception as exc:  # noqa: BLE001
            self._fail(exc, "clear")

    def stats(self) -> dict:
        with self._lock:
            d = {k: self._c.get(k, 0) for k in _COUNTERS}
            d.update({k: v for k, v in self._c.items() if k not in d})
            d["errors"] = dict(self._errors)
        d["backend"] = self.backend
        d.update(self._extra_stats())
        return d

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing
        """Release backend resources (threads, handles)."""

    # ---- backend hooks ---------------------------------------------------------------
    @abstractmethod
    def _lookup(self, keys: list[str]) -> list[bool]: ...

    @abstractmethod
    def _load(self, key: str, out: torch.Tensor) -> bool: ...

    @abstractmethod
    def _get(self, key: str) -> torch.Tensor | None: ...

    @abstractmethod
    def _put(self, key: str, kv: torch.Tensor, give: bool = False) -> bool: ...

    @abstractmethod
    def _delete(self, key: str) -> bool: ...

    @abstractmethod
    def _clear(self) -> None: ...

    def _fetch(self, key: str) -> torch.Tensor | None:
        return self._get(key)

    def _extra_stats(self) -> dict:
        return {}

    # ---- accounting ------------------------------------------------------------------
    def _count(self, **kw: int) -> None:
        with self._lock:
            self._c.update(kw)

    def _error(self, reason: str, detail: str = "") -> None:
        with self._lock:
            self._errors[reason] += 1
            n = self._errors[reason]
        if n <= _LOG_FIRST or n % 1000 == 0:
            log.warning("%s (%s, #%d) %s", self.backend, reason, n, detail)

    def _miss_with(self, reason: str, detail: str) -> bool:
        self._error(reason, detail)
        self._count(misses=1)
        return False

    def _fail(self, exc: BaseException, op: str) -> str:
        if isinstance(exc, StoreMiss):
            reason = exc.reason
        elif isinstance(exc, OSError):
            reason = classify_oserror(exc)
        else:
            reason = "internal"
        self._error(reason, f"{op}: {exc!r}")
        return reason

    def _miss_exc(self, exc: BaseException, op: str) -> bool:
        self._fail(exc, op)
        self._count(misses=1)
        return False


_COUNTERS = ("lookups", "lookup_hits", "hits", "misses", "puts", "put_failures",
             "bytes_read", "bytes_written")
_SUPPORTED = {torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int8,
              torch.uint8, torch.int32, torch.int64, torch.float8_e4m3fn, torch.float8_e5m2}
