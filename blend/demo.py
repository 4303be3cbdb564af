"""`make demo`: one multi-document question, answered by plain prefill and by CacheBlend.

Runs the real vLLM engine on the embedded SmolLM2 model. The first blended
request finds no chunk KV (it computes and stores it); the second asks the
same question over the same documents in another order, so prefix caching
could not help, yet every chunk comes from the store.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

from blend.device import DTYPES, choose_dtype, shutdown_llm

SYSTEM = "You are a helpful assistant. Answer the question using the documents."
QUESTION = "Which Python statement is used to raise an exception, according to the documents?"
TOPICS = ["raise", "assert", "return", "break", "pass"]


def _documents() -> list[str]:
    from blend.prose import topics

    return [" ".join(topics()[t].split())[:1400] for t in TOPICS]


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtype", choices=DTYPES, default=None,
                    help="default: blend.device.choose_dtype (fp32 on CPUs without native bf16)")
    args = ap.parse_args(argv)
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from vllm import LLM, SamplingParams

    import blend
    from blend.assets import model_path

    choice = choose_dtype("cpu", args.dtype)
    print(f"[demo] {choice}", flush=True)
    store = tempfile.mkdtemp(prefix="cacheblend-demo-")
    llm = LLM(model=str(model_path()), dtype=choice.dtype, enforce_eager=True, max_model_len=4096,
              gpu_memory_utilization=0.3, enable_prefix_caching=False,
              kv_transfer_config=blend.kv_transfer_config(
                  store=f"local:{store}", cache_fuse_metadata={"recomp_ratio": 0.15}))
    tok = llm.get_tokenizer()
    docs = _documents()
    reordered = [docs[i] for i in (3, 0, 4, 2, 1)]
    sp = SamplingParams(max_tokens=48, temperature=0.0)
    first = SamplingParams(max_tokens=1, temperature=0.0)

    def ttft(prompt) -> float:
        t = time.perf_counter()
        llm.generate(prompt, first, use_tqdm=False)
        return (time.perf_counter() - t) * 1e3

    p1 = blend.build_prompt(tok, SYSTEM, docs, QUESTION)
    p2 = blend.build_prompt(tok, SYSTEM, reordered, QUESTION)
    llm.generate(p1.tokens_prompt(), first, use_tqdm=False)  # warm-up
    rows = []
    for label, prompt in (("plain prefill", p2.tokens_prompt()),
                          ("blend, first time (chunks computed)", p1),
                          ("blend, chunks reordered", p2)):
        ms = ttft(prompt) if label.startswith("plain") else None
        t = time.perf_counter()
        out = llm.generate(prompt, sp, use_tqdm=False)[0]
        total = (time.perf_counter() - t) * 1e3
        rep = (out.kv_transfer_params or {}).get("blend")
        if ms is None:
            ms = ttft(prompt) if label.endswith("reordered") else total
        hit = f"{rep['chunk_hit_tokens'] / rep['chunk_tokens']:.0%}" if rep else "-"
        rows.append((label, ms, hit, out.outputs[0].text.strip()))
    print()
    print(f"{len(p2.prompt_token_ids)} prompt tokens, {len(docs)} documents, recomp_ratio=0.15, "
          f"{choice}")
    print(f"question: {QUESTION}\n")
    for label, ms, hit, text in rows:
        print(f"== {label}: TTFT {ms:.0f} ms, chunk hit rate {hit}")
        print(f"   {text}\n")
    plain_ms, blend_ms = rows[0][1], rows[2][1]
    print(f"TTFT plain / blended (reordered chunks): {plain_ms / blend_ms:.1f}x, {choice.dtype}")
    shutdown_llm(llm)


if __name__ == "__main__":
    main()
