"""BlendConnector inside GPU vLLM (0.26 on the lent H200), real SmolLM2 weights, bf16.

Everything runs with vLLM's defaults: torch.compile and CUDA graphs on (no
`enforce_eager`), prefix caching on, chunked prefill on. Only the memory share
is set (0.3), so the module's engine, the `vllm serve` process and the sync-check
engine fit on one GPU side by side.

Engines started: plain vLLM in a fresh process (all references, one start), one
in-process engine with the connector (a, b, d), a `vllm serve` process (f) and a
fresh engine with `BLEND_SYNC_CHECK=1` (g): four starts.

- (a) recomp_ratio=1.0 reproduces plain vLLM by the master check (`blend/exactness.py`)
  over 10 prompts: mean first-answer-token KL <= 0.01, greedy tokens equal up to a plain
  near-tie (<= 0.3 nats), a `blend` report on every blended request;
- (b) chunks stored by a first pass and reused in another order and position:
  >= 99% of chunk tokens from the store, and the first-answer-token KL to plain
  vLLM within 10% of the CPU engine's on the same token ids
  (`bench/results/kl_reference.json`, made by `bench/kl_reference.py`);
- (d) 16 concurrent requests, blended and plain in one `generate`: the plain ones
  token-identical to plain vLLM;
- (f) `vllm serve` with the connector: an OpenAI completion (prompt as token ids)
  carrying chunk spans, answered from the store;
- (g) the worker's hot path under `torch.cuda.set_sync_debug_mode("error")`
  (`BLEND_SYNC_CHECK=1`): a blended request from the store completes.

On the GPU machine: `bash tools/gpu/device.sh tests` (docs/gpu.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from test_vllm_connector import QUESTIONS, _kl, _passages, _report
from vllm_server import blend_ktc, post, vllm_server

pytestmark = [pytest.mark.gpu, pytest.mark.vllm]
# The in-process engines start after this process has touched CUDA (importing the blend
# kernels does); a forked EngineCore then dies with "Cannot re-initialize CUDA in forked
# subprocess" (seen on the H200, vLLM 0.26). Spawned, it starts clean.
os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")

ROOT = Path(__file__).resolve().parents[1]
KL_REFERENCE = ROOT / "bench" / "results" / "kl_reference.json"
ENGINE = dict(dtype="bfloat16", gpu_memory_utilization=0.3, seed=0)
GEN = 16
LOGPROBS = 20  # vLLM's default max_logprobs
# bf16 greedy decoding flips on near-ties, and plain vLLM itself is not batch-invariant:
# on vLLM CPU bf16, 3 of the 8 plain requests in the 16-request mix left their plain
# references (at ties of 0.25 nats), and an r=1.0 blend left plain vLLM at token 13 where
# plain's top two were 0.25 apart. A bf16 logit between 16 and 32 moves in steps of 0.125.
# So "identical" means: identical, or identical up to a position where plain vLLM's own top
# two are within TIE_NATS (two such steps plus rounding), after which the texts differ.
TIE_NATS = 0.3  # = blend.exactness.TIE_NATS, which (a) uses through the master check
KL_SLACK = 1.10  # (b): GPU KL <= 1.1 x the CPU engine's on the same prompts
SPAWN_TIMEOUT = 420
SYS_A = "You are a helpful assistant."
SYS_C = "Use the documents to answer."


def _row(out, i: int = 0) -> dict[str, float]:
    """Generated position i's top-k distribution as {token id: logprob}."""
    return {str(t): lp.logprob for t, lp in out.outputs[0].logprobs[i].items() if t >= 0}


def _chosen_logprobs(out) -> list[float]:
    o = out.outputs[0]
    return [o.logprobs[i][t].logprob for i, t in enumerate(o.token_ids)]


def _rows(out) -> list[dict[str, float]]:
    return [_row(out, i) for i in range(len(out.outputs[0].token_ids))]


def _divergence(tokens: list[int], ref: dict) -> int | None:
    """None if `tokens` equal plain vLLM's; else the first differing position, which must be
    a near-tie in plain vLLM's own distribution there (else AssertionError)."""
    for i, (a, b) in enumerate(zip(tokens, ref["tokens"])):
        if a != b:
            row = ref["rows"][i]
            assert str(a) in row and row[str(b)] - row[str(a)] <= TIE_NATS, (
                f"token {i}: got {a}, plain vLLM {b}, plain's logprobs there "
                f"{b}: {row[str(b)]:.4f}, {a}: {row.get(str(a))}")
            return i
    assert len(tokens) == len(ref["tokens"]), (tokens, ref["tokens"])
    return None


def _load_reference_cases() -> dict:
    if not KL_REFERENCE.exists():
        pytest.fail(f"{KL_REFERENCE} missing: run `python -m bench.kl_reference` on the CPU")
    return json.loads(KL_REFERENCE.read_text())


def _cases(tok) -> dict:
    """Token ids (+ spans) of every prompt, built once in the test process."""
    from blend.api import build_prompt

    ref = _load_reference_cases()
    P = _passages(60)  # all of pydoc's passages of >= 700 characters; (b) uses P[:48]
    exact = [build_prompt(tok, SYS_A, P[40 + 4 * i: 44 + 4 * i], QUESTIONS[i],
                          cache_fuse_metadata={"recomp_ratio": 1.0}) for i in range(5)]
    # The master check judges >= 10 prompts: five more, the same chunks in another order
    # behind another system line (pydoc has only 60 long passages), served from the store.
    exact += [build_prompt(tok, SYS_C, [P[42 + 4 * i], P[40 + 4 * i], P[43 + 4 * i],
                                        P[41 + 4 * i]], QUESTIONS[(i + 2) % 5],
                           cache_fuse_metadata={"recomp_ratio": 1.0}) for i in range(5)]
    # (d): the reused chunks behind a new system prompt and question, so that vLLM's
    # prefix cache holds none of it and every one of them really blends.
    mixed_blend = []
    for i, c in enumerate(ref["cases"]["reuse_src"]):
        ch = c["chunks"]
        p = build_prompt(tok, SYS_C, [ch[1], ch[3], ch[0], ch[2]], QUESTIONS[(i + 2) % 5])
        mixed_blend.append((p.prompt_token_ids, p.spans))
    plain = [tok(f"Question {i}: explain the Python keyword {w} in two sentences.").input_ids
             for i, w in enumerate(["yield", "lambda", "with", "async", "global", "class",
                                    "return", "import"])]
    mixed = [("blend", *mixed_blend[i // 2]) if i % 2 == 0 else ("plain", plain[i // 2], None)
             for i in range(16)]
    return {
        "exact": [(p.prompt_token_ids, p.spans) for p in exact],
        "reuse_src": [(c["ids"], c["spans"]) for c in ref["cases"]["reuse_src"]],
        "reuse": [(c["ids"], c["spans"]) for c in ref["cases"]["reuse"]],
        "mixed": mixed,
        "cpu_kl": ref["kl"], "cpu_mean_kl": ref["mean_kl"], "cpu_vllm": ref.get("vllm"),
    }


# ----------------------------------------------------------------- subprocess side
def _finish(llm, out_path: str, obj) -> None:
    """Save the child's result, stop its engine and leave without interpreter teardown
    (the CPU suite's `_save` / `_exit_child` where that checkout has them)."""
    try:
        from test_vllm_connector import _exit_child, _save
    except ImportError:
        _save = _exit_child = None
    if _save is not None:
        _save(out_path, obj)
        _exit_child(llm)
    with open(out_path, "w") as fh:
        json.dump(obj, fh)
    llm.llm_engine.engine_core.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _reference(model: str, cases: dict, out_path: str) -> None:
    """Plain vLLM, no connector, same engine arguments: every reference in one start."""
    from vllm import LLM, SamplingParams

    llm = LLM(model=model, **ENGINE)
    gen = SamplingParams(max_tokens=GEN, temperature=0.0, logprobs=LOGPROBS)
    first = SamplingParams(max_tokens=1, temperature=0.0, logprobs=LOGPROBS)
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in cases["exact"]], gen,
                        use_tqdm=False)
    exact = [{"tokens": list(o.outputs[0].token_ids), "logprobs": _chosen_logprobs(o),
              "rows": _rows(o)} for o in outs]
    outs = llm.generate([{"prompt_token_ids": ids} for ids, _ in cases["reuse"]], first,
                        use_tqdm=False)
    reuse = [_row(o) for o in outs]
    outs = llm.generate([{"prompt_token_ids": ids} for _, ids, _ in cases["mixed"]], gen,
                        use_tqdm=False)
    mixed = [{"tokens": list(o.outputs[0].token_ids), "rows": _rows(o)} for o in outs]
    _finish(llm, out_path, {"exact": exact, "reuse": reuse, "mixed": mixed})


def _sync_check(model: str, store: str, ids: list[int], spans: list, out_path: str) -> None:
    """A fresh engine with BLEND_SYNC_CHECK=1 (set by the caller) on the module's store."""
    from vllm import LLM, SamplingParams

    import blend

    assert os.environ.get("BLEND_SYNC_CHECK") == "1"
    ktc = blend.kv_transfer_config(store={"backend": "local", "path": store},
                                   on_miss="compute", admit="always",
                                   cache_fuse_metadata={"recomp_ratio": 0.15})
    llm = LLM(model=model, kv_transfer_config=ktc, **ENGINE)
    outs = llm.generate([blend.BlendPrompt(ids, spans)],
                        SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)
    _finish(llm, out_path, [{"report": _report(o), "tokens": list(o.outputs[0].token_ids),
                             "finished": o.finished} for o in outs])


def _spawn(*args: str, env: dict) -> None:
    """Run this file as a child; `env` is the session's (conftest `child_env`), not os.environ
    as an in-process engine left it."""
    r = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True,
                       env=env, timeout=SPAWN_TIMEOUT)
    assert r.returncode == 0, (r.stdout[-2000:], r.stderr[-6000:])


# ----------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cases(tok):
    return _cases(tok)


@pytest.fixture(scope="module")
def reference(smollm2_path, cases, tmp_path_factory, child_env):
    d = tmp_path_factory.mktemp("ref")
    (d / "cases.json").write_text(json.dumps(cases))
    t = time.time()
    _spawn("reference", smollm2_path, str(d / "cases.json"), str(d / "out.json"), env=child_env)
    print(f"plain reference engine: {time.time() - t:.0f} s")
    return json.loads((d / "out.json").read_text())


@pytest.fixture(scope="module")
def store_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("kvstore"))


@pytest.fixture(scope="module")
def llm(smollm2_path, store_dir, reference):  # reference first: its engine is gone by then
    from vllm import LLM

    import blend

    # CacheBlend's own semantics (first sight computes standalone KV and stores it), as
    # the CPU connector tests; the default miss path has its own test (test_h_*).
    ktc = blend.kv_transfer_config(store={"backend": "local", "path": store_dir},
                                   on_miss="compute", admit="always", unmarked="none",
                                   cache_fuse_metadata={"recomp_ratio": 0.15})
    t = time.time()
    engine = LLM(model=smollm2_path, kv_transfer_config=ktc, **ENGINE)
    print(f"blend engine start: {time.time() - t:.0f} s")
    yield engine
    engine.llm_engine.engine_core.shutdown()
    del engine


def _sp(**kw):
    from vllm import SamplingParams

    return SamplingParams(**{"max_tokens": GEN, "temperature": 0.0, **kw})


# ----------------------------------------------------------------- tests
def test_a_exact_at_ratio_one(llm, cases, reference):
    """r=1.0 through the connector is plain vLLM, by the master check (`blend/exactness.py`)
    over 10 prompts of 4 chunks: mean first-answer-token KL <= KL_MAX (0.01) and greedy
    tokens equal to plain vLLM's up to, at most, a position where plain's own top two are
    within TIE_NATS (0.3).

    Why these tolerances, and not per-token logprob bounds: bf16 forces them. A bf16 logit
    between 16 and 32 moves in steps of 0.125, so two runs of the same math grouped
    differently (the blend's kernels vs vLLM's; vLLM against itself across batch
    compositions) can flip a top-two gap of up to two steps plus rounding (0.3 nats), and
    after such a flip the texts differ. Per-token logprob limits over the few tokens before
    a flip failed on exactly that, while the KL over prompts stayed small
    (bench/notes/history.md). The mean KL over prompts averages the rounding out: 0.01 is
    a typical per-logit disagreement of 0.14 nats (KL ~ 1/2 Var(d logit)). The price: a
    bug that moves the answer less than bf16 rounding does is invisible in bf16 (one wrong
    mask on the attention sink is such a bug). tests/test_verify_model.py shows, on
    vLLM CPU fp32, that the criterion fails with one chunk's RoPE off by one and with one
    recomputed token's causal mask wrong.
    """
    import blend
    from blend.exactness import Answer, answer_from_vllm, judge

    prompts = [blend.BlendPrompt(ids, spans, cache_fuse_metadata={"recomp_ratio": 1.0})
               for ids, spans in cases["exact"]]
    outs = llm.generate(prompts, _sp(logprobs=LOGPROBS), use_tqdm=False)
    for i, o in enumerate(outs):
        rep = _report(o)
        assert rep and rep["chunks"] == 4 and rep["num_external"] > 0, (i, rep)
    res = judge([Answer(r["tokens"], r["rows"]) for r in reference["exact"]],
                [answer_from_vllm(o) for o in outs], dtype=ENGINE["dtype"])
    print(f"r=1.0 master check ({len(outs)} prompts x {GEN} tokens):\n{res.table()}\n"
          f"{res.summary()}")
    assert res.passed, res.summary()


def test_b_reuse_other_order_and_position(llm, cases, reference):
    """Chunks stored by one pass serve a later one in another order and position."""
    import blend

    src = [blend.BlendPrompt(ids, spans) for ids, spans in cases["reuse_src"]]
    first = llm.generate(src, _sp(max_tokens=1), use_tqdm=False)  # misses: computed, stored
    assert all(_report(o) for o in first), [_report(o) for o in first]
    later = [blend.BlendPrompt(ids, spans) for ids, spans in cases["reuse"]]
    outs = llm.generate(later, _sp(max_tokens=1, logprobs=LOGPROBS), use_tqdm=False)
    kls, hits = [], []
    for i, (o, ref) in enumerate(zip(outs, reference["reuse"])):
        rep = _report(o)
        assert rep and rep["num_external"] > 0, (i, rep)
        hits.append(rep["chunk_hit_tokens"] / rep["chunk_tokens"])
        kls.append(_kl([ref], [_row(o)]))
    mean_kl, cpu = sum(kls) / len(kls), cases["cpu_mean_kl"]
    print(f"reuse (r=0.15) first-answer KL to plain vLLM: GPU {[round(k, 4) for k in kls]} "
          f"mean {mean_kl:.4f}; CPU vLLM {cases['cpu_vllm']} {cases['cpu_kl']} mean {cpu:.4f}; "
          f"ratio {mean_kl / cpu:.3f}; chunk hit rate {hits}")
    assert min(hits) >= 0.99, hits
    assert mean_kl <= KL_SLACK * cpu, (mean_kl, cpu, kls)


def test_d_sixteen_concurrent_mixed(llm, cases, reference):
    """8 blended and 8 plain requests, interleaved, in one generate call."""
    import blend

    prompts = [blend.BlendPrompt(ids, spans) if kind == "blend" else {"prompt_token_ids": ids}
               for kind, ids, spans in cases["mixed"]]
    outs = llm.generate(prompts, _sp(logprobs=LOGPROBS), use_tqdm=False)
    assert len(outs) == 16
    split = {}
    for i, ((kind, _, _), o, ref) in enumerate(zip(cases["mixed"], outs, reference["mixed"])):
        assert o.finished and o.outputs[0].token_ids, i
        if kind == "plain":
            assert not _report(o), (i, _report(o))
            split[i] = _divergence(list(o.outputs[0].token_ids), ref)
        else:
            rep = _report(o)
            assert rep and rep["chunks"] == 4 and rep["num_external"] > 0, (i, rep)
    print(f"mixed: plain requests' first divergence at a near-tie (None = identical): {split}")


def test_f_vllm_serve_completion_with_spans(smollm2_path, tok, tmp_path, child_env):
    """`vllm serve` + connector: a completion with chunk spans is answered from the store."""
    import blend

    # -P and a neutral cwd: import blend from the installed copy (with blend.patches),
    # never from the repo folder.
    args = ["--dtype", "bfloat16", "--gpu-memory-utilization",
            str(ENGINE["gpu_memory_utilization"]), "--seed", "0"]
    with vllm_server(smollm2_path, blend_ktc(tmp_path / "kv", admit="always"),
                     tmp_path / "serve.log", child_env, args, python=(sys.executable, "-P"),
                     cwd=tempfile.gettempdir(), timeout_s=SPAWN_TIMEOUT) as base:
        from pydoc_data.topics import topics

        docs = [" ".join(topics[t].split())[:900] for t in ("raise", "assert", "pass")]
        p1 = blend.build_prompt(tok, "Answer from the documents.", docs, "Which statement raises?")
        body = {"model": smollm2_path, "prompt": p1.prompt_token_ids, "max_tokens": 8,
                "temperature": 0.0, "kv_transfer_params": p1.kv_transfer_params()}
        first = post(base + "/v1/completions", body)
        rep1 = first["kv_transfer_params"]["blend"]
        # The default miss path: vLLM prefills, the chunks are extracted from its blocks and
        # saved by the saver thread (CUDA streams, the extraction kernel).
        assert first["choices"][0]["text"] and rep1["chunks"] == 3, rep1
        assert rep1["plain_prefill"] and rep1["saved_chunks"] == 3, rep1
        # Same chunks in another order: the one completion answered from the store.
        p2 = blend.build_prompt(tok, "Answer from the documents.", docs[::-1],
                                "Which statement raises?")
        second = post(base + "/v1/completions", {**body, "prompt": p2.prompt_token_ids,
                                                 "kv_transfer_params": p2.kv_transfer_params()})
        rep2 = second["kv_transfer_params"]["blend"]
        print(f"serve reports: first {rep1}; second {rep2}")
        assert second["choices"][0]["text"]
        assert rep2["chunk_hits"] == 3 and rep2["chunk_hit_tokens"] == rep2["chunk_tokens"], rep2
        # An OpenAI chat request with the documents pasted in, no spans: found by content.
        msgs = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "\n\n".join(docs[::-1]) + "\n\nWhich one raises?"}]
        chat = post(base + "/v1/chat/completions", {"model": smollm2_path, "messages": msgs,
                                                   "max_tokens": 8, "temperature": 0.0})
        rep3 = chat["kv_transfer_params"]["blend"]
        print(f"chat report: {rep3}")
        assert chat["choices"][0]["message"]["content"]
        assert rep3["chunk_hits"] == 3 and rep3["num_external"] > 0, rep3


def test_g_hot_path_has_no_device_sync(llm, cases, store_dir, smollm2_path, tmp_path, child_env):
    """BLEND_SYNC_CHECK=1: the worker's hot path runs under sync debug mode "error"
    (a sync raises and the request fails). A fresh engine on the module's store."""
    ids, spans = cases["reuse"][0]
    out = tmp_path / "sync.json"
    t = time.time()
    _spawn("sync_check", smollm2_path, store_dir, json.dumps([ids, spans]), str(out),
           env={**child_env, "BLEND_SYNC_CHECK": "1"})
    res = json.loads(out.read_text())
    print(f"sync-check engine: {time.time() - t:.0f} s; {res}")
    for r in res:
        assert r["finished"] and r["tokens"] and r["report"], r
    rep = res[0]["report"]
    assert rep["chunk_hit_tokens"] == rep["chunk_tokens"], rep  # loaded, not recomputed


if __name__ == "__main__":
    mode = sys.argv[1]
    if mode == "reference":
        _reference(sys.argv[2], json.loads(open(sys.argv[3]).read()), sys.argv[4])
    elif mode == "sync_check":
        ids, spans = json.loads(sys.argv[4])
        _sync_check(sys.argv[2], sys.argv[3], ids, spans, sys.argv[5])
