"""TTFT on the real vLLM engine: plain prefill vs CacheBlend, same process, same prompts.

Prompts: a system prompt, 6 chunks of real prose (Python's language reference,
`pydoc_data.topics`) of ~500 tokens each (~3k context tokens), and a question.
The chunks are precomputed into the store first; each run shuffles them into
a new order, so nothing but chunk KV can be reused. vLLM's prefix cache is
off, so plain prefill really recomputes every run. TTFT is the wall time of
a 1-token generation; we report the median of `--runs` runs of each kind,
after warm-up runs.

    python bench/ttft_vllm.py [--runs 7] [--ratio 0.15] [--out bench/results/ttft_vllm.json]
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


def passages(n: int, min_tokens: int, tok) -> list[str]:
    from pydoc_data.topics import topics

    out = []
    for k in sorted(topics, key=lambda k: -len(topics[k])):
        words = topics[k].split()
        text, i = [], 0
        while i < len(words) and len(tok(" ".join(text)).input_ids) < min_tokens:
            text += words[i: i + 40]
            i += 40
        if len(tok(" ".join(text)).input_ids) >= min_tokens:
            out.append(" ".join(text))
        if len(out) == n:
            return out
    raise RuntimeError("not enough prose")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--ratio", type=float, default=0.15)
    ap.add_argument("--chunks", type=int, default=6)
    ap.add_argument("--chunk-tokens", type=int, default=500)
    ap.add_argument("--model", default=None, help="HF folder (default: embedded SmolLM2)")
    ap.add_argument("--store", default=None, help="store spec (default: a fresh temp dir)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "ttft_vllm.json"))
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    import blend
    from blend.assets import model_path

    model = args.model or str(model_path())
    store = args.store or f"local:{tempfile.mkdtemp(prefix='cacheblend-ttft-')}"
    ktc = blend.kv_transfer_config(store=store,
                                   cache_fuse_metadata={"recomp_ratio": args.ratio})
    llm = LLM(model=model, dtype="bfloat16", enforce_eager=True, max_model_len=4096,
              gpu_memory_utilization=0.3, enable_prefix_caching=False,
              max_num_batched_tokens=4096, kv_transfer_config=ktc, seed=0)
    tok = llm.get_tokenizer()
    chunks = passages(args.chunks, args.chunk_tokens, tok)
    t0 = time.perf_counter()
    blend.precompute(llm, chunks)
    precompute_s = time.perf_counter() - t0

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

    for i in range(args.warmup):
        one("plain", i)
        one("blend", i)
    plain, blended, info = [], [], {}
    for i in range(args.runs):  # interleaved, so drift in machine load hits both alike
        ms, info_p = one("plain", i)
        plain.append(ms)
        ms, info = one("blend", i)
        blended.append(ms)
        assert info["report"] and info["report"]["chunk_hits"] == args.chunks, info
    import vllm

    res = {
        "what": "TTFT (1-token generate wall time), plain vLLM prefill vs CacheBlend",
        "model": os.path.basename(model), "vllm": vllm.__version__, "device": "cpu",
        "cpu": platform.processor() or platform.machine(), "threads": os.cpu_count(),
        "chunks": args.chunks, "prompt_tokens": info["prompt_tokens"],
        "context_tokens": info["context_tokens"], "recomp_ratio": args.ratio,
        "runs": args.runs, "warmup": args.warmup,
        "plain_ms": [round(x, 1) for x in plain], "blend_ms": [round(x, 1) for x in blended],
        "plain_median_ms": round(statistics.median(plain), 1),
        "blend_median_ms": round(statistics.median(blended), 1),
        "precompute_s": round(precompute_s, 2),
        "chunk_hit_rate": info["report"]["chunk_hit_tokens"] / info["report"]["chunk_tokens"],
    }
    res["speedup"] = round(res["plain_median_ms"] / res["blend_median_ms"], 2)
    res["target_speedup"] = 3.0
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
