"""`stats.py` without an engine: what one interval's payload holds, how vLLM's aggregation
sums it, and that `collect` reports each role's counters since its last call only.

`test_vllm_metrics.py` checks the same numbers end to end, through a real engine's
stats path into Prometheus.
"""

from __future__ import annotations

import pytest

from blend.connector.stats import COUNTERS, BlendStats, collect, load_gbps


def test_an_empty_payload_has_every_counter_at_zero():
    st = BlendStats(data={})
    assert st.is_empty()
    assert set(COUNTERS) <= set(st.data) and not any(st.data[k] for k in COUNTERS)
    assert st.data["store_errors"] == {} and st.data["blend_ms_steps"] == []
    assert not BlendStats(data={"fallbacks": 1}).is_empty()
    assert not BlendStats(data={"store_errors": {"checksum": 1}}).is_empty()


def test_aggregate_sums_counters_and_merges_errors_and_steps():
    a = BlendStats(data={"chunk_hits": 2, "blend_ms": 1.5, "store_errors": {"checksum": 1},
                         "blend_ms_steps": [1.5]})
    b = BlendStats(data={"chunk_hits": 3, "blend_ms": 2.0,
                         "store_errors": {"checksum": 2, "truncated": 1},
                         "blend_ms_steps": [2.0]})
    out = a.aggregate(b)
    assert out is a
    assert a.data["chunk_hits"] == 5 and a.data["blend_ms"] == 3.5
    assert a.data["store_errors"] == {"checksum": 3, "truncated": 1}
    assert a.data["blend_ms_steps"] == [1.5, 2.0]
    assert b.data["blend_ms_steps"] == [2.0]  # the other payload is left as it was
    a.reset()
    assert a.is_empty()


def test_reduce_gives_rates_not_raw_counts():
    st = BlendStats(data={"chunk_lookups": 3, "chunk_hits": 2, "blended_tokens": 400,
                          "recomputed_tokens": 60, "bytes_fetched": 3_000_000_000,
                          "load_ms": 1500.0, "blend_ms": 12.345, "blended_requests": 2,
                          "fallbacks": 1, "store_errors": {"checksum": 2, "truncated": 1}})
    assert st.reduce() == {"Blended reqs": 2, "Chunk hit rate": 0.667, "Blended tokens": 400,
                           "Recomputed fraction": 0.15, "Load GB/s": 2.0, "Blend ms": 12.3,
                           "Fallbacks": 1, "Store errors": 3}
    zero = BlendStats(data={}).reduce()
    assert zero["Chunk hit rate"] == 0.0 and zero["Recomputed fraction"] == 0.0


@pytest.mark.parametrize("fetched,ms,gbps", [(0, 0.0, 0.0), (10**9, 0.0, 0.0),
                                             (10**9, 500.0, 2.0)])
def test_load_gbps_is_zero_when_nothing_was_timed(fetched, ms, gbps):
    assert load_gbps({"bytes_fetched": fetched, "load_ms": ms}) == gbps


class _Store:
    def __init__(self) -> None:
        self.errors: dict[str, int] = {}

    def stats(self) -> dict:
        return {"errors": dict(self.errors)}


class _Role:
    """A scheduler or worker as `collect` sees it (weak-referenceable, like the real ones)."""

    def __init__(self, store, **attrs) -> None:
        self.store = store
        self.__dict__.update(attrs)


def test_collect_reports_the_worker_since_its_last_call():
    store = _Store()
    taken = [{"chunks": 4, "chunk_hits": 3, "blend_ms": 7.0, "stored_chunks": 1}, {}]
    worker = _Role(store, take_stats=lambda: taken.pop(0))
    store.errors = {"checksum": 2}
    st = collect(worker=worker)
    assert (st.data["chunk_lookups"], st.data["chunk_hits"], st.data["stored_chunks"]) == (4, 3, 1)
    assert st.data["blend_ms_steps"] == [7.0] and st.data["store_errors"] == {"checksum": 2}
    assert collect(worker=worker) is None  # nothing new: the store's errors were reported


def test_collect_turns_the_schedulers_running_totals_into_deltas():
    store = _Store()
    sched = _Role(store, stats={"fallbacks": 2, "plain_prefills": 1, "scheduler_ms": 0.5,
                                "bad_spans": 2})
    st = collect(scheduler=sched)
    assert (st.data["fallbacks"], st.data["plain_prefills"]) == (2, 1)
    sched.stats = {**sched.stats, "fallbacks": 3, "scheduler_ms": 0.75}
    store.errors = {"fingerprint": 1}
    st = collect(scheduler=sched)
    assert (st.data["fallbacks"], st.data["plain_prefills"]) == (1, 0)
    assert st.data["scheduler_ms"] == pytest.approx(0.25)
    assert st.data["store_errors"] == {"fingerprint": 1}
    assert collect(scheduler=sched) is None


def test_a_store_whose_stats_fail_does_not_fail_the_step():
    class Broken:
        def stats(self):
            raise OSError("gone")

    worker = _Role(Broken(), take_stats=lambda: {"chunks": 1})
    assert collect(worker=worker).data["store_errors"] == {}


def test_store_reports_give_each_roles_counters_and_the_gpu_tier(tmp_path):
    import torch

    from blend.connector.stats import store_reports
    from blend.store.gpu_tier import DeviceTier
    from blend.store.local import LocalStore

    store = LocalStore("fp", tmp_path, memory_bytes=3 * 4096, disk_bytes=1 << 20)
    for i in range(4):  # the fourth put evicts the first from memory; disk keeps all four
        assert store.put(f"{i:064x}", torch.zeros(1024))
    tier = DeviceTier(1 << 20)
    tier.put(f"{0:064x}", torch.zeros(16))
    from blend.connector.saver import SaverStats

    saver = _Role(None, stats=SaverStats(submitted=3, saved=2, dropped=1))
    got = store_reports(_Role(store), _Role(store, gpu_tier=tier, saver=saver))
    assert got["scheduler"]["puts"] == 4 and got["scheduler"]["memory_evictions"] == 1
    assert "gpu_tier" not in got["scheduler"] and "saver" not in got["scheduler"]
    assert got["worker"]["saver"]["dropped"] == 1 and got["worker"]["saver"]["saved"] == 2
    assert got["worker"]["gpu_tier"] == {"bytes_used": 64, "capacity": 1 << 20, "entries": 1,
                                         "evictions": 0}


def test_a_store_report_that_fails_is_reported_not_raised():
    class Broken:
        def stats(self):
            raise OSError("gone")

    got = store_reports_of(_Role(Broken()))
    assert got == {"scheduler": {"stats_error": "OSError('gone')"}}


def store_reports_of(scheduler):
    from blend.connector.stats import store_reports

    return store_reports(scheduler, None)
