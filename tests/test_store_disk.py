"""`store/disk.py` on its own: damaged entries end as a `StoreMiss` naming why (the local
store counts it as a miss), and capacity holds, evicting least recently read first.

`test_store_local.py` and `test_store_faults.py` cover the same tier through `LocalStore`;
here the tier's own contract is pinned, without the memory tier in front of it.
"""

from __future__ import annotations

import hashlib
import os
import struct

import pytest
import torch

from blend.store.base import StoreMiss
from blend.store.disk import LOW_WATER, DiskTier

FP = "d" * 64
ENTRY = 4096 * 4  # payload bytes of one test entry (4096 fp32)


def key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def kv(seed: int) -> torch.Tensor:
    return torch.randn(4096, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tier(tmp_path) -> DiskTier:
    return DiskTier(tmp_path / "kv", 1 << 30, FP)


def entry_size(tier: DiskTier, k: str) -> int:
    return tier.path(k).stat().st_size


def counter(tier: DiskTier) -> int:
    return struct.unpack("<Q", (tier.root / ".lock").read_bytes()[:8])[0]


def test_round_trip_and_accounting(tier):
    x = kv(0)
    tier.write(key("a"), x)
    assert tier.contains(key("a")) and not tier.contains(key("b"))
    assert torch.equal(tier.read(key("a")), x)
    out = torch.empty_like(x)
    assert tier.read_into(key("a"), out) and torch.equal(out, x)
    assert tier.read(key("b")) is None and tier.read_into(key("b"), out) is False
    assert tier.usage() == counter(tier) == entry_size(tier, key("a")) > ENTRY
    assert oct(tier.path(key("a")).stat().st_mode & 0o777) == "0o600"


def test_remove_and_clear_keep_the_counter_exact(tier):
    for i in range(3):
        tier.write(key(str(i)), kv(i))
    assert tier.remove(key("0")) is True and tier.remove(key("0")) is False
    assert counter(tier) == tier.usage() == 2 * entry_size(tier, key("1"))
    tier.clear()
    assert counter(tier) == tier.usage() == 0 and not tier.contains(key("1"))


def _damage(tier: DiskTier, k: str, how: str) -> None:
    p = tier.path(k)
    data = bytearray(p.read_bytes())
    if how == "truncated":
        data = data[:-100]
    elif how == "payload":
        data[-1] ^= 0xFF
    elif how == "header":
        data[40] ^= 0xFF
    elif how == "magic":
        data[:8] = b"NOTAKV!!"
    p.write_bytes(bytes(data))


@pytest.mark.parametrize("how,reason", [("truncated", "truncated"), ("payload", "checksum"),
                                        ("header", "checksum"), ("magic", "bad_header")])
def test_a_damaged_entry_is_a_miss_with_its_reason(tier, how, reason):
    tier.write(key("a"), kv(0))
    _damage(tier, key("a"), how)
    with pytest.raises(StoreMiss) as e:
        tier.read(key("a"))
    assert e.value.reason == reason
    with pytest.raises(StoreMiss) as e:
        tier.read_into(key("a"), torch.empty(4096))
    assert e.value.reason == reason


def test_entries_of_another_model_or_key_are_misses(tier):
    tier.write(key("a"), kv(0))
    other = DiskTier(tier.root, 1 << 30, "e" * 64)
    with pytest.raises(StoreMiss, match="fingerprint"):
        other.read(key("a"))
    tier.path(key("b")).parent.mkdir(exist_ok=True)
    os.replace(tier.path(key("a")), tier.path(key("b")))  # a file under another key's name
    with pytest.raises(StoreMiss, match="wrong_key"):
        tier.read(key("b"))


def test_a_buffer_of_another_shape_is_a_miss(tier):
    tier.write(key("a"), kv(0))
    with pytest.raises(StoreMiss, match="shape_mismatch"):
        tier.read_into(key("a"), torch.empty(4095))


def test_a_deleted_directory_is_a_miss_then_recreated(tier):
    import shutil

    tier.write(key("a"), kv(0))
    shutil.rmtree(tier.root)
    with pytest.raises(StoreMiss, match="dir_missing"):
        tier.read(key("a"))
    tier.write(key("b"), kv(1))  # the writer recreates it
    assert torch.equal(tier.read(key("b")), kv(1))


def test_an_entry_larger_than_the_tier_is_refused(tmp_path):
    tier = DiskTier(tmp_path, ENTRY, FP)  # the header does not fit on top
    with pytest.raises(StoreMiss, match="too_large"):
        tier.write(key("a"), kv(0))
    assert tier.usage() == 0 and list((tmp_path / "tmp").iterdir()) == []


def test_eviction_keeps_usage_within_capacity_and_drops_the_least_recently_read(tmp_path):
    probe = DiskTier(tmp_path / "probe", 1 << 30, FP)
    probe.write(key("x"), kv(0))
    size = entry_size(probe, key("x"))
    tier = DiskTier(tmp_path / "kv", 4 * size, FP)  # room for four entries
    for i in range(4):
        tier.write(key(str(i)), kv(i))
        t = 1_000_000 + i  # mtimes one second apart: LRU order does not hang on clock ticks
        os.utime(tier.path(key(str(i))), (t, t))
    assert tier.evictions == 0 and tier.usage() == 4 * size
    tier.read(key("0"))  # a read hit makes entry 0 the most recently used
    tier.write(key("4"), kv(4))
    assert tier.usage() <= LOW_WATER * tier.capacity
    assert tier.usage() == counter(tier)
    kept = [i for i in range(5) if tier.contains(key(str(i)))]
    assert kept == [0, 3, 4]  # 1 and 2, the oldest, went; freed down to the low-water mark
    assert tier.evictions == 2


def test_an_inflated_counter_corrects_itself(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, FP)
    tier.write(key("a"), kv(0))
    with open(tier.root / ".lock", "r+b") as f:  # a writer crashed between reserve and rename
        f.write(struct.pack("<Q", tier.capacity))
    tier.write(key("b"), kv(1))
    assert tier.contains(key("a")) and tier.contains(key("b"))  # nothing real evicted
    assert counter(tier) == tier.usage() == 2 * entry_size(tier, key("a"))


def test_an_eviction_pass_sweeps_dead_writers_temp_files(tmp_path):
    tier = DiskTier(tmp_path, 1 << 20, FP)
    tier.write(key("b"), kv(1))  # creates the counter file
    dead = tier.root / "tmp" / f"{key('z')}.{2 ** 22 + 12345}.abcdef.tmp"  # no such pid
    dead.write_bytes(b"partial")
    mine = tier.root / "tmp" / f"{key('y')}.{os.getpid()}.abcdef.tmp"  # a live writer's
    mine.write_bytes(b"partial")
    with open(tier.root / ".lock", "r+b") as f:  # force a pass
        f.write(struct.pack("<Q", tier.capacity))
    tier.write(key("a"), kv(0))
    assert not dead.exists() and mine.exists()
