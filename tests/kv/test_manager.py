from tierserve.kv.manager import KVCacheManager
from tierserve.request import Request, SamplingParams


def _request(rid, tokens):
    return Request(rid, list(tokens), SamplingParams())


def _compute_all(kv, request):
    assert kv.allocate(request, request.num_tokens - request.num_computed_tokens)
    request.num_computed_tokens = request.num_tokens
    kv.commit(request)


def test_shared_prefix_reuses_full_blocks_only():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _request("a", range(10))  # 2 full blocks + 2 tokens
    assert kv.lookup_prefix(first)[0] == 0
    _compute_all(kv, first)
    second = _request("b", list(range(8)) + [99, 98, 97])
    assert kv.lookup_prefix(second)[0] == 8
    assert kv.block_table("b") == kv.block_table("a")[:2]
    kv.check_invariants()


def test_a_lookup_always_leaves_one_token_to_compute():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _request("a", range(8))
    kv.lookup_prefix(first)[0]
    _compute_all(kv, first)
    same = _request("b", range(8))
    assert kv.lookup_prefix(same)[0] == 4  # the last block is recomputed to get logits


def test_no_hit_across_namespaces():
    kv = KVCacheManager(num_blocks=16, block_size=4, namespace="lora-a")
    first = _request("a", range(9))
    kv.lookup_prefix(first)[0]
    _compute_all(kv, first)
    kv.namespace = "lora-b"
    assert kv.lookup_prefix(_request("b", range(9)))[0] == 0


def test_freed_blocks_stay_cached_until_evicted_lru():
    kv = KVCacheManager(num_blocks=4, block_size=4)
    old = _request("old", range(100, 105))  # 1 full block cached
    kv.lookup_prefix(old)[0]
    _compute_all(kv, old)
    kv.free(old)
    new = _request("new", range(200, 205))
    kv.lookup_prefix(new)[0]
    _compute_all(kv, new)
    kv.free(new)
    # Both prefixes are cached; taking 3 of 4 blocks evicts the least recently freed first.
    assert kv.lookup_prefix(_request("probe-old", range(100, 105)))[0] == 4
    kv.free(_request("probe-old", []))
    filler = _request("filler", range(500, 511))
    kv.lookup_prefix(filler)[0]
    assert kv.allocate(filler, 11)  # 3 blocks: evicts "new"'s block before "old"'s
    assert kv.lookup_prefix(_request("probe-new", range(200, 205)))[0] == 0
    assert kv.lookup_prefix(_request("probe-old2", range(100, 105)))[0] == 4
    kv.check_invariants()


def test_hit_rate_counts_blocks():
    kv = KVCacheManager(num_blocks=16, block_size=4)
    first = _request("a", range(13))
    kv.lookup_prefix(first)[0]
    _compute_all(kv, first)
    kv.lookup_prefix(_request("b", range(13)))[0]
    assert kv.prefix_cache.hits == 3
    assert 0 < kv.prefix_cache.hit_rate <= 1


def test_disabled_prefix_caching_never_hits():
    kv = KVCacheManager(num_blocks=16, block_size=4, enable_prefix_caching=False)
    first = _request("a", range(13))
    kv.lookup_prefix(first)[0]
    _compute_all(kv, first)
    assert kv.lookup_prefix(_request("b", range(13)))[0] == 0


def test_allocate_refuses_beyond_free_blocks():
    kv = KVCacheManager(num_blocks=2, block_size=4)
    request = _request("a", range(12))
    kv.lookup_prefix(request)[0]
    assert not kv.allocate(request, 12)
    assert kv.num_blocks_of("a") == 0
    assert kv.allocate(request, 8)
    assert kv.num_free_blocks == 0
