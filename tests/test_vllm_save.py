"""The default miss path in a real vLLM CPU engine: chunks saved out of prompts' context.

With `on_miss="recompute"` (the default) nothing is computed standalone: a request
whose context is mostly new goes to vLLM's own prefill, a mostly-found one is
blended with its missed chunks recomputed in place, and either way the scheduler
asks the worker to save the missed chunks' KV out of the request's blocks after
the step (admitted on their second sight), in the background.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pytest

from blend.device import choose_dtype, shutdown_llm

pytestmark = pytest.mark.vllm

SYSTEMS = ["You are a helpful assistant.", "Answer from the documents.",
           "Use only what the documents say.", "Be brief.", "Read carefully."]


def _docs() -> list[str]:
    from pydoc_data.topics import topics

    keys = ["assert", "break", "continue", "del", "global", "pass", "raise", "return"]
    return [" ".join(topics[k].split()[:90]) for k in keys]


def _entries(store: Path) -> int:
    return len(list(store.rglob("*.kv")))


def _wait_entries(store: Path, n: int, timeout: float = 30.0) -> int:
    deadline = time.time() + timeout
    while _entries(store) < n and time.time() < deadline:
        time.sleep(0.1)
    return _entries(store)


@pytest.fixture(scope="module")
def engine(smollm2_path, tmp_path_factory):
    from vllm import LLM

    import blend

    store = tmp_path_factory.mktemp("kv")
    llm = LLM(model=smollm2_path, dtype=choose_dtype("cpu").dtype, enforce_eager=True,
              max_model_len=2048, gpu_memory_utilization=0.3, max_logprobs=20, seed=0,
              kv_transfer_config=blend.kv_transfer_config(  # `_plain` sends no spans
                  store=f"local:{store}", unmarked="none",
                  cache_fuse_metadata={"recomp_ratio": 0.15}))
    yield llm, store
    shutdown_llm(llm)


def _run(llm, prompt, **kw):
    from vllm import SamplingParams

    sp = SamplingParams(**{"max_tokens": 8, "temperature": 0.0, **kw})
    out = llm.generate(prompt, sp, use_tqdm=False)[0]
    return out, (out.kv_transfer_params or {}).get("blend") or {}


def _plain(llm, prompt, **kw):
    """The same token ids with no spans and no salt: vLLM alone."""
    return _run(llm, {"prompt_token_ids": prompt.prompt_token_ids}, **kw)[0]


def _first_token_kl(a, b) -> float:
    """KL(a || b) over a's top-20 logprobs of the first generated token."""
    pa, pb = a.outputs[0].logprobs[0], b.outputs[0].logprobs[0]
    floor = min(lp.logprob for lp in pb.values())
    return sum(math.exp(lp.logprob) * (lp.logprob - (pb[t].logprob if t in pb else floor))
               for t, lp in pa.items())


def test_miss_path_saves_on_second_sight_then_blends(engine, tok):
    import blend

    llm, store = engine
    d = _docs()
    p1 = blend.build_prompt(tok, SYSTEMS[0], d[0:3], "What is the first document about?")
    o1, r1 = _run(llm, p1)
    # All new: vLLM's own prefill, nothing saved on a first sight.
    assert r1["plain_prefill"] and r1["num_external"] == 0 and r1["saved_chunks"] == 0, r1
    assert list(o1.outputs[0].token_ids) == list(_plain(llm, p1).outputs[0].token_ids)
    p2 = blend.build_prompt(tok, SYSTEMS[1], [d[2], d[0], d[1]], "Which keyword comes last?")
    _, r2 = _run(llm, p2)
    assert r2["plain_prefill"] and r2["saved_chunks"] == 3, r2  # second sight: saved
    assert _wait_entries(store, 3) == 3
    # Third sight, another order and system prompt: every chunk from the store.
    p3 = blend.build_prompt(tok, SYSTEMS[2], [d[1], d[2], d[0]], "What does the last one say?")
    o3, r3 = _run(llm, p3, logprobs=20, max_tokens=1)
    assert r3["chunk_hits"] == 3 and r3["num_external"] > 0 and "plain_prefill" not in r3, r3
    kl = _first_token_kl(_plain(llm, p3, logprobs=20, max_tokens=1), o3)
    assert kl < 0.1, kl  # chunk KV from another prompt's context, r=0.15
    # r=1 over that KV is plain vLLM exactly (fp32 here; the GPU suite allows bf16 ties).
    p4 = blend.build_prompt(tok, SYSTEMS[3], [d[0], d[2], d[1]], "Summarize them.",
                            cache_fuse_metadata={"recomp_ratio": 1.0})
    o4, r4 = _run(llm, p4, max_tokens=16)
    assert r4["chunk_hits"] == 3, r4
    assert list(o4.outputs[0].token_ids) == list(_plain(llm, p4, max_tokens=16)
                                                 .outputs[0].token_ids)


def test_blend_with_a_missed_chunk_saves_it_from_the_blend(engine, tok):
    """Two of three chunks found: blended, the new one recomputed in place; seen again, it
    is saved out of that blend, and a third request finds all three."""
    import blend

    llm, store = engine
    d = _docs()
    before = _entries(store)
    q = "Name the keywords."
    _, r = _run(llm, blend.build_prompt(tok, SYSTEMS[4], [d[0], d[5], d[1]], q))
    assert r["chunk_hits"] == 2 and r["num_external"] > 0 and r["saved_chunks"] == 0, r
    _, r = _run(llm, blend.build_prompt(tok, SYSTEMS[0], [d[5], d[1], d[0]], q))
    assert r["chunk_hits"] == 2 and r["num_external"] > 0 and r["saved_chunks"] == 1, r
    assert _wait_entries(store, before + 1) == before + 1
    _, r = _run(llm, blend.build_prompt(tok, SYSTEMS[1], [d[1], d[0], d[5]], q))
    assert r["chunk_hits"] == 3, r


def test_few_hits_go_to_plain_prefill(engine, tok):
    """One of three chunks found (< min_hit_ratio 0.5 of the context): vLLM prefills."""
    import blend

    llm, _ = engine
    d = _docs()
    p = blend.build_prompt(tok, SYSTEMS[2], [d[6], d[0], d[7]], "What is the middle one about?")
    o, r = _run(llm, p)
    assert r["chunk_hits"] == 1 and r["plain_prefill"] and r["num_external"] == 0, r
    assert list(o.outputs[0].token_ids) == list(_plain(llm, p).outputs[0].token_ids)


def test_precompute_stores_every_chunk_even_over_the_pending_bound(smollm2_path, tmp_path, tok):
    """A precompute's saves wait for the writer: with a 1 MiB bound each chunk's KV (about
    5 MB here) is over it, which a best-effort save drops; precompute must store all 8."""
    from vllm import LLM

    import blend

    llm = LLM(model=smollm2_path, dtype=choose_dtype("cpu").dtype, enforce_eager=True,
              max_model_len=1024, gpu_memory_utilization=0.3, seed=0,
              kv_transfer_config=blend.kv_transfer_config(
                  store=f"local:{tmp_path}", unmarked="none", save_pending_bytes="1MiB"))
    try:
        docs = _docs()
        got = blend.precompute(llm, docs)
        assert got["chunks"] == len(docs)
        assert _wait_entries(tmp_path, len(docs)) == len(docs)
        _, r = _run(llm, blend.build_prompt(tok, SYSTEMS[0], docs[:4], "Name the keywords."))
        assert r["chunk_hits"] == 4 and r["num_external"] > 0, r
    finally:
        shutdown_llm(llm)
