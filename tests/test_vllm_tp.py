"""Blending with tensor_parallel_size=2 on vLLM CPU: two worker processes, one KV head each.

Each rank holds half of the KV heads, so it measures deviation over its heads only; the
ranks must still recompute the same tokens (the deviation is summed over the TP group
before top-k) and fall back alike when one rank's store read fails (they agree on which
chunks every rank has). A small random-weight Llama with 2 KV heads and SmolLM2's tokenizer
keeps two fp32 ranks quick on two cores; the checks are about agreement and exactness, which
random weights exercise as well as real ones.

Plain TP=2 vLLM and blended TP=2 vLLM each run in a child process (this file as a script):
(a) recomp_ratio=1.0 reproduces plain TP=2 vLLM token for token;
(b) chunks reused in another order hit >= 99% of chunk tokens;
(c) both ranks' traces hold the same selected positions;
(d) a chunk whose shard on rank 1 is corrupt is recomputed on both ranks, and the ranks'
    selections still agree.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_vllm_connector import Child, _exit_child, _passages, _save

pytestmark = pytest.mark.vllm

ENGINE = dict(dtype="float32", enforce_eager=True, max_model_len=2048, tensor_parallel_size=2,
              distributed_executor_backend="mp", gpu_memory_utilization=0.3, seed=0)
GEN = 12
# vLLM CPU binds each worker's threads to a NUMA node unless told otherwise; these machines
# have one node, so two ranks need a core each (vLLM: "Not enough allowed NUMA nodes").
TP_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1"}


def _tiny_llama(tok_dir: str, out: Path) -> None:
    """A 4-layer Llama with 4 query and 2 KV heads (one per rank), seeded random weights."""
    import shutil

    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      vocab_size=len(tok), max_position_embeddings=4096, rope_theta=10000.0,
                      tie_word_embeddings=False, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).float().save_pretrained(out)
    for f in Path(tok_dir).iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, out / f.name)


def _cases(tok) -> dict:
    from blend.api import build_prompt

    P = _passages(16, size=500)
    exact = [build_prompt(tok, "Answer briefly.", P[3 * i: 3 * i + 3], f"Question {i}?",
                          cache_fuse_metadata={"recomp_ratio": 1.0}) for i in range(3)]
    src = [build_prompt(tok, "You are helpful.", P[9:12], "What is this about?")]
    reuse = [build_prompt(tok, f"System {i}.", [P[11], P[9], P[10]], f"Say more, {i}.")
             for i in range(2)]
    fault = build_prompt(tok, "Another system prompt.", [P[10], P[11], P[9]], "Once more?")
    return {"exact": [(p.prompt_token_ids, p.spans, {"recomp_ratio": 1.0}) for p in exact],
            "src": [(p.prompt_token_ids, p.spans) for p in src],
            "reuse": [(p.prompt_token_ids, p.spans) for p in reuse],
            "fault": (fault.prompt_token_ids, fault.spans)}  # chunk 0's rank-1 shard corrupted


# ----------------------------------------------------------------- subprocess side
def _plain(model: str, cases: dict, out: str) -> None:
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **ENGINE)
    outs = llm.generate([{"prompt_token_ids": c[0]} for c in cases["exact"]],
                        SamplingParams(max_tokens=GEN, temperature=0.0), use_tqdm=False)
    _save(out, {"exact": [list(o.outputs[0].token_ids) for o in outs]})
    _exit_child(llm)


def _entries(llm, store: str, token_ids: list[int]) -> list:
    """The chunk's entry file in each rank's store (rank 0, rank 1)."""
    from blend.connector.identity import vllm_fingerprint
    from blend.keys import chunk_key
    from blend.store import open_store

    out = []
    for rank in (0, 1):
        fp = vllm_fingerprint(llm.llm_engine.vllm_config, rank)
        out.append(open_store({"path": store, "memory_bytes": 1}, fp).disk.path(
            chunk_key(fp, token_ids)))
    return out


def _corrupt(path) -> None:
    """Flip a payload byte: the entry's checksum fails, so that rank's read is a miss."""
    raw = bytearray(path.read_bytes())
    raw[-100] ^= 0x10
    path.write_bytes(bytes(raw))


def _blend(model: str, cases: dict, store: str, traces: str, out: str) -> None:
    from vllm import LLM, SamplingParams

    import blend

    # memory_bytes=1: every read goes to disk, where the injected fault is.
    ktc = blend.kv_transfer_config(store={"path": store, "memory_bytes": 1}, trace_dir=traces,
                                   on_miss="compute", admit="always")
    llm = LLM(model=model, kv_transfer_config=ktc, **ENGINE)
    sp = SamplingParams(max_tokens=GEN, temperature=0.0)

    def run(items):
        prompts = [blend.BlendPrompt(x[0], x[1], cache_fuse_metadata=x[2] if len(x) > 2 else None)
                   for x in items]
        outs = llm.generate(prompts, sp, use_tqdm=False)
        return [{"tokens": list(o.outputs[0].token_ids), "req_id": o.request_id,
                 "report": (o.kv_transfer_params or {}).get("blend")} for o in outs]

    res = {"exact": run(cases["exact"])}
    _save(out, res)
    run(cases["src"])  # stores the chunks that the reuse and fault requests place
    res["reuse"] = run(cases["reuse"])
    _save(out, res)
    ids, spans = cases["fault"]
    (s, e), (s2, e2) = spans[0], spans[1]
    hit, other = _entries(llm, store, ids[s:e]), _entries(llm, store, ids[s2:e2])
    _corrupt(hit[1])
    before = [os.stat(p).st_ino for p in hit + other]
    res["fault"] = run([(ids, spans)])[0]
    # A recomputed chunk is stored again (a new file, by atomic rename), on each rank that
    # recomputed it; a chunk placed from the store is left as it was. The saver thread
    # writes after the step: give it a moment.
    deadline = time.time() + 20
    while time.time() < deadline and [os.stat(p).st_ino for p in hit] == before[:len(hit)]:
        time.sleep(0.1)
    res["fault"]["inodes_before"] = before
    res["fault"]["inodes_after"] = [os.stat(p).st_ino for p in hit + other]
    _save(out, res)
    _exit_child(llm)


# ----------------------------------------------------------------- test side
def _child(mode: str, env: dict, out: Path, *args: str) -> Child:
    try:
        r = subprocess.run([sys.executable, __file__, mode, *args, str(out)], env=env,
                           capture_output=True, text=True, timeout=900)
        rc, err = r.returncode, r.stderr
    except subprocess.TimeoutExpired as e:
        rc, err = None, f"timed out after 900 s\n{e.stderr or ''}"
    parts = json.loads(out.read_text()) if out.exists() else {}
    return Child(f"TP=2 {mode} child", rc, err, parts)


@pytest.fixture(scope="module")
def tp(smollm2_path, tmp_path_factory, child_env):
    from transformers import AutoTokenizer

    d = tmp_path_factory.mktemp("tp")
    model = d / "tiny-llama-2kv"
    _tiny_llama(smollm2_path, model)
    cases = _cases(AutoTokenizer.from_pretrained(smollm2_path))
    (d / "cases.json").write_text(json.dumps(cases))
    env = {**child_env, **TP_ENV}
    plain = _child("plain", env, d / "plain.json", str(model), str(d / "cases.json"))
    blended = _child("blend", env, d / "blend.json", str(model), str(d / "cases.json"),
                     str(d / "kv"), str(d / "traces"))
    return {"cases": cases, "plain": plain, "blend": blended, "traces": d / "traces"}


def _selected(traces: Path, req_id: str) -> tuple[list[int], list[int]]:
    """Rank 0's and rank 1's selected positions for one request."""
    from blend.trace import load_dir

    def one(d: dict):  # the engine core's id is the output's id plus "-<suffix>"
        hits = [t for k, t in d.items() if k == req_id or k.startswith(req_id + "-")]
        assert len(hits) == 1, (req_id, sorted(d))
        return hits[0].selected

    return one(load_dir(traces)), one(load_dir(traces / "rank1"))


def test_a_exact_at_ratio_one_matches_plain_tp2(tp):
    want = tp["plain"].part("exact")
    got = tp["blend"].part("exact")
    for w, g in zip(want, got):
        assert g["report"] and g["report"]["chunks"] == 3, g["report"]
        assert g["tokens"] == w, (g["tokens"], w)


def test_b_reordered_reuse_hits_the_store(tp):
    for r in tp["blend"].part("reuse"):
        rep = r["report"]
        assert rep["chunk_hit_tokens"] >= 0.99 * rep["chunk_tokens"], rep


def test_c_both_ranks_select_the_same_tokens(tp):
    reuse = tp["blend"].part("reuse")
    for r in reuse:
        s0, s1 = _selected(tp["traces"], r["req_id"])
        assert s0 and s0 == s1


def test_d_a_failed_read_on_one_rank_is_recomputed_on_every_rank(tp):
    f = tp["blend"].part("fault")
    tp["blend"].check_exit()
    s0, s1 = _selected(tp["traces"], f["req_id"])
    assert s0 and s0 == s1
    b, a = f["inodes_before"], f["inodes_after"]
    # Rank 1's shard was unreadable, so both ranks computed the chunk anew (rank 0 dropped
    # its good shard) and stored it again; the untouched chunk came from both stores.
    assert a[0] != b[0] and a[1] != b[1], (b, a)
    assert a[2:] == b[2:], (b, a)


if __name__ == "__main__":
    mode, *rest = sys.argv[1:]
    cases_ = json.loads(Path(rest[1]).read_text())
    if mode == "plain":
        _plain(rest[0], cases_, rest[2])
    else:
        _blend(rest[0], cases_, rest[2], rest[3], rest[4])
