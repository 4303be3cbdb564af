"""BlendConnector metrics through vLLM's own connector-stats path and Prometheus hooks.

Why this route: vLLM already ships per-step connector stats from every worker
(`get_kv_connector_stats` → `KVConnectorOutput`) and from the scheduler to
the front-end process, sums them (`aggregate`), logs them ("KV Transfer
metrics: ...", via `reduce`) and hands them to Prometheus (`build_prom_metrics`).
Riding that path means `llm.get_metrics()`, `/metrics` and the periodic log
line all show CacheBlend's numbers with no extra plumbing.

A payload is a flat dict of counters summed since the last step, plus
`store_errors` ({reason: n}) and `blend_ms_steps` (one entry per blended step).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any

from vllm.distributed.kv_transfer.kv_connector.v1.metrics import (
    KVConnectorPromMetrics,
    KVConnectorStats,
    PromMetric,
    PromMetricT,
)

# name -> (what it counts, Prometheus metric name)
COUNTERS: dict[str, tuple[str, str]] = {
    "chunk_lookups": ("chunks the worker looked up in the store", "vllm:cacheblend_chunk_lookups"),
    "chunk_hits": ("chunks whose KV came from the store", "vllm:cacheblend_chunk_hits"),
    "chunk_tokens": ("tokens in looked-up chunks", "vllm:cacheblend_chunk_tokens"),
    "chunk_hit_tokens": ("tokens in chunks loaded from the store", "vllm:cacheblend_chunk_hit_tokens"),
    "blended_requests": ("requests blended", "vllm:cacheblend_blended_requests"),
    "blended_tokens": ("context tokens blended (placed or recomputed)", "vllm:cacheblend_blended_tokens"),
    "recomputed_tokens": ("blended tokens recomputed after the check layers",
                          "vllm:cacheblend_recomputed_tokens"),
    "computed_chunks": ("missed chunks computed standalone", "vllm:cacheblend_computed_chunks"),
    "stored_chunks": ("chunk KV entries written to the store", "vllm:cacheblend_stored_chunks"),
    "bytes_fetched": ("chunk KV bytes the store and the GPU tier served",
                      "vllm:cacheblend_fetched_bytes"),
    "bytes_loaded": ("chunk KV bytes copied host to device", "vllm:cacheblend_loaded_bytes"),
    "gpu_hits": ("chunks served by the GPU tier (no copy)", "vllm:cacheblend_gpu_tier_hits"),
    "pinned_on_load": ("chunks a store returned pageable, pinned while loading",
                       "vllm:cacheblend_pinned_on_load"),
    "load_ms": ("milliseconds spent loading chunk KV", "vllm:cacheblend_load_milliseconds"),
    "blend_ms": ("milliseconds spent blending", "vllm:cacheblend_blend_milliseconds"),
    "rank_misses": ("chunks a TP rank had but another lacked, recomputed on every rank",
                    "vllm:cacheblend_rank_misses"),
    "fallbacks": ("requests with chunks that fell back to plain prefill",
                  "vllm:cacheblend_fallbacks"),
    "plain_prefills": ("requests with chunks left to vLLM's own prefill (too few hits)",
                       "vllm:cacheblend_plain_prefills"),
    "save_requested": ("chunks extracted from prompts for the store",
                       "vllm:cacheblend_save_requests"),
    "save_dropped": ("chunk saves dropped (the saver was over its bound)",
                     "vllm:cacheblend_save_dropped"),
    "store_evictions": ("host and disk tier evictions", "vllm:cacheblend_store_evictions"),
    "jit_compiles": ("blend-kernel Triton compiles after the start-up warm-up",
                     "vllm:cacheblend_jit_compiles"),
    "graph_replays": ("blend layers replayed from CUDA graphs (cuda_graphs)",
                      "vllm:cacheblend_graph_replays"),
    "scheduler_ms": ("milliseconds in the connector's scheduler side",
                     "vllm:cacheblend_scheduler_milliseconds"),
}
_WORKER_KEYS = {"chunks": "chunk_lookups", "chunk_hits": "chunk_hits",
                "chunk_tokens": "chunk_tokens", "chunk_hit_tokens": "chunk_hit_tokens",
                "blended_requests": "blended_requests", "blended_tokens": "blended_tokens",
                "recomputed_tokens": "recomputed_tokens", "computed_chunks": "computed_chunks",
                "stored_chunks": "stored_chunks", "bytes_loaded": "bytes_loaded",
                "bytes_fetched": "bytes_fetched",
                "load_ms": "load_ms", "blend_ms": "blend_ms", "gpu_hits": "gpu_hits",
                "pinned_on_load": "pinned_on_load", "rank_misses": "rank_misses",
                "save_requested": "save_requested", "save_dropped": "save_dropped",
                "store_evictions": "store_evictions", "jit_compiles": "jit_compiles",
                "graph_replays": "graph_replays"}


def empty() -> dict[str, Any]:
    d: dict[str, Any] = dict.fromkeys(COUNTERS, 0)
    d["store_errors"] = {}
    d["blend_ms_steps"] = []
    return d


@dataclass
class BlendStats(KVConnectorStats):
    """One interval's CacheBlend counters (picklable: plain dicts, lists and numbers)."""

    def __post_init__(self) -> None:
        base = empty()
        for k, v in (self.data or {}).items():
            base[k] = v
        self.data = base

    def reset(self) -> None:
        self.data = empty()

    def is_empty(self) -> bool:
        d = self.data
        return not any(d[k] for k in COUNTERS) and not d["store_errors"] \
            and not d["blend_ms_steps"]

    def aggregate(self, other: KVConnectorStats) -> KVConnectorStats:
        o = other.data
        for k in COUNTERS:
            self.data[k] += o.get(k, 0)
        errs = self.data["store_errors"]
        for reason, n in o.get("store_errors", {}).items():
            errs[reason] = errs.get(reason, 0) + n
        self.data["blend_ms_steps"] = list(self.data["blend_ms_steps"]) + \
            list(o.get("blend_ms_steps", []))
        return self

    def reduce(self) -> dict[str, int | float]:
        """The interval in the numbers an operator asks for first."""
        d = self.data
        out: dict[str, int | float] = {
            "Blended reqs": d["blended_requests"],
            "Chunk hit rate": round(d["chunk_hits"] / d["chunk_lookups"], 3)
            if d["chunk_lookups"] else 0.0,
            "Blended tokens": d["blended_tokens"],
            "Recomputed fraction": round(d["recomputed_tokens"] / d["blended_tokens"], 3)
            if d["blended_tokens"] else 0.0,
            "Load GB/s": round(load_gbps(d), 3),
            "Blend ms": round(d["blend_ms"], 1),
            "Fallbacks": d["fallbacks"],
            "Store errors": sum(d["store_errors"].values()),
        }
        return out


def load_gbps(d: dict[str, Any]) -> float:
    """Chunk KV fetched per second of fetch time (the store's read speed), 0 if nothing was.

    The host-to-device copies are asynchronous, so no host clock times them;
    their GPU time is in the per-request trace (`timings_ms.load`).
    """
    return d["bytes_fetched"] / (d["load_ms"] * 1e6) if d["load_ms"] > 0 else 0.0


# ------------------------------------------------------------------ collection (per process)
_prev: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _store_error_delta(owner: Any, store: Any) -> dict[str, int]:
    """New store errors since the last call, by reason (the store's counters are cumulative)."""
    if store is None:
        return {}
    try:
        now = dict(store.stats().get("errors", {}))
    except Exception:  # noqa: BLE001 - metrics must never fail a step
        return {}
    prev = _prev.setdefault(owner, {}).get("errors", {})
    _prev[owner]["errors"] = now
    return {r: n - prev.get(r, 0) for r, n in now.items() if n > prev.get(r, 0)}


def collect(scheduler: Any = None, worker: Any = None) -> BlendStats | None:
    """This role's counters since the last call (None when nothing happened)."""
    d = empty()
    if worker is not None:
        w = worker.take_stats()
        for src, dst in _WORKER_KEYS.items():
            d[dst] += w.get(src, 0)
        if w.get("blend_ms"):
            d["blend_ms_steps"].append(w["blend_ms"])
        d["store_errors"] = _store_error_delta(worker, getattr(worker, "store", None))
    if scheduler is not None:
        now = dict(scheduler.stats)
        prev = _prev.setdefault(scheduler, {}).get("counts", {})
        _prev[scheduler]["counts"] = now
        for k in ("fallbacks", "plain_prefills", "scheduler_ms"):
            d[k] += now.get(k, 0) - prev.get(k, 0)
        for r, n in _store_error_delta(scheduler, getattr(scheduler, "store", None)).items():
            d["store_errors"][r] = d["store_errors"].get(r, 0) + n
    st = BlendStats(data=d)
    return None if st.is_empty() else st


# ------------------------------------------------------------------ Prometheus
class BlendPromMetrics(KVConnectorPromMetrics):
    """`vllm:cacheblend_*` counters, a per-step blend-time histogram and a load GB/s gauge."""

    def __init__(self, vllm_config: Any, metric_types: dict[type[PromMetric], type[PromMetricT]],
                 labelnames: list[str], per_engine_labelvalues: dict[int, list[object]]) -> None:
        super().__init__(vllm_config, metric_types, labelnames, per_engine_labelvalues)
        self.counters = {}
        for key, (doc, name) in COUNTERS.items():
            c = self._counter_cls(name=name, documentation=f"CacheBlend: {doc}",
                                  labelnames=labelnames)
            self.counters[key] = {i: c.labels(*v) for i, v in per_engine_labelvalues.items()}
        self.errors = self._counter_cls(name="vllm:cacheblend_store_errors",
                                        documentation="CacheBlend: store errors (each a miss), "
                                        "by reason", labelnames=labelnames + ["reason"])
        h = self._histogram_cls(name="vllm:cacheblend_blend_step_milliseconds",
                                documentation="CacheBlend: blend time per engine step",
                                labelnames=labelnames,
                                buckets=[1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000])
        self.blend_hist = {i: h.labels(*v) for i, v in per_engine_labelvalues.items()}
        g = self._gauge_cls(name="vllm:cacheblend_load_gbps",
                            documentation="CacheBlend: chunk KV load GB/s over the last interval",
                            labelnames=labelnames, multiprocess_mode="mostrecent")
        self.gbps = {i: g.labels(*v) for i, v in per_engine_labelvalues.items()}

    def observe(self, transfer_stats_data: dict[str, Any], engine_idx: int = 0) -> None:
        d = BlendStats(data=dict(transfer_stats_data)).data
        for key, per_engine in self.counters.items():
            if d[key]:
                per_engine[engine_idx].inc(d[key])
        labels = self.per_engine_labelvalues[engine_idx]
        for reason, n in d["store_errors"].items():
            self.errors.labels(*labels, reason).inc(n)
        for ms in d["blend_ms_steps"]:
            self.blend_hist[engine_idx].observe(ms)
        if d["bytes_fetched"]:
            self.gbps[engine_idx].set(load_gbps(d))


def store_reports(scheduler: Any, worker: Any) -> dict[str, dict]:
    """Each role's store counters (and the worker's saver and GPU tier), for the shutdown
    log line."""
    out: dict[str, dict] = {}
    for role, half in (("scheduler", scheduler), ("worker", worker)):
        store = getattr(half, "store", None)
        if store is None:
            continue
        try:
            out[role] = store.stats()
        except Exception as exc:  # noqa: BLE001 - a report must never fail a shutdown
            out[role] = {"stats_error": repr(exc)}
        saver = getattr(half, "saver", None)
        if saver is not None:  # saves dropped over save_pending_bytes, waits, failures
            out[role]["saver"] = dict(vars(saver.stats))
        tier = getattr(half, "gpu_tier", None)
        if tier is not None:
            out[role]["gpu_tier"] = {"bytes_used": tier.used, "capacity": tier.capacity,
                                     "entries": len(tier), "evictions": tier.evictions}
    return out
