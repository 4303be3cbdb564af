"""TTFT on the real vLLM engine: plain prefill vs CacheBlend, same process, same prompts.

Prompts: a system prompt, 6 chunks of real prose (Python's language reference,
`pydoc_data.topics`) of ~500 tokens each (~3k context tokens), and a question.
The chunks are precomputed into the store first; each run shuffles them into
a new order, so nothing but chunk KV can be reused. vLLM's prefix cache is
off, so plain prefill really recomputes every run. TTFT is the wall time of
a 1-token generation; we report the median of `--runs` runs of each kind,
after warm-up runs.

Each dtype in `--dtypes` (default: fp32 and bf16) gets its own engine, one
after the other. The JSON also names the dtype `blend.device.choose_dtype`
picks for this CPU (the demo's), and why. Where the connector cannot start
in a dtype (bf16 on an AMX CPU: vLLM's `amx` KV layout), that dtype records
the error and plain prefill alone, from an engine without the connector.

    python -m bench.ttft_vllm [--runs 7] [--ratio 0.15] [--dtypes float32,bfloat16]
                              [--out bench/results/ttft_vllm.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import topics


def passages(n: int, min_tokens: int, tok) -> list[str]:
    t = topics()
    out = []
    for k in sorted(t, key=lambda k: -len(t[k])):
        words = t[k].split()
        text, i = [], 0
        while i < len(words) and len(tok(" ".join(text)).input_ids) < min_tokens:
            text += words[i: i + 40]
            i += 40
        if len(tok(" ".join(text)).input_ids) >= min_tokens:
            out.append(" ".join(text))
        if len(out) == n:
            return out
    raise RuntimeError("not enough prose")


def _engine(model: str, dtype: str, ktc):
    from vllm import LLM

    kw = {"kv_transfer_config": ktc} if ktc is not None else {}
    return LLM(model=model, dtype=dtype, enforce_eager=True, max_model_len=4096,
               gpu_memory_utilization=0.3, enable_prefix_caching=False,
               max_num_batched_tokens=4096, seed=0, **kw)


def measure(args, model: str, dtype: str) -> dict:
    from vllm import SamplingParams

    import blend
    from blend.device import shutdown_llm

    store = args.store or f"local:{tempfile.mkdtemp(prefix='cacheblend-ttft-')}"
    ktc = blend.kv_transfer_config(store=store,
                                   cache_fuse_metadata={"recomp_ratio": args.ratio})
    blend_error = None
    try:
        llm = _engine(model, dtype, ktc)
    except Exception as e:  # recorded; plain prefill is still measured
        cause = e.__cause__ or e
        blend_error = f"{type(cause).__name__}: {cause}"[:600]
        print(f"[ttft] {dtype}: the connector engine did not start ({blend_error}); "
              "measuring plain prefill only", flush=True)
        llm = _engine(model, dtype, None)
    tok = llm.get_tokenizer()
    chunks = passages(args.chunks, args.chunk_tokens, tok)
    precompute_s = None
    if blend_error is None:
        t0 = time.perf_counter()
        blend.precompute(llm, chunks)
        precompute_s = round(time.perf_counter() - t0, 2)

    rng = random.Random(0)
    sp = SamplingParams(max_tokens=1, temperature=0.0)
    system = "You are a helpful assistant. Answer from the documents."
    questions = ["Which statement does the second document describe?",
                 "What is the main topic of the first document?",
                 "Summarize the last document in one sentence."]

    def one(kind: str, i: int) -> tuple[float, dict]:
        order = chunks[:]
        rng.shuffle(order)
        p = blend.build_prompt(tok, system, order, questions[i % len(questions)])
        prompt = p if kind == "blend" else p.tokens_prompt()
        t = time.perf_counter()
        out = llm.generate(prompt, sp, use_tqdm=False)[0]
        ms = (time.perf_counter() - t) * 1e3
        return ms, {"prompt_tokens": len(p.prompt_token_ids), "context_tokens": p.spans[-1][1],
                    "report": (out.kv_transfer_params or {}).get("blend")}

    kinds = ["plain"] + (["blend"] if blend_error is None else [])
    for i in range(args.warmup):
        for kind in kinds:
            one(kind, i)
    plain, blended, info = [], [], {}
    for i in range(args.runs):  # interleaved, so drift in machine load hits both alike
        ms, info = one("plain", i)
        plain.append(ms)
        if blend_error is None:
            ms, info = one("blend", i)
            blended.append(ms)
            assert info["report"] and info["report"]["chunk_hits"] == args.chunks, info
    shutdown_llm(llm)  # before the next dtype's engine starts
    res = {"prompt_tokens": info["prompt_tokens"], "context_tokens": info["context_tokens"],
           "plain_ms": [round(x, 1) for x in plain],
           "plain_median_ms": round(statistics.median(plain), 1)}
    if blend_error is not None:
        res["blend_error"] = blend_error
        return res
    res.update({
        "blend_ms": [round(x, 1) for x in blended],
        "blend_median_ms": round(statistics.median(blended), 1),
        "precompute_s": precompute_s,
        "chunk_hit_rate": info["report"]["chunk_hit_tokens"] / info["report"]["chunk_tokens"],
    })
    res["speedup"] = round(res["plain_median_ms"] / res["blend_median_ms"], 2)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--chunk-tokens", type=int, default=500)
    ap.add_argument("--dtypes", default="float32,bfloat16",
                    help="comma-separated vLLM dtypes, each measured in its own engine")
    ap.add_argument("--model", default=None, help="HF folder (default: embedded SmolLM2)")
    ap.add_argument("--store", default=None, help="store spec (default: a fresh temp dir per dtype)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ttft_vllm.json"))
    args = ap.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

    import vllm

    from blend.assets import model_path
    from blend.device import choose_dtype, cpu_bf16_features

    model = args.model or str(model_path())
    chosen = choose_dtype("cpu")
    res = {
        "what": "TTFT (1-token generate wall time), plain vLLM prefill vs CacheBlend, per dtype",
        "model": os.path.basename(model), "vllm": vllm.__version__, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "threads": os.cpu_count(),
        "cpu_bf16": cpu_bf16_features(),
        "chosen_dtype": chosen.dtype, "chosen_because": chosen.reason,
        "chunks": args.chunks, "recomp_ratio": args.ratio,
        "runs": args.runs, "warmup": args.warmup,
        "measured": time.strftime("%Y-%m-%d", time.gmtime()),
        "dtypes": {},
    }
    for dtype in args.dtypes.split(","):
        res["dtypes"][dtype] = measure(args, model, dtype)
        print(f"[ttft] {dtype}: {json.dumps(res['dtypes'][dtype])}", flush=True)
    res["target_speedup"] = 3.0
    out = Path(args.out)
    res = with_earlier(json.loads(out.read_text()) if out.exists() else None, res)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


def with_earlier(old: dict | None, new: dict) -> dict:
    """Keep what earlier runs on other CPUs measured: `earlier_runs`, newest first.

    A file of the one-dtype format (before 2026-12-01) was a bf16 run on a CPU without
    native bf16 (emulated bf16); it is kept, marked as such.
    """
    earlier = list((old or {}).get("earlier_runs", []))
    if old is not None:
        if "dtypes" not in old:
            old = {**old, "dtype": "bfloat16",
                   "note": "one-dtype format, before blend.device chose the dtype: bf16 on the "
                           "CI machine of then, which had no native bf16 (issue 12: emulated, "
                           "several times slower than fp32)"}
        else:
            old = {k: v for k, v in old.items() if k != "earlier_runs"}
        earlier.insert(0, old)
    return {**new, "earlier_runs": earlier}


if __name__ == "__main__":
    main()
