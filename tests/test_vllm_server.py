"""(f) `vllm serve` with the connector; chunk spans travel in an OpenAI completions request."""

from __future__ import annotations

import pytest
from vllm_server import blend_ktc, cpu_args, post, vllm_server

pytestmark = pytest.mark.vllm


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory, child_env):
    ktc = blend_ktc(tmp_path_factory.mktemp("kv"), admit="always")
    with vllm_server(smollm2_path, ktc, tmp_path_factory.mktemp("log") / "serve.log", child_env,
                     cpu_args()) as base:
        yield base, smollm2_path


def test_f_openai_completion_with_spans(server):
    from pydoc_data.topics import topics

    from transformers import AutoTokenizer

    import blend

    base, model = server
    tok = AutoTokenizer.from_pretrained(model)
    docs = [" ".join(topics[t].split())[:900] for t in ("raise", "assert", "pass")]
    p = blend.build_prompt(tok, "Answer from the documents.", docs, "Which statement raises?")
    body = {"model": model, "prompt": p.prompt_token_ids, "max_tokens": 8, "temperature": 0.0,
            "kv_transfer_params": p.kv_transfer_params()}
    first = post(base + "/v1/completions", body)
    assert first["choices"][0]["text"]
    rep = first["kv_transfer_params"]["blend"]
    # All new: vLLM's own prefill; the chunks are saved out of its blocks afterwards.
    assert rep["chunks"] == 3 and rep["chunk_hits"] == 0 and rep["plain_prefill"], rep
    assert rep["saved_chunks"] == 3, rep
    # Same chunks, other order: every chunk now comes from the store.
    p2 = blend.build_prompt(tok, "Answer from the documents.", docs[::-1], "Which statement raises?")
    second = post(base + "/v1/completions", {**body, "prompt": p2.prompt_token_ids,
                                              "kv_transfer_params": p2.kv_transfer_params()})
    rep2 = second["kv_transfer_params"]["blend"]
    assert rep2["chunk_hits"] == 3 and rep2["chunk_hit_tokens"] == rep2["chunk_tokens"]
    assert second["choices"][0]["text"]
