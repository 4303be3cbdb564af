"""An unmodified OpenAI chat client against `vllm serve` with the connector: the documents
pasted into a user message are found by content, with no spans, no separator, no extra field.

The real `openai` package, streaming on and off. The first request's paragraphs are new:
vLLM prefills it and the connector saves them (`admit="always"`, so the test needs one sight).
The next request carries the same documents in another order behind another system prompt
and question: they come from the store, and the blend report reaches the client (non-streamed
response's `kv_transfer_params`) and the server's metrics (streamed).
"""

from __future__ import annotations

import time

import pytest
from vllm_server import blend_ktc, cpu_args, metric, vllm_server

pytestmark = pytest.mark.vllm


def _docs() -> list[str]:
    from pydoc_data.topics import topics

    return [" ".join(topics[k].split()[:110]) for k in ("assert", "break", "del", "global")]


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory, child_env):
    store = tmp_path_factory.mktemp("kv")
    with vllm_server(smollm2_path, blend_ktc(store, admit="always"),
                     tmp_path_factory.mktemp("log") / "serve.log", child_env, cpu_args()) as base:
        yield base, smollm2_path, store


def _messages(system: str, docs: list[str], question: str) -> list[dict]:
    return [{"role": "system", "content": system},
            {"role": "user", "content": "\n\n".join(docs) + "\n\n" + question}]


def _wait_entries(store, n: int) -> int:
    deadline = time.time() + 30
    while len(list(store.rglob("*.kv"))) < n and time.time() < deadline:
        time.sleep(0.1)
    return len(list(store.rglob("*.kv")))


def test_chat_documents_found_by_content(server):
    import openai

    base, model, store = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    d = _docs()
    first = client.chat.completions.create(
        model=model, messages=_messages("Answer from the documents.", d[:3], "Which is about del?"),
        max_tokens=8, temperature=0.0)
    rep = (first.model_extra or {}).get("kv_transfer_params", {}).get("blend")
    assert first.choices[0].message.content
    assert rep and rep["plain_prefill"] and rep["chunks"] == 3 and rep["saved_chunks"] == 3, rep
    assert _wait_entries(store, 3) == 3
    # Same documents, other order, system prompt and question: from the store.
    second = client.chat.completions.create(
        model=model, messages=_messages("Be brief.", [d[2], d[0], d[1]], "What does break do?"),
        max_tokens=8, temperature=0.0)
    rep = second.model_extra["kv_transfer_params"]["blend"]
    assert second.choices[0].message.content
    assert rep["chunk_hits"] == 3 and rep["num_external"] > 0, rep
    assert rep["chunk_hit_tokens"] >= 0.9 * rep["chunk_tokens"], rep  # boundary tokens aside


def test_chat_streamed_blends(server):
    import openai

    base, model, store = server
    client = openai.OpenAI(base_url=base + "/v1", api_key="unused")
    d = _docs()
    hits0 = metric(base, "vllm:cacheblend_chunk_hits_total")
    blended0 = metric(base, "vllm:cacheblend_blended_requests_total")
    stream = client.chat.completions.create(
        model=model, messages=_messages("Use the documents.", [d[1], d[2], d[0]], "Summarize."),
        max_tokens=8, temperature=0.0, stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text
    deadline = time.time() + 30  # the engine's stats reach /metrics at its next log interval
    while time.time() < deadline and metric(base, "vllm:cacheblend_blended_requests_total") \
            <= blended0:
        time.sleep(0.5)
    assert metric(base, "vllm:cacheblend_blended_requests_total") == blended0 + 1
    assert metric(base, "vllm:cacheblend_chunk_hits_total") == hits0 + 3
