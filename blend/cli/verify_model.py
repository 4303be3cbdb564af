"""`cacheblend verify --model PATH`: the master check on the user's own vLLM and model.

Plain vLLM and vLLM with the connector each run in a fresh child process, one
after the other, with the same engine arguments (the user's vLLM defaults plus
what they pass). Separate processes, because the reference must be plain vLLM
and nothing else: no connector in that engine at all, so neither a blend nor a
prefix-cache block written by one can reach it, and each engine gets the whole
memory share the user gave it. The blended engine answers the same prompts with
chunk spans at recomp_ratio=1.0 (every context token recomputed, chunks on a
first sight computed standalone and stored, as CacheBlend does), and
`blend.exactness.judge` compares the two: mean first-answer-token KL and greedy
agreement up to plain vLLM's own near-ties.

The prompts are built in: a system line, 4 chunks of Python's own reference prose
(`pydoc_data.topics`, shipped with Python) and a question, 10 of them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from blend.prose import QUESTIONS, passages

N_PROMPTS = 10
N_CHUNKS = 4
CHUNK_CHARS = 700
GEN = 16
LOGPROBS = 20  # vLLM's default max_logprobs
SYSTEMS = ["You are a helpful assistant.", "Answer briefly, using only the documents below."]
# Engine options passed through to vllm.LLM when given (None: vLLM's own default).
ENGINE_OPTS = {"dtype": str, "gpu_memory_utilization": float, "max_model_len": int,
               "tensor_parallel_size": int, "seed": int}


def build_cases(tok, n_prompts: int = N_PROMPTS) -> list[dict]:
    """Token ids and chunk spans of the built-in prompts."""
    from blend.api import build_prompt

    P = passages(N_CHUNKS * n_prompts, CHUNK_CHARS)
    cases = []
    for i in range(n_prompts):
        p = build_prompt(tok, SYSTEMS[i % 2], P[N_CHUNKS * i: N_CHUNKS * (i + 1)],
                         QUESTIONS[i % len(QUESTIONS)], cache_fuse_metadata={"recomp_ratio": 1.0})
        cases.append({"ids": p.prompt_token_ids, "spans": [list(s) for s in p.spans]})
    return cases


# ----------------------------------------------------------------- child side
def _child(role: str, model: str, cases_path: str, out_path: str, engine_json: str) -> None:
    """Run one engine (plain or blended) over the cases; write answers as JSON."""
    from vllm import LLM, SamplingParams

    import blend
    from blend.device import shutdown_llm

    cases = json.loads(open(cases_path).read())
    engine = json.loads(engine_json)
    sp = SamplingParams(max_tokens=GEN, temperature=0.0, logprobs=LOGPROBS)
    if role == "plain":
        llm = LLM(model=model, **engine)
        prompts = [{"prompt_token_ids": c["ids"]} for c in cases]
    else:
        store = tempfile.mkdtemp(prefix="cacheblend-verify-")
        ktc = blend.kv_transfer_config(store={"backend": "local", "path": store},
                                       on_miss="compute", admit="always", unmarked="none",
                                       cache_fuse_metadata={"recomp_ratio": 1.0})
        llm = LLM(model=model, kv_transfer_config=ktc, **engine)
        prompts = [blend.BlendPrompt(c["ids"], [tuple(s) for s in c["spans"]],
                                     cache_fuse_metadata={"recomp_ratio": 1.0}) for c in cases]
    t = time.time()
    outs = llm.generate(prompts, sp, use_tqdm=False)
    dtype = str(llm.llm_engine.model_config.dtype).replace("torch.", "")
    res = {"seconds": time.time() - t, "dtype": dtype, "answers": []}
    for o in outs:
        c = o.outputs[0]
        res["answers"].append({
            "tokens": list(c.token_ids),
            "rows": [{str(t): lp.logprob for t, lp in r.items() if t >= 0} for r in c.logprobs],
            "report": (o.kv_transfer_params or {}).get("blend")})
    with open(out_path + ".tmp", "w") as fh:
        json.dump(res, fh)
    os.replace(out_path + ".tmp", out_path)
    shutdown_llm(llm)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # no interpreter teardown racing vLLM's finalizers (tests/test_vllm_connector.py)


# ----------------------------------------------------------------- parent side
def _run_child(role: str, model: str, cases_path: str, out_path: str, engine: dict,
               timeout: float) -> tuple[dict | None, str]:
    """One engine in a fresh process, in its own session; returns (answers or None, error).

    Its output goes to a log file, not a pipe: a vLLM worker orphaned by a crashed engine
    keeps a pipe open and a reader would wait for ever. After the child exits, whatever it
    left in its session (such orphans) is killed.
    """
    cmd = [sys.executable, "-m", "blend.cli.verify_model", role, model, cases_path, out_path,
           json.dumps(engine)]
    log_path = out_path + ".log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            rc = f"killed after {timeout:.0f} s"
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # the child's own session: its leftovers only
        except (ProcessLookupError, PermissionError):
            pass
        proc.wait()
    if not os.path.exists(out_path):
        tail = open(log_path, errors="replace").read()[-6000:]
        return None, f"{role} engine failed (exit {rc}); log {log_path}, its end:\n{tail}"
    return json.loads(open(out_path).read()), ""


def engine_args(args: argparse.Namespace) -> dict:
    """The vllm.LLM keyword arguments the user gave (the rest stay vLLM's defaults)."""
    out = {k: getattr(args, k) for k in ENGINE_OPTS if getattr(args, k, None) is not None}
    if getattr(args, "enforce_eager", False):
        out["enforce_eager"] = True
    if getattr(args, "trust_remote_code", False):
        out["trust_remote_code"] = True
    return out


def verify_model(args: argparse.Namespace) -> int:
    """Plain vs blended at r=1.0 on the built-in prompts; prints figures and PASS/FAIL."""
    from transformers import AutoTokenizer

    from blend.exactness import MIN_PROMPTS, Answer, judge, tolerance
    from blend.faults import ENV as FAULT_ENV

    engine = engine_args(args)
    tok = AutoTokenizer.from_pretrained(args.model,
                                        trust_remote_code=engine.get("trust_remote_code", False))
    cases = build_cases(tok, args.prompts)
    sys.stdout.flush()
    print(f"=== cacheblend engine check: {args.model} ===")
    print(f"{len(cases)} prompts of {N_CHUNKS} chunks ({min(len(c['ids']) for c in cases)}-"
          f"{max(len(c['ids']) for c in cases)} tokens), {GEN} greedy tokens, top-{LOGPROBS} "
          f"logprobs; recomp_ratio=1.0; engine arguments {engine or '(vLLM defaults)'}")
    if os.environ.get(FAULT_ENV):
        print(f"note: {FAULT_ENV}={os.environ[FAULT_ENV]} (a test-only fault is injected)")
    sys.stdout.flush()
    d = tempfile.mkdtemp(prefix="cacheblend-verify-")  # kept, with the engines' logs, on failure
    cases_path = os.path.join(d, "cases.json")
    with open(cases_path, "w") as fh:
        json.dump(cases, fh)
    runs = {}
    for role in ("plain", "blend"):
        t = time.time()
        res, err = _run_child(role, args.model, cases_path, os.path.join(d, f"{role}.json"),
                              engine, args.timeout)
        if res is None:
            print(err, file=sys.stderr)
            print("FAIL: the engine check did not run")
            return 1
        print(f"{role:>5} engine: {time.time() - t:.0f} s in all, "
              f"{res['seconds']:.1f} s generating", flush=True)
        runs[role] = res["answers"]
        dtype = res["dtype"]
    missing = [i for i, a in enumerate(runs["blend"])
               if not (a["report"] and a["report"].get("num_external", 0) > 0)]
    plain = [Answer(a["tokens"], a["rows"]) for a in runs["plain"]]
    blended = [Answer(a["tokens"], a["rows"]) for a in runs["blend"]]
    kl_max, tie = tolerance(dtype)
    print(f"engine dtype {dtype}: tolerances mean first-token KL <= {kl_max:g}, near-tie "
          f"<= {tie:g} nats (blend/exactness.py says why)")
    result = judge(plain, blended, dtype=dtype, min_prompts=min(args.prompts, MIN_PROMPTS))
    print(result.table())
    if missing:
        result.passed = False
        result.reasons.append(f"prompts {missing} were not blended (no connector report with "
                              "external tokens): the connector did not take part")
    print(result.summary())
    if result.passed:
        shutil.rmtree(d, ignore_errors=True)
    else:
        print(f"engine logs and answers kept in {d}")
    return 0 if result.passed else 1


if __name__ == "__main__":
    _child(*sys.argv[1:6])
