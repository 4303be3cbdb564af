"""UCM backend against the real UCM package (uc-manager, cp312 only).

Under Python 3.12 with UCM installed these tests run directly. In the main
(3.11) session, `test_ucm_suite_in_py312` runs this file under `.venv312`
(built by `make ucm-env`, which `make test` depends on) and fails if it fails.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import subprocess
import tempfile
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.ucm
HAVE_UCM = importlib.util.find_spec("ucm") is not None
REPO = Path(__file__).resolve().parents[1]
PY312 = REPO / ".venv312" / "bin" / "python"
FP = "c" * 64
needs_ucm = pytest.mark.skipif(not HAVE_UCM, reason="runs under .venv312 (see launcher test)")


# The 3.12 env has no vLLM and no editable install, and `blend/__init__` wires up the
# vLLM integration; the store needs none of it, so import `blend` as a bare package.
BOOT = ("import sys, types, pytest; m = types.ModuleType('blend'); m.__path__ = ['blend']; "
        "sys.modules['blend'] = m; sys.exit(pytest.main(sys.argv[1:]))")


def key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.mark.skipif(HAVE_UCM, reason="already inside the UCM environment")
def test_ucm_suite_in_py312():
    if not PY312.exists():
        msg = f"{PY312} missing: run `make ucm-env` (make test does)"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    env = {**os.environ, "PYTHONPATH": str(REPO), "BLEND_LOG_LEVEL": "WARNING"}
    log = Path(tempfile.mkdtemp()) / "ucm-pytest.log"
    with open(log, "w") as f:  # a file, not a pipe: only the interpreter's own exit counts
        r = subprocess.run([str(PY312), "-c", BOOT, "-q", "-p", "no:cacheprovider", "-m", "ucm",
                            str(Path(__file__))], cwd=REPO, env=env, stdout=f,
                           stderr=subprocess.STDOUT, timeout=600)
    out = log.read_text()
    tail = "\n".join(ln for ln in out.splitlines() if "[UC][I]" not in ln)[-4000:]
    print(tail)
    assert r.returncode == 0, tail
    m = re.search(r"(\d+) passed", out)
    assert m and int(m.group(1)) >= 10 and " failed" not in out, tail


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One UCM store for the module: opening and closing one costs ~2 s (UCM threads)."""
    from blend.store import open_store

    root = tmp_path_factory.mktemp("ucm")
    s = open_store({"backend": "ucm", "path": str(root), "block_size": 64 << 10}, FP)
    s.root = root
    yield s
    s.close()


@needs_ucm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 5, 333])  # one partial block, exactly-ish one, many + a tail
def test_round_trip_bit_exact(store, dtype, n):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(4, 2, n, 2, 64, generator=g).to(dtype)
    k = key(f"{n}{dtype}")
    assert store.lookup([k]) == [False]
    errs = dict(store.stats()["errors"])
    assert store.put(k, x)
    assert store.lookup([k]) == [True]
    got = store.get(k)
    assert got is not None and same(got, x)
    out = torch.empty_like(x)
    assert store.load(k, out) and same(out, x)
    assert store.stats()["errors"] == errs


@needs_ucm
def test_blocks_and_tail_layout(store):
    from blend.store.ucm import block_ids

    x = torch.ones(4, 2, 333, 2, 64, dtype=torch.float16)  # 681,984 B + header
    k = key("layout")
    assert store.put(k, x)
    n = -(-(x.numel() * 2 + 256) // (64 << 10))
    ids = block_ids(k, n + 1)
    assert all(len(i) == 16 for i in ids) and len(set(ids)) == n + 1
    assert list(store._s.lookup(ids[:n])) == [True] * n  # every block, tail included
    assert not store._s.lookup(ids[n:])[0]  # and not one more
    names = {p.name for p in store.root.rglob("*") if p.is_file()}
    assert {i.hex() for i in ids[:n]} <= names and ids[n].hex() not in names


@needs_ucm
def test_misses_and_faults_are_counted(store):
    from blend.store import open_store
    from blend.store.ucm import block_ids

    x = torch.randn(4, 2, 300, 2, 64).to(torch.bfloat16)
    k = key("victim")
    before = dict(store.stats()["errors"])
    assert store.get(key("absent")) is None
    assert not store.load(key("absent"), torch.empty_like(x))
    assert store.put(k, x)
    assert not store.load(k, torch.empty(4, 2, 299, 2, 64, dtype=torch.bfloat16))
    assert not store.load(k, torch.empty(4, 2, 300, 2, 64, dtype=torch.float16))
    other = open_store({"backend": "ucm", "path": str(store.root),
                        "block_size": 64 << 10}, "d" * 64)
    assert other.get(k) is None
    assert other.stats()["errors"] == {"fingerprint": 1}
    # a lost body block (e.g. GC on shared storage): a miss, not an exception
    body = block_ids(k, 2)[1].hex()
    victim = next(p for p in (store.root).rglob(body))
    victim.unlink()
    assert store.get(k) is None
    # a corrupted body block: the payload crc catches it
    assert store.put(key("flip"), x)
    body = block_ids(key("flip"), 2)[1].hex()
    f = next(p for p in (store.root).rglob(body))
    raw = bytearray(f.read_bytes())
    raw[100] ^= 1
    f.write_bytes(bytes(raw))
    assert store.get(key("flip")) is None
    e = {r: c - before.get(r, 0) for r, c in store.stats()["errors"].items()}
    assert e.get("shape_mismatch") == 1 and e.get("dtype_mismatch") == 1, e
    assert e.get("ucm_not_found") == 1 and e.get("checksum") == 1, e
    assert store.delete(k) and store.get(k) is None
    store.clear()
    assert store.lookup([key("flip")]) == [False]


@needs_ucm
def test_config_passes_through(tmp_path):
    from blend.store import open_store

    s = open_store({"backend": "ucm", "path": str(tmp_path), "block_size": "128KiB",
                    "unique_id": "cb-test", "ucm_config": {"posix_capacity_gb": 8}}, FP)
    assert s.config["unique_id"] == "cb-test" and s.config["posix_capacity_gb"] == 8
    assert s.config["shard_size"] == s.config["block_size"] == 128 << 10
    x = torch.arange(4 * 2 * 7 * 2 * 64, dtype=torch.float32).view(4, 2, 7, 2, 64)
    assert s.put(key("cfg"), x) and same(s.get(key("cfg")), x)


@needs_ucm
def test_close_releases_ucm_and_later_calls_miss(tmp_path):
    """close() drops UCM's store now (not at interpreter teardown); afterwards: misses."""
    from blend.store import open_store

    s = open_store({"backend": "ucm", "path": str(tmp_path), "block_size": "128KiB"}, FP)
    x = torch.ones(2, 2, 3, 2, 64)
    assert s.put(key("closing"), x)
    s.close()
    s.close()  # idempotent
    assert s.lookup([key("closing")]) == [False] and s.get(key("closing")) is None
    assert not s.put(key("after"), x)
    assert s.stats()["errors"].get("closed", 0) >= 3


@pytest.mark.skipif(HAVE_UCM, reason="checks the error without UCM")
def test_ucm_without_package_fails_clearly_at_startup(tmp_path):
    from blend.store import open_store

    with pytest.raises(RuntimeError, match="uc-manager"):
        open_store(f"ucm:{tmp_path}", FP)


@needs_ucm
@pytest.mark.gpu
def test_cache_posix_round_trip_on_gpu(tmp_path):
    """UCM `Cache|Posix` moves device buffers; run on the GPU machine."""
    from blend.store import open_store

    s = open_store({"backend": "ucm", "path": str(tmp_path), "block_size": "2MiB",
                    "pipeline": "Cache|Posix"}, FP)
    for n in (1, 700):
        x = torch.randn(8, 2, n, 8, 128, device="cuda").to(torch.bfloat16)
        k = key(f"gpu{n}")
        assert s.put(k, x) and s.lookup([k]) == [True]
        out = torch.empty_like(x)
        assert s.load(k, out) and same(out, x)
        got = s.get(k)
        assert got is not None and same(got.to("cuda"), x)
    assert s.stats()["errors"] == {}
