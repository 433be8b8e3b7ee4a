"""The BatchLLM planner on synthetic batches (no model): the prefix tree, its walk, the optimum."""

from __future__ import annotations

import random

from tierserve.batch.planner import (
    BatchItem,
    common_prefix_len,
    plan_batch,
    prefill_optimum,
    shareable_len,
)


def _draw(rng, n):
    return [rng.randrange(3, 500) for _ in range(n)]


def _shared_batch(num_prefixes=4, per_prefix=5, prefix_len=40, seed=0):
    rng = random.Random(seed)
    prefixes = [_draw(rng, prefix_len) for _ in range(num_prefixes)]
    items = []
    for p in prefixes:
        for _ in range(per_prefix):
            items.append(BatchItem(len(items), p + _draw(rng, rng.randint(3, 9)),
                                   rng.randint(1, 30)))
    rng.shuffle(items)
    return items


def _nested_batch(seed=0, systems=2, templates=3, documents=2, questions=3, unit=32):
    rng = random.Random(seed)
    items = []
    for _ in range(systems):
        system = _draw(rng, unit)
        for _ in range(templates):
            template = system + _draw(rng, unit)
            for _ in range(documents):
                document = template + _draw(rng, 2 * unit)
                for _ in range(questions):
                    items.append(BatchItem(len(items), document + _draw(rng, 5), 4))
    rng.shuffle(items)
    return items


def _replay(plan, block_size):
    """Compute the plan in order with an unbounded block cache: the tokens each request really
    computes, checking it only reuses what its leader, already planned, holds."""
    done: dict[int, list[int]] = {}
    computed = 0
    for planned in plan.requests:
        ids = planned.item.prompt_token_ids
        if planned.leader is not None:
            assert planned.leader in done  # the leader comes first
            assert planned.shared_len % block_size == 0
            assert shareable_len(done[planned.leader], ids, block_size) >= planned.shared_len
        computed += len(ids) - planned.shared_len
        done[planned.item.index] = ids
    return computed


def test_every_request_is_planned_exactly_once():
    items = _shared_batch() + [BatchItem(100 + i, [7] * (i + 1), 5) for i in range(5)]
    items += _nested_batch(seed=3)
    for i, item in enumerate(items):
        item.index = i
    plan = plan_batch(items, block_size=8)
    assert sorted(r.item.index for r in plan.requests) == list(range(len(items)))


def test_a_flat_batch_computes_each_prefix_once():
    items = _shared_batch(prefix_len=40)
    plan = plan_batch(items, block_size=8)
    assert plan.num_nodes == 4 and plan.num_groups == 4
    assert plan.saved_tokens == 4 * 4 * 40
    for r in plan.requests:
        assert r.shared_len in (0, 40)
    assert sum(r.leader is None for r in plan.requests) == 4  # one per prefix computes it
    prompts = [i.prompt_token_ids for i in items]
    assert _replay(plan, 8) == plan.computed_tokens == prefill_optimum(prompts, 8)


def test_a_nested_batch_computes_each_tree_node_once():
    items = _nested_batch()
    plan = plan_batch(items, block_size=16)
    # 2 systems, 6 templates, 12 documents: every node of the tree is shared
    assert plan.num_nodes == 2 + 6 + 12 and plan.num_groups == 12
    prompts = [i.prompt_token_ids for i in items]
    optimum = prefill_optimum(prompts, 16)
    assert _replay(plan, 16) == plan.computed_tokens == optimum
    # what a one-level plan would compute (each document once, nothing above it shared)
    one_level = sum(len(p) for p in prompts) - 12 * 2 * 128
    assert optimum == one_level - (12 - 2) * 32 - (12 - 6) * 32
    # the first request of a template subtree reuses its system prompt from another template
    assert {r.shared_len for r in plan.requests} == {0, 32, 64, 128}


def test_the_walk_keeps_each_subtree_contiguous():
    items = _nested_batch(seed=5)
    plan = plan_batch(items, block_size=16)
    order = [r.item.prompt_token_ids for r in plan.requests]
    for depth in (32, 64, 128):  # system, template, document prefixes
        seen, last = set(), None
        for ids in order:
            key = tuple(ids[:depth])
            if key != last:
                assert key not in seen  # a subtree, once left, never comes back
                seen.add(key)
                last = key


def test_the_optimum_counts_distinct_blocks_and_always_the_last_token():
    a = list(range(100, 140))  # 40 tokens
    # identical prompts: blocks before the last token are shared (2 of 8), the rest computed
    assert prefill_optimum([a, a], 8) == 40 + (40 - 32)
    # a prompt that is a prefix of another
    assert prefill_optimum([a[:17], a], 8) == 17 + (40 - 16)
    assert prefill_optimum([], 8) == 0
    assert prefill_optimum([[1], [1]], 8) == 2


def test_unrelated_prompts_share_nothing():
    rng = random.Random(1)
    items = [BatchItem(i, _draw(rng, 30), 8) for i in range(10)]
    plan = plan_batch(items, block_size=8)
    assert plan.num_nodes == 0 and plan.num_groups == 10 and plan.saved_tokens == 0
    assert all(r.leader is None for r in plan.requests)


def test_a_short_lcp_does_not_shrink_a_long_shared_prefix():
    long_prefix = list(range(3, 67))  # 64 tokens
    items = [BatchItem(i, long_prefix + [500 + i, 9], 4) for i in range(3)]
    items.append(BatchItem(3, long_prefix[:16] + [999] * 30, 4))  # shares only 16
    plan = plan_batch(items, block_size=16)
    shared = {r.item.index: r.shared_len for r in plan.requests}
    assert sorted(shared[i] for i in range(3)) == [0, 64, 64] or \
        sorted(shared[i] for i in range(3)) == [16, 64, 64]
    assert shared[3] in (0, 16)
    assert plan.saved_tokens == 2 * 64 + 16


def test_larger_decode_ratio_goes_first():
    items = [BatchItem(0, [1] * 100, 10), BatchItem(1, [2] * 10, 100), BatchItem(2, [3] * 50, 50)]
    assert [r.item.index for r in plan_batch(items, block_size=8).requests] == [1, 2, 0]
    # inside a shared prefix too, without splitting the subtree
    base = [5] * 32
    items = [BatchItem(0, base + [1] * 40, 2), BatchItem(1, base + [2] * 4, 40),
             BatchItem(2, [9] * 20, 1)]
    assert [r.item.index for r in plan_batch(items, block_size=8).requests] == [1, 0, 2]


def test_common_prefix_len():
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert shareable_len([1] * 20, [1] * 20, 8) == 16  # the last token is never shared


def test_output_history_estimates_from_its_own_template_only():
    from tierserve.batch.planner import OutputLengthHistory

    history = OutputLengthHistory()
    assert history.estimate(0, 200) == 200  # nothing seen: the declared budget
    history.observe(0, 10)
    history.observe(0, 30)
    assert history.estimate(0, 200) == 25  # mean 20, plus 25%
    assert history.estimate(0, 12) == 12  # never above what is declared
    assert history.estimate(1, 200) == 200  # another template learns nothing from it
    history.observe(-1, 5)  # a request sharing nothing has no template
    assert history.estimate(-1, 50) == 50
