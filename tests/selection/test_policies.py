"""KV-selection policies: what each keeps, checked against brute force per (decode, kv head)."""

from __future__ import annotations

import math

import pytest
import torch

from tierserve.config import SelectionConfig
from tierserve.kernels import cpu_ops
from tierserve.selection.policies import BlockView, bound_scores_torch, make_policy, select_blocks

BLOCK = 16


def _case(seed=0, decodes=3, nkv=2, group=3, hd=8, num_blocks=200, lens=(700, 100, 333)):
    gen = torch.Generator().manual_seed(seed)
    keys = torch.randn(num_blocks, BLOCK, nkv, hd, generator=gen)
    key_max, key_min = keys.amax(1), keys.amin(1)
    lens = torch.tensor(lens[:decodes])
    width = int(-(-lens.max() // BLOCK))
    tables = torch.randperm(num_blocks, generator=gen)[: decodes * width].view(decodes, width)
    q = torch.randn(decodes, nkv * group, hd, generator=gen)
    return q, keys, key_max, key_min, tables, lens


def _pick(name, q, key_max, key_min, tables, lens, **options):
    config = SelectionConfig(kv_selection=name, **options)
    view = BlockView.build(tables, lens, BLOCK, config)
    policy = make_policy(config)
    scores = policy.scores(q, view, key_max.shape[1], key_max, key_min)
    return select_blocks(scores, view), config


def _kept(tables, lens, d, h):
    count = -(-int(lens[d, h]) // BLOCK)
    return tables[d, h, :count].tolist()


def _expected_mpcache(q, key_max, key_min, table, length, h, config):
    """MPCache's two levels for one (decode, kv head), written plainly."""
    a, nkv = config.mpcache_alpha, key_max.shape[1]
    nb = -(-length // BLOCK)
    query = q.view(nkv, -1, q.shape[-1])[h].sum(0)
    blocks = [int(b) for b in table[:nb]]

    def score(upper, lower):
        return float(query @ (a * upper + (1 - a) * lower))

    forced = set(range(config.kv_sink_blocks)) | set(range(nb - config.kv_recent_blocks, nb))
    keep = min(max(math.ceil(config.kv_budget * nb), len(forced)), nb)
    pairs = [list(range(2 * p, min(2 * p + 2, nb))) for p in range(-(-nb // 2))]
    pair_score = {p: score(torch.stack([key_max[blocks[j], h] for j in m]).amax(0),
                           torch.stack([key_min[blocks[j], h] for j in m]).amin(0))
                  for p, m in enumerate(pairs)}
    forced_pairs = {j // 2 for j in forced}
    keep_pairs = max(math.ceil(config.mpcache_level1_keep * len(pairs)), (keep + 1) // 2 + 1)
    keep_pairs = min(max(keep_pairs, len(forced_pairs)), len(pairs))
    others = sorted(set(pair_score) - forced_pairs, key=lambda p: -pair_score[p])
    kept_pairs = forced_pairs | set(others[: keep_pairs - len(forced_pairs)])
    candidates = [j for p in kept_pairs for j in pairs[p] if j not in forced]
    candidates.sort(key=lambda j: -score(key_max[blocks[j], h], key_min[blocks[j], h]))
    chosen = sorted(forced | set(candidates[: keep - len(forced)]))
    return [blocks[j] for j in chosen]


@pytest.mark.parametrize("budget", [0.1, 0.2, 0.5])
def test_mpcache_keeps_the_best_blocks_of_the_best_clusters(budget):
    q, _, key_max, key_min, tables, lens = _case()
    (picked, picked_lens), config = _pick("mpcache", q, key_max, key_min, tables, lens,
                                          kv_budget=budget)
    for d in range(len(lens)):
        for h in range(key_max.shape[1]):
            expected = _expected_mpcache(q[d], key_max, key_min, tables[d], int(lens[d]), h,
                                         config)
            assert _kept(picked, picked_lens, d, h) == expected
            last_rows = int(lens[d]) - (-(-int(lens[d]) // BLOCK) - 1) * BLOCK
            assert int(picked_lens[d, h]) == (len(expected) - 1) * BLOCK + last_rows


def test_quest_score_bounds_every_key_in_the_block():
    q, keys, key_max, key_min, tables, lens = _case(seed=1)
    config = SelectionConfig(kv_selection="quest")
    view = BlockView.build(tables, lens, BLOCK, config)
    scores = make_policy(config).scores(q, view, 2, key_max, key_min)  # (D, nkv, W)
    grouped = q.view(3, 2, 3, -1)
    block_keys = keys[tables]  # (D, W, BLOCK, nkv, hd)
    # the true max over a block of the group's summed logits, per (decode, kv head, block)
    logits = torch.einsum("dhgc,dwrhc->dhwr", grouped, block_keys)
    valid = view.valid[:, None].expand_as(scores)
    assert (scores >= logits.amax(-1) - 1e-4)[valid].all()
    assert (scores[~valid] == float("-inf")).all()  # past a decode's blocks


def test_streaming_keeps_the_sink_and_the_most_recent_blocks():
    q, _, key_max, key_min, tables, lens = _case(seed=2)
    (picked, picked_lens), _ = _pick("streaming", q, key_max, key_min, tables, lens,
                                     kv_budget=0.2, kv_sink_blocks=1)
    for d in range(len(lens)):
        nb = -(-int(lens[d]) // BLOCK)
        keep = max(math.ceil(0.2 * nb), 2)
        expected = [0, *range(nb - keep + 1, nb)]
        assert _kept(picked, picked_lens, d, 0) == [int(tables[d, j]) for j in expected]


@pytest.mark.parametrize("name", ["streaming", "quest", "mpcache"])
def test_a_token_budget_keeps_that_many_tokens_sink_and_recent_included(name):
    q, _, key_max, key_min, tables, lens = _case(seed=3)
    (picked, picked_lens), _ = _pick(name, q, key_max, key_min, tables, lens, kv_budget=64)
    for d in range(len(lens)):
        nb = -(-int(lens[d]) // BLOCK)
        for h in range(2):
            kept = _kept(picked, picked_lens, d, h)
            assert len(kept) == min(4, nb)
            assert kept[0] == int(tables[d, 0]) and kept[-1] == int(tables[d, nb - 1])


def test_a_budget_that_holds_every_block_keeps_everything():
    config = SelectionConfig(kv_selection="mpcache", kv_budget=1.0)
    view = BlockView.build(torch.zeros(2, 10, dtype=torch.long), torch.tensor([150, 3]), BLOCK,
                           config)
    assert view.everything_kept


@pytest.mark.skipif(cpu_ops() is None, reason="native kernels could not be built here")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("cluster", [1, 2])
def test_native_bound_scores_equal_the_torch_reference(dtype, cluster):
    q, _, key_max, key_min, tables, lens = _case(seed=4, lens=(700, 100, 333))
    key_max, key_min = key_max.to(dtype), key_min.to(dtype)
    view = BlockView.build(tables, lens, BLOCK, SelectionConfig(kv_selection="quest"))
    upper, lower = q.view(3, 2, 3, -1).sum(2), q.view(3, 2, 3, -1).amin(2)
    native = cpu_ops().block_bound_scores(upper, lower, key_max, key_min, tables,
                                          view.num_blocks, cluster)
    reference = bound_scores_torch(upper, lower, key_max, key_min, view, cluster)
    finite = torch.isfinite(reference)
    assert torch.equal(finite, torch.isfinite(native))
    assert torch.allclose(native[finite], reference[finite], rtol=1e-5, atol=1e-4)
