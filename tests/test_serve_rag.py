"""The serving benchmark's CPU smoke mode (`python -m bench.serve_rag --smoke`), so the harness cannot rot.

Both `vllm serve` processes, vLLM's bench client, the `/metrics` scraping, the JSON and the plot,
on SmolLM2 with a tiny corpus (a few minutes on 2 cores). It measures nothing: it checks that every
run completed, that the summary has every key, and that the blended server counted chunk lookups.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.vllm

ROOT = Path(__file__).resolve().parents[1]
SUMMARY_KEYS = {"p90_ttft_speedup", "slo_throughput_speedup", "decay", "miss_ttft_ratio",
                "targets_met"}
TARGETS = {"never_worse", "hot_3x", "slo_2x", "no_decay", "miss_1_3x"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory, child_env, smollm2_path) -> dict:
    out, work = tmp_path_factory.mktemp("out"), tmp_path_factory.mktemp("work")
    proc = subprocess.run([sys.executable, "-m", "bench.serve_rag", "--smoke",
                           "--out", str(out), "--work", str(work)],
                          cwd=ROOT, env=child_env, capture_output=True, text=True, timeout=1500)
    print(proc.stdout[-4000:])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return {"out": out, "doc": json.loads((out / "serve_rag.json").read_text())}


def test_every_run_completed(smoke):
    runs = smoke["doc"]["runs"]
    names = {(r["server"], r["name"]) for r in runs}
    assert names == {(s, n) for s in ("plain", "blend") for n in ("r1_steady", "r1_new", "miss")}
    for r in runs:
        b = r.get("bench") or {}
        assert r["rc"] == 0 and b.get("failed") == 0 and b.get("completed") == r["prompts"], r
        assert len(b["ttfts_ms"]) == r["prompts"] and None not in b["ttfts_ms"]
        for key in ("p50_ttft_ms", "p90_ttft_ms", "p99_ttft_ms", "median_tpot_ms",
                    "request_throughput", "output_throughput"):
            assert b.get(key) is not None, (r["name"], key)
    # Both servers got the same request files.
    by = {(r["server"], r["name"]): r["sha256"] for r in runs}
    assert all(by[("plain", n)] == by[("blend", n)] for _, n in by)


def test_summary_has_every_key(smoke):
    doc = smoke["doc"]
    assert SUMMARY_KEYS <= doc["summary"].keys()
    assert set(doc["summary"]["targets_met"]) == TARGETS
    assert doc["summary"]["miss_ttft_ratio"] is not None  # the miss run paired on both servers
    assert doc["summary"]["decay"] is not None
    assert "| separator | 1 | r1_steady |" in doc["table"]
    assert (smoke["out"] / "serve_rag.png").stat().st_size > 10_000


def test_blended_server_counted_lookups(smoke):
    doc = smoke["doc"]
    blend = [r for r in doc["runs"] if r["server"] == "blend" and r["phase"] != "miss"]
    assert sum(r["metrics"].get("vllm:cacheblend_chunk_lookups", 0) for r in blend) > 0
    assert not any(k.startswith("vllm:cacheblend_") for r in doc["runs"]
                   if r["server"] == "plain" for k in r["metrics"])
    srv = {s["server"]: s for s in doc["servers"]}
    assert "vllm:cacheblend_chunk_lookups" in srv["blend"]["scrape"]["names"]
    assert len(srv["blend"]["scrape"]["t"]) >= 5 and srv["blend"]["log_tail"]
