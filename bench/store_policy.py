"""Which chunks stay hot under churn: eviction policy x save admission, by trace simulation.

    python -m bench.store_policy            # 5 seeds, every scenario (~5 min on 2 cores)
    python -m bench.store_policy --seeds 1    # quicker

Runs the real `MemoryTier` and `Admission` classes over a synthetic RAG stream
(no engine, no tensors: entries are stand-ins whose `numel()` is their byte
size). Each request looks up 5-10 distinct documents drawn by Zipf(1.1); a hit
is a chunk found in the tier; each missed chunk is offered to the admission
policy and saved (`put`, its bytes written) when admitted, as the connector
does. After a warm-up that is not measured come three phases: steady, churn
(each document slot becomes a new document with probability 0.3), steady
again. Two kinds of churn: `oneoff` (new documents are never seen again: a
scan) and `shift` (new documents come from a second Zipf corpus, so some of
them become hot). `hot kept` is the old documents' hit rate during churn over
the steady hit rate: how well the hot chunks survive. Also sweeps the
doorkeeper's bound. Writes bench/results/store_policy.json and .png.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import statistics
import sys
from pathlib import Path

import numpy as np

from bench.common import kv_chunk_shape
from blend.store.admission import make_admission
from blend.store.memory import MemoryTier

RESULTS = Path(__file__).resolve().parent / "results"

BYTES_PER_TOKEN = math.prod(kv_chunk_shape(1)) * 2  # Llama-3-8B, bf16: 500 tokens = 64 MiB
MEAN_TOKENS = 500  # documents of 300-700 tokens
POLICIES = [("lru", "always"), ("lru", "second_sight"), ("slru", "always"),
            ("slru", "second_sight")]
CORPORA, CAPACITIES, CHURNS = (2000, 10000), (200, 400, 800), ("oneoff", "shift")
ZIPF, NEW_FRACTION, WINDOW = 1.1, 0.3, 50


class FakeKV:
    """Stands in for a chunk's KV tensor: the tier only reads its byte size."""

    __slots__ = ("nbytes",)

    def __init__(self, nbytes: int) -> None:
        self.nbytes = nbytes

    def numel(self) -> int:
        return self.nbytes

    def element_size(self) -> int:
        return 1


class Corpus:
    """Documents with Zipf popularity (random rank order) and sizes of 300-700 tokens."""

    def __init__(self, name: str, n: int, rng: np.random.Generator) -> None:
        self.name, self.n = name, n
        p = 1.0 / np.arange(1, n + 1) ** ZIPF
        self.p = rng.permutation(p / p.sum())
        self.tokens = rng.integers(300, 701, size=n)

    def draw(self, k: int, rng: np.random.Generator) -> list[tuple[str, int]]:
        idx = rng.choice(self.n, size=k, replace=False, p=self.p)
        return [(f"{self.name}{i}", int(self.tokens[i]) * BYTES_PER_TOKEN) for i in idx]


def make_trace(corpus: int, churn: str, warm: int, phase: int,
               seed: int) -> list[list[tuple[str, int]]]:
    """Requests as lists of (key, bytes): `warm` steady requests not measured, then three
    phases of `phase` requests; the second replaces ~30% of document slots."""
    rng = np.random.default_rng(seed)
    old, new = Corpus("d", corpus, rng), Corpus("s", corpus, rng)
    fresh = itertools.count()
    trace = []
    for r in range(warm + 3 * phase):
        k = int(rng.integers(5, 11))
        docs = old.draw(k, rng)
        if warm + phase <= r < warm + 2 * phase:  # replace slots, not redraw: the old
            keep = rng.random(k) >= NEW_FRACTION  # documents left are an unbiased sample
            docs = [d for d, kp in zip(docs, keep) if kp]
            n_new = k - len(docs)
        else:
            n_new = 0
        if churn == "shift":
            docs += new.draw(n_new, rng)
        else:
            docs += [(f"n{next(fresh)}", int(rng.integers(300, 701)) * BYTES_PER_TOKEN)
                     for _ in range(n_new)]
        trace.append(docs)
    return trace


def simulate(trace, capacity: int, policy: str, admit: str, remember: int | None = None) -> dict:
    """Per-request hits, lookups and bytes written, through the real tier and admission."""
    tier = MemoryTier(capacity, policy=policy)
    adm = make_admission(admit) if remember is None else make_admission(admit, remember)
    hits, written, old_hits, old_lookups = [], [], [], []
    for docs in trace:
        present = [k in tier for k, _ in docs]  # the scheduler's lookup
        h = w = oh = ol = 0
        for (k, n), hit in zip(docs, present):
            if hit:
                h += tier.get(k) is not None  # the worker's fetch
            elif adm.admit(k) and tier.put(k, FakeKV(n)):  # saved after it is computed
                w += n
            if k.startswith("d"):
                ol += 1
                oh += hit
        hits.append(h)
        written.append(w)
        old_hits.append(oh)
        old_lookups.append(ol)
    return {"hits": hits, "written": written, "old_hits": old_hits, "old_lookups": old_lookups,
            "evictions": tier.evictions}


def ceiling(trace) -> dict:
    """An unbounded store that saves everything: every repeat hits, nothing is evicted."""
    seen: set[str] = set()
    hits, old_hits, old_lookups = [], [], []
    for docs in trace:
        hit = [k in seen for k, _ in docs]
        hits.append(sum(hit))
        old_hits.append(sum(h for (k, _), h in zip(docs, hit) if k.startswith("d")))
        old_lookups.append(sum(k.startswith("d") for k, _ in docs))
        seen.update(k for k, _ in docs)
    return {"hits": hits, "old_hits": old_hits, "old_lookups": old_lookups}


def rate(hits, lookups, lo: int, hi: int) -> float:
    return sum(hits[lo:hi]) / max(1, sum(lookups[lo:hi]))


def summarize(run: dict, lookups: list[int], warm: int, phase: int) -> dict:
    """Hit rates: steady = phase 1; churn = phase 2; after = phase 3 (the last third);
    overall and writes over the three phases (the warm-up is not counted)."""
    h, n = run["hits"], lookups
    p1, p2, p3 = warm + phase, warm + 2 * phase, warm + 3 * phase
    steady, after = rate(h, n, warm, p1), rate(h, n, p2, p3)
    w = run.get("written", [0] * len(h))
    return {
        "steady": steady,
        "churn": rate(h, n, p1, p2),
        "churn_hot_docs": rate(run["old_hits"], run["old_lookups"], p1, p2),
        "hot_kept": rate(run["old_hits"], run["old_lookups"], p1, p2) / steady if steady else 0.0,
        "recovery": rate(h, n, p2, p2 + phase // 4),
        "after": after,
        "after_over_steady": after / steady if steady else 0.0,
        "overall": rate(h, n, warm, p3),
        "write_mib_per_req": sum(w[warm:]) / (3 * phase) / 2**20,
        "write_mib_per_req_churn": sum(w[p1:p2]) / phase / 2**20,
        "windows": [rate(h, n, i, i + WINDOW) for i in range(0, len(h), WINDOW)],
    }


def scenario(corpus: int, cap: int, churn: str, warm: int, phase: int, seeds: int) -> dict:
    """Every policy over the same traces (one per seed); figures are means over seeds."""
    per: dict[str, list[dict]] = {}
    for seed in range(seeds):
        trace = make_trace(corpus, churn, warm, phase, seed)
        lookups = [len(d) for d in trace]
        capacity = cap * MEAN_TOKENS * BYTES_PER_TOKEN
        for policy, admit in POLICIES:
            run = simulate(trace, capacity, policy, admit)
            s = summarize(run, lookups, warm, phase)
            s["evictions"] = run["evictions"]
            per.setdefault(f"{policy}+{admit}", []).append(s)
        per.setdefault("ceiling", []).append(summarize(ceiling(trace), lookups, warm, phase))
    return {name: mean_of(runs) for name, runs in per.items()}


def mean_of(runs: list[dict]) -> dict:
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, list):
            out[k] = [round(statistics.fmean(r[k][i] for r in runs), 4) for i in range(len(v))]
        else:
            vals = [r[k] for r in runs]
            out[k] = round(statistics.fmean(vals), 4)
            if k in ("steady", "after", "overall") and len(vals) > 1:
                out[k + "_sd"] = round(statistics.stdev(vals), 4)
    return out


def recommend(results: dict) -> dict:
    """Highest hit rate over the three phases, averaged over every scenario; among those
    within half a point of it, the one that writes least."""
    names = [f"{p}+{a}" for p, a in POLICIES]

    def avg(field: str) -> dict[str, float]:
        return {n: statistics.fmean(s[n][field] for s in results.values()) for n in names}
    hit, wr, kept = avg("overall"), avg("write_mib_per_req"), avg("hot_kept")
    pick = min((n for n in names if hit[n] >= max(hit.values()) - 0.005), key=lambda n: wr[n])
    base = "lru+always"
    policy, admit = pick.split("+")
    return {
        "policy": policy, "admit": admit,
        "mean_overall_hit_rate": {n: round(v, 4) for n, v in hit.items()},
        "mean_hot_kept_during_churn": {n: round(v, 4) for n, v in kept.items()},
        "mean_write_mib_per_req": {n: round(v, 1) for n, v in wr.items()},
        "reason": (f"{pick}: the best hit rate over the stream, averaged over all "
                   f"{len(results)} scenarios ({hit[pick]:.3f}, today's {base} {hit[base]:.3f}); "
                   f"during churn the hot documents keep {kept[pick]:.0%} of their steady hit "
                   f"rate ({base}: {kept[base]:.0%}); it writes {wr[pick]:.0f} MiB per "
                   f"request against {wr[base]:.0f}"
                   + (", since chunks seen once are not saved" if admit == "second_sight"
                      else "")),
    }


COLS = {"steady": "steady", "churn": "churn", "churn_hot_docs": "hot@churn",
        "hot_kept": "hot kept", "recovery": "recovery", "after": "after",
        "write_mib_per_req": "MiB/req", "write_mib_per_req_churn": "MiB/req churn"}


def table(results: dict) -> str:
    """One row per scenario and policy: hit rates, then MiB written per request."""
    head = " ".join(f"{h:>13s}" for h in COLS.values())
    lines = [f"{'scenario':22s} {'policy':18s} {head}"]
    for sc, res in results.items():
        for name, s in res.items():
            cells = [f"{s[c]:13.0f}" if c.startswith("write") else f"{s[c]:13.3f}"
                     for c in COLS]
            lines.append(f"{sc:22s} {name:18s} " + " ".join(cells))
    return "\n".join(lines)


SIZE_SCENARIOS = ((2000, 400, "shift"), (10000, 400, "oneoff"), (10000, 800, "shift"))
SIZE_RATIOS = (0.5, 1, 2, 5, 25, None)  # x the chunks the tier holds; None: the default bound


def doorkeeper_sizes(warm: int, phase: int, seeds: int) -> dict:
    """slru+second_sight with the doorkeeper's bound as a multiple of the tier's chunks."""
    out: dict[str, dict] = {}
    for corpus, cap, churn in SIZE_SCENARIOS:
        traces = [make_trace(corpus, churn, warm, phase, seed) for seed in range(seeds)]
        res = out.setdefault(f"c{corpus}_cap{cap}_{churn}", {})
        for ratio in SIZE_RATIOS:
            remember = None if ratio is None else int(ratio * cap)
            runs = []
            for trace in traces:
                run = simulate(trace, cap * MEAN_TOKENS * BYTES_PER_TOKEN, "slru",
                               "second_sight", remember)
                s = summarize(run, [len(d) for d in trace], warm, phase)
                runs.append({k: v for k, v in s.items() if k != "windows"})
            res["default" if ratio is None else f"x{ratio:g}"] = mean_of(runs)
    return out


def pick_remember(sizes: dict) -> dict:
    """The largest bound whose hit rate, averaged over the scenarios, is within a quarter point
    of the best bound's: the largest, because this simulation has no disk tier, where a
    saved chunk could still hit after the memory tier evicted it."""
    names = list(next(iter(sizes.values())))
    hit = {n: statistics.fmean(s[n]["overall"] for s in sizes.values()) for n in names}
    wr = {n: statistics.fmean(s[n]["write_mib_per_req"] for s in sizes.values()) for n in names}
    ok = [n for n in names if n != "default" and hit[n] >= max(hit.values()) - 0.0025]
    pick = max(ok, key=lambda n: float(n[1:]))
    return {"tier_chunks_times": float(pick[1:]),
            "mean_overall_hit_rate": {n: round(v, 4) for n, v in hit.items()},
            "mean_write_mib_per_req": {n: round(v, 1) for n, v in wr.items()},
            "reason": (f"a doorkeeper of {pick[1:]}x the chunks the tier holds: hit rate "
                       f"{hit[pick]:.3f} against {hit['default']:.3f} with the default bound "
                       f"(65,536 keys, more than this stream's), writing {wr[pick]:.0f} MiB per "
                       f"request against {wr['default']:.0f}. A bound near the tier's size "
                       "refuses chunks that recur only after more misses than the tier holds: "
                       "they would be evicted before their reuse anyway (the largest bound "
                       "within 0.25 points of the best is taken: a disk tier, not simulated "
                       "here, could still serve such chunks)")}


def plot(results: dict, warm: int, phase: int, path: Path, cap: int = 400) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(CHURNS), len(CORPORA), figsize=(12, 7), sharex=True,
                             squeeze=False)
    for (i, churn), (j, corpus) in itertools.product(enumerate(CHURNS), enumerate(CORPORA)):
        ax, res = axes[i][j], results[f"c{corpus}_cap{cap}_{churn}"]
        for name, s in res.items():
            x = [WINDOW * (w + 1) for w in range(len(s["windows"]))]
            ax.plot(x, s["windows"], label=name, ls=":" if name == "ceiling" else "-")
        ax.axvspan(warm + phase, warm + 2 * phase, color="0.9")
        ax.axvline(warm, color="0.5", lw=0.8)
        ax.set_title(f"corpus {corpus}, {cap} chunks, churn: {churn}")
        ax.set_ylim(0, 1)
        ax.set_ylabel(f"hit rate per {WINDOW} requests")
    for ax in axes[-1]:
        ax.set_xlabel("request (left of the line: warm-up; shaded: 30% new documents)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def setup_of(a: argparse.Namespace) -> dict:
    return {"zipf": ZIPF, "docs_per_request": [5, 10], "doc_tokens": [300, 700],
            "bytes_per_token": BYTES_PER_TOKEN, "capacity_chunks_of_500_tokens": CAPACITIES,
            "corpora": CORPORA, "churn_kinds": CHURNS, "new_fraction": NEW_FRACTION,
            "warmup_requests": a.warmup, "requests_per_phase": a.phase, "seeds": a.seeds,
            "window": WINDOW, "steady": "phase 1", "churn": "phase 2", "after": "phase 3",
            "recovery": "first quarter of phase 3",
            "churn_hot_docs": "hit rate of the old corpus's documents during churn",
            "hot_kept": "churn_hot_docs / steady",
            "figures": "means over seeds; *_sd: standard deviation over seeds"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=2000, help="steady requests not measured")
    ap.add_argument("--phase", type=int, default=1000, help="requests per phase")
    ap.add_argument("--out", default=str(RESULTS / "store_policy.json"))
    a = ap.parse_args()
    results = {}
    for corpus, cap, churn in itertools.product(CORPORA, CAPACITIES, CHURNS):
        name = f"c{corpus}_cap{cap}_{churn}"
        results[name] = scenario(corpus, cap, churn, a.warmup, a.phase, a.seeds)
        print(f"done {name}", file=sys.stderr, flush=True)
    print(table(results))
    sizes = doorkeeper_sizes(a.warmup, a.phase, a.seeds)
    print("\ndoorkeeper bound (slru+second_sight), x the chunks the tier holds:")
    for sc, res in sizes.items():
        print(f"  {sc:22s} " + "  ".join(f"{n} {d['overall']:.3f}/{d['write_mib_per_req']:.0f}"
                                         for n, d in res.items()) + "  (hit rate/MiB per req)")
    rec = recommend(results)
    rec["admit_remember"] = pick_remember(sizes)
    print(json.dumps(rec, indent=1))
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"setup": setup_of(a), "recommended": rec,
                               "doorkeeper_size": sizes, "results": results}, indent=1) + "\n")
    plot(results, a.warmup, a.phase, out.with_suffix(".png"))


if __name__ == "__main__":
    main()
