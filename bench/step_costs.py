"""What the connector makes an engine step wait for, per request: before and after issue 20.

Under load the blended server's steps grew slower as a queue formed. Two costs sat
inside the step and are measured here with the project's own code, on this machine:

- saving a chunk: before, `LocalStore.put` ran in `wait_for_save` (host copy into the
  memory tier, then the disk file with its checksums); now the step only hands the
  tensor to `ChunkSaver.submit` and a thread does the rest;
- the scheduler's work on a request: before, spans from the separator (per-token Python)
  and chunk keys at every step vLLM retried the request; now once per request, with the
  vocabulary's bytes cached.

Chunk KV has the Llama-3-8B shape (32 layers, 8 KV heads, head dim 128, bf16), 512 tokens:
64 MiB. Prints a table and writes bench/results/step_costs.json.
Usage: python -m bench.step_costs [--chunks 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from bench.common import kv_chunk_shape, topic_words, topics

RESULTS = Path(__file__).resolve().parent / "results"
SHAPE = kv_chunk_shape(512)  # Llama-3-8B, one 512-token chunk
FP = "ab" * 32


def _ms(fn, reps: int) -> float:
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(out)


def save_costs(n_chunks: int, reps: int) -> dict:
    from blend.connector.saver import ChunkSaver
    from blend.keys import chunk_key
    from blend.store.local import LocalStore

    gen = torch.Generator().manual_seed(0)
    chunks = [torch.randn(SHAPE, generator=gen).to(torch.bfloat16) for _ in range(n_chunks)]
    rows = {"old_put_ms": [], "new_submit_ms": [], "new_background_ms": []}
    for rep in range(reps):
        keys = [chunk_key(FP, [rep, i]) for i in range(n_chunks)]
        with tempfile.TemporaryDirectory() as d:
            store = LocalStore(FP, d, 8 << 30, 32 << 30)
            for k, t in zip(keys, chunks):  # before: inside the step
                t0 = time.perf_counter()
                store.put(k, t)
                rows["old_put_ms"].append((time.perf_counter() - t0) * 1e3)
        with tempfile.TemporaryDirectory() as d:
            store = LocalStore(FP, d, 8 << 30, 32 << 30)
            saver = ChunkSaver(store, 4 << 30)
            t_all = time.perf_counter()
            own = [t.clone() for t in chunks]  # the step's freshly extracted buffers
            for k, t in zip(keys, own):  # now: the step's part
                t0 = time.perf_counter()
                saver.submit(k, t)
                rows["new_submit_ms"].append((time.perf_counter() - t0) * 1e3)
            saver.flush(120)
            rows["new_background_ms"].append((time.perf_counter() - t_all) * 1e3 / n_chunks)
            assert saver.stats.saved == n_chunks, saver.stats
            saver.close()
    return {k: statistics.median(v) for k, v in rows.items()}


def scheduler_costs(reps: int) -> dict:
    from transformers import AutoTokenizer

    from blend.assets import model_path
    from blend.keys import chunk_key
    from blend.segments import SeparatorSplitter, token_byte_spans

    tok = AutoTokenizer.from_pretrained(str(model_path("SmolLM2-135M-Instruct")))
    sep = "\n##DOC##\n"
    docs = [topic_words(k, 380) for k in sorted(topics())[:8]]
    ids = tok("You answer from the documents." + sep + sep.join(docs) + sep + "Why?").input_ids
    sep_b = sep.encode()

    def old_spans():  # the splitter as it was: per-token decoding and per-token loops
        text, spans_b = token_byte_spans(tok, ids)
        cuts, i = [], text.find(sep_b)
        while i >= 0:
            cuts.append(i)
            i = text.find(sep_b, i + len(sep_b))
        out, t = [], 0
        for a, b in zip(cuts, cuts[1:]):
            lo, hi = a + len(sep_b), b
            while t < len(spans_b) and spans_b[t][0] < lo:
                t += 1
            s = t
            while t < len(spans_b) and spans_b[t][1] <= hi:
                t += 1
            out.append((s, t))
        return [chunk_key(FP, ids[s:e]) for s, e in out]

    new = SeparatorSplitter(tok, sep)
    new.spans(ids)  # the vocabulary cache fills on the first request

    def new_spans():
        return [chunk_key(FP, ids[s:e]) for s, e in new.spans(ids)]

    assert len(old_spans()) == len(new_spans()) == 8
    return {"prompt_tokens": len(ids), "old_per_step_ms": _ms(old_spans, reps * 4),
            "new_per_request_ms": _ms(new_spans, reps * 4)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=str(RESULTS / "step_costs.json"))
    a = ap.parse_args()
    save = save_costs(a.chunks, a.reps)
    sched = scheduler_costs(a.reps)
    print(f"{'what':52s} {'before':>10s} {'after':>10s}")
    print(f"{'save one 64 MiB chunk: time inside the step (ms)':52s} "
          f"{save['old_put_ms']:10.1f} {save['new_submit_ms']:10.3f}")
    print(f"{'  the same save in the saver thread (ms, off the step)':52s} {'':10s} "
          f"{save['new_background_ms']:10.1f}")
    print(f"{'scheduler: spans + keys of a ' + str(sched['prompt_tokens']) + '-token prompt (ms)':52s}"
          f" {sched['old_per_step_ms']:10.2f} {sched['new_per_request_ms']:10.2f}")
    print("  (before: at every step a waiting request was retried; now: once per request)")
    doc = {"machine": "CPU development machine (2 cores)", "chunk_shape": SHAPE,
           "dtype": "bfloat16", "save": save, "scheduler": sched}
    Path(a.out).write_text(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
