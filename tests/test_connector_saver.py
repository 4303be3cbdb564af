"""`blend/connector/saver.py` without an engine: best-effort saves drop over the bound,
must-store saves (`blend.precompute`) wait for the writer instead."""

from __future__ import annotations

import threading
import time

import torch

from blend.connector.saver import ChunkSaver
from blend.store.local import LocalStore

CHUNK = torch.ones(4096, dtype=torch.bfloat16)  # 8 KiB
BOUND = 2 * CHUNK.numel() * CHUNK.element_size()  # two chunks pending at most


class SlowStore(LocalStore):
    """The injected fault: a writer slower than the step (as a disk is, for GBs)."""

    def __init__(self, *a, gate: threading.Event, **kw) -> None:
        super().__init__(*a, **kw)
        self.gate = gate

    def _put(self, key, kv, give=False):
        self.gate.wait(10)
        return super()._put(key, kv, give)


def _key(i: int) -> str:
    return f"{i:064x}"


def _saver(tmp_path, gate: threading.Event) -> tuple[ChunkSaver, LocalStore]:
    store = SlowStore("fp", tmp_path, memory_bytes=1 << 20, disk_bytes=1 << 22, gate=gate)
    return ChunkSaver(store, BOUND), store


def test_best_effort_saves_over_the_bound_are_dropped_and_counted(tmp_path):
    gate = threading.Event()
    saver, store = _saver(tmp_path, gate)
    took = [saver.submit(_key(i), CHUNK.clone()) for i in range(5)]
    gate.set()
    assert saver.flush(10)
    assert took.count(False) >= 2 and saver.stats.dropped == took.count(False)
    assert sum(store.lookup([_key(i) for i in range(5)])) == took.count(True)
    saver.close()


def test_must_store_saves_wait_for_room_and_all_land(tmp_path):
    gate = threading.Event()
    saver, store = _saver(tmp_path, gate)
    opener = threading.Timer(0.3, gate.set)  # the writer catches up while submits wait
    opener.start()
    t0 = time.monotonic()
    took = [saver.submit(_key(i), CHUNK.clone(), wait_s=10.0) for i in range(6)]
    assert time.monotonic() - t0 >= 0.25  # it did wait, not drop
    assert saver.flush(10)
    assert took == [True] * 6 and saver.stats.dropped == 0 and saver.stats.waits >= 1
    assert store.lookup([_key(i) for i in range(6)]) == [True] * 6
    saver.close()


def test_a_must_store_chunk_larger_than_the_bound_is_taken_once_the_queue_is_empty(tmp_path):
    gate = threading.Event()
    gate.set()
    saver, store = _saver(tmp_path, gate)
    big = torch.ones(3 * CHUNK.numel(), dtype=torch.bfloat16)
    assert not saver.submit(_key(1), big.clone())  # best effort: over the bound, dropped
    assert saver.submit(_key(2), big.clone(), wait_s=5.0)
    assert saver.flush(10) and store.lookup([_key(2)]) == [True]
    saver.close()


def test_a_must_store_save_gives_up_after_its_wait_and_counts_the_drop(tmp_path):
    gate = threading.Event()  # the writer never moves within the test
    saver, _ = _saver(tmp_path, gate)
    assert saver.submit(_key(1), CHUNK.clone()) and saver.submit(_key(2), CHUNK.clone())
    t0 = time.monotonic()
    assert not saver.submit(_key(3), CHUNK.clone(), wait_s=0.2)
    assert 0.15 <= time.monotonic() - t0 < 5 and saver.stats.dropped == 1
    gate.set()
    assert saver.flush(10)
    saver.close()


def test_save_pending_bytes_is_parsed_and_its_range_checked_at_start_up():
    import pytest

    from blend.connector.extra_config import check_extra_config

    assert check_extra_config({})["save_pending_bytes"] == 4 << 30
    assert check_extra_config({"save_pending_bytes": "64MiB"})["save_pending_bytes"] == 64 << 20
    for bad in [1024, "lots", True, -1]:
        with pytest.raises(ValueError, match="save_pending_bytes"):
            check_extra_config({"save_pending_bytes": bad})
