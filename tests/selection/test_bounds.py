"""Per-block key bounds stay equal to a recomputation from the cached keys through chunked
prefill, decode, swap out and in, prefix-cache hits and static eviction's compaction."""

from __future__ import annotations

import random

import torch

from tierserve import LLM, SamplingParams
from tierserve.selection.bounds import update_bounds


def _expected_bounds(kv_cache, block: int, rows: int, block_size: int):
    keys = kv_cache[block, :, 0, :, :rows]  # (layers, nkv, rows, hd)
    return keys.amax(dim=2), keys.amin(dim=2)


def _check_tables(runner, chunks, checked: list[int], evicted: dict[str, int]) -> None:
    block_size = runner.block_size
    for chunk in chunks:
        # the cache slots the request holds after the step
        end = (chunk.start_pos + chunk.num_tokens - chunk.kv_offset
               - evicted.get(chunk.request_id, 0))
        for index, block in enumerate(chunk.block_table[: -(-end // block_size)]):
            rows = min(block_size, end - index * block_size)
            key_max, key_min = _expected_bounds(runner.kv_cache, block, rows, block_size)
            assert torch.equal(runner.kv_cache[block, :, 0, :, block_size], key_max)
            assert torch.equal(runner.kv_cache[block, :, 1, :, block_size], key_min)
            checked[0] += 1


def _checking(llm) -> list[int]:
    """After every step, the bounds of every block each scheduled request has computed."""
    runner, checked = llm.engine.runner, [0, 0]  # blocks checked, evictions seen
    execute = runner.execute

    def checked_execute(plan):
        result = execute(plan)
        _check_tables(runner, plan.chunks, checked, result.evicted)
        checked[1] += sum(1 for count in result.evicted.values() if count)
        return result

    runner.execute = checked_execute
    return checked


def test_update_bounds_takes_only_the_filled_rows():
    cache = torch.randn(4, 16, 2, 8)
    key_max, key_min = torch.zeros(4, 2, 8), torch.zeros(4, 2, 8)
    update_bounds(cache, key_max, key_min, torch.tensor([2, 0]), torch.tensor([5, 16]))
    assert torch.equal(key_max[2], cache[2, :5].amax(0))
    assert torch.equal(key_min[0], cache[0].amin(0))
    assert not key_max[1].any()  # untouched


def test_bounds_follow_chunked_prefill_decode_swaps_and_prefix_hits(tiny_llama_dir, tmp_path):
    rng = random.Random(3)
    shared = [rng.randrange(3, 350) for _ in range(40)]
    prompts = [shared + [rng.randrange(3, 350) for _ in range(n)] for n in (5, 30, 61, 17, 90, 3)]
    llm = LLM(str(tiny_llama_dir), num_blocks=24, preemption_mode="swap", swap_space="64MiB",
              max_num_batched_tokens=24, kv_selection="quest", kv_budget=0.5,
              kv_dense_layers=0, swap_dir=str(tmp_path))
    assert llm.engine.runner.kv_cache.shape[4] == 17  # 16 rows and the bound row
    checked = _checking(llm)
    params = SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True)
    llm.generate(prompts[:1], params, use_tqdm=False)  # the shared prefix is cached
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 30 for o in outputs)
    assert llm.core.scheduler.num_swap_preemptions > 0
    assert llm.core.kv.prefix_cache.hit_rate > 0
    assert checked[0] > 100


def test_bounds_follow_static_eviction_and_swaps(tiny_llama_dir, tmp_path):
    rng = random.Random(4)
    prompts = [[rng.randrange(3, 350) for _ in range(n)] for n in (200, 150, 230, 90)]
    llm = LLM(str(tiny_llama_dir), num_blocks=20, preemption_mode="swap", swap_space="64MiB",
              max_num_batched_tokens=48, kv_selection="mpcache", kv_budget=0.3,
              kv_dense_layers=0, kv_eviction="mpcache", kv_eviction_budget=0.4,
              swap_dir=str(tmp_path))
    checked = _checking(llm)
    params = SamplingParams(temperature=0.0, max_tokens=60, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    assert all(len(o.outputs[0].token_ids) == 60 for o in outputs)
    assert llm.core.scheduler.num_swap_preemptions > 0
    assert checked[1] == 4  # every request compacted its blocks
    assert checked[0] > 100
