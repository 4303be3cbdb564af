"""Disk tier: one file per chunk in a directory several processes may share.

Why it is safe without a daemon:
- writers fill a private temp file and publish it with an atomic rename, so a
  reader opens either a complete old entry or a complete new one, never a torn
  one (a SIGKILLed writer leaves only a temp file, swept later);
- readers verify header and payload crcs, so damage on disk is a miss;
- capacity accounting and eviction run under one `flock` on `.lock`, whose
  first 8 bytes hold the bytes in use. The counter can only over-estimate
  (a crash between reserve and rename), and every eviction pass rescans the
  directory and rewrites it, so drift corrects itself.
LRU order is file mtime, bumped on every read hit.
"""

from __future__ import annotations

import errno
import fcntl
import os
import struct
import threading
import time
import uuid
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from blend.store import format as fmt
from blend.store.base import StoreMiss, log

_open = os.open  # the single entry point for opening files (tests inject faults here)
SUFFIX = ".kv"
STALE_TMP_S = 600.0
LOW_WATER = 0.9  # eviction frees down to this fraction of capacity
_RD = os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW


class DiskTier:
    def __init__(self, root: str | os.PathLike, capacity_bytes: int, fingerprint: str) -> None:
        self.root = Path(root)
        self._rs = str(self.root)
        self.capacity = int(capacity_bytes)
        self.fingerprint = fingerprint
        self.evictions = 0
        self._tlock = threading.Lock()
        self.ensure_dirs()

    # ---- layout ----------------------------------------------------------------------
    def ensure_dirs(self) -> None:
        """Create root/ and root/tmp/ as 0700 (also after the directory was deleted)."""
        for d in (self.root, self.root / "tmp"):
            if not d.is_dir():
                d.mkdir(mode=0o700, parents=True, exist_ok=True)
                os.chmod(d, 0o700)

    def path(self, key: str) -> Path:
        return self.root / key[:2] / (key + SUFFIX)

    def _p(self, key: str) -> str:
        """Hot-path string form of `path` (pathlib is slow for one call per key)."""
        return f"{self._rs}/{key[:2]}/{key}{SUFFIX}"

    def contains(self, key: str) -> bool:
        try:
            os.stat(self._p(key))
            return True
        except OSError:
            return False

    # ---- reads -----------------------------------------------------------------------
    def _open_entry(self, key: str) -> int | None:
        try:
            return _open(self._p(key), _RD)
        except FileNotFoundError:
            if not self.root.is_dir():
                raise StoreMiss("dir_missing", str(self.root)) from None
            return None

    def _header(self, fd: int, key: str) -> fmt.Header:
        head = os.pread(fd, 4096, 0)
        hlen = fmt.header_len_hint(head)
        if hlen > len(head):
            head = os.pread(fd, hlen, 0)
        h = fmt.decode(head)
        fmt.check(h, key, self.fingerprint)
        size = os.fstat(fd).st_size
        if size != h.header_len + h.payload_len:
            raise StoreMiss("truncated", f"file has {size} bytes, header says "
                            f"{h.header_len + h.payload_len}")
        return h

    def read_into(self, key: str, out: torch.Tensor) -> bool:
        """Fill contiguous CPU tensor `out`; False if absent, StoreMiss if unusable."""
        fd = self._open_entry(key)
        if fd is None:
            return False
        try:
            h = self._header(fd, key)
            fmt.check_out(h, out)
            _read_verified(fd, h, fmt.byte_view(out))
            _touch(fd)
            return True
        finally:
            os.close(fd)

    def read(self, key: str, alloc: Callable[..., torch.Tensor] = fmt.alloc) -> torch.Tensor | None:
        """A new tensor with the entry, None if absent."""
        fd = self._open_entry(key)
        if fd is None:
            return None
        try:
            h = self._header(fd, key)
            t = alloc(h.shape, h.dtype)
            _read_verified(fd, h, fmt.byte_view(t))
            _touch(fd)
            return t
        finally:
            os.close(fd)

    # ---- writes ----------------------------------------------------------------------
    def write(self, key: str, t: torch.Tensor) -> None:
        """Publish `t` (contiguous CPU) under `key` atomically; raises on failure."""
        mv = fmt.byte_view(t)
        hdr = fmt.encode(key, self.fingerprint, t, fmt.segment_crcs(mv))
        size = len(hdr) + len(mv)
        if size > self.capacity:
            raise StoreMiss("too_large", f"{size} bytes > disk capacity {self.capacity}")
        tmp = self.root / "tmp" / f"{key}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW
        try:
            fd = _open(tmp, flags, 0o600)
        except FileNotFoundError:
            log.warning("store directory %s vanished; recreating it", self.root)
            self.ensure_dirs()
            fd = _open(tmp, flags, 0o600)
        try:
            try:
                _write_all(fd, [hdr, mv])
            finally:
                os.close(fd)
            final = self.path(key)
            final.parent.mkdir(mode=0o700, exist_ok=True)
            with self._locked() as lk:
                used = self._used(lk)
                used -= _size_or_zero(final)
                if used + size > self.capacity:
                    used = self._evict(int(self.capacity * LOW_WATER) - size, skip=final)
                os.replace(tmp, final)
                _set_used(lk, used + size)
        except BaseException:
            _unlink_quiet(tmp)
            raise

    def remove(self, key: str) -> bool:
        final = self.path(key)
        with self._locked() as lk:
            size = _size_or_zero(final)
            try:
                os.unlink(final)
            except FileNotFoundError:
                return False
            _set_used(lk, max(0, self._used(lk) - size))
        return True

    def clear(self) -> None:
        with self._locked() as lk:
            for _, _, p in self._entries():
                _unlink_quiet(p)
            _set_used(lk, 0)

    def usage(self) -> int:
        """Bytes of published entries (a rescan, not the counter)."""
        return sum(s for _, s, _ in self._entries())

    # ---- capacity --------------------------------------------------------------------
    @contextmanager
    def _locked(self) -> Iterator[int]:
        with self._tlock:  # flock is per open file; serialise this process's threads too
            try:
                fd = _open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            except FileNotFoundError:
                self.ensure_dirs()
                fd = _open(self.root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                yield fd
            finally:
                os.close(fd)

    def _used(self, lk: int) -> int:
        raw = os.pread(lk, 8, 0)
        if len(raw) == 8:
            return struct.unpack("<Q", raw)[0]
        total = self.usage()  # new or recreated directory: count what is there
        _set_used(lk, total)
        return total

    def _entries(self) -> list[tuple[int, int, Path]]:
        out = []
        try:
            subdirs = [e for e in os.scandir(self.root) if len(e.name) == 2 and e.is_dir()]
        except FileNotFoundError:
            return out
        for d in subdirs:
            try:
                for e in os.scandir(d.path):
                    if e.name.endswith(SUFFIX):
                        try:
                            st = e.stat(follow_symlinks=False)
                        except FileNotFoundError:
                            continue
                        out.append((st.st_mtime_ns, st.st_size, Path(e.path)))
            except FileNotFoundError:
                continue
        return out

    def _evict(self, target: int, skip: Path | None = None) -> int:
        """Delete least recently used entries until at most `target` bytes remain
        (`skip`, the entry being replaced, is not counted). Caller holds the lock."""
        self._sweep_tmp()
        entries = sorted(e for e in self._entries() if e[2] != skip)
        total = sum(s for _, s, _ in entries)
        for _, s, p in entries:
            if total <= max(target, 0):
                break
            _unlink_quiet(p)
            total -= s
            self.evictions += 1
        return total

    def _sweep_tmp(self) -> None:
        """Remove temp files of dead writers (SIGKILL, power loss)."""
        now = time.time()
        try:
            it = list(os.scandir(self.root / "tmp"))
        except FileNotFoundError:
            return
        for e in it:
            try:
                pid = int(e.name.split(".")[1])
                age = now - e.stat(follow_symlinks=False).st_mtime
            except (ValueError, IndexError, OSError):
                continue
            if age > STALE_TMP_S or not _alive(pid):
                _unlink_quiet(Path(e.path))


def _read_range(fd: int, base: int, mv: memoryview, lo: int, hi: int, seg: int,
                crcs: tuple[int, ...]) -> None:
    for o in range(lo, hi, seg):
        e = min(o + seg, hi)
        if os.preadv(fd, [mv[o:e]], base + o) != e - o:
            raise StoreMiss("truncated", "short read")
        if zlib.crc32(mv[o:e]) != crcs[o // seg]:
            raise StoreMiss("checksum", f"payload crc mismatch at byte {o}")


def _read_verified(fd: int, h: fmt.Header, mv: memoryview) -> None:
    """Read the payload straight into `mv`, verifying each segment; two threads
    for large entries (pread and crc32 both release the GIL)."""
    n, seg = h.payload_len, h.seg_size
    if n < fmt.PARALLEL_MIN:
        _read_range(fd, h.header_len, mv, 0, n, seg, h.crcs)
        return
    mid = (-(-n // seg) // 2) * seg
    other = fmt.pool().submit(_read_range, fd, h.header_len, mv, mid, n, seg, h.crcs)
    try:
        _read_range(fd, h.header_len, mv, 0, mid, seg, h.crcs)
    finally:
        other_exc = other.exception()
    if other_exc is not None:
        raise other_exc


def _write_all(fd: int, bufs: list) -> None:
    bufs = [memoryview(b).cast("B") for b in bufs]
    while bufs:
        n = os.writev(fd, bufs)
        while bufs and n >= len(bufs[0]):
            n -= len(bufs[0])
            bufs.pop(0)
        if bufs and n:
            bufs[0] = bufs[0][n:]


def _touch(fd: int) -> None:
    try:
        os.utime(fd)
    except OSError:
        pass  # read-only media: LRU order degrades to write order


def _size_or_zero(p: Path) -> int:
    try:
        return os.stat(p).st_size
    except OSError:
        return 0


def _set_used(lk: int, n: int) -> None:
    os.pwrite(lk, struct.pack("<Q", max(0, n)), 0)


def _unlink_quiet(p: Path) -> None:
    try:
        os.unlink(p)
    except OSError:
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError as e:
        return e.errno == errno.EPERM
    return True
