"""Write chunk KV to the store off the engine step.

A chunk of an 8B model is 64 MB per 500 tokens. Copying it to the host,
into the memory tier and onto disk (with checksums) inside the step stalled
every request of a server: under a stream of requests that is most of the
step time, and the queue grows. So the step only hands the chunk's device
tensor over (after the kernel that extracted it was queued); a thread copies
it to pinned memory on its own stream, waits for that copy, and gives the
pinned buffer to the store, which keeps it as the memory tier's entry (no
second copy) and writes it to disk.

Until it is written, a pending chunk is still served to blends from its
device tensor (`get`), so a chunk that recurs at once is not a miss.
Saving is best effort: over `max_pending_bytes` a save is dropped and
counted (a later request recomputes the chunk; nothing is wrong, only slower).
An explicit "compute and store" request (`blend.precompute`, `on_miss="compute"`)
waits for room instead: a precompute of many chunks in one call otherwise
outruns the writer and silently stores only part of them (the 0.33 bench's
precompute of 11 GiB kept 12 of one set's 32 chunks).
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from blend.log import get_logger

log = get_logger("Connector")


@dataclass
class _Job:
    key: str
    kv: torch.Tensor  # [L, 2, n, H, D] on the device (or the CPU), the saver's own
    ready: torch.cuda.Event | None  # recorded after the kernel that wrote `kv`
    token_ids: list[int] | None


@dataclass
class SaverStats:
    submitted: int = 0
    saved: int = 0
    failed: int = 0
    dropped: int = 0  # over the pending bound
    waits: int = 0  # times a must-store submit waited for room
    save_ms: float = 0.0  # background time (copy wait + store put)


class ChunkSaver:
    """One background thread per worker; `submit` never blocks the step."""

    def __init__(self, store, max_pending_bytes: int,
                 on_saved: Callable[[str, list[int] | None], None] | None = None) -> None:
        self.store = store
        self.max_pending = int(max_pending_bytes)
        self.on_saved = on_saved
        self.stats = SaverStats()
        self._pending: dict[str, torch.Tensor] = {}
        self._bytes = 0
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified whenever a save finishes
        self._q: queue.Queue[_Job | None] = queue.Queue()
        self._stream: torch.cuda.Stream | None = None
        self._thread = threading.Thread(target=self._loop, name="cacheblend-saver", daemon=True)
        self._thread.start()

    def submit(self, key: str, kv: torch.Tensor, token_ids: list[int] | None = None,
               wait_s: float = 0.0) -> bool:
        """Queue `kv` (which the caller no longer writes) for the store; False if dropped.

        `wait_s > 0`: over the bound, block up to that long for earlier saves to finish
        (a chunk alone in the queue is always taken, however large) before dropping."""
        n = kv.numel() * kv.element_size()
        with self._lock:
            if key in self._pending:
                return True
            deadline = time.monotonic() + wait_s
            while self._bytes + n > self.max_pending and not (wait_s > 0 and not self._bytes):
                left = deadline - time.monotonic()
                if left <= 0:
                    self.stats.dropped += 1
                    return False
                self.stats.waits += 1
                self._room.wait(left)
            self._pending[key] = kv
            self._bytes += n
            self.stats.submitted += 1
        ready = None
        if kv.is_cuda:
            ready = torch.cuda.Event()
            ready.record(torch.cuda.current_stream(kv.device))
        self._q.put(_Job(key, kv, ready, token_ids))
        return True

    def get(self, key: str) -> torch.Tensor | None:
        """A chunk still being saved (its device tensor: read it, never write it)."""
        with self._lock:
            return self._pending.get(key)

    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    def flush(self, timeout: float = 60.0) -> bool:
        """Wait until every queued save is done (tests, shutdown); False on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._q.unfinished_tasks == 0:
                return True
            time.sleep(0.005)
        return False

    def close(self) -> None:
        self._q.put(None)
        self._thread.join(timeout=30)

    # ------------------------------------------------------------------ the thread
    def _loop(self) -> None:
        while True:
            job = self._q.get()
            try:
                if job is None:
                    return
                self._save(job)
            finally:
                self._q.task_done()

    def _save(self, job: _Job) -> None:
        t0 = time.perf_counter()
        ok = False
        try:
            host = self._to_host(job)
            ok = self.store.put(job.key, host, give=True)
        except Exception as exc:  # noqa: BLE001 - a lost save is only a future miss
            log.warning("chunk %s: save failed (%r)", job.key[:12], exc)
        with self._lock:
            kv = self._pending.pop(job.key, None)
            if kv is not None:
                self._bytes -= kv.numel() * kv.element_size()
            self.stats.saved += int(ok)
            self.stats.failed += int(not ok)
            self.stats.save_ms += (time.perf_counter() - t0) * 1e3
            self._room.notify_all()
        if ok and self.on_saved is not None:
            self.on_saved(job.key, job.token_ids)

    def _to_host(self, job: _Job) -> torch.Tensor:
        kv = job.kv
        if not kv.is_cuda:
            return kv
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=kv.device)
        with torch.cuda.stream(self._stream):
            self._stream.wait_event(job.ready)
            host = torch.empty(kv.shape, dtype=kv.dtype, pin_memory=True)
            host.copy_(kv, non_blocking=True)
            done = torch.cuda.Event()
            done.record(self._stream)
        done.synchronize()
        return host
