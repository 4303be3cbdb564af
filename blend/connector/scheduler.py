"""Scheduler half of `BlendConnector`: decide, per request, which tokens the connector provides.

For each new request: find its chunks (explicit spans from the request's
`kv_transfer_params`, or the configured separator), key them, look them up,
and claim every token from vLLM's own computed prefix up to the end of the
last chunk (never the prompt's last token). Claimed tokens are loaded
synchronously in the worker before the step's forward, so vLLM then
computes only the question over the fused cache.

A request's chunks and keys are worked out once (`_Analysis`), not at every
step in which vLLM retries a waiting request: under load a queue forms, vLLM
asks again for each queued request at every step, and per-token work there
made every step slower and the queue longer.

Missed chunks (`on_miss="recompute"`, the default) are computed inside the
prompt: forced into the blend's recompute set, or, when too little of the
context hits (`min_hit_ratio`), by vLLM's own plain prefill. Either way their
KV is then in the request's blocks, and the scheduler asks the worker to save
it from there once vLLM has computed it (`_SaveTrack`), for the chunks the
admission policy lets in.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from blend.config import BlendConfig
from blend.connector.content import ContentChunks
from blend.connector.metadata import BlendConnectorMetadata, BlendRequest, ChunkRef, SaveRequest
from blend.keys import chunk_key, token_array
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

# Keys the scheduler asked the worker to save count as present for this long, so that a
# chunk recurring while its save is under way is not saved twice (the worker serves it
# from the save in flight, or recomputes it if the save was dropped).
SAVING_TTL_S = 120.0
SAVING_MAX = 16384
# Unmarked prompts: the shortest paragraph stored on first sight, and the shortest stored
# run found by content (64 tokens: shorter pieces save little next to a fetch and a placement).
CONTENT_MIN_TOKENS = 64


@dataclass
class _Analysis:
    """What a request's prompt says, worked out once per request."""

    spans: list[Span]
    keys: list[str]
    on_miss: str
    config: dict | None
    src: list[tuple[int, int]] | None = None  # content matches: (src_start, src_len) per span
    ids: np.ndarray | None = None  # the prompt as int64, converted once (keys, worker metadata)
    admitted: dict[str, bool] = field(default_factory=dict)  # admission, once per chunk

    def ref(self, i: int, hit: bool) -> ChunkRef:
        s, e = self.spans[i]
        src_start, src_len = self.src[i] if self.src else (0, 0)
        return ChunkRef(s, e, self.keys[i], hit, src_start, src_len)


@dataclass
class _Plan:
    a: _Analysis
    hits: list[bool]
    context_end: int
    num_local: int = 0
    saves: list[int] = field(default_factory=list)  # chunk indexes to save once computed


@dataclass
class _SaveTrack:
    """Chunks of a running request to save once vLLM has computed them."""

    chunks: list[ChunkRef]
    block_ids: list[int] = field(default_factory=list)


class BlendScheduler:
    """State kept in the engine-core process between `get_num_new_matched_tokens` and
    `build_connector_meta`, keyed by request id."""

    def __init__(self, extra: dict[str, Any], fingerprint: str, store: Any,
                 tokenizer_loader: Any = None, admission: Any = None,
                 index_dir: Any = None) -> None:
        self.extra = extra
        self.fingerprint = fingerprint
        self.store = store
        self.on_miss = extra.get("on_miss", "recompute")
        self.min_chunk_tokens = int(extra.get("min_chunk_tokens", 1))
        self.min_hit_ratio = float(extra.get("min_hit_ratio", 0.0))
        self.admission = admission
        self._splitter: SeparatorSplitter | None = None
        self._tokenizer_loader = tokenizer_loader
        self.unmarked = extra.get("unmarked", "paragraphs")
        self._index_dir = index_dir
        self._content_chunks: ContentChunks | None = None
        self.base_config = BlendConfig.from_dict(extra.get("cache_fuse_metadata")).to_dict()
        self._analyses: dict[str, _Analysis | None] = {}
        self._plans: dict[str, _Plan] = {}
        self._to_load: dict[str, tuple[Request, _Plan]] = {}
        self._tracks: dict[str, _SaveTrack] = {}
        self._new_tracks: dict[str, _SaveTrack] = {}
        self._saving: OrderedDict[str, float] = OrderedDict()
        self._reports: dict[str, dict] = {}
        self.stats = {"requests": 0, "blended_requests": 0, "chunks": 0, "chunk_hits": 0,
                      "chunk_tokens": 0, "chunk_hit_tokens": 0, "fallbacks": 0, "bad_spans": 0,
                      "plain_prefills": 0, "saves_planned": 0, "analyses": 0,
                      "scheduler_ms": 0.0}

    # -------------------------------------------------------------- segmentation
    def _separator(self) -> SeparatorSplitter | None:
        sep = self.extra.get("separator")
        if not sep:
            return None
        if self._splitter is None:
            self._splitter = SeparatorSplitter(self._tokenizer_loader(), sep)
        return self._splitter

    def _spans(self, prompt: list[int], params: dict) -> list[Span]:
        if "spans" in params:
            return validate_spans(params["spans"], len(prompt))
        splitter = self._separator()
        return splitter.spans(prompt) if splitter is not None else []

    def _content(self) -> ContentChunks | None:
        """Content matching for prompts with no spans (None when `unmarked` is "none")."""
        if self.unmarked == "none" or self._tokenizer_loader is None:
            return None
        if self._content_chunks is None:
            self._content_chunks = ContentChunks(self._tokenizer_loader(), self.fingerprint,
                                                 self._index_dir, CONTENT_MIN_TOKENS)
        return self._content_chunks

    def _analysis(self, request: Request) -> _Analysis | None:
        """The request's chunks, keys and settings; None for a plain prefill (cached)."""
        rid = request.request_id
        if rid in self._analyses:
            return self._analyses[rid]
        self.stats["analyses"] += 1
        a = self._analyze(request)
        self._analyses[rid] = a
        return a

    def _analyze(self, request: Request) -> _Analysis | None:
        rid = request.request_id
        prompt = request.prompt_token_ids or []
        params = request_params(request.kv_transfer_params) or {}
        try:
            spans = self._spans(prompt, params)
        except SpanError as exc:
            self.stats["bad_spans"] += 1
            self.stats["fallbacks"] += 1
            log.warning("request %s: bad chunk spans (%s); plain prefill", rid, exc)
            return None
        src = None
        if not spans and "spans" not in params and self._content() is not None:
            found = self._content().chunks(prompt)
            spans = [(c.start, c.end) for c in found]
            src = [(c.src_start, c.src_len) for c in found]
            keys = [c.key for c in found]
        keep = [i for i, (s, e) in enumerate(spans) if e - s >= self.min_chunk_tokens]
        if not keep:
            return None
        on_miss = params.get("on_miss", self.on_miss)
        if on_miss not in ("compute", "recompute", "prefill"):
            log.warning("request %s: on_miss %r unknown; using %r", rid, on_miss, self.on_miss)
            on_miss = self.on_miss
        override = params.get("cache_fuse_metadata")
        if override is not None:
            try:
                override = BlendConfig.from_dict({**self.base_config, **override}).to_dict()
            except (ValueError, TypeError) as exc:
                log.warning("request %s: bad cache_fuse_metadata (%s); plain prefill", rid, exc)
                self.stats["fallbacks"] += 1
                return None
        spans = [spans[i] for i in keep]
        ids = token_array(prompt)
        if src is None:
            keys = [chunk_key(self.fingerprint, ids[s:e]) for s, e in spans]
        else:
            keys, src = [keys[i] for i in keep], [src[i] for i in keep]
        return _Analysis(spans, keys, on_miss, override, src, ids=ids)

    # -------------------------------------------------------------- lookups
    def _lookup(self, keys: list[str]) -> list[bool]:
        hits = self.store.lookup(keys)
        now = time.monotonic()
        return [h or now - self._saving.get(k, -1e18) < SAVING_TTL_S for k, h in zip(keys, hits)]

    def _mark_saving(self, keys: list[str]) -> None:
        now = time.monotonic()
        for k in keys:
            self._saving[k] = now
            self._saving.move_to_end(k)
        while len(self._saving) > SAVING_MAX:
            self._saving.popitem(last=False)

    def _admit(self, a: _Analysis, key: str) -> bool:
        """Whether a missed chunk is saved: decided once per request and chunk."""
        if key not in a.admitted:
            a.admitted[key] = self.admission is None or bool(self.admission.admit(key))
        return a.admitted[key]

    # -------------------------------------------------------------- vLLM hooks
    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int
                                   ) -> tuple[int, bool]:
        t0 = time.perf_counter()
        try:
            return self._matched(request, num_computed_tokens)
        finally:
            self.stats["scheduler_ms"] += (time.perf_counter() - t0) * 1e3

    def _matched(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        rid = request.request_id
        self._plans.pop(rid, None)
        prompt = request.prompt_token_ids
        if not prompt:
            return 0, False
        a = self._analysis(request)
        if a is None:
            return 0, False
        end = context_end(len(prompt), a.spans)
        if num_computed_tokens >= end:
            # vLLM's prefix cache already holds the whole context (this prompt ran before):
            # nothing to load, but the output still says how its context was served.
            self._reports.setdefault(rid, {**_report(a.spans, [False] * len(a.spans),
                                                     num_computed_tokens, 0), "prefix_cached": True})
            return 0, False
        hits = self._lookup(a.keys)
        if a.src is not None:  # found by content but gone from the store: stop finding it
            for k, h in zip(a.keys, hits):
                if not h:
                    self._content().forget(k)
        if a.on_miss == "prefill" and not all(hits):
            log.debug("request %s: %d/%d chunks miss, on_miss=prefill: plain prefill",
                      rid, hits.count(False), len(hits))
            self.stats["fallbacks"] += 1
            return 0, False
        plan = _Plan(a, hits, end, num_computed_tokens)
        if a.on_miss == "recompute":
            plan.saves = [i for i, (k, h) in enumerate(zip(a.keys, hits))
                          if not h and a.ref(i, h).whole and self._admit(a, k)]
            if not _enough_hits(a.spans, hits, num_computed_tokens, end, self.min_hit_ratio):
                self._plans[rid] = plan  # plain prefill: saves only
                return 0, False
        self._plans[rid] = plan
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, num_external_tokens: int) -> None:
        rid = request.request_id
        plan = self._plans.pop(rid, None)
        if plan is None:
            return
        a = plan.a
        saving = list(plan.saves)
        if plan.saves:
            chunks = [a.ref(i, False) for i in plan.saves]
            self._new_tracks[rid] = _SaveTrack(chunks)
            self.stats["saves_planned"] += len(chunks)
        if a.on_miss == "compute" and num_external_tokens > 0:  # the worker computes and saves
            saving = [i for i, h in enumerate(plan.hits) if not h and a.ref(i, h).whole]
        self._mark_saving([a.keys[i] for i in saving])
        content = self._content() if saving else None
        for i in saving if content is not None else ():
            s, e = a.spans[i]
            content.register(a.keys[i], request.prompt_token_ids[s:e])
        if num_external_tokens <= 0:
            self.stats["plain_prefills"] += 1
            self._reports[rid] = {**_report(a.spans, plan.hits, plan.num_local, 0),
                                  "plain_prefill": True, "saved_chunks": len(plan.saves)}
            return
        # What vLLM kept of its own prefix hit: the rest of the context is ours.
        plan.num_local = plan.context_end - num_external_tokens
        self._to_load[rid] = (request, plan)
        rep = _report(a.spans, plan.hits, plan.num_local, num_external_tokens)
        rep["saved_chunks"] = len(plan.saves)
        self._reports[rid] = rep
        self.stats["blended_requests"] += 1
        for k in ("chunks", "chunk_hits", "chunk_tokens", "chunk_hit_tokens"):
            self.stats[k] += rep[k]

    def build_connector_meta(self, so: SchedulerOutput) -> BlendConnectorMetadata:
        meta = BlendConnectorMetadata()
        sched = so.num_scheduled_tokens
        for new in so.scheduled_new_reqs:
            rid = new.req_id
            item = self._to_load.pop(rid, None)
            if item is not None:
                meta.requests.append(self._request_meta(item, new.block_ids[0]))
            track = self._new_tracks.pop(rid, None)
            if track is not None:
                track.block_ids = list(new.block_ids[0])
                self._tracks[rid] = track
                self._emit_saves(meta, rid, new.num_computed_tokens + sched.get(rid, 0))
        cached = so.scheduled_cached_reqs
        for i, rid in enumerate(cached.req_ids):
            item = self._to_load.pop(rid, None)
            new_blocks = cached.new_block_ids[i]
            track = self._tracks.get(rid) or self._new_tracks.pop(rid, None)
            if track is not None:
                if rid in cached.resumed_req_ids and new_blocks is not None:
                    track.block_ids = list(new_blocks[0])  # a resumed request's whole table
                elif new_blocks is not None:
                    track.block_ids += new_blocks[0]
                self._tracks[rid] = track
                self._emit_saves(meta, rid, cached.num_computed_tokens[i] + sched.get(rid, 0))
            if item is None:
                continue
            if rid not in cached.resumed_req_ids or new_blocks is None:
                log.warning("request %s: planned blend but not resumed with blocks; skipped", rid)
                continue
            meta.requests.append(self._request_meta(item, new_blocks[0]))
        if self._to_load:
            log.warning("requests %s planned but not scheduled; dropped", sorted(self._to_load))
            self._to_load.clear()
        self._new_tracks.clear()
        return meta

    def _emit_saves(self, meta: BlendConnectorMetadata, rid: str, done: int) -> None:
        """Ask the worker to save the request's chunks that vLLM has computed by this step."""
        track = self._tracks[rid]
        ready = [c for c in track.chunks if c.end <= done]
        if not ready:
            return
        track.chunks = [c for c in track.chunks if c.end > done]
        meta.saves.append(SaveRequest(rid, list(track.block_ids), ready))
        if not track.chunks:
            del self._tracks[rid]

    def _request_meta(self, item: tuple[Request, _Plan], block_ids: list[int]) -> BlendRequest:
        request, plan = item
        a = plan.a
        last = a.spans[-1][1]
        prompt = request.prompt_token_ids
        if (a.config or self.base_config).get("selection", "deviation") != "deviation":
            last = len(prompt)  # query-aware selection reads the question as probes
        ids = a.ids if a.ids is not None else token_array(prompt)
        return BlendRequest(
            req_id=request.request_id,
            token_ids=ids[:last],  # an array: pickled as bytes, a tensor in the worker for free
            chunks=[a.ref(i, h) for i, h in enumerate(plan.hits)],
            num_local=plan.num_local,
            context_end=plan.context_end,
            block_ids=list(block_ids),
            on_miss=a.on_miss,
            config=a.config,
        )

    def request_finished(self, request: Request) -> dict | None:
        """Forget the request; return what it got from the store (goes to its output)."""
        rid = request.request_id
        for d in (self._analyses, self._plans, self._to_load, self._tracks, self._new_tracks):
            d.pop(rid, None)
        report = self._reports.pop(rid, None)
        return None if report is None else {PARAMS_KEY: report}


def _enough_hits(spans: list[Span], hits: list[bool], num_local: int, end: int,
                 min_ratio: float) -> bool:
    """Whether the chunks found cover at least `min_ratio` of the context left to compute.

    Below it a blend costs more than vLLM's own prefill: its missed chunks and glue text
    are recomputed through every layer, on top of the blend's fixed cost.
    """
    todo = end - num_local
    if todo <= 0:
        return False
    found = sum(max(0, min(e, end) - max(s, num_local)) for (s, e), h in zip(spans, hits) if h)
    return found > 0 and found >= min_ratio * todo


def _report(spans: list[Span], hits: list[bool], num_local: int, num_external: int) -> dict:
    """What a request got from the store: its output's `kv_transfer_params["blend"]`."""
    n = [e - s for s, e in spans]
    return {"chunks": len(spans), "chunk_hits": sum(hits), "chunk_tokens": sum(n),
            "chunk_hit_tokens": sum(x for x, h in zip(n, hits) if h),
            "num_local": num_local, "num_external": num_external}
