"""`cacheblend store|trace|bench quality`: real store files, real traces, bad input exits non-zero."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from blend.store import open_store
from blend.trace import make_doc, write_request_trace

FP_A, FP_B = "a" * 64, "b" * 64


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "blend.cli", *args], capture_output=True,
                          text=True, timeout=120)


def _key(i: int) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


@pytest.fixture()
def store_dir(tmp_path):
    """Three entries of model A, one of model B, and one damaged file, through the real store."""
    root = tmp_path / "kv"
    a, b = open_store(f"local:{root}", FP_A), open_store(f"local:{root}", FP_B)
    for i in range(3):
        assert a.put(_key(i), torch.randn(30, 2, 10 + i, 3, 64, dtype=torch.bfloat16))
    assert b.put(_key(9), torch.randn(24, 2, 7, 2, 64, dtype=torch.bfloat16))
    p = root / _key(2)[:2] / f"{_key(2)}.kv"
    p.write_bytes(p.read_bytes()[:100])  # truncated: header no longer complete
    return root


def test_store_stats(store_dir):
    r = cli("store", "stats", "--store", f"local:{store_dir}", "--json")
    assert r.returncode == 0, r.stderr
    s = json.loads(r.stdout)
    assert s["entries"] == 4 and s["damaged"] == 1
    assert s["tokens"] == 10 + 11 + 7
    assert s["fingerprints"] == {FP_A[:16]: 2, FP_B[:16]: 1, "?": 1}
    r = cli("store", "stats", "--store", f"local:{store_dir}")
    assert r.returncode == 0 and "4 (1 damaged)" in r.stdout


def test_store_inspect(store_dir):
    r = cli("store", "inspect", "--store", f"local:{store_dir}", "--json")
    rows = {x["key"]: x for x in json.loads(r.stdout)}
    assert rows[_key(0)]["shape"] == [30, 2, 10, 3, 64] and rows[_key(0)]["dtype"] == "bfloat16"
    assert rows[_key(2)]["error"] == "truncated"
    r = cli("store", "inspect", "--store", f"local:{store_dir}", _key(9))
    assert r.returncode == 0 and _key(9)[:16] in r.stdout and "ok" in r.stdout
    r = cli("store", "inspect", "--store", f"local:{store_dir}", _key(5))
    assert r.returncode == 1 and "no entry" in r.stderr
    r = cli("store", "inspect", "--store", f"local:{store_dir}", "xyz")
    assert r.returncode == 2 and "64 lowercase hex" in r.stderr


def test_store_clear(store_dir):
    spec = f"local:{store_dir}"
    r = cli("store", "clear", "--store", spec)
    assert r.returncode == 2 and "--yes" in r.stderr  # refuses without --yes
    r = cli("store", "clear", "--store", spec, "--fingerprint", FP_B[:8], "--yes")
    assert r.returncode == 0 and "deleted 1" in r.stdout
    assert json.loads(cli("store", "stats", "--store", spec, "--json").stdout)["entries"] == 3
    r = cli("store", "clear", "--store", spec, "--yes")
    assert r.returncode == 0 and "deleted 3" in r.stdout
    assert json.loads(cli("store", "stats", "--store", spec, "--json").stdout)["entries"] == 0
    # the store still works after a clear (its byte counter was reset under its lock)
    s = open_store(spec, FP_A)
    assert s.put(_key(1), torch.zeros(2, 2, 4, 1, 8)) and s.get(_key(1)) is not None


@pytest.mark.parametrize("args, msg", [
    (["store", "stats", "--store", "local:/no/such/dir"], "no store directory"),
    (["store", "stats", "--store", "ucm:/tmp"], "only local stores"),
    (["store", "inspect", "--limit", "0"], "positive integer"),
    (["store", "bogus"], "invalid choice"),
    (["trace", "/no/such/trace.json"], "no such trace"),
    (["bench", "quality", "--n", "-3"], "positive integer"),
    (["bench", "quality", "--meta", "{\"recomp_ratio\": 2}"], "recomp_ratio"),
    (["bench", "quality", "--meta", "{\"bogus\": 1}"], "unknown key"),
    (["bench", "quality", "--only", "nope"], "invalid choice"),
    (["bench", "quality", "--out", "/no/such/dir/q.json"], "does not exist"),
])
def test_bad_input_fails_clearly(args, msg):
    r = cli(*args)
    assert r.returncode != 0
    assert msg in r.stderr, r.stderr


@pytest.mark.parametrize("args", [["store", "stats"], ["store", "inspect"], ["store", "clear"],
                                  ["trace"], ["bench", "quality"], ["bench", "ttft"]])
def test_help(args):
    r = cli(*args, "--help")
    assert r.returncode == 0 and "usage: cacheblend" in r.stdout


def test_trace_summary(tmp_path):
    dev = {1: [0.5, float("nan"), 2.0, 1.0], 4: [float("nan"), float("nan"), 3.0, 0.1]}
    write_request_trace(tmp_path, make_doc("req-7", (10, 14), dev, [12, 13], {"blend": 4.2},
                                           [(10, 14, _key(1))]))
    (tmp_path / "junk.json").write_text("{}")
    r = cli("trace", str(tmp_path / "req-7.json"))
    assert r.returncode == 0, r.stderr
    assert "context 10..14 (4 tokens), 1 chunks, 2 recomputed (50.0%)" in r.stdout
    assert "layer  1: 3 tokens measured" in r.stdout and "layer  4: 2 tokens" in r.stdout
    r = cli("trace", str(tmp_path))  # the directory holds a non-trace file
    assert r.returncode == 2 and "not a cacheblend trace" in r.stderr
