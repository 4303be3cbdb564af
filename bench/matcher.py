"""Content matcher cost: `ChunkIndex.find` on 32k-token prompts, one core (issue 22: <= 2 ms).

    python -m bench.matcher [--reps 300] [--out bench/results/matcher.json]

An index of 2,000 stored chunks of ~1,000 random token ids (62k anchors); prompts of ~32k
tokens made of 32 of them (as ids, and as the Python list vLLM holds; also with each chunk's
edge tokens changed, as BPE merges do in chat text), a 32k prompt with no stored chunk, and
the empty index. Medians (and p90) of `--reps` runs. Prints a table, writes JSON.
"""

from __future__ import annotations

import os

for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_v] = "1"  # one core, set before numpy loads its BLAS

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

from blend.matcher import ChunkIndex, as_ids  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"

VOCAB = 49152
TARGET_MS = 2.0


def timed(cases: dict, reps: int) -> dict:
    """Wall and thread-CPU milliseconds per case, the cases interleaved so that load from
    other processes falls on all alike; CPU time leaves out time others held the core."""
    for fn in cases.values():
        fn()  # warm: scratch buffers, powers table, pending anchors sorted in
    wall: dict = {k: [] for k in cases}
    cpu: dict = {k: [] for k in cases}
    for _ in range(reps):
        for name, fn in cases.items():
            t0, c0 = time.perf_counter(), time.thread_time()
            fn()
            cpu[name].append(time.thread_time() - c0)
            wall[name].append(time.perf_counter() - t0)
    out = {}
    for name in cases:
        w, c = np.array(wall[name]) * 1e3, np.array(cpu[name]) * 1e3
        out[name] = {"median_ms": round(float(np.median(w)), 4),
                     "p90_ms": round(float(np.percentile(w, 90)), 4),
                     "min_ms": round(float(w.min()), 4), "cpu_median_ms": round(float(np.median(c)), 4)}
    return out


def index_bytes(ix: ChunkIndex) -> int:
    """Memory held by the index: stored ids, anchors, bucket and prefilter tables."""
    arrays = [ix._flat, ix._base, ix._len, ix._alive, ix._table]
    for lv in (ix._main, ix._small):
        arrays += [lv.he, lv.c, lv.o, lv.h, lv.gs, lv.starts]
    return int(sum(a.nbytes for a in arrays))


def build_index(rng, n_chunks: int) -> tuple[ChunkIndex, dict, float]:
    chunks = {f"{i:064x}": rng.integers(0, VOCAB, int(rng.integers(900, 1101))).astype(np.uint32)
              for i in range(n_chunks)}
    t0 = time.perf_counter()
    ix = ChunkIndex()
    ix.add_many(chunks.items())
    return ix, chunks, time.perf_counter() - t0


def rag_prompt(rng, chunks: dict, k: int, edges: bool) -> tuple[np.ndarray, list[str]]:
    """system prefix, k stored chunks with 2 glue tokens between, a 64-token question."""
    keys = list(rng.choice(list(chunks), k, replace=False))
    parts = [rng.integers(0, VOCAB, 60)]
    for key in keys:
        c = chunks[key].copy()
        if edges:  # BPE merged the first and last token with the text around them
            c[0], c[-1] = (c[0] + 1) % VOCAB, (c[-1] + 1) % VOCAB
        parts += [c, rng.integers(0, VOCAB, 2)]
    parts.append(rng.integers(0, VOCAB, 64))
    return np.concatenate(parts).astype(np.uint32), keys


def run(reps: int) -> dict:
    rng = np.random.default_rng(0)
    ix, chunks, build_s = build_index(rng, 2000)
    prompt, keys = rag_prompt(rng, chunks, 32, edges=False)
    merged, mkeys = rag_prompt(rng, chunks, 32, edges=True)
    assert [m.key for m in ix.find(prompt)] == keys
    assert [m.key for m in ix.find(merged)] == mkeys
    noise = rng.integers(0, VOCAB, len(prompt)).astype(np.uint32)
    assert ix.find(noise) == []
    lst, noise_lst = prompt.tolist(), noise.tolist()
    info = {"anchors": int(len(ix._main) + len(ix._small)), "index_bytes": index_bytes(ix),
            "stored_tokens": int(sum(len(c) for c in chunks.values()))}
    empty = ChunkIndex()
    extra = rng.integers(0, VOCAB, (2 * reps + 2, 1000)).astype(np.uint32)
    fresh = iter(range(10**6, 10**7))

    def add_one():
        i = next(fresh)
        ix.add(f"{i:064x}", extra[i % len(extra)])

    def add_then_find():
        add_one()
        ix.find(prompt)

    rows = timed({
        "32 chunks, uint32 array": lambda: ix.find(prompt),
        "32 chunks, list[int]": lambda: ix.find(lst),
        "32 chunks, edge tokens merged": lambda: ix.find(merged),
        "no stored chunk, uint32 array": lambda: ix.find(noise),
        "no stored chunk, list[int]": lambda: ix.find(noise_lst),
        "empty index, list[int]": lambda: empty.find(lst),
        "list[int] -> uint32 array alone": lambda: as_ids(lst),
    }, reps)
    # these add chunks: after the finds, so the index above stays the 2,000 chunks
    rows.update(timed({"add one chunk (1,000 ids)": add_one}, reps))
    rows.update(timed({"add one chunk, then find (pending sorted in)": add_then_find}, reps))
    return {
        "prompt_tokens": int(len(prompt)),
        "stored_chunks": 2000,
        **info,
        "window": ix.window,
        "min_match": ix.min_match,
        "index_build_s_2000_chunks": round(build_s, 3),
        "rows": rows,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=300)
    ap.add_argument("--out", default=str(RESULTS / "matcher.json"))
    args = ap.parse_args()
    load0 = os.getloadavg()
    res = run(args.reps)
    res.update(reps=args.reps, target_ms=TARGET_MS, numpy=np.__version__,
               python=platform.python_version(), machine=cpu_model(),
               cpus=os.cpu_count(), loadavg_before=[round(x, 2) for x in load0],
               loadavg_after=[round(x, 2) for x in os.getloadavg()])
    print(f"{res['prompt_tokens']} prompt tokens, {res['stored_chunks']} stored chunks "
          f"({res['stored_tokens']} tokens, {res['anchors']} anchors, "
          f"{res['index_bytes'] / 2**20:.1f} MiB), one thread, {args.reps} reps, "
          f"load average {res['loadavg_before'][0]} -> {res['loadavg_after'][0]}")
    print("| case | median ms | p90 ms | min ms | CPU median ms |\n|---|---|---|---|---|")
    for name, r in res["rows"].items():
        print(f"| {name} | {r['median_ms']:.3f} | {r['p90_ms']:.3f} | {r['min_ms']:.3f} "
              f"| {r['cpu_median_ms']:.3f} |")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=1) + "\n")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
