"""Scheduler half of `BlendConnector`: decide, per request, which tokens the connector provides.

For each new request: find its chunks (explicit spans from the request's
`kv_transfer_params`, or the configured separator), key them, look them up,
and claim every token from vLLM's own computed prefix up to the end of the
last chunk (never the prompt's last token). Claimed tokens are loaded
synchronously in the worker before the step's forward, so vLLM then
computes only the question over the fused cache.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blend.config import BlendConfig
from blend.connector.metadata import BlendConnectorMetadata, BlendRequest, ChunkRef
from blend.keys import chunk_key
from blend.log import get_logger
from blend.segments import (
    PARAMS_KEY,
    SeparatorSplitter,
    Span,
    SpanError,
    context_end,
    request_params,
    validate_spans,
)

if TYPE_CHECKING:
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.request import Request

log = get_logger("Connector")


@dataclass
class _Plan:
    spans: list[Span]
    keys: list[str]
    hits: list[bool]
    context_end: int
    on_miss: str
    num_local: int = 0
    config: dict | None = None


class BlendScheduler:
    """State kept in the engine-core process between `get_num_new_matched_tokens` and
    `build_connector_meta`, keyed by request id."""

    def __init__(self, extra: dict[str, Any], fingerprint: str, store: Any,
                 tokenizer_loader: Any = None) -> None:
        self.extra = extra
        self.fingerprint = fingerprint
        self.store = store
        self.on_miss = extra.get("on_miss", "compute")
        self.min_chunk_tokens = int(extra.get("min_chunk_tokens", 1))
        self._splitter: SeparatorSplitter | None = None
        self._tokenizer_loader = tokenizer_loader
        self.base_config = BlendConfig.from_dict(extra.get("cache_fuse_metadata")).to_dict()
        self._plans: dict[str, _Plan] = {}
        self._to_load: dict[str, tuple[Request, _Plan]] = {}
        self._reports: dict[str, dict] = {}
        self.stats = {"requests": 0, "blended_requests": 0, "chunks": 0, "chunk_hits": 0,
                      "chunk_tokens": 0, "chunk_hit_tokens": 0, "fallbacks": 0, "bad_spans": 0}

    # -------------------------------------------------------------- segmentation
    def _separator(self) -> SeparatorSplitter | None:
        sep = self.extra.get("separator")
        if not sep:
            return None
        if self._splitter is None:
            self._splitter = SeparatorSplitter(self._tokenizer_loader(), sep)
        return self._splitter

    def _spans(self, request: Request) -> tuple[list[Span], dict]:
        params = request_params(request.kv_transfer_params) or {}
        prompt = request.prompt_token_ids or []
        if "spans" in params:
            return validate_spans(params["spans"], len(prompt)), params
        splitter = self._separator()
        if splitter is not None:
            return splitter.spans(prompt), params
        return [], params

    # -------------------------------------------------------------- vLLM hooks
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        rid = request.request_id
        self._plans.pop(rid, None)
        prompt = request.prompt_token_ids
        if not prompt:
            return 0, False
        try:
            spans, params = self._spans(request)
        except SpanError as exc:
            self.stats["bad_spans"] += 1
            self.stats["fallbacks"] += 1
            log.warning("request %s: bad chunk spans (%s); plain prefill", rid, exc)
            return 0, False
        spans = [s for s in spans if s[1] - s[0] >= self.min_chunk_tokens]
        if not spans:
            return 0, False
        end = context_end(len(prompt), spans)
        if num_computed_tokens >= end:
            # vLLM's prefix cache already holds the whole context (this prompt ran before):
            # nothing to load, but the output still says how its context was served.
            self._reports.setdefault(rid, {**_report(spans, [False] * len(spans),
                                                     num_computed_tokens, 0), "prefix_cached": True})
            return 0, False
        keys = [chunk_key(self.fingerprint, prompt[s:e]) for s, e in spans]
        hits = self.store.lookup(keys)
        on_miss = params.get("on_miss", self.on_miss)
        if on_miss not in ("compute", "prefill"):
            log.warning("request %s: on_miss %r unknown; using %r", rid, on_miss, self.on_miss)
            on_miss = self.on_miss
        if on_miss == "prefill" and not all(hits):
            log.debug("request %s: %d/%d chunks miss, on_miss=prefill: plain prefill",
                      rid, hits.count(False), len(hits))
            self.stats["fallbacks"] += 1
            return 0, False
        override = params.get("cache_fuse_metadata")
        if override is not None:
            try:
                override = BlendConfig.from_dict({**self.base_config, **override}).to_dict()
            except (ValueError, TypeError) as exc:
                log.warning("request %s: bad cache_fuse_metadata (%s); plain prefill", rid, exc)
                self.stats["fallbacks"] += 1
                return 0, False
        self._plans[rid] = _Plan(spans, keys, hits, end, on_miss, num_computed_tokens, override)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        rid = request.request_id
        plan = self._plans.pop(rid, None)
        if plan is None or num_external_tokens <= 0:
            return
        # What vLLM kept of its own prefix hit: the rest of the context is ours.
        plan.num_local = plan.context_end - num_external_tokens
        self._to_load[rid] = (request, plan)
        rep = _report(plan.spans, plan.hits, plan.num_local, num_external_tokens)
        self._reports[rid] = rep
        self.stats["blended_requests"] += 1
        for k in ("chunks", "chunk_hits", "chunk_tokens", "chunk_hit_tokens"):
            self.stats[k] += rep[k]

    def build_connector_meta(self, so: SchedulerOutput) -> BlendConnectorMetadata:
        meta = BlendConnectorMetadata()
        for new in so.scheduled_new_reqs:
            item = self._to_load.pop(new.req_id, None)
            if item is not None:
                meta.requests.append(self._request_meta(item, new.block_ids[0]))
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            item = self._to_load.pop(rid, None)
            if item is None:
                continue
            new_blocks = cached.new_block_ids[i]
            if rid not in cached.resumed_req_ids or new_blocks is None:
                log.warning("request %s: planned blend but not resumed with blocks; skipped", rid)
                continue
            meta.requests.append(self._request_meta(item, new_blocks[0]))
        if self._to_load:
            log.warning("requests %s planned but not scheduled; dropped", sorted(self._to_load))
            self._to_load.clear()
        return meta

    def _request_meta(self, item: tuple[Request, _Plan], block_ids: list[int]) -> BlendRequest:
        request, plan = item
        last = plan.spans[-1][1]
        prompt = request.prompt_token_ids
        if (plan.config or self.base_config).get("selection", "deviation") != "deviation":
            last = len(prompt)  # query-aware selection reads the question as probes
        return BlendRequest(
            req_id=request.request_id,
            token_ids=list(prompt[:last]),
            chunks=[ChunkRef(s, e, k, h) for (s, e), k, h in zip(plan.spans, plan.keys, plan.hits)],
            num_local=plan.num_local,
            context_end=plan.context_end,
            block_ids=list(block_ids),
            on_miss=plan.on_miss,
            config=plan.config,
        )

    def request_finished(self, request: Request) -> dict | None:
        """Forget the request; return what it got from the store (goes to its output)."""
        self._plans.pop(request.request_id, None)
        self._to_load.pop(request.request_id, None)
        report = self._reports.pop(request.request_id, None)
        return None if report is None else {PARAMS_KEY: report}


def _report(spans: list[Span], hits: list[bool], num_local: int, num_external: int) -> dict:
    """What a request got from the store: its output's `kv_transfer_params["blend"]`."""
    n = [e - s for s, e in spans]
    return {"chunks": len(spans), "chunk_hits": sum(hits), "chunk_tokens": sum(n),
            "chunk_hit_tokens": sum(x for x, h in zip(n, hits) if h),
            "num_local": num_local, "num_external": num_external}
