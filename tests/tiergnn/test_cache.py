"""The tiered cache: coherence through every tier, Belady's order, victim-ring prefetch."""

from __future__ import annotations

import pytest
import torch

from tiergnn.cache import TieredCache
from tiergnn.policies import make_policy
from tiergnn.storage import FeatureStorage


def _cache(dataset, policy, cache_rows, victim_rows, static=None, static_weight=0.5):
    storage = FeatureStorage(dataset)
    return TieredCache(storage, cache_rows, victim_rows,
                       make_policy(policy, dataset.meta.num_nodes, static, static_weight))


def _check_maps(cache):
    resident = cache.node_of_slot[cache.node_of_slot >= 0]
    assert torch.equal(cache.slot_of[resident],
                       torch.nonzero(cache.node_of_slot >= 0).flatten())
    in_ring = cache.ring_node[cache.ring_node >= 0]
    assert torch.equal(cache.ring_slot_of[in_ring],
                       torch.nonzero(cache.ring_node >= 0).flatten())
    assert not (cache.slot_of[in_ring] >= 0).any()          # never in both tiers
    assert int((cache.slot_of >= 0).sum()) == len(resident)


@pytest.mark.parametrize("policy", ["none", "lru", "static", "hybrid"])
def test_rows_through_any_tier_equal_the_storage_rows(small_graph, policy):
    full = torch.from_numpy(small_graph.load_features())
    degree = torch.from_numpy(small_graph.degrees()).float()
    cache = _cache(small_graph, policy, cache_rows=150, victim_rows=80, static=degree)
    gen = torch.Generator().manual_seed(0)
    batches = [torch.unique(torch.randint(0, 600, (120,), generator=gen)) for _ in range(40)]
    for step, nodes in enumerate(batches):
        cache.policy.set_future(batches[step + 1:step + 5])
        assert torch.equal(cache.gather(nodes), full[nodes])
        if step + 1 < len(batches):
            cache.prefetch(batches[step + 1])
        _check_maps(cache)
    stats = cache.stats
    assert stats.requested == stats.slab_hits + stats.ring_hits + stats.storage_rows
    if policy != "none":
        assert stats.slab_hits > 0
    if policy in ("lru", "hybrid"):
        assert stats.ring_hits + stats.prefetched > 0       # the ring served lines
    resident = torch.nonzero(cache.node_of_slot >= 0).flatten()
    assert torch.equal(cache.slab[resident], full[cache.node_of_slot[resident]])
    in_ring = torch.nonzero(cache.ring_node >= 0).flatten()
    assert torch.equal(cache.ring[in_ring], full[cache.ring_node[in_ring]])


def _hits(cache, sequence, window):
    hits = []
    for step, node in enumerate(sequence):
        cache.policy.set_future([torch.tensor([n]) for n in sequence[step + 1:step + 1 + window]])
        before = cache.stats.slab_hits
        cache.gather(torch.tensor([node]))
        hits.append(cache.stats.slab_hits > before)
    return hits


def test_hybrid_with_the_whole_future_is_beladys_rule(small_graph):
    # Capacity 2. Hand-computed Belady (evict the farthest next use; bypass a miss used later
    # than everything resident):
    #   A  B  C(bypass: next at 8, A at 3, B at 4)  A  B  D(bypass: never again)  A  B  C
    #   m  m  m                                      h  h  m                       h  h  m
    a, b, c, d = 10, 20, 30, 40
    sequence = [a, b, c, a, b, d, a, b, c]
    cache = _cache(small_graph, "hybrid", cache_rows=2, victim_rows=0, static_weight=0.0)
    assert _hits(cache, sequence, window=len(sequence)) == [
        False, False, False, True, True, False, True, True, False]
    lru = _cache(small_graph, "lru", cache_rows=2, victim_rows=0)
    assert _hits(lru, sequence, window=0) == [False] * 9       # LRU's worst case


def test_static_policy_keeps_the_most_important_nodes(small_graph):
    degree = torch.from_numpy(small_graph.degrees()).float()
    cache = _cache(small_graph, "static", cache_rows=100, victim_rows=0, static=degree)
    resident = cache.contains(torch.arange(len(degree)))
    assert int(resident.sum()) == 100
    assert degree[resident].min() >= degree[~resident].max()       # the top 100 (ties aside)
    before = resident.clone()
    cache.gather(torch.arange(1000, 1200))
    assert torch.equal(cache.contains(torch.arange(len(degree))), before)


def test_evicted_line_comes_back_from_the_ring_not_storage(small_graph):
    full = torch.from_numpy(small_graph.load_features())
    cache = _cache(small_graph, "lru", cache_rows=4, victim_rows=8)
    cache.gather(torch.tensor([1, 2, 3, 4]))
    cache.gather(torch.tensor([5, 6, 7, 8]))                 # 1-4 evicted into the ring
    assert not cache.contains(torch.tensor([1, 2])).any()
    storage_rows = cache.stats.storage_rows
    moved = cache.prefetch(torch.tensor([1, 2, 9]))          # 9 is in no tier: not fetched
    assert moved == 2 and cache.stats.storage_rows == storage_rows
    assert torch.equal(cache.gather(torch.tensor([1, 2])), full[[1, 2]])
    assert cache.stats.slab_hits == 2 and cache.stats.storage_rows == storage_rows
    ring_hits = cache.stats.ring_hits
    cache.gather(torch.tensor([3]))                          # a demand hit in the ring
    assert cache.stats.ring_hits == ring_hits + 1 and cache.stats.storage_rows == storage_rows
    _check_maps(cache)


def test_unknown_policy_names_the_choices(small_graph):
    with pytest.raises(ValueError, match="hybrid"):
        make_policy("mru", 10)


def test_a_ring_line_the_slab_turns_away_stays_in_the_ring(small_graph):
    cache = _cache(small_graph, "lru", cache_rows=2, victim_rows=4)
    cache.gather(torch.tensor([1, 2]))
    cache.gather(torch.tensor([3, 4]))                       # 1 and 2 go to the ring
    cache.gather(torch.tensor([1, 3, 4]))                    # 1: a ring hit, turned away (3, 4
    assert not cache.contains(torch.tensor([1])).any()       # were used this step too)
    storage_rows, ring_hits = cache.stats.storage_rows, cache.stats.ring_hits
    cache.gather(torch.tensor([1]))
    assert cache.stats.ring_hits == ring_hits + 1 and cache.stats.storage_rows == storage_rows
    _check_maps(cache)
