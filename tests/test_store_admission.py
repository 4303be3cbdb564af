"""Save admission: the doorkeeper admits on second sight, forgets under its bound."""

from __future__ import annotations

import hashlib
import threading
import tracemalloc

import pytest

from blend.store.admission import (
    DEFAULT_REMEMBER,
    AlwaysAdmit,
    SecondSight,
    make_admission,
    remember_for,
)


def key(s: str) -> str:
    return hashlib.sha256(s.encode()).hexdigest()


def test_always_admits_every_sighting():
    a = make_admission("always")
    assert isinstance(a, AlwaysAdmit)
    assert all(a.admit(key("x")) for _ in range(3))
    assert a.stats() == {"admit": "always", "sightings": 3, "admitted": 3}


def test_default_is_always():
    assert isinstance(make_admission(), AlwaysAdmit)


def test_second_sight_admits_from_the_second_sighting_on():
    a = make_admission("second_sight")
    assert isinstance(a, SecondSight) and a.remember == DEFAULT_REMEMBER
    assert [a.admit(key("x")) for _ in range(3)] == [False, True, True]
    assert a.admit(key("y")) is False  # keys are independent
    assert a.admit(key("y")) is True
    s = a.stats()
    assert (s["sightings"], s["admitted"], s["remembered"], s["forgotten"]) == (5, 3, 2, 0)


def test_forgets_the_least_recently_seen_key_under_its_bound():
    a = SecondSight(remember=2)
    assert not a.admit("a") and not a.admit("b")
    assert not a.admit("c")  # a is forgotten
    assert len(a) == 2 and a.forgotten == 1
    assert not a.admit("a")  # first sight again; b is forgotten now
    assert a.admit("c")


def test_a_recurring_key_is_refreshed_and_outlives_older_ones():
    a = SecondSight(remember=2)
    a.admit("a")
    a.admit("b")
    assert a.admit("a")  # refreshed: b is now the least recent
    a.admit("c")
    assert a.admit("a")
    assert not a.admit("b")


def test_memory_stays_bounded():
    a = SecondSight(remember=100)
    for i in range(1000):
        a.admit(key(str(i)))
    assert len(a) == 100 and a.forgotten == 900


def test_default_bound_costs_under_10_mb():
    keys = [key(str(i)) for i in range(DEFAULT_REMEMBER + 100)]
    tracemalloc.start()
    try:
        a = SecondSight()
        for k in keys:
            a.admit(k)
        size = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert len(a) == DEFAULT_REMEMBER
    assert size < 10 * 2**20, f"{size / 2**20:.1f} MiB"


def test_concurrent_sightings_admit_exactly_all_but_the_first():
    a = SecondSight(remember=10_000)
    keys = [key(str(i)) for i in range(200)]

    def work() -> None:
        for k in keys:
            a.admit(k)
    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    s = a.stats()
    assert s["sightings"] == 800 and s["admitted"] == 600 and s["remembered"] == 200


@pytest.mark.parametrize("value", ["bogus", "Always", "", None, 2])
def test_unknown_admit_value_names_the_key_and_the_allowed_values(value):
    with pytest.raises(ValueError, match="admit") as e:
        make_admission(value)
    assert "always, second_sight" in str(e.value)


@pytest.mark.parametrize("remember", [0, -1, 1.5, True, "100"])
def test_bad_bound_is_rejected(remember):
    with pytest.raises(ValueError, match="admit_remember"):
        make_admission("second_sight", remember)


def test_remember_for_scales_with_the_tier_and_is_clamped():
    mib64 = 64 << 20
    assert remember_for(400 * mib64, mib64) == 800
    assert remember_for(400 * mib64, mib64, times=1) == 400
    assert remember_for(mib64, mib64) == 16
    assert remember_for(1 << 50, mib64) == DEFAULT_REMEMBER
    assert remember_for(400 * mib64, 0) == DEFAULT_REMEMBER
