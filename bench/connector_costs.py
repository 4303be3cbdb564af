"""The connector's host-side Python per blended request, against the chunk count (issue 23).

TTFT's fixed cost around the blend grew with the number of chunks on the H200. This times,
engine-free and on the CPU, every step of the connector's own Python that runs per request,
with the project's code (no vLLM engine, no device):

- scheduler (engine-core process): `get_num_new_matched_tokens` (spans, chunk keys, lookup),
  `update_state_after_alloc`, `build_connector_meta`, then the metadata's pickle round trip
  (vLLM pickles it to the workers with the scheduler output);
- worker (before the blend): `_fetch_all` (store fetch per chunk), `_plan` (the request's
  `BlendSeq` and its pieces: slots, forced mask, token ids), and the one-launch placement's
  host metadata (`Placement.__init__`, the GPU path's), plus the number of host-to-device
  copy calls `LayerLoad` queues (it cannot be timed without a GPU).

The model has Llama-3-8B's layer count (32) but a tiny KV (1 head of dim 8), so that chunk
tensors are cheap to hold: the timed code does not depend on the KV's size. The store is a
dict (the fetch path's own cost is the store's, not the connector's).

    python -m bench.connector_costs --before REV [--rounds 3] [--reps 7]
        # REV (e.g. the commit before a change) and this checkout, alternating, one JSON
"""

from __future__ import annotations

import argparse
import json
import pickle
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"
FP = "ab" * 32
LAYERS, HKV, HEAD_DIM, BLOCK = 32, 1, 8, 16
QUESTION = 64
CASES = [(c, n) for n in (8192, 32768) for c in (8, 16, 32, 64)]


class DictStore:
    """The store interface the connector calls, over a dict (no copies, no I/O)."""

    def __init__(self) -> None:
        self.d: dict[str, torch.Tensor] = {}

    def lookup(self, keys: list[str]) -> list[bool]:
        return [k in self.d for k in keys]

    def fetch(self, key: str) -> torch.Tensor | None:
        return self.d.get(key)


def _prompt(chunks: int, context: int, seed: int) -> tuple[list[int], list[list[int]]]:
    """A system line, `chunks` chunks filling `context` tokens, a 64-token question."""
    g = torch.Generator().manual_seed(seed)
    n = (context - 32) // chunks
    ids = torch.randint(100, 40000, (32 + chunks * n + QUESTION,), generator=g).tolist()
    spans = [[32 + i * n, 32 + (i + 1) * n] for i in range(chunks)]
    return ids, spans


def _worker(store: DictStore, selection: str):
    from blend.config import BlendConfig
    from blend.connector.worker import BlendWorker, WorkerStats

    w = BlendWorker.__new__(BlendWorker)
    adapter = SimpleNamespace(num_layers=LAYERS, num_kv_heads=HKV, head_dim=HEAD_DIM,
                              dtype=torch.bfloat16, device="cpu")
    cfg = BlendConfig.from_dict({"selection": selection} if selection != "deviation" else {})
    w.blender = SimpleNamespace(adapter=adapter, config=cfg)
    w.gpu_tier, w.saver, w.store, w.tp, w.rank = None, None, store, None, 0
    w.block_size, w.fingerprint, w.stats = BLOCK, FP, WorkerStats()
    return w, cfg


def one_case(chunks: int, context: int, reps: int, selection: str = "deviation") -> dict:
    """Median ms of each host step for one request of `chunks` chunks in `context` tokens."""
    from blend.chunk_loader import LayerLoad  # noqa: F401 - imported as the worker does
    from blend.connector.scheduler import BlendScheduler
    from blend.keys import chunk_key
    from blend.triton_kernels.placement import Placement, PlacePiece

    store = DictStore()
    cos_sin = torch.zeros((40000 + 1, 2, HEAD_DIM // 2), dtype=torch.float32)
    nblocks = -(-(context + 2 * QUESTION) // BLOCK) + 1
    caches = [(torch.zeros((nblocks, BLOCK, HKV, HEAD_DIM), dtype=torch.bfloat16),
               torch.zeros((nblocks, BLOCK, HKV, HEAD_DIM), dtype=torch.bfloat16))
              for _ in range(LAYERS)]
    # One KV tensor per chunk of the layout the store returns ([L, 2, n, Hkv, D]).
    times: dict[str, list[float]] = {}

    def tick(name: str, t0: float) -> float:
        t = time.perf_counter()
        times.setdefault(name, []).append((t - t0) * 1e3)
        return t

    extra = {} if selection == "deviation" else {"cache_fuse_metadata": {"selection": selection}}
    meta_bytes = 0
    for rep in range(reps + 1):
        ids, spans = _prompt(chunks, context, seed=rep)
        for s, e in spans:
            store.d[chunk_key(FP, ids[s:e])] = torch.zeros((LAYERS, 2, e - s, HKV, HEAD_DIM),
                                                           dtype=torch.bfloat16)
        sched = BlendScheduler(extra, FP, store)
        rid = f"r{rep}"
        req = SimpleNamespace(request_id=rid, prompt_token_ids=ids,
                              kv_transfer_params={"blend": {"spans": spans}})
        blocks = list(range(-(-len(ids) // BLOCK)))
        so = SimpleNamespace(
            scheduled_new_reqs=[SimpleNamespace(req_id=rid, block_ids=(blocks,),
                                                num_computed_tokens=0)],
            num_scheduled_tokens={rid: len(ids)},
            scheduled_cached_reqs=SimpleNamespace(req_ids=[], new_block_ids=[],
                                                  resumed_req_ids=set(), num_computed_tokens=[]))
        t0 = time.perf_counter()
        n_ext, _ = sched.get_num_new_matched_tokens(req, 0)
        t0 = tick("sched.get_num_new_matched_tokens", t0)
        sched.update_state_after_alloc(req, n_ext)
        t0 = tick("sched.update_state_after_alloc", t0)
        meta = sched.build_connector_meta(so)
        t0 = tick("sched.build_connector_meta", t0)
        blob = pickle.dumps(meta, protocol=pickle.HIGHEST_PROTOCOL)
        meta_bytes = len(blob)
        meta = pickle.loads(blob)
        t0 = tick("hop.pickle_round_trip", t0)
        sched.request_finished(req)
        w, cfg = _worker(store, selection)
        reqs = meta.requests
        t0 = time.perf_counter()
        found = w._fetch_all(reqs)
        t0 = tick("worker.fetch_all", t0)
        pieces = []
        for r in reqs:
            _, pcs = w._plan(r, cfg, found, set())
            pieces += pcs
        t0 = tick("worker.plan", t0)
        Placement(caches, [PlacePiece(p.src.dev, p.lo, p.hi, p.slots, p.delta) for p in pieces],
                  cos_sin, True)
        tick("worker.placement_meta", t0)
        assert len(pieces) == chunks, (len(pieces), chunks)
    out = {k: round(statistics.median(v[1:]), 3) for k, v in times.items()}  # first: warm-up
    out["scheduler_total"] = round(sum(v for k, v in out.items() if k.startswith("sched.")), 3)
    out["worker_total"] = round(sum(v for k, v in out.items() if k.startswith("worker.")), 3)
    out["total"] = round(out["scheduler_total"] + out["worker_total"]
                         + out["hop.pickle_round_trip"], 3)
    out["metadata_bytes"] = meta_bytes
    out["host_copy_calls"] = _copy_calls(chunks)
    return out


def _copy_calls(chunks: int) -> int:
    """Host-to-device copy calls `LayerLoad` queues for `chunks` host-tier chunks."""
    try:
        from blend.chunk_loader import copy_groups
    except ImportError:  # before issue 23: one copy per chunk and layer
        return chunks * LAYERS
    return chunks * len(copy_groups(LAYERS))


def _use_tree(tree: str) -> None:
    """Import `blend` from checkout `tree`, its `triton_kernels/` and `patches/` as
    `blend.triton_kernels` and `blend.patches` (setup.py's mapping), ahead of any
    editable install that points elsewhere."""
    import importlib.abc
    import importlib.machinery
    import importlib.util

    folders = {"blend": "blend", "blend.triton_kernels": "triton_kernels",
               "blend.patches": "patches"}

    class TreeFinder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name in folders:
                init = Path(tree) / folders[name] / "__init__.py"
                return importlib.util.spec_from_file_location(
                    name, init, submodule_search_locations=[str(init.parent)])
            parent = name.rpartition(".")[0]
            if parent in folders:
                return importlib.machinery.PathFinder.find_spec(
                    name, [str(Path(tree) / folders[parent])])
            return None

    sys.meta_path.insert(0, TreeFinder())


def _child(tree: str, chunks: int, context: int, reps: int, selection: str) -> None:
    _use_tree(tree)
    torch.set_num_threads(1)
    print(json.dumps(one_case(chunks, context, reps, selection)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--rounds", type=int, default=3, help="alternations of before and after")
    ap.add_argument("--before", default=None,
                    help="a git revision to compare with (exported to a temporary folder)")
    ap.add_argument("--selection", default="deviation")
    ap.add_argument("--out", default=str(RESULTS / "connector_costs.json"))
    a = ap.parse_args()
    # Not at the top: bench.common imports `blend`, which a child must import from its tree.
    from bench.common import child_env, python_m

    here = str(Path(__file__).resolve().parents[1])
    trees = {"after": here}
    tmp = None
    if a.before:
        tmp = tempfile.mkdtemp(prefix="connector-costs-")
        archive = subprocess.run(["git", "-C", here, "archive", a.before], check=True,
                                 capture_output=True).stdout
        subprocess.run(["tar", "-x", "-C", tmp], input=archive, check=True)
        trees = {"before": tmp, **trees}
    # Each case runs in a fresh process per tree, the trees alternating `--rounds` times
    # (the machine is shared: a slow moment then hits both sides); the minimum of the
    # rounds' medians is kept per step.
    rows = []
    for chunks, context in CASES:
        got: dict[str, list[dict]] = {k: [] for k in trees}
        for _ in range(a.rounds):
            for label, tree in trees.items():
                r = subprocess.run(python_m("bench.connector_costs", "--child", tree,
                                            str(chunks), str(context), str(a.reps), a.selection),
                                   check=True, capture_output=True, text=True, env=child_env())
                got[label].append(json.loads(r.stdout.strip().splitlines()[-1]))
        row: dict[str, Any] = {"chunks": chunks, "context": context}
        for label, runs in got.items():
            row[label] = {k: min(x[k] for x in runs) for k in runs[0]}
        rows.append(row)
        line = " | ".join(
            f"{label}: sched {r['scheduler_total']:5.2f} pickle {r['hop.pickle_round_trip']:5.2f} "
            f"plan {r['worker.plan']:6.2f} placement {r['worker.placement_meta']:5.2f} "
            f"total {r['total']:6.2f} ms, {r['host_copy_calls']} copies"
            for label, r in ((k, row[k]) for k in trees))
        print(f"{chunks:3d} chunks {context:6d} tok: {line}", flush=True)
    if tmp:
        shutil.rmtree(tmp, ignore_errors=True)
    doc = {"what": "connector host-side Python per blended request (ms), engine-free, on the "
                   "CPU development machine (2 cores, shared; 1 torch thread): per step the "
                   f"minimum over {a.rounds} alternating rounds of the median of {a.reps} requests",
           "before": a.before, "selection": a.selection, "rows": rows}
    Path(a.out).write_text(json.dumps(doc, indent=1) + "\n")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        _child(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
    else:
        main()
