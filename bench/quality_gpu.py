"""Answer quality at a real model's scale, through the vLLM connector (issue 24).

Long-context QA on one engine with `BlendConnector` (vLLM's defaults otherwise), rows at their
measured compute, EM/F1 with paired bootstrap intervals against full prefill:

- Tasks. `squad`: a SQuAD v1.1 dev question (the official dev file, from a package on the index:
  bench/squad.py) over its gold document among 9-39 distractor documents (a document is a run of
  consecutive paragraphs of one Wikipedia article, about `--doc-tokens`), from the same article
  and from others, shuffled, 4k-16k context tokens. `hotpot`: real multi-hop QA, HotpotQA's
  dev set (distractor setting, bench/hotpot.py): each question's two gold paragraphs and eight
  official distractors, padded with other questions' paragraphs to 4k-16k tokens and packed
  into documents like SQuAD's; official HotpotQA answer scoring. `notes2hop`: multi-hop fact
  lookup: Python's language reference (pydoc_data) as the haystack, with six short notes among
  its documents (three "library X is maintained by P" / "P lives in C" pairs); the question
  asks for the city of library X's maintainer, so the answer needs two notes in two chunks.
- Splits. Articles (squad), questions (hotpot) and reference topics (notes2hop) are split by a
  hash of their name into `tune` (30%) and `heldout` (70%), disjoint; distractors come from the
  same split.
  The hybrid settings are chosen on `tune` (best F1, then least compute), and reported on
  `heldout`, which tuning never saw.
- Rows (`heldout`): `full` (plain prefill by vLLM: no spans, `unmarked: none`), `reuse`
  (every chunk's cached KV as is: `cheap` at r=0, no sinks), `deviation` (CacheBlend, check
  layer 1, r=0.15), `hybrid` (the tuned one), `cheap` (`[4]`, r=0.045, 4 sinks). `tune` has
  full, deviation, cheap and every hybrid candidate.
- Compute is measured per request from the connector's per-request trace (`trace_dir`):
  `token_layers / (blended_tokens x layers)`, the share of a full prefill's per-token layer work
  over the tokens the blend computed (probe passes included). A request the connector did not
  blend (its chunks missing) counts 1.0. Full prefill is 1.0 by definition.
- Chunk KV is precomputed standalone (`blend.precompute`) into a local store kept in
  `--state`, so a later call on a warm machine finds it.

Each (task, split, row) keeps its per-question answers in `--state` (default
`$CACHEBLEND_HOME/quality_gpu/...`): a call that runs out of `--budget-s` stops between
batches and the same command continues; `--out/quality_gpu.json` always holds every finished
row, `quality_gpu.png` plots F1 against compute.

    python -m bench.quality_gpu --model DIR [--tasks squad,hotpot,notes2hop] [--n 500] [--budget-s 540]
    python -m bench.quality_gpu --smoke --out /tmp/qsmoke       # CPU: SmolLM2, tiny, minutes
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import re
import shutil
import sys
import time
from pathlib import Path

from bench import hotpot, squad
from bench.common import topics

ROOT = Path(__file__).resolve().parents[1]

SYSTEM = "Answer the question with a short phrase taken from the documents."
# HotpotQA's comparison questions are answered yes or no (a fifth of its dev set).
SYSTEMS = {"hotpot": "Answer the question with a short phrase taken from the documents, "
                     "or with yes or no."}
SCORERS = {"squad": squad.em_f1, "hotpot": hotpot.em_f1, "notes2hop": squad.em_f1}
HYB = {"selection": "hybrid", "query_weight": 0.5}
ROW_META: dict[str, dict | None] = {
    "full": None,
    "reuse": {"selection": "cheap", "check_layers": [1], "recomp_ratio": 0.0, "sink_tokens": 0},
    "deviation": {"selection": "deviation", "check_layers": [1], "recomp_ratio": 0.15},
    "cheap": {"selection": "cheap", "check_layers": [4], "recomp_ratio": 0.045, "sink_tokens": 4},
}
# Hybrid candidates (docs/tuning.md: best on the prose prompts at <= 0.18 compute).
HYBRIDS: dict[str, dict] = {
    "hybrid [1] .15": {**HYB, "check_layers": [1], "recomp_ratio": 0.15},
    "hybrid [1,2] .4/.14": {**HYB, "check_layers": [1, 2], "recomp_ratios": [0.4, 0.14]},
    "hybrid [1,3] .35/.13": {**HYB, "check_layers": [1, 3], "recomp_ratios": [0.35, 0.13]},
    "hybrid [1,3] .35/.13 qw1": {**HYB, "query_weight": 1.0, "check_layers": [1, 3],
                                 "recomp_ratios": [0.35, 0.13]},
}
TUNE_ROWS = ["full", "deviation", "cheap", *HYBRIDS]
HELDOUT_ROWS = ["full", "reuse", "deviation", "hybrid", "cheap"]
TASKS = ("squad", "hotpot", "notes2hop")
TARGETS = {"deviation_f1_gap": -1.0, "deviation_ci_half_width": 1.5, "cheap_compute": 0.08,
           "cheap_f1_gap": -3.0}
PROFILES = {  # the GPU run, and the CPU smoke mode (SmolLM2, short contexts, tiny n)
    "gpu": dict(n=500, n_tune=200, min_tokens=4096, max_tokens=16384, doc_tokens=450,
                answer_tokens=24, batch=64, hybrids=list(HYBRIDS)),
    "smoke": dict(n=4, n_tune=3, min_tokens=400, max_tokens=700, doc_tokens=110,
                  answer_tokens=12, batch=4, hybrids=["hybrid [1] .15", "hybrid [1,3] .35/.13"]),
}


# ----------------------------------------------------------------- metrics
def bootstrap(values: list[float], reps: int = 2000, seed: int = 0) -> list[float]:
    """95% percentile bootstrap interval of the mean (x100): paired when `values` are
    per-question differences, which is what makes 500 questions separate rows 1 F1 apart."""
    import numpy as np

    if not values:
        return [0.0, 0.0]
    v = np.asarray(values, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(v), size=(reps, len(v)))
    means = np.sort(v[idx].mean(axis=1))
    return [round(100 * float(means[int(0.025 * reps)]), 2),
            round(100 * float(means[int(0.975 * reps) - 1]), 2)]


def answer_text(text: str) -> str:
    """The first line of a generated answer (a chat model may add an explanation after it)."""
    return text.strip().split("\n")[0].strip()


# ----------------------------------------------------------------- tasks
def split_of(name: str) -> str:
    """`tune` for ~30% of names, `heldout` for the rest: fixed, disjoint, no seed involved."""
    return "tune" if int(hashlib.sha1(name.encode()).hexdigest(), 16) % 10 < 3 else "heldout"


def _ntok(tok, texts: list[str]) -> list[int]:
    return [len(x) for x in tok(texts, add_special_tokens=False).input_ids]


def _fill(rng: random.Random, first: list[tuple[str, int]], rest: list[tuple[str, int]],
          budget: int) -> tuple[list[str], int]:
    """Documents from `first`, then `rest`, while they fit in `budget` tokens."""
    out, total = [], 0
    for text, n in first + rest:
        if total + n <= budget:
            out.append(text)
            total += n
        if total >= budget - 64:
            break
    return out, total


def squad_items(tok, split: str, n: int, seed: int, min_tokens: int, max_tokens: int,
                doc_tokens: int) -> list[dict]:
    """Multi-document SQuAD: gold document + distractors (same article first), shuffled."""
    data = squad.load_squad_dev()
    arts = [a for a in data["data"] if split_of(a["title"]) == split]
    docs: dict[int, list[tuple[str, int, set[int]]]] = {}  # article -> (text, tokens, paragraphs)
    for ai, art in enumerate(arts):
        title = art["title"].replace("_", " ")
        paras = [p["context"].strip() for p in art["paragraphs"]]
        lens = _ntok(tok, paras)
        cur: list[int] = []
        out = []
        for pi, ln in enumerate(lens):
            if cur and sum(lens[j] for j in cur) + ln > doc_tokens:
                out.append(cur)
                cur = []
            cur.append(pi)
        if cur:
            out.append(cur)
        texts = [f"{title}\n" + "\n".join(paras[j] for j in g) for g in out]
        docs[ai] = [(t, n_, set(g)) for t, n_, g in zip(texts, _ntok(tok, texts), out)]
    questions = [(ai, pi, qa) for ai, art in enumerate(arts)
                 for pi, p in enumerate(art["paragraphs"]) for qa in p["qas"]]
    rng = random.Random(f"squad-{split}-{seed}")
    picked = rng.sample(questions, min(n, len(questions)))
    pool = [(ai, t, k) for ai, ds in docs.items() for t, k, _ in ds]
    items = []
    for ai, pi, qa in picked:
        gold = next((t, k) for t, k, ps in docs[ai] if pi in ps)
        same = [(t, k) for t, k, ps in docs[ai] if pi not in ps]
        rng.shuffle(same)
        target = rng.randint(min_tokens, max_tokens) - gold[1]
        others = [(t, k) for a, t, k in rng.sample(pool, min(len(pool), 400)) if a != ai]
        # Half the distractors' tokens at most from the gold's own article: the rest elsewhere.
        half, _ = _fill(rng, same, [], target // 2)
        by_text = dict(same)
        rest, _ = _fill(rng, others, [], target - sum(by_text[t] for t in half))
        chosen = [gold[0], *half, *rest]
        rng.shuffle(chosen)
        items.append({"id": qa["id"], "docs": chosen, "question": qa["question"],
                      "answers": sorted({a["text"] for a in qa["answers"]})})
    return items


FIRST = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas",
         "Kavya", "Lars", "Maya", "Nikolai", "Olga", "Pedro", "Quinn", "Rosa", "Sven", "Tariq",
         "Ursula", "Viktor", "Wen", "Yara", "Zoltan", "Amara", "Boris", "Celine", "Diego", "Emil"]
LAST = ["Andersen", "Baptiste", "Costa", "Dubois", "Eriksen", "Fischer", "Garcia", "Horvat",
        "Ibrahim", "Jansen", "Kowalski", "Lindqvist", "Moreau", "Nakamura", "Okafor", "Petrov",
        "Quiroga", "Rossi", "Schmidt", "Tanaka", "Ulrich", "Varga", "Weber", "Xu", "Yilmaz",
        "Zimmermann", "Novak", "Silva", "Keller", "Haddad"]
CITIES = ["Lisbon", "Oslo", "Nairobi", "Montreal", "Krakow", "Seville", "Osaka", "Tbilisi",
          "Porto", "Helsinki", "Valparaiso", "Bergen", "Cusco", "Ljubljana", "Adelaide", "Tallinn",
          "Marrakesh", "Graz", "Halifax", "Cebu", "Leipzig", "Trieste", "Quito", "Gdansk",
          "Windhoek", "Aarhus", "Bologna", "Hobart", "Dakar", "Reykjavik"]
ADJ = ["amber", "brisk", "cobalt", "dusky", "ember", "frosty", "gilded", "hollow", "ivory",
       "jagged", "lunar", "misty", "nimble", "opal", "placid", "quiet", "rustic", "scarlet",
       "tidal", "umber", "velvet", "woven", "young", "zesty", "silent", "copper"]
NOUN = ["falcon", "harbor", "lantern", "meadow", "quarry", "thistle", "beacon", "canyon", "delta",
        "fern", "glacier", "heron", "island", "juniper", "kettle", "ledger", "maple", "nectar",
        "orchid", "pebble", "raven", "saddle", "timber", "violet", "willow", "yarrow"]


def notes2hop_items(tok, split: str, n: int, seed: int, min_tokens: int, max_tokens: int,
                    doc_tokens: int) -> list[dict]:
    """Two-hop lookup: which city the maintainer of library X lives in, from two of six notes
    placed among documents of Python's language reference (the haystack)."""
    t = topics()
    names = sorted(k for k, v in t.items() if len(v.split()) > 150 and split_of(k) == split)
    pool: list[tuple[str, int]] = []
    words_per = max(20, int(doc_tokens * 0.7))
    for k in names:
        w = t[k].split()
        for i in range(0, len(w) - 20, words_per):
            pool.append((f"Python reference: {k}\n" + " ".join(w[i:i + words_per]), 0))
    pool = [(t, k) for (t, _), k in zip(pool, _ntok(tok, [t for t, _ in pool]))]
    rng = random.Random(f"notes2hop-{split}-{seed}")
    items = []
    for q in range(n):
        people = [f"{a} {b}" for a, b in zip(rng.sample(FIRST, 3), rng.sample(LAST, 3))]
        libs = [f"{a}-{b}" for a, b in zip(rng.sample(ADJ, 3), rng.sample(NOUN, 3))]
        cities = rng.sample(CITIES, 3)
        notes = [f"Project note: the {lib} library is maintained by {p}." for lib, p in
                 zip(libs, people)]
        notes += [f"Staff note: {p} lives in {c} and works remotely." for p, c in
                  zip(people, cities)]
        target = rng.randint(min_tokens, max_tokens) - sum(_ntok(tok, notes))
        hay, _ = _fill(rng, rng.sample(pool, len(pool)), [], target)
        chosen = hay + notes
        rng.shuffle(chosen)
        items.append({"id": f"notes2hop-{split}-{seed}-{q}", "docs": chosen,
                      "question": f"In which city does the maintainer of the {libs[0]} library "
                                  f"live?", "answers": [cities[0]]})
    return items


def hotpot_items(tok, split: str, n: int, seed: int, min_tokens: int, max_tokens: int,
                 doc_tokens: int) -> list[dict]:
    """HotpotQA (distractor setting): the question's two gold paragraphs, its eight official
    distractors, then paragraphs of other questions of the split up to the context size; the
    paragraphs shuffled and packed into documents of up to `doc_tokens` (like SQuAD's), so
    the two gold paragraphs mostly land in different chunks."""
    data = [q for q in hotpot.load_hotpot_dev() if split_of(q["_id"]) == split]
    text = {}
    for q in data:
        for title, sents in q["context"]:
            text.setdefault(title, f"{title}\n" + "".join(sents).strip())
    titles = sorted(text)
    ntok: dict[str, int] = {}

    def sized(names: list[str]) -> list[tuple[str, int]]:
        new = [t for t in names if t not in ntok]
        ntok.update(zip(new, _ntok(tok, [text[t] for t in new]) if new else []))
        return [(t, ntok[t]) for t in names]

    rng = random.Random(f"hotpot-{split}-{seed}")
    items = []
    for q in rng.sample(data, min(n, len(data))):
        own = [t for t, _ in q["context"]]
        gold = list(dict.fromkeys(t for t, _ in q["supporting_facts"] if t in text))
        distract = [t for t in own if t not in gold]
        others = [t for t in rng.sample(titles, min(len(titles), 600)) if t not in own]
        budget = rng.randint(min_tokens, max_tokens)
        base = sized(gold)
        fill, _ = _fill(rng, sized(distract), sized(others), budget - sum(k for _, k in base))
        paras = [*base, *sized(fill)]
        rng.shuffle(paras)
        docs, cur, size = [], [], 0
        for title, k in paras:
            if cur and size + k > doc_tokens:
                docs.append("\n\n".join(text[t] for t in cur))
                cur, size = [], 0
            cur.append(title)
            size += k
        docs.append("\n\n".join(text[t] for t in cur))
        items.append({"id": q["_id"], "docs": docs, "question": q["question"],
                      "answers": [q["answer"]], "type": q["type"], "gold_titles": gold})
    return items


def make_items(task: str, tok, split: str, n: int, seed: int, prof: dict) -> list[dict]:
    fn = {"squad": squad_items, "hotpot": hotpot_items, "notes2hop": notes2hop_items}[task]
    return fn(tok, split, n, seed, prof["min_tokens"], prof["max_tokens"], prof["doc_tokens"])


# ----------------------------------------------------------------- state (resumable)
class State:
    """Per-question answers of every (task, split, row), one JSON file each, written per batch."""

    def __init__(self, root: Path, key: str):
        self.dir = root / key
        self.dir.mkdir(parents=True, exist_ok=True)

    def path(self, task: str, split: str, row: str) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", row)
        return self.dir / task / split / f"{safe}.json"

    def load(self, task: str, split: str, row: str) -> dict:
        p = self.path(task, split, row)
        return json.loads(p.read_text()) if p.exists() else {"row": row, "meta": None, "q": {}}

    def save(self, task: str, split: str, row: str, doc: dict) -> None:
        p = self.path(task, split, row)
        p.parent.mkdir(parents=True, exist_ok=True)
        tmp = p.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        tmp.replace(p)


def choose_hybrid(state: State, task: str, names: list[str]) -> tuple[str, dict] | None:
    """Best hybrid on the tune split: highest F1, then least compute; None until all ran."""
    best = None
    for name in names:
        doc = state.load(task, "tune", name)
        if not doc.get("done"):
            return None
        qs = list(doc["q"].values())
        f1 = sum(r["f1"] for r in qs) / len(qs)
        comp = sum(r["compute"] for r in qs) / len(qs)
        key = (round(f1, 6), -comp)
        if best is None or key > best[0]:
            best = (key, name)
    return best[1], HYBRIDS[best[1]]


# ----------------------------------------------------------------- engine side
def read_traces(trace_dir: Path, request_ids: list[str]) -> dict[str, dict]:
    """The connector's per-request trace of each request id (then removed)."""
    found: dict[str, dict] = {}
    ids = set(request_ids)
    for p in trace_dir.glob("*.json"):
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            continue
        rid = str(doc.get("req_id", ""))
        base = rid if rid in ids else rid.rsplit("-", 1)[0]  # the engine core's id = id-suffix
        if base in ids:
            found[base] = doc
            p.unlink(missing_ok=True)
    return found


def run_batch(llm, tok, task: str, items: list[dict], meta: dict | None, num_layers: int,
              answer_tokens: int, trace_dir: Path) -> dict[str, dict]:
    """One `generate` over many questions under one row; per question: answer, EM, F1, compute."""
    from vllm import SamplingParams

    import blend

    sp = SamplingParams(max_tokens=answer_tokens, temperature=0.0)
    system = SYSTEMS.get(task, SYSTEM)
    prompts = [blend.build_prompt(tok, system, it["docs"], it["question"],
                                  cache_fuse_metadata=meta) for it in items]
    if meta is None:  # full prefill: plain token prompts (the engine leaves them to vLLM)
        outs = llm.generate([p.tokens_prompt() for p in prompts], sp, use_tqdm=False)
    else:
        outs = llm.generate(prompts, sp, use_tqdm=False)
    traces = read_traces(trace_dir, [o.request_id for o in outs]) if meta is not None else {}
    res = {}
    for it, p, o in zip(items, prompts, outs):
        pred = answer_text(o.outputs[0].text)
        em, f1 = SCORERS[task](pred, it["answers"])
        rep = (o.kv_transfer_params or {}).get("blend") or {}
        tr = traces.get(o.request_id)
        if meta is None:
            comp = 1.0
        elif tr is not None and tr.get("token_layers") is not None and tr["blended_tokens"]:
            comp = tr["token_layers"] / (tr["blended_tokens"] * num_layers)
        else:
            comp = 1.0  # not blended (chunks missing): vLLM prefilled it
        res[it["id"]] = {"pred": pred, "gold": it["answers"], "em": em, "f1": f1,
                         "compute": round(comp, 5),
                         "blended": tr is not None,
                         "hit": round(rep.get("chunk_hit_tokens", 0) / max(1, rep.get(
                             "chunk_tokens", 0)), 4) if rep else None,
                         "prompt_tokens": len(p.prompt_token_ids)}
    return res


def plan_jobs(tasks: list[str], splits: list[str], prof: dict) -> list[tuple[str, str, str]]:
    jobs = []
    for task in tasks:
        if "tune" in splits:
            jobs += [(task, "tune", r) for r in ["full", "deviation", "cheap", *prof["hybrids"]]]
        if "heldout" in splits:
            jobs += [(task, "heldout", r) for r in HELDOUT_ROWS]
    return jobs


def run(args, prof: dict, state: State, t0: float) -> dict:
    """Run every job not done yet, within the budget; returns what happened."""
    from transformers import AutoConfig, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    num_layers = AutoConfig.from_pretrained(args.model).num_hidden_layers
    tasks = args.tasks.split(",")
    splits = ["tune", "heldout"] if args.split == "both" else [args.split]
    jobs = plan_jobs(tasks, splits, prof)
    todo = [j for j in jobs if not state.load(*j).get("done")]
    info: dict = {"jobs": len(jobs), "todo_at_start": len(todo), "batches": 0}
    if not todo:
        return info
    items = {}
    for task, split in dict.fromkeys((t, s) for t, s, _ in todo):
        n = prof["n"] if split == "heldout" else prof["n_tune"]
        t = time.time()
        items[(task, split)] = make_items(task, tok, split, n, args.seed, prof)
        ntoks = [sum(_ntok(tok, it["docs"])) for it in items[(task, split)][:50]]
        print(f"[quality] {task}/{split}: {len(items[(task, split)])} questions, context "
              f"{min(ntoks)}-{max(ntoks)} tokens (first 50), built in {time.time() - t:.1f} s",
              flush=True)

    from vllm import LLM

    import blend

    trace_dir = state.dir / "traces"
    # A new engine numbers its requests from 0 again: an older call's traces would match them.
    shutil.rmtree(trace_dir, ignore_errors=True)
    trace_dir.mkdir()
    store = {"backend": "local", "path": str(state.dir / "kv"), "memory_bytes": args.memory_bytes,
             "disk_bytes": args.disk_bytes}
    if args.gpu_bytes:
        store["gpu_bytes"] = args.gpu_bytes
    kw: dict = dict(model=args.model, seed=0, max_model_len=prof["max_tokens"] + 1024)
    if args.smoke:  # CPU CI only: the GPU run keeps vLLM's defaults
        kw.update(dtype="float32", enforce_eager=True, gpu_memory_utilization=0.3,
                  max_num_batched_tokens=1024)
    kw["kv_transfer_config"] = blend.kv_transfer_config(
        store=store, cache_fuse_metadata=ROW_META["deviation"], unmarked="none",
        trace_dir=str(trace_dir))
    os.environ["CACHEBLEND_TRACE"] = "summary"  # per-request compute only (blend/trace.py)
    t = time.time()
    llm = LLM(**kw)
    info["engine_start_s"] = round(time.time() - t, 1)
    print(f"[quality] engine ready in {info['engine_start_s']} s", flush=True)
    info["precompute"] = {}
    done_pre: set[tuple[str, str]] = set()
    per_q: dict[str, float] = {}  # seconds per question, by row kind, from the batches so far
    stopped = None
    for task, split, row in todo:
        if stopped:
            break
        if (task, split) not in done_pre:
            chunks = sorted({d for it in items[(task, split)] for d in it["docs"]})
            t = time.time()
            r = blend.precompute(llm, chunks)
            info["precompute"][f"{task}/{split}"] = {**r, "s": round(time.time() - t, 1)}
            print(f"[quality] {task}/{split}: precomputed {r} in {time.time() - t:.1f} s",
                  flush=True)
            done_pre.add((task, split))
        choice = None
        if row == "hybrid":
            choice = choose_hybrid(state, task, prof["hybrids"])
            if choice is None:
                print(f"[quality] {task}: hybrid waits for the tune split", flush=True)
                continue
            meta = choice[1]
        else:
            meta = HYBRIDS[row] if row in HYBRIDS else ROW_META[row]
        doc = state.load(task, split, row)
        doc.update(meta=meta, hybrid_choice=choice[0] if choice else None)
        left = [it for it in items[(task, split)] if it["id"] not in doc["q"]]
        kind = "full" if meta is None else "blend"
        for i in range(0, len(left), prof["batch"]):
            batch = left[i:i + prof["batch"]]
            est = per_q.get(kind, per_q.get("full", 0.0)) * len(batch)
            if time.time() - t0 + est + 10 > args.budget_s:
                stopped = f"budget: {task}/{split}/{row} at {len(doc['q'])} of " \
                          f"{len(items[(task, split)])}"
                break
            t = time.time()
            doc["q"].update(run_batch(llm, tok, task, batch, meta, num_layers,
                                      prof["answer_tokens"], trace_dir))
            dt = time.time() - t
            per_q[kind] = max(per_q.get(kind, 0.0) * 0.5, dt / len(batch))
            info["batches"] += 1
            state.save(task, split, row, doc)
            f1 = 100 * sum(r["f1"] for r in doc["q"].values()) / len(doc["q"])
            print(f"[quality] {task}/{split}/{row}: {len(doc['q'])}/{len(items[(task, split)])}"
                  f" F1 {f1:.1f} ({dt / len(batch) * 1e3:.0f} ms/question)", flush=True)
        if len(doc["q"]) >= len(items[(task, split)]):
            doc["done"] = True
            state.save(task, split, row, doc)
    info["stopped"] = stopped
    info["seconds_per_question"] = {k: round(v, 4) for k, v in per_q.items()}
    try:
        llm.llm_engine.engine_core.shutdown()
    except Exception:  # noqa: BLE001 - the results are saved; a stuck shutdown is not ours
        pass
    return info


# ----------------------------------------------------------------- results
def summarize(state: State, tasks: list[str], prof: dict) -> dict:
    """The issue's JSON shape from every finished row (heldout as TASK, tune as TASK@tune)."""
    out: dict = {}
    for task in tasks:
        for split, rows in (("heldout", HELDOUT_ROWS), ("tune", TUNE_ROWS)):
            rows = [r for r in rows if r not in HYBRIDS or r in prof["hybrids"]]
            docs = {r: state.load(task, split, r) for r in rows}
            full = docs["full"]["q"] if docs["full"].get("done") else None
            entry: dict = {"n": len(full) if full else 0, "split": split, "rows": {},
                           "pending": [r for r in rows if not docs[r].get("done")]}
            for r, doc in docs.items():
                if not doc.get("done") or full is None:
                    continue
                ids = [q for q in full if q in doc["q"]]
                f1 = [doc["q"][q]["f1"] for q in ids]
                gap = [doc["q"][q]["f1"] - full[q]["f1"] for q in ids]
                entry["rows"][r] = {
                    "f1": round(100 * sum(f1) / len(ids), 2),
                    "em": round(100 * sum(doc["q"][q]["em"] for q in ids) / len(ids), 2),
                    "compute": round(sum(doc["q"][q]["compute"] for q in ids) / len(ids), 4),
                    "f1_minus_full": round(100 * sum(gap) / len(ids), 2),
                    "ci95": bootstrap(gap) if r != "full" else [0.0, 0.0],
                    "f1_ci95": bootstrap(f1),
                    "blended": round(sum(doc["q"][q]["blended"] for q in ids) / len(ids), 4),
                    "cache_fuse_metadata": doc.get("meta"),
                    "per_question": str(state.path(task, split, r)),
                }
                if doc.get("hybrid_choice"):
                    entry["rows"][r]["chosen_on_tune"] = doc["hybrid_choice"]
            out[task if split == "heldout" else f"{task}@tune"] = entry
    return out


def targets(tasks: dict) -> dict:
    """The issue's targets on each heldout task (None where a row is missing)."""
    res = {}
    for name, t in tasks.items():
        if t["split"] != "heldout":
            continue
        d, c = t["rows"].get("deviation"), t["rows"].get("cheap")
        res[name] = {
            "deviation_within_1_f1": None if d is None else d["f1_minus_full"] >= TARGETS[
                "deviation_f1_gap"],
            "deviation_ci_half_width_le_1_5": None if d is None else
            (d["ci95"][1] - d["ci95"][0]) / 2 <= TARGETS["deviation_ci_half_width"],
            "cheap_compute_le_0_08": None if c is None else c["compute"] <= TARGETS[
                "cheap_compute"],
            "cheap_within_3_f1": None if c is None else c["f1_minus_full"] >= TARGETS[
                "cheap_f1_gap"],
        }
    return res


def plot(tasks: dict, path: Path) -> bool:
    """F1 against measured compute, one panel per heldout task, 95% intervals of F1."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    held = {k: v for k, v in tasks.items() if v["split"] == "heldout" and v["rows"]}
    if not held:
        return False
    fig, axes = plt.subplots(1, len(held), figsize=(5.5 * len(held), 4.2), squeeze=False)
    for ax, (name, t) in zip(axes[0], held.items()):
        for r, v in t["rows"].items():
            lo, hi = v["f1_ci95"]
            ax.errorbar(v["compute"], v["f1"], yerr=[[v["f1"] - lo], [hi - v["f1"]]], fmt="o",
                        capsize=3, label=f"{r} ({v['f1']:.1f})")
            ax.annotate(r, (v["compute"], v["f1"]), textcoords="offset points", xytext=(5, 4),
                        fontsize=8)
        ax.set_xscale("symlog", linthresh=0.05)
        ax.set_xlabel("compute (share of a full prefill, measured)")
        ax.set_ylabel("F1")
        ax.set_title(f"{name} (heldout, n={t['n']})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="HF folder (default: the profile's model)")
    ap.add_argument("--smoke", action="store_true", help="CPU CI: SmolLM2, short contexts, tiny n")
    ap.add_argument("--tasks", default=",".join(TASKS))
    ap.add_argument("--split", choices=("tune", "heldout", "both"), default="both")
    ap.add_argument("--n", type=int, default=None, help="heldout questions per task (500)")
    ap.add_argument("--n-tune", type=int, default=None, help="tune questions per task (200)")
    ap.add_argument("--batch", type=int, default=None, help="questions per generate (64)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--budget-s", type=float, default=540,
                    help="stop starting batches past this many seconds from the start")
    ap.add_argument("--memory-bytes", default="48GiB", help="host tier of the chunk store")
    ap.add_argument("--disk-bytes", default="24GiB")
    ap.add_argument("--gpu-bytes", default=None, help="GPU tier (default: the store's 'auto')")
    ap.add_argument("--state", default=None, help="resumable per-question results (default "
                    "$CACHEBLEND_HOME/quality_gpu)")
    ap.add_argument("--merge-only", action="store_true", help="no engine: JSON + figure only")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    t0 = time.time()
    prof = dict(PROFILES["smoke" if args.smoke else "gpu"])
    for k in ("n", "n_tune", "batch"):
        if getattr(args, k) is not None:
            prof[k] = getattr(args, k)
    if args.smoke:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if args.memory_bytes == "48GiB":
            args.memory_bytes, args.disk_bytes = "2GiB", "2GiB"
    from blend.assets import QWEN25_15B, SMOLLM2, home, model_path

    if args.model is None:
        args.model = str(model_path(SMOLLM2.name if args.smoke else QWEN25_15B.name))
    model_name = Path(args.model).name
    key = hashlib.sha1(json.dumps([model_name, args.seed, prof], sort_keys=True).encode()
                       ).hexdigest()[:12]
    state = State(Path(args.state) if args.state else home() / "quality_gpu", f"{model_name}-{key}")
    tasks = args.tasks.split(",")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        ap.error(f"--tasks: unknown {bad}; known {list(TASKS)}")
    print(f"[quality] model {model_name}, state {state.dir}, budget {args.budget_s:.0f} s; "
          f"profile {prof}", flush=True)
    info = {} if args.merge_only else run(args, prof, state, t0)
    summary = summarize(state, tasks, prof)
    pending = {k: v["pending"] for k, v in summary.items() if v["pending"]}
    doc = {"model": model_name, "tasks": summary, "targets_met": targets(summary),
           "targets": TARGETS, "complete": not pending, "pending": pending,
           "profile": prof, "hybrids": {h: HYBRIDS[h] for h in prof["hybrids"]},
           "seed": args.seed, "state": str(state.dir), "call": info,
           "engine": "vLLM defaults + BlendConnector (store: local, unmarked: none, trace_dir)"
                     + (" [smoke: fp32, enforce_eager]" if args.smoke else ""),
           "definitions": {
               "compute": "mean over questions of token_layers / (blended_tokens x layers) "
                          "from the connector's per-request trace; full prefill 1.0",
               "ci95": "paired bootstrap (2000 resamples of questions) 95% interval of "
                       "F1(row) - F1(full), in F1 points; f1_ci95: the row's own F1",
               "split": "heldout rows are reported; TASK@tune rows chose the hybrid",
               "hybrids": "the hybrid candidates run on tune, by row name: their "
                          "cache_fuse_metadata; the heldout `hybrid` row is the one chosen",
               "per_question": "the row's answers, a JSON file: {\"q\": {ID: {\"pred\", "
                               "\"gold\", \"em\", \"f1\", \"compute\", ...}}}; a squad ID "
                               "is the SQuAD v1.1 dev question id"}}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality_gpu.json").write_text(json.dumps(doc, indent=1))
    plotted = plot(summary, out / "quality_gpu.png")
    for name, t in summary.items():
        print(f"\n{name} ({t['split']}, n={t['n']}); pending: {t['pending'] or 'none'}")
        print(f"{'row':<28}{'F1':>7}{'EM':>7}{'compute':>9}{'F1-full':>9}  ci95")
        for r, v in t["rows"].items():
            print(f"{r:<28}{v['f1']:>7.2f}{v['em']:>7.2f}{v['compute']:>9.4f}"
                  f"{v['f1_minus_full']:>9.2f}  {v['ci95']}")
    print(f"\n[quality] {'every planned run is done' if not pending else 'not done: run again'}"
          f"; {out / 'quality_gpu.json'}{' + png' if plotted else ''}; "
          f"{time.time() - t0:.0f} s", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # the engine is shut down; skip the interpreter's teardown of vLLM's threads


if __name__ == "__main__":
    main()
