import pytest

from tierserve.kv.block_pool import BlockPool, BlockPoolExhausted


def test_allocate_takes_blocks_and_release_returns_them():
    pool = BlockPool(4)
    blocks = pool.allocate(3)
    assert len(set(blocks)) == 3 and pool.num_free == 1
    pool.release(blocks)
    assert pool.num_free == 4
    pool.check_invariants()


def test_allocating_more_than_free_raises():
    pool = BlockPool(2)
    pool.allocate(2)
    with pytest.raises(BlockPoolExhausted):
        pool.allocate(1)


def test_released_blocks_are_evicted_least_recently_freed_first():
    evicted = []
    pool = BlockPool(3, on_evict=evicted.append)
    a, b, c = pool.allocate(3)
    evicted.clear()
    pool.release([b])
    pool.release([a])
    pool.release([c])
    assert pool.allocate(3) == [b, a, c]
    assert evicted == [b, a, c]


def test_touch_shares_a_block_and_takes_it_off_the_free_queue():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.release([a])
    pool.touch(a)
    pool.touch(a)
    assert pool.ref_counts[a] == 2 and pool.num_free == 1
    pool.release([a])
    assert not pool.is_free(a)
    pool.release([a])
    assert pool.is_free(a)
    pool.check_invariants()


def test_double_release_is_caught():
    pool = BlockPool(2)
    (a,) = pool.allocate(1)
    pool.release([a])
    with pytest.raises(AssertionError):
        pool.release([a])
