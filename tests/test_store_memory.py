"""Memory tier: LRU as before, SLRU promotion/demotion/eviction order, byte accounting."""

from __future__ import annotations

import random
import threading

import pytest
import torch

from blend.store.gpu_tier import DeviceTier
from blend.store.memory import MemoryTier


def b(n: int, fill: int = 0) -> torch.Tensor:
    """An entry of exactly n bytes."""
    return torch.full((n,), fill, dtype=torch.uint8)


def segments(tier: MemoryTier) -> tuple[list[str], list[str]]:
    """(probation or the whole LRU, protected), least recent first."""
    return list(tier._d), list(tier._p)


def check_accounting(tier: MemoryTier) -> None:
    prob = sum(t.numel() for t in tier._d.values())
    prot = sum(t.numel() for t in tier._p.values())
    assert tier.used == prob + prot <= tier.capacity
    assert tier.protected_used == prot <= max(tier.protected_capacity, 0)
    assert len(tier) == len(tier._d) + len(tier._p)
    assert not set(tier._d) & set(tier._p)


def test_lru_default_refreshes_on_get_and_evicts_least_recent():
    t = MemoryTier(6)
    assert t.policy == "lru"
    for k in "abc":
        assert t.put(k, b(2))
    assert t.get("a") is not None  # order now b, c, a
    assert t.put("d", b(2))
    assert "b" not in t and all(k in t for k in "acd")
    assert segments(t) == (["c", "a", "d"], [])
    assert t.evictions == 1 and t.used == 6


def test_slru_hand_worked_promotion_demotion_and_eviction_order():
    t = MemoryTier(10, policy="slru", protected_fraction=0.5)  # protected holds <= 5 bytes
    assert t.protected_capacity == 5
    for k in "abc":
        t.put(k, b(2))
    assert segments(t) == (["a", "b", "c"], [])
    t.get("a")
    t.get("b")
    assert segments(t) == (["c"], ["a", "b"]) and t.protected_used == 4
    t.get("c")  # protected would hold 6 > 5: its least recent (a) goes back to probation
    assert segments(t) == (["a"], ["b", "c"]) and t.demotions == 1 and t.promotions == 3
    t.put("d", b(2))
    assert segments(t) == (["a", "d"], ["b", "c"])
    t.put("e", b(3))  # 11 > 10: probation's least recent goes first
    assert segments(t) == (["d", "e"], ["b", "c"]) and t.evictions == 1
    t.put("f", b(2))
    t.put("g", b(2))  # a stream of once-seen entries only evicts once-seen entries
    assert segments(t) == (["f", "g"], ["b", "c"]) and t.evictions == 3
    check_accounting(t)


def test_lru_loses_the_hot_entries_that_slru_keeps():
    def run(policy: str) -> set[str]:
        t = MemoryTier(10, policy=policy, protected_fraction=0.5)
        for k in "abc":
            t.put(k, b(2))
        for k in "abc":
            t.get(k)
        for k in "defg":
            t.put(k, b(3 if k == "e" else 2))
        return {k for k in "abc" if k in t}
    assert run("lru") == set()
    assert run("slru") == {"b", "c"}


def test_slru_demotes_to_the_recent_end_of_probation():
    t = MemoryTier(10, policy="slru", protected_fraction=0.5)
    for k in "ab":
        t.put(k, b(2))
        t.get(k)
    t.put("x", b(2))
    t.put("c", b(2))
    t.get("c")  # a is demoted behind x, which is older in probation
    assert segments(t) == (["x", "a"], ["b", "c"])
    t.put("y", b(4))
    assert "x" not in t and "a" in t
    assert segments(t) == (["a", "y"], ["b", "c"])


def test_slru_evicts_protected_when_probation_is_empty():
    t = MemoryTier(10, policy="slru", protected_fraction=0.8)
    t.put("a", b(4))
    t.put("b", b(4))
    t.get("a")
    t.get("b")
    assert segments(t) == ([], ["a", "b"])
    t.put("c", b(4))
    assert segments(t) == (["c"], ["b"]) and t.evictions == 1
    check_accounting(t)


def test_slru_get_in_protected_refreshes_it():
    t = MemoryTier(10, policy="slru", protected_fraction=0.5)
    for k in "ab":
        t.put(k, b(2))
        t.get(k)
    t.get("a")  # protected order b, a
    t.put("c", b(2))
    t.get("c")  # 6 > 5: b, now the least recent, is demoted
    assert segments(t) == (["b"], ["a", "c"])


def test_put_of_a_present_key_replaces_it_in_its_segment():
    t = MemoryTier(10, policy="slru", protected_fraction=0.5)
    t.put("a", b(2))
    t.get("a")
    t.put("b", b(2))
    t.put("a", b(3, fill=7))  # protected stays protected, with the new bytes
    t.put("b", b(1, fill=9))
    assert segments(t) == (["b"], ["a"])
    assert t.used == 4 and t.protected_used == 3
    assert int(t.peek("a")[0]) == 7 and int(t.peek("b")[0]) == 9
    check_accounting(t)


def test_peek_neither_refreshes_nor_promotes():
    t = MemoryTier(10, policy="slru")
    t.put("a", b(2))
    assert t.peek("a") is not None and t.peek("z") is None
    assert segments(t) == (["a"], [])
    lru = MemoryTier(4)
    lru.put("a", b(2))
    lru.put("b", b(2))
    lru.peek("a")
    lru.put("c", b(2))
    assert "a" not in lru


def test_pop_clear_fits_and_too_large():
    t = MemoryTier(10, policy="slru", protected_fraction=0.5)
    t.put("a", b(2))
    t.get("a")
    t.put("b", b(3))
    assert t.pop("a") and t.pop("b") and not t.pop("a")
    assert t.used == 0 and t.protected_used == 0 and len(t) == 0
    assert not t.put("huge", b(11)) and t.fits(10) and not t.fits(11)
    t.put("c", b(2))
    t.get("c")
    t.clear()
    assert t.used == 0 and t.protected_used == 0 and len(t) == 0 and "c" not in t


@pytest.mark.parametrize("policy", ["lru", "slru"])
def test_byte_accounting_never_exceeds_capacity(policy):
    rng = random.Random(0)
    t = MemoryTier(1000, policy=policy, protected_fraction=0.7)
    for _ in range(3000):
        k = f"k{rng.randrange(60)}"
        op = rng.random()
        if op < 0.5:
            t.put(k, b(rng.randrange(1, 300)))
        elif op < 0.9:
            t.get(k)
        else:
            t.pop(k)
        check_accounting(t)
    assert t.evictions > 0 and (policy == "lru" or t.demotions > 0)


@pytest.mark.parametrize("policy", ["lru", "slru"])
def test_concurrent_use_keeps_the_accounting(policy):
    t = MemoryTier(2000, policy=policy, protected_fraction=0.6)

    def work(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(2000):
            k = f"k{rng.randrange(40)}"
            r = rng.random()
            if r < 0.45:
                t.put(k, b(rng.randrange(1, 200)))
            elif r < 0.9:
                t.get(k)
                _ = k in t
            else:
                t.pop(k)
    threads = [threading.Thread(target=work, args=(s,)) for s in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    check_accounting(t)


@pytest.mark.parametrize("kw, name", [({"policy": "lfu"}, "policy"),
                                      ({"policy": "LRU"}, "policy"),
                                      ({"policy": "slru", "protected_fraction": 0.0},
                                       "protected_fraction"),
                                      ({"policy": "slru", "protected_fraction": 1.0},
                                       "protected_fraction")])
def test_bad_config_names_the_key(kw, name):
    with pytest.raises(ValueError, match=name) as e:
        MemoryTier(10, **kw)
    if name == "policy":
        assert "lru, slru" in str(e.value)


def test_device_tier_is_still_an_lru():
    t = DeviceTier(4)
    t.put("a", b(2))
    t.put("b", b(2))
    t.get("a")
    t.put("c", b(2))
    assert "b" not in t and "a" in t and t.policy == "lru"
