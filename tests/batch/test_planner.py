"""The BatchLLM planner on synthetic batches (no model)."""

from __future__ import annotations

import random

from tierserve.batch.planner import BatchItem, common_prefix_len, plan_batch


def _shared_batch(num_prefixes=4, per_prefix=5, prefix_len=40, seed=0):
    rng = random.Random(seed)
    prefixes = [[rng.randrange(3, 500) for _ in range(prefix_len)] for _ in range(num_prefixes)]
    items = []
    for p in prefixes:
        for _ in range(per_prefix):
            question = [rng.randrange(3, 500) for _ in range(rng.randint(3, 9))]
            items.append(BatchItem(len(items), p + question, rng.randint(1, 30)))
    rng.shuffle(items)
    return items


def test_every_request_is_planned_exactly_once():
    items = _shared_batch() + [BatchItem(100 + i, [7] * (i + 1), 5) for i in range(5)]
    groups = plan_batch(items, block_size=8)
    planned = sorted(item.index for g in groups for item in g.items)
    assert planned == sorted(item.index for item in items)


def test_requests_sharing_a_prefix_land_in_one_group_with_block_aligned_prefix():
    groups = plan_batch(_shared_batch(prefix_len=40), block_size=8)
    shared = [g for g in groups if len(g.items) > 1]
    assert len(shared) == 4 and all(len(g.items) == 5 for g in shared)
    for group in shared:
        assert group.prefix_len == 40 and group.prefix_len % 8 == 0
        first = group.items[0].prompt_token_ids
        assert all(common_prefix_len(first, i.prompt_token_ids) >= group.prefix_len
                   for i in group.items)
    assert sum(g.saved_tokens for g in groups) == 4 * 4 * 40


def test_unrelated_prompts_form_singleton_groups():
    rng = random.Random(1)
    items = [BatchItem(i, [rng.randrange(3, 500) for _ in range(30)], 8) for i in range(10)]
    groups = plan_batch(items, block_size=8)
    assert len(groups) == 10 and all(g.prefix_len == 0 for g in groups)


def test_a_short_lcp_does_not_shrink_a_long_shared_prefix():
    long_prefix = list(range(3, 67))  # 64 tokens
    items = [BatchItem(i, long_prefix + [500 + i, 9], 4) for i in range(3)]
    items.append(BatchItem(3, long_prefix[:16] + [999] * 30, 4))  # shares only 16
    groups = plan_batch(items, block_size=16)
    big = max(groups, key=lambda g: len(g.items))
    assert len(big.items) == 3 and big.prefix_len == 64


def test_larger_decode_ratio_goes_first():
    items = [BatchItem(0, [1] * 100, 10), BatchItem(1, [2] * 10, 100), BatchItem(2, [3] * 50, 50)]
    order = [g.items[0].index for g in plan_batch(items, block_size=8)]
    assert order == [1, 2, 0]
