"""`connector/scheduler.py` without an engine: which tokens the connector claims, and what it
sends the workers, for each kind of request.

Most tests drive the facade's scheduler-side hooks by hand, in the order vLLM calls them
(`get_num_new_matched_tokens` → `update_state_after_alloc` → `build_connector_meta` →
`request_finished`); the last ones let vLLM's own `Scheduler` drive them, over a fake KV
cache. The store is a real local store in `tmp_path`.
"""

from __future__ import annotations

import os

import pytest
from connector_utils import (
    cached_req_output,
    create_connector,
    create_request,
    create_scheduler,
    create_vllm_config,
    model_runner_output,
    new_req_output,
    no_blocks,
    store_chunk,
    tiny_model_dir,
    tokens,
)

from blend.connector.metadata import ChunkRef, SaveRequest

SPANS = [(10, 40), (40, 80)]  # prefix 10, two chunks (30 and 40 tokens), question 20
PROMPT_LEN = 100
BLOCKS = list(range(7))  # ceil(100 / 16)


@pytest.fixture(scope="module", autouse=True)
def _environ_as_before():
    """Building a `VllmConfig` rewrites os.environ for vLLM's workers (LD_PRELOAD, the
    multiprocessing method, ...); later tests in this process must not see that."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def make(model_dir, tmp_path):
    """`make(**extra)`: a scheduler-side connector over a fresh store in `tmp_path`."""
    n = iter(range(100))

    def _make(**extra):
        return create_connector(create_vllm_config(model_dir, tmp_path / f"kv{next(n)}", **extra))
    return _make


@pytest.fixture
def prompt():
    return tokens(PROMPT_LEN, seed=1)


def store_spans(conn, prompt) -> None:
    """Every chunk of SPANS stored, as a warm store holds them."""
    for s in SPANS:
        store_chunk(conn, prompt, s)


def claim(conn, request, num_computed: int = 0) -> int:
    n, is_async = conn.get_num_new_matched_tokens(request, num_computed)
    assert is_async is False  # loads are synchronous: the blend runs before the forward
    return n


def alloc_and_meta(conn, request, num_external: int, num_local: int = 0):
    """vLLM's next two calls after a claim, for a request scheduled whole in one step."""
    conn.update_state_after_alloc(request, no_blocks(), num_external)
    done = num_local + num_external
    return conn.build_connector_meta(new_req_output(request, BLOCKS, done, PROMPT_LEN - done))


def planned(make, prompt):
    """A connector and a request it planned to blend (warm store, claimed, allocated), not
    yet in any scheduler output."""
    conn = make()
    store_spans(conn, prompt)
    r = create_request(prompt, SPANS)
    claim(conn, r)
    conn.update_state_after_alloc(r, no_blocks(), 80)
    return conn, r


def report(conn, request) -> dict | None:
    delay_free, params = conn.request_finished(request, BLOCKS)
    assert delay_free is False  # nothing is sent from the request's blocks after it ends
    return None if params is None else params["blend"]


# ------------------------------------------------------------------ hits and claims
def test_all_chunks_stored_claims_the_context_and_sends_the_request(make, prompt):
    conn = make()
    keys = [store_chunk(conn, prompt, s) for s in SPANS]
    r = create_request(prompt, SPANS)
    assert claim(conn, r) == 80
    meta = alloc_and_meta(conn, r, 80)
    assert meta.saves == []
    (req,) = meta.requests
    assert (req.req_id, req.num_local, req.context_end, req.num_blend) == (r.request_id, 0, 80, 80)
    assert req.chunks == [ChunkRef(10, 40, keys[0], True), ChunkRef(40, 80, keys[1], True)]
    assert req.block_ids == BLOCKS and req.on_miss == "recompute" and req.config is None
    assert list(req.token_ids) == prompt[:80]  # deviation selection: no question tokens
    assert report(conn, r) == {"chunks": 2, "chunk_hits": 2, "chunk_tokens": 70,
                               "chunk_hit_tokens": 70, "num_local": 0, "num_external": 80,
                               "saved_chunks": 0}
    st = conn._scheduler.stats
    assert (st["blended_requests"], st["chunk_hits"], st["fallbacks"]) == (1, 2, 0)


def test_the_prompts_last_token_is_never_claimed(make):
    conn = make()
    prompt = tokens(50, seed=2)
    store_chunk(conn, prompt, (0, 50))
    r = create_request(prompt, [(0, 50)])
    assert claim(conn, r) == 49  # vLLM must compute at least one token to sample from
    meta = alloc_and_meta(conn, r, 49)
    assert meta.requests[0].context_end == 49


def test_a_request_without_spans_is_plain(make, prompt):
    conn = make()
    r = create_request(prompt)
    assert claim(conn, r) == 0
    assert alloc_and_meta(conn, r, 0).requests == []
    assert report(conn, r) is None


def test_the_analysis_runs_once_but_the_lookup_every_retry(make, prompt):
    conn = make(on_miss="prefill")
    r = create_request(prompt, SPANS)
    store_chunk(conn, prompt, SPANS[0])
    assert claim(conn, r) == 0  # chunk 2 missing: plain prefill, for now
    assert claim(conn, r) == 0
    store_chunk(conn, prompt, SPANS[1])
    assert claim(conn, r) == 80  # vLLM retried the waiting request; now it all hits
    st = conn._scheduler.stats
    assert st["analyses"] == 1 and st["fallbacks"] == 2


# ------------------------------------------------------------------ bad spans
@pytest.mark.parametrize("spans", [
    [[10, 40], [30, 60]],    # overlapping
    [[40, 80], [10, 40]],    # out of order
    [[90, 120]],             # past the prompt's end
    [[-1, 10]],              # before its start
    [[20, 20]],              # empty
    [[1.5, 3]],              # not integers
    "10-40",                 # not a list
], ids=["overlap", "order", "past-end", "negative", "empty", "float", "string"])
def test_bad_spans_fall_back_to_plain_prefill_and_are_counted(make, prompt, spans):
    conn = make()
    r = create_request(prompt, kv_transfer_params={"blend": {"spans": spans}})
    assert claim(conn, r) == 0
    assert alloc_and_meta(conn, r, 0).requests == []
    st = conn._scheduler.stats
    assert (st["bad_spans"], st["fallbacks"], st["blended_requests"]) == (1, 1, 0)
    assert report(conn, r) is None


# ------------------------------------------------------------------ min_chunk_tokens
def test_chunks_shorter_than_min_chunk_tokens_are_text_not_chunks(make, prompt):
    conn = make(min_chunk_tokens=16)
    spans = [(0, 8), (8, 40), (40, 50)]  # 8, 32 and 10 tokens: only the middle one is kept
    for s in spans:
        store_chunk(conn, prompt, s)
    r = create_request(prompt, spans)
    assert claim(conn, r) == 40  # up to the last kept chunk; (40, 50) is left to vLLM
    (req,) = alloc_and_meta(conn, r, 40).requests
    assert [(c.start, c.end) for c in req.chunks] == [(8, 40)]


def test_only_short_chunks_is_a_plain_prefill(make, prompt):
    conn = make(min_chunk_tokens=64)
    store_spans(conn, prompt)
    r = create_request(prompt, SPANS)
    assert claim(conn, r) == 0
    assert conn._scheduler.stats["fallbacks"] == 0  # not a fallback: nothing to blend
    assert report(conn, r) is None


# ------------------------------------------------------------------ on_miss
def test_on_miss_prefill_with_a_miss_claims_nothing(make, prompt):
    conn = make(on_miss="prefill")
    store_chunk(conn, prompt, SPANS[0])
    r = create_request(prompt, SPANS)
    assert claim(conn, r) == 0
    assert conn._scheduler.stats["fallbacks"] == 1
    assert alloc_and_meta(conn, r, 0).saves == []  # prefill mode saves nothing


@pytest.mark.parametrize("min_hit_ratio,claimed", [(0.3, 80), (0.5, 0)])
def test_on_miss_recompute_blends_only_above_min_hit_ratio(make, prompt, min_hit_ratio,
                                                           claimed):
    conn = make(min_hit_ratio=min_hit_ratio)
    store_chunk(conn, prompt, SPANS[0])  # 30 of the 80 context tokens found: 0.375
    r = create_request(prompt, SPANS)
    assert claim(conn, r) == claimed


def test_on_miss_recompute_blend_saves_the_missed_chunk_from_the_prompt(make, prompt):
    conn = make()
    store_chunk(conn, prompt, SPANS[0])
    r = create_request(prompt, SPANS)
    assert claim(conn, r) == 80
    meta = alloc_and_meta(conn, r, 80)
    assert [c.hit for c in meta.requests[0].chunks] == [True, False]
    # The blend computes the missed chunk in this step, so it is saved from this step's blocks.
    (save,) = meta.saves
    assert (save.req_id, save.block_ids) == (r.request_id, BLOCKS)
    assert [(c.start, c.end, c.hit) for c in save.chunks] == [(40, 80, False)]
    assert conn._scheduler.stats["saves_planned"] == 1
    assert report(conn, r)["saved_chunks"] == 1


def test_on_miss_recompute_plain_prefill_saves_once_vllm_has_computed_the_chunk(make, prompt):
    conn = make(min_hit_ratio=1.0)
    store_chunk(conn, prompt, SPANS[0])
    r = create_request(prompt, SPANS)
    assert claim(conn, r) == 0
    conn.update_state_after_alloc(r, no_blocks(), 0)
    # Chunked prefill: 50 tokens this step, chunk 2 ends at 80 → nothing to save yet.
    meta = conn.build_connector_meta(new_req_output(r, BLOCKS[:4], 0, 50))
    assert meta.requests == [] and meta.saves == []
    meta = conn.build_connector_meta(cached_req_output(r.request_id, 50, 50, [4, 5, 6]))
    assert meta.saves == [SaveRequest(r.request_id, BLOCKS, [meta.saves[0].chunks[0]])]
    assert (meta.saves[0].chunks[0].start, meta.saves[0].chunks[0].end) == (40, 80)
    assert conn.build_connector_meta(cached_req_output(r.request_id, 100, 1)).saves == []
    rep = report(conn, r)
    assert rep["plain_prefill"] is True and rep["saved_chunks"] == 1
    assert conn._scheduler.stats["plain_prefills"] == 1


def test_on_miss_compute_claims_misses_and_a_repeat_counts_them_as_saving(make, prompt):
    conn = make(on_miss="compute")
    r = create_request(prompt, SPANS)
    assert claim(conn, r) == 80  # nothing stored: the worker computes both chunks
    meta = alloc_and_meta(conn, r, 80)
    assert [c.hit for c in meta.requests[0].chunks] == [False, False]
    assert meta.saves == []  # the worker saves what it computes itself
    again = create_request(prompt, SPANS)
    assert claim(conn, again) == 80
    meta = alloc_and_meta(conn, again, 80)
    assert [c.hit for c in meta.requests[0].chunks] == [True, True]  # save in flight


def test_second_sight_admission_saves_a_missed_chunk_on_its_second_miss(make, prompt):
    conn = make(admit="second_sight")
    store_chunk(conn, prompt, SPANS[0])
    first, second = create_request(prompt, SPANS), create_request(prompt, SPANS)
    claim(conn, first)
    assert alloc_and_meta(conn, first, 80).saves == []
    claim(conn, second)
    assert len(alloc_and_meta(conn, second, 80).saves) == 1


# ------------------------------------------------------------------ per-request overrides
def test_per_request_on_miss_overrides_the_engines(make, prompt):
    conn = make(on_miss="compute")
    r = create_request(prompt, SPANS, on_miss="prefill")
    assert claim(conn, r) == 0  # the engine would compute; the request asked for prefill
    assert conn._scheduler.stats["fallbacks"] == 1


def test_unknown_per_request_on_miss_uses_the_engines(make, prompt):
    conn = make(on_miss="compute")
    r = create_request(prompt, kv_transfer_params={"blend": {"spans": SPANS,
                                                             "on_miss": "bogus"}})
    assert claim(conn, r) == 80
    assert alloc_and_meta(conn, r, 80).requests[0].on_miss == "compute"


def test_per_request_cache_fuse_metadata_is_merged_over_the_engines(make, prompt):
    conn = make(cache_fuse_metadata={"recomp_ratio": 0.2, "check_layers": [2]})
    store_spans(conn, prompt)
    r = create_request(prompt, SPANS, cache_fuse_metadata={"recomp_ratio": 1.0,
                                                           "selection": "query"})
    assert claim(conn, r) == 80
    (req,) = alloc_and_meta(conn, r, 80).requests
    assert req.config["recomp_ratio"] == 1.0 and req.config["selection"] == "query"
    assert list(req.config["check_layers"]) == [2]  # the engine's, kept
    assert list(req.token_ids) == prompt  # query selection reads the question as probes


def test_bad_per_request_cache_fuse_metadata_falls_back_to_plain(make, prompt):
    conn = make()
    store_spans(conn, prompt)
    r = create_request(prompt, kv_transfer_params={"blend": {
        "spans": SPANS, "cache_fuse_metadata": {"recomp_ratio": 7}}})
    assert claim(conn, r) == 0
    st = conn._scheduler.stats
    assert (st["fallbacks"], st["bad_spans"]) == (1, 0)


# ------------------------------------------------------------------ vLLM's prefix cache
def test_a_prefix_cache_hit_shortens_the_claim(make, prompt):
    conn = make()
    store_spans(conn, prompt)
    r = create_request(prompt, SPANS)
    assert claim(conn, r, num_computed=32) == 48
    (req,) = alloc_and_meta(conn, r, 48, num_local=32).requests
    assert (req.num_local, req.context_end, req.num_blend) == (32, 80, 48)
    assert report(conn, r)["num_local"] == 32


def test_a_context_wholly_prefix_cached_claims_nothing_but_is_reported(make, prompt):
    conn = make()
    r = create_request(prompt, SPANS)
    assert claim(conn, r, num_computed=80) == 0
    assert alloc_and_meta(conn, r, 0, num_local=80).requests == []
    rep = report(conn, r)
    assert rep["prefix_cached"] is True and rep["num_local"] == 80 and rep["chunk_hits"] == 0


# ------------------------------------------------------------------ scheduling edge cases
def test_a_planned_request_not_scheduled_is_dropped(make, prompt):
    conn, r = planned(make, prompt)
    from vllm.v1.core.sched.output import SchedulerOutput

    assert conn.build_connector_meta(SchedulerOutput.make_empty()).requests == []
    # ...and not sent later either.
    assert conn.build_connector_meta(new_req_output(r, BLOCKS, 80, 20)).requests == []


def test_a_resumed_request_is_blended_into_its_new_block_table(make, prompt):
    conn, r = planned(make, prompt)
    table = [20, 21, 22, 23, 24, 25, 26]
    meta = conn.build_connector_meta(cached_req_output(r.request_id, 80, 20, table, resumed=True))
    assert meta.requests[0].block_ids == table


def test_request_finished_forgets_the_request(make, prompt):
    conn = make()
    store_spans(conn, prompt)
    r = create_request(prompt, SPANS, request_id="same-id")
    assert claim(conn, r) == 80
    alloc_and_meta(conn, r, 80)
    assert report(conn, r)["chunk_hits"] == 2
    assert report(conn, r) is None  # the report is handed out once
    claim(conn, create_request(prompt, SPANS, request_id="same-id"))
    assert conn._scheduler.stats["analyses"] == 2  # a new request under an old id starts over


# ------------------------------------------------------------------ under vLLM's Scheduler
def test_vllm_schedules_only_the_question_after_a_blend(model_dir, tmp_path, prompt):
    sched = create_scheduler(create_vllm_config(model_dir, tmp_path / "kv"))
    store_spans(sched.connector, prompt)
    r = create_request(prompt, SPANS)
    sched.add_request(r)
    out = sched.schedule()
    assert out.num_scheduled_tokens == {r.request_id: 20}
    (req,) = out.kv_connector_metadata.requests
    assert (req.num_local, req.context_end, len(req.block_ids)) == (0, 80, 7)
    eco = sched.update_from_output(out, model_runner_output([r]))
    (done,) = eco[0].outputs
    assert done.kv_transfer_params["blend"]["num_external"] == 80
    assert not sched.requests  # finished and freed


def test_vllm_prefix_cache_and_the_connector_share_the_context(model_dir, tmp_path, prompt):
    sched = create_scheduler(create_vllm_config(model_dir, tmp_path / "kv"))
    store_spans(sched.connector, prompt)
    first = create_request(prompt, SPANS)
    sched.add_request(first)
    out = sched.schedule()
    sched.update_from_output(out, model_runner_output([first]))
    # Same system prompt and first chunk (48 tokens: three full blocks), another second chunk.
    other = prompt[:48] + tokens(52, seed=3)
    store_chunk(sched.connector, other, (48, 80))
    second = create_request(other, [(10, 40), (48, 80)])
    sched.add_request(second)
    out = sched.schedule()
    (req,) = out.kv_connector_metadata.requests
    assert (req.num_local, req.context_end) == (48, 80)  # vLLM kept 3 blocks; we blend 32
    assert out.num_scheduled_tokens == {second.request_id: 20}
