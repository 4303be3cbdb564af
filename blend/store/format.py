"""On-disk entry format: a self-checking binary header followed by raw tensor bytes.

Why not pickle/torch.save: reading an entry must never execute code, and the
payload must land directly in a caller buffer (readinto) with no extra copy.

Layout (little-endian):
  fixed   magic(8) version(u16) dtype(u8) ndim(u8) header_len(u32)
          payload_len(u64) seg_size(u32) n_segs(u32) fp_len(u16) key(32 raw bytes)
  then    shape (ndim x u64), fingerprint (fp_len bytes, utf-8),
          one crc32 per payload segment (n_segs x u32), header crc32 (u32),
          zero padding to a multiple of 64 bytes; then the payload.
Per-segment crc32 (not one crc over everything) lets two threads verify halves
of a large payload at once: zlib.crc32 on one core is slower than the disk's page cache.
"""

from __future__ import annotations

import math
import mmap
import struct
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch

from blend.store.base import StoreMiss

MAGIC = b"CBLENDKV"
VERSION = 1
SEG_SIZE = 1 << 20
_FIXED = struct.Struct("<8sHBBIQIIH32s")
ALIGN = 64
MAX_HEADER = 1 << 20

DTYPES: dict[int, torch.dtype] = {
    1: torch.float32, 2: torch.bfloat16, 3: torch.float16, 4: torch.float64,
    5: torch.int8, 6: torch.uint8, 7: torch.int32, 8: torch.int64,
    9: torch.float8_e4m3fn, 10: torch.float8_e5m2,
}
DTYPE_CODES = {v: k for k, v in DTYPES.items()}

_pool: ThreadPoolExecutor | None = None
PARALLEL_MIN = 4 * SEG_SIZE  # below this, threads cost more than they save


def pool() -> ThreadPoolExecutor:
    """Two worker threads: read syscalls and zlib.crc32 both release the GIL."""
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(2, thread_name_prefix="blend-store")
    return _pool


@dataclass(frozen=True)
class Header:
    dtype: torch.dtype
    shape: tuple[int, ...]
    payload_len: int
    header_len: int
    fingerprint: str
    key: str
    seg_size: int
    crcs: tuple[int, ...]


def byte_view(t: torch.Tensor) -> memoryview:
    """Writable uint8 memoryview over a contiguous CPU tensor's storage (no copy)."""
    return memoryview(t.reshape(-1).view(torch.uint8).numpy())


def alloc(shape: tuple[int, ...], dtype: torch.dtype, pin: bool = False) -> torch.Tensor:
    """A fresh CPU tensor. Large ones come from an anonymous mapping advised to use
    transparent huge pages: first-touch faults on 4 KiB pages cap how fast a fresh
    large buffer fills; huge pages fault a few times less often per byte."""
    if pin:
        return torch.empty(shape, dtype=dtype, pin_memory=True)
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    if nbytes < (4 << 20):
        return torch.empty(shape, dtype=dtype)
    m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        m.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(m, dtype=dtype).view(shape)


def _seg_crcs(mv: memoryview, lo: int, hi: int, seg: int) -> list[int]:
    return [zlib.crc32(mv[o:min(o + seg, hi)]) for o in range(lo, hi, seg)]


def segment_crcs(mv: memoryview, seg: int = SEG_SIZE) -> list[int]:
    """crc32 of each `seg`-byte segment, two threads for large payloads."""
    n = len(mv)
    if n < PARALLEL_MIN:
        return _seg_crcs(mv, 0, n, seg)
    nseg = -(-n // seg)
    mid = (nseg // 2) * seg
    a = pool().submit(_seg_crcs, mv, mid, n, seg)
    return _seg_crcs(mv, 0, mid, seg) + a.result()


def encode(key: str, fingerprint: str, t: torch.Tensor, crcs: list[int],
           seg: int = SEG_SIZE) -> bytes:
    """Header bytes for tensor `t` whose payload segment crcs are `crcs`."""
    fp = fingerprint.encode()
    shape = tuple(int(s) for s in t.shape)
    payload_len = t.numel() * t.element_size()
    var = struct.pack(f"<{len(shape)}Q", *shape) + fp + struct.pack(f"<{len(crcs)}I", *crcs)
    raw_len = _FIXED.size + len(var) + 4
    header_len = -(-raw_len // ALIGN) * ALIGN
    fixed = _FIXED.pack(MAGIC, VERSION, DTYPE_CODES[t.dtype], len(shape), header_len,
                        payload_len, seg, len(crcs), len(fp), bytes.fromhex(key))
    body = fixed + var
    return body + struct.pack("<I", zlib.crc32(body)) + bytes(header_len - raw_len)


def fixed_len() -> int:
    return _FIXED.size


def header_len_hint(buf: bytes) -> int:
    """Total header length announced by the fixed part (validated)."""
    if len(buf) < _FIXED.size:
        raise StoreMiss("truncated", f"header has {len(buf)} bytes")
    magic, version, _, _, hlen, *_ = _FIXED.unpack_from(buf)
    if magic != MAGIC:
        raise StoreMiss("bad_header", "bad magic")
    if version != VERSION:
        raise StoreMiss("version", f"format version {version}, expected {VERSION}")
    if not _FIXED.size < hlen <= MAX_HEADER or hlen % ALIGN:
        raise StoreMiss("bad_header", f"header length {hlen}")
    return hlen


def decode(buf: bytes | memoryview) -> Header:
    """Parse and verify a header (magic, version, header crc, internal consistency)."""
    buf = bytes(buf)
    hlen = header_len_hint(buf)
    if len(buf) < hlen:
        raise StoreMiss("truncated", f"header needs {hlen} bytes, have {len(buf)}")
    (_, _, code, ndim, _, payload_len, seg, nseg, fp_len, key) = _FIXED.unpack_from(buf)
    off = _FIXED.size
    end = off + 8 * ndim + fp_len + 4 * nseg
    if end + 4 > hlen:
        raise StoreMiss("bad_header", "fields overrun header")
    (crc,) = struct.unpack_from("<I", buf, end)
    if zlib.crc32(buf[:end]) != crc:
        raise StoreMiss("checksum", "header crc mismatch")
    if code not in DTYPES:
        raise StoreMiss("bad_header", f"dtype code {code}")
    shape = struct.unpack_from(f"<{ndim}Q", buf, off)
    off += 8 * ndim
    fp = buf[off:off + fp_len].decode("utf-8", "replace")
    off += fp_len
    crcs = struct.unpack_from(f"<{nseg}I", buf, off)
    dtype = DTYPES[code]
    itemsize = torch.empty((), dtype=dtype).element_size()
    if math.prod(shape) * itemsize != payload_len or seg <= 0 or nseg != -(-payload_len // seg):
        raise StoreMiss("bad_header", "shape/length/segments disagree")
    return Header(dtype, tuple(shape), payload_len, hlen, fp, key.hex(), seg, tuple(crcs))


def check(h: Header, key: str, fingerprint: str) -> None:
    """The entry belongs to this key and this model layout, or it is a miss."""
    if h.fingerprint != fingerprint:
        raise StoreMiss("fingerprint", f"entry fingerprint {h.fingerprint[:16]}...")
    if h.key != key:
        raise StoreMiss("wrong_key", f"entry is for {h.key[:16]}...")


def check_out(h: Header, out: torch.Tensor) -> None:
    if out.dtype != h.dtype:
        raise StoreMiss("dtype_mismatch", f"stored {h.dtype}, buffer {out.dtype}")
    if tuple(out.shape) != h.shape:
        raise StoreMiss("shape_mismatch", f"stored {h.shape}, buffer {tuple(out.shape)}")


def verify(h: Header, mv: memoryview) -> None:
    """Payload crcs match, or the entry is a miss."""
    if list(h.crcs) != segment_crcs(mv, h.seg_size):
        raise StoreMiss("checksum", "payload crc mismatch")
