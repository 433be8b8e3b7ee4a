"""ExpertCache: slot books over the KV BlockPool (pure Python)."""

import random

import pytest

from tierserve.experts.cache import ExpertCache


def test_a_held_slot_is_never_handed_to_another_expert():
    cache = ExpertCache(2)
    a = cache.reserve((0, 0))
    b = cache.reserve((0, 1))
    assert cache.reserve((0, 2)) is None  # both held by their loads
    cache.loaded(a)
    assert cache.acquire((0, 0)) == a  # held by a forward now
    cache.loaded(b)
    c = cache.reserve((0, 2))
    assert c == b and cache.slot_of((0, 1)) is None  # the free one was evicted, not the held one
    assert cache.counters.evictions == 1
    cache.release([a])
    cache.loaded(c)
    cache.check_invariants()


def test_hits_late_and_misses_are_counted_per_layer():
    cache = ExpertCache(4)
    slot = cache.reserve((1, 3), prefetch=True)
    assert cache.acquire((1, 3)) == slot  # asked while loading: late
    cache.loaded(slot)
    cache.release([slot])
    assert cache.acquire((1, 3)) == slot  # ready: a hit
    cache.release([slot])
    assert cache.acquire((1, 2)) is None  # absent: a miss
    layer = cache.counters.layer(1)
    assert (layer.hits, layer.late, layer.misses) == (1, 1, 1)
    assert cache.counters.prefetches == 1 and cache.counters.prefetches_used == 1


def test_a_failed_load_empties_its_slot():
    cache = ExpertCache(1)
    slot = cache.reserve((0, 0))
    cache.loaded(slot, ok=False)
    assert cache.slot_of((0, 0)) is None and cache.num_free == 1
    assert cache.counters.failed_loads == 1
    cache.check_invariants()


def test_eviction_follows_the_policy_score_then_recency():
    worth = {(0, 0): 5.0, (0, 1): 0.0, (0, 2): 1.0}
    cache = ExpertCache(3, score=lambda key: worth.get(key, 0.0))
    for key in worth:
        cache.loaded(cache.reserve(key))
    cache.loaded(cache.reserve((0, 3)))
    assert cache.slot_of((0, 1)) is None  # score 0 goes first
    worth[(0, 3)] = 9.0
    cache.loaded(cache.reserve((0, 4)))
    assert cache.slot_of((0, 2)) is None  # then the lowest score
    assert cache.slot_of((0, 0)) is not None and cache.slot_of((0, 3)) is not None


def test_reserving_a_resident_expert_twice_is_refused():
    cache = ExpertCache(2)
    cache.reserve((0, 0))
    with pytest.raises(AssertionError, match="already in slot"):
        cache.reserve((0, 0))


def test_random_loads_uses_and_failures_leak_no_slot():
    rng = random.Random(0)
    cache = ExpertCache(6, score=lambda key: (key[1] * 7 % 5) / 5)
    loading, held = [], []
    for _ in range(3000):
        action = rng.random()
        key = (rng.randrange(3), rng.randrange(8))
        if action < 0.4 and cache.slot_of(key) is None:
            slot = cache.reserve(key, prefetch=rng.random() < 0.5)
            if slot is not None:
                loading.append(slot)
        elif action < 0.6 and loading:
            cache.loaded(loading.pop(rng.randrange(len(loading))), ok=rng.random() > 0.1)
        elif action < 0.8:
            slot = cache.acquire(key)
            if slot is not None:
                held.append(slot)
        elif held:
            cache.release([held.pop(rng.randrange(len(held)))])
    for slot in loading:
        cache.loaded(slot)
    cache.release(held)
    cache.check_invariants()
    assert cache.num_free == cache.num_slots
