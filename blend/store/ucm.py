"""`ucm` backend: chunk KV in the real UCM v1 `UcmPipelineStore`.

Why this shape:
- UCM stores fixed-size blocks under 16-byte ids. A chunk entry (our header +
  payload, the same format as the local disk tier) is cut into
  ceil(len / block_size) blocks with ids sha256(key || index)[:16]; the tail
  block is zero-padded in a staging buffer and the padding is never read back.
- One shard per block (shard_size == tensor_size == block_size), so UCM's
  multi-shard commit hazard cannot leave a hole; and block 0, which holds the
  header, is dumped only after every other block has been written, so a
  visible block 0 means a complete entry.
- `Posix` works on host buffers (CPU); `Cache|Posix` moves device buffers.
- UCM has no delete: `delete` overwrites block 0 with a tombstone.
"""

from __future__ import annotations

import os
import shutil
import uuid
import weakref
from hashlib import sha256
from pathlib import Path
from typing import Any

import torch

from blend.store import format as fmt
from blend.store.base import ChunkStore, StoreMiss, log

TOMBSTONE = b"CBTOMBST"
CACHE_BUFFER_GB = 4  # UCM's Cache layer: host staging buffer in /dev/shm (UCM's default: 256)


def block_ids(key: str, n: int) -> list[bytes]:
    raw = bytes.fromhex(key)
    return [sha256(raw + i.to_bytes(4, "little")).digest()[:16] for i in range(n)]


class UcmStore(ChunkStore):
    backend = "ucm"

    def __init__(self, fingerprint: str, path: list[Path], block_size: int = 2 << 20,
                 pipeline: str = "Posix", device_id: int = 0, io_direct: bool = False,
                 unique_id: str | None = None, verify: bool = True,
                 ucm_config: dict[str, Any] | None = None) -> None:
        super().__init__(fingerprint)
        try:
            from ucm.store.factory_v1 import UcmConnectorFactoryV1
        except ImportError as e:
            raise RuntimeError(
                "store backend 'ucm' needs the UCM package (uc-manager-cuda-cu130==0.8.1, "
                f"Python 3.12 only; `make ucm-env` builds .venv312 with it): {e}") from e
        self.paths = [Path(p) for p in path]
        self.bs = int(block_size)
        self.pipeline = pipeline
        self.on_device = pipeline.startswith("Cache")
        if self.on_device and not torch.cuda.is_available():
            raise RuntimeError(f"pipeline {pipeline!r} moves device buffers and needs CUDA; "
                               "use pipeline='Posix' on CPU")
        self.device = torch.device("cuda", device_id) if self.on_device else torch.device("cpu")
        # Payload crc needs the bytes on the host: full verification on host pipelines,
        # header-only on device pipelines unless asked for (it costs a D2H copy).
        self.verify = verify if not self.on_device else bool(ucm_config and ucm_config.get(
            "blend_verify_payload", False))
        config = {
            "store_pipeline": pipeline,
            "storage_backends": [str(p) for p in self.paths],
            "device_id": device_id,
            "io_direct": io_direct,
            "block_size": self.bs,
            "shard_size": self.bs,
            "tensor_size": self.bs,
            "unique_id": unique_id or f"cacheblend-{os.getpid()}-{uuid.uuid4().hex[:8]}",
        }
        config.update({k: v for k, v in (ucm_config or {}).items()
                       if k != "blend_verify_payload"})
        shm = None
        if self.on_device:
            config.setdefault("cache_buffer_capacity_gb", CACHE_BUFFER_GB)
            shm = _check_cache_buffer(config["cache_buffer_capacity_gb"], config["unique_id"])
        self.config = config
        # UCM's store is released by close(), when this object is collected, or at exit
        # (atexit), whichever comes first: never at interpreter teardown, after CUDA is gone.
        self._box = [UcmConnectorFactoryV1.create_connector("UcmPipelineStore", config)]
        self._finalizer = weakref.finalize(self, _release, self._box, shm)

    @property
    def _s(self) -> Any:
        if not self._box:
            raise StoreMiss("closed", "the UCM store was closed")
        return self._box[0]

    # ---- helpers ---------------------------------------------------------------------
    def _staging(self, nblocks: int) -> torch.Tensor:
        return torch.empty(nblocks * self.bs, dtype=torch.uint8, device=self.device)

    def _blocks(self, buf: torch.Tensor, lo: int, hi: int) -> list[list[torch.Tensor]]:
        return [[buf[i * self.bs:(i + 1) * self.bs]] for i in range(lo, hi)]

    def _xfer(self, op: str, ids: list[bytes], bufs: list[list[torch.Tensor]]) -> None:
        fn = self._s.load if op == "load" else self._s.dump
        try:
            self._s.wait(fn(ids, [0] * len(ids), bufs))
        except Exception as e:  # StoreNotFoundError / StoreUnhealthyError / RuntimeError
            name = type(e).__name__
            if "NotFound" in name:
                raise StoreMiss("ucm_not_found", f"{op}: a block is missing ({e})") from None
            raise StoreMiss("ucm_" + op, f"{name}: {e}") from None

    def _header_from(self, stage: torch.Tensor, key: str) -> fmt.Header:
        head = stage[: min(len(stage), 4096)].cpu().numpy().tobytes()
        if head[:8] == TOMBSTONE:
            raise _Deleted()
        hlen = fmt.header_len_hint(head)
        if hlen > len(head):
            head = stage[:hlen].cpu().numpy().tobytes()
        h = fmt.decode(head)
        fmt.check(h, key, self.fingerprint)
        return h

    def _payload(self, stage: torch.Tensor, h: fmt.Header) -> torch.Tensor:
        p = stage[h.header_len:h.header_len + h.payload_len]
        if self.verify:
            fmt.verify(h, memoryview(p.cpu().numpy()))
        return p

    # ---- ChunkStore hooks ------------------------------------------------------------
    def _lookup(self, keys: list[str]) -> list[bool]:
        return [bool(x) for x in self._s.lookup([block_ids(k, 1)[0] for k in keys])]

    def _read(self, key: str, nblocks_hint: int | None) -> tuple[fmt.Header, torch.Tensor] | None:
        if not self._s.lookup(block_ids(key, 1))[0]:
            return None
        if nblocks_hint is None:  # unknown size: header block first, then the rest
            stage = self._staging(1)
            self._xfer("load", block_ids(key, 1), self._blocks(stage, 0, 1))
            h = self._header_from(stage, key)
            n = -(-(h.header_len + h.payload_len) // self.bs)
            if n > 1:
                full = self._staging(n)
                full[: self.bs].copy_(stage)
                self._xfer("load", block_ids(key, n)[1:], self._blocks(full, 1, n))
                stage = full
        else:
            n = nblocks_hint
            stage = self._staging(n)
            self._xfer("load", block_ids(key, n), self._blocks(stage, 0, n))
            h = self._header_from(stage, key)
            if -(-(h.header_len + h.payload_len) // self.bs) != n:
                raise StoreMiss("shape_mismatch", "stored entry has another size")
        return h, stage

    def _load(self, key: str, out: torch.Tensor) -> bool:
        dtype_code = fmt.DTYPE_CODES.get(out.dtype)
        if dtype_code is None:
            raise StoreMiss("dtype_mismatch", f"unsupported buffer dtype {out.dtype}")
        nbytes = out.numel() * out.element_size()
        hlen = len(fmt.encode("0" * 64, self.fingerprint, _meta_like(out),
                              [0] * -(-nbytes // fmt.SEG_SIZE)))
        try:
            r = self._read(key, -(-(hlen + nbytes) // self.bs))
        except _Deleted:
            return False
        if r is None:
            return False
        h, stage = r
        fmt.check_out(h, out)
        p = self._payload(stage, h)
        out.view(-1).view(torch.uint8).copy_(p, non_blocking=p.device != out.device)
        return True

    def _get(self, key: str) -> torch.Tensor | None:
        try:
            r = self._read(key, None)
        except _Deleted:
            return None
        if r is None:
            return None
        h, stage = r
        p = self._payload(stage, h)
        return p.clone().view(h.dtype).view(h.shape)

    def _put(self, key: str, kv: torch.Tensor, give: bool = False) -> bool:
        kv = kv.detach().contiguous()
        host = kv if kv.device.type == "cpu" else kv.cpu()
        mv = fmt.byte_view(host)
        hdr = fmt.encode(key, self.fingerprint, host, fmt.segment_crcs(mv))
        total = len(hdr) + len(mv)
        n = -(-total // self.bs)
        stage = self._staging(n)
        stage[:len(hdr)].copy_(torch.frombuffer(bytearray(hdr), dtype=torch.uint8))
        src = kv.view(-1).view(torch.uint8) if kv.device == self.device else \
            host.view(-1).view(torch.uint8)
        stage[len(hdr):total].copy_(src)
        stage[total:].zero_()
        ids = block_ids(key, n)
        if n > 1:  # body first, header block last: a visible block 0 means a whole entry
            self._xfer("dump", ids[1:], self._blocks(stage, 1, n))
        self._xfer("dump", ids[:1], self._blocks(stage, 0, 1))
        return True

    def _delete(self, key: str) -> bool:
        if not self._s.lookup(block_ids(key, 1))[0]:
            return False
        stage = self._staging(1)
        stage.zero_()
        stage[:8].copy_(torch.frombuffer(bytearray(TOMBSTONE), dtype=torch.uint8))
        self._xfer("dump", block_ids(key, 1), self._blocks(stage, 0, 1))
        return True

    def _clear(self) -> None:
        """Remove every block file under the storage directories (this store owns them);
        UCM's own `.ucm_*` bookkeeping is left alone."""
        for root in self.paths:
            for d in root.iterdir():
                if d.is_dir() and not d.name.startswith("."):
                    shutil.rmtree(d, ignore_errors=True)
                    d.mkdir(exist_ok=True)
        log.info("cleared UCM storage under %s", [str(p) for p in self.paths])

    def close(self) -> None:
        self._finalizer()

    def _extra_stats(self) -> dict:
        return {"pipeline": self.pipeline, "block_size": self.bs,
                "paths": [str(p) for p in self.paths]}


def _check_cache_buffer(gib: Any, unique_id: str) -> Path:
    """UCM's Cache layer maps `cache_buffer_capacity_gb` of /dev/shm up front. Its own
    default is 256 GiB: on a 128 GiB host that fills memory until the process is killed,
    and the file it leaves behind starves the next run. Refuse what cannot fit."""
    if isinstance(gib, bool) or not isinstance(gib, int | float) or gib < CACHE_BUFFER_GB:
        raise ValueError(f"ucm_config.cache_buffer_capacity_gb: {gib!r} must be a number "
                         f">= {CACHE_BUFFER_GB} (UCM's minimum for 2 MiB shards)")
    shm = Path("/dev/shm")
    if shm.is_dir():
        free = shutil.disk_usage(shm).free / 2**30
        if gib > free:
            raise ValueError(f"ucm_config.cache_buffer_capacity_gb: {gib} GiB does not fit the "
                             f"{free:.1f} GiB free in /dev/shm (allowed {CACHE_BUFFER_GB}.."
                             f"{int(free)}); stale uc_shm_cache_* files there are left by "
                             "killed UCM processes")
    return shm / f"uc_shm_cache_{unique_id}"


def _release(box: list, shm: Path | None) -> None:
    box.clear()  # UCM's store (threads, buffers) goes with its last reference
    if shm is not None:
        shm.unlink(missing_ok=True)


class _Deleted(Exception):
    """Block 0 is a tombstone: the entry was deleted (a plain miss)."""


def _meta_like(t: torch.Tensor) -> torch.Tensor:
    """A zero-storage tensor with t's shape and dtype, to size a header."""
    return torch.empty(t.shape, dtype=t.dtype, device="meta")

