"""Local store: bit-exact round trips, tiers, capacity bounds, spec validation."""

from __future__ import annotations

import hashlib
import os
import stat

import pytest
import torch

from blend.store import open_store
from blend.store.local import LocalStore

FP = "f" * 64


def key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def kv(n: int, dtype: torch.dtype, layers: int = 3, heads: int = 2, dim: int = 64,
       seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(layers, 2, n, heads, dim, generator=g).to(dtype)


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-exact equality (NaN-safe, sign-of-zero-safe)."""
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))


@pytest.fixture
def store(tmp_path) -> LocalStore:
    return open_store({"path": str(tmp_path / "kv"), "memory_bytes": "8MiB",
                       "disk_bytes": "512MiB"}, FP)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [1, 17, 256, 2000])
def test_round_trip_bit_exact_every_tier(store, tmp_path, dtype, n):
    x = kv(n, dtype, seed=n)
    x.view(-1)[0] = float("nan")  # odd values survive too
    k = key(f"{n}{dtype}")
    assert store.put(k, x)
    assert store.lookup([k]) == [True]
    got = store.get(k)  # memory tier if it fits, else disk
    assert got is not None and same(got, x)
    out = torch.empty_like(x)
    assert store.load(k, out) and same(out, x)
    # a second process's view: disk only
    cold = open_store({"path": str(tmp_path / "kv"), "memory_bytes": "8MiB"}, FP)
    got = cold.get(k)
    assert got is not None and same(got, x)
    out = torch.zeros_like(x)
    assert cold.load(k, out) and same(out, x)
    assert cold.stats()["disk_hits"] == 2 or cold.stats()["memory_hits"] >= 1


def test_chunk_larger_than_memory_tier_goes_to_disk_only(tmp_path):
    s = open_store({"path": str(tmp_path), "memory_bytes": 1 << 20, "disk_bytes": 1 << 30}, FP)
    x = kv(4096, torch.float32)  # 6 MiB > 1 MiB memory tier
    assert s.put(key("big"), x)
    assert s.stats()["memory_entries"] == 0
    got = s.get(key("big"))
    assert got is not None and same(got, x)
    assert s.stats()["disk_hits"] == 1


def test_memory_tier_is_byte_bounded_lru(tmp_path):
    x = kv(64, torch.float16)  # 48 KiB
    nb = x.numel() * x.element_size()
    s = open_store({"path": str(tmp_path), "memory_bytes": 3 * nb, "disk_bytes": 1 << 30}, FP)
    for i in range(4):
        s.put(key(str(i)), kv(64, torch.float16, seed=i))
    assert s.mem.used <= 3 * nb and key("0") not in s.mem and key("3") in s.mem
    got = s.get(key("0"))  # evicted from memory, still on disk, promoted back
    assert got is not None and same(got, kv(64, torch.float16, seed=0))
    assert key("0") in s.mem and s.mem.used <= 3 * nb


def test_caller_buffers_are_not_aliased(store):
    x = kv(8, torch.float32)
    k = key("alias")
    store.put(k, x)
    x.zero_()  # caller reuses its buffer
    got = store.get(k)
    got.fill_(7)  # caller scribbles on what it got
    again = store.get(k)
    assert same(again, kv(8, torch.float32))


def test_shape_or_dtype_mismatch_is_a_counted_miss(store):
    k = key("m")
    store.put(k, kv(16, torch.float16))
    assert not store.load(k, torch.empty(3, 2, 15, 2, 64, dtype=torch.float16))
    assert not store.load(k, torch.empty(3, 2, 16, 2, 64, dtype=torch.bfloat16))
    store.mem.clear()  # same checks on the disk path
    assert not store.load(k, torch.empty(3, 2, 15, 2, 64, dtype=torch.float16))
    assert not store.load(k, torch.empty(3, 2, 16, 2, 64, dtype=torch.float32))
    e = store.stats()["errors"]
    assert e["shape_mismatch"] == 2 and e["dtype_mismatch"] == 2


def test_bad_keys_are_misses_not_exceptions(store):
    for bad in ["", "../../etc/passwd", "A" * 64, "g" * 64, key("x")[:-1], None, 5]:
        assert store.lookup([bad]) == [False]
        assert store.get(bad) is None
        assert not store.put(bad, kv(1, torch.float16))
        assert not store.delete(bad)
    assert store.stats()["errors"]["bad_key"] == 28
    assert not list((store.disk.root).glob("*/*.kv"))


def test_files_0600_in_0700_dirs(store):
    k = key("perm")
    store.put(k, kv(4, torch.float16))
    p = store.disk.path(k)
    assert stat.S_IMODE(os.stat(p).st_mode) == 0o600
    for d in (store.disk.root, p.parent, store.disk.root / "tmp"):
        assert stat.S_IMODE(os.stat(d).st_mode) == 0o700


def test_delete_and_clear(store):
    ks = [key(f"d{i}") for i in range(3)]
    for i, k in enumerate(ks):
        store.put(k, kv(4, torch.float16, seed=i))
    assert store.delete(ks[0]) and not store.delete(ks[0])
    assert store.lookup(ks) == [False, True, True]
    store.clear()
    assert store.lookup(ks) == [False, False, False]
    assert store.disk.usage() == 0


def test_disk_capacity_respected_under_churn(tmp_path):
    x = kv(64, torch.float16)  # 96 KiB + header
    cap = 1 << 20  # room for ~10 entries
    s = open_store({"path": str(tmp_path), "memory_bytes": 1 << 20, "disk_bytes": cap}, FP)
    for i in range(60):
        assert s.put(key(f"c{i}"), kv(64, torch.float16, seed=i))
        assert s.disk.usage() <= cap
        if i % 3 == 0:  # keep one entry hot: LRU must not evict it
            s.mem.clear()
            assert s.get(key("c0")) is not None
    assert s.lookup([key("c0")]) == [True]
    assert s.lookup([key("c1")]) == [False]
    assert s.lookup([key("c59")]) == [True]
    assert s.stats()["disk_evictions"] > 0
    n = len(list(tmp_path.glob("*/*.kv")))
    assert 7 <= n <= 10 and n * (x.numel() * 2) <= cap
    big = kv(4096, torch.float32)  # larger than the whole disk tier
    assert not s.put(key("big"), big)
    assert s.stats()["errors"]["too_large"] == 1


def test_lookup_64_keys_is_fast(store):
    import time

    ks = [key(f"l{i}") for i in range(64)]
    for k in ks[::2]:
        store.put(k, kv(2, torch.float16))
    store.mem.clear()
    best = min((lambda t0: (store.lookup(ks), time.perf_counter() - t0)[1])(time.perf_counter())
               for _ in range(20))
    assert store.lookup(ks) == [i % 2 == 0 for i in range(64)]
    assert best < 2e-3  # target 1 ms (bench/store.py); slack for a loaded CI machine


@pytest.mark.parametrize("spec, needle", [
    ({"backend": "s3"}, "backend"),
    ("nfs:/x", "backend"),
    ({"backend": "local", "disk_bytes": 0}, "disk_bytes"),
    ({"backend": "local", "memory_bytes": 0}, "memory_bytes"),
    ({"backend": "local", "memory_bytes": "lots"}, "memory_bytes"),
    ({"backend": "local", "colour": "red"}, "colour"),
    ({"backend": "local", "path": "/proc/cacheblend-nope"}, "path"),
    ({"backend": "local", "path": "/dev/null/kv"}, "path"),
    ({"backend": "ucm"}, "path"),
    ({"backend": "ucm", "path": "/tmp", "pipeline": "Nope"}, "pipeline"),
    ({"backend": "ucm", "path": "/tmp", "block_size": 100}, "block_size"),
    (42, "store"),
])
def test_bad_specs_fail_at_startup_naming_the_key(spec, needle):
    with pytest.raises(ValueError, match=needle):
        open_store(spec, FP)


def test_spec_forms(tmp_path, monkeypatch):
    monkeypatch.setenv("CACHEBLEND_HOME", str(tmp_path / "home"))
    s = open_store(None, FP)
    assert s.disk.root == tmp_path / "home" / "kv"
    s = open_store(f"local:{tmp_path}/a", FP)
    assert s.disk.root == tmp_path / "a"
    monkeypatch.setenv("HOME", str(tmp_path))
    s = open_store("local:~/b", FP)
    assert s.disk.root == tmp_path / "b"
    s = open_store({"path": tmp_path / "c", "memory_bytes": "1.5GiB", "disk_bytes": "2GB"}, FP)
    assert s.mem.capacity == 3 << 29 and s.disk.capacity == 2 * 10**9
