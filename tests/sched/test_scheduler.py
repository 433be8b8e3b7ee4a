import random

import pytest

from tests.fakes import make_core, run_to_completion
from tierserve.errors import InvalidRequestError
from tierserve.request import BACKGROUND_PRIORITY, RequestStatus, SamplingParams


def _add(core, rid, prompt_len, max_tokens=8, seed=0, **kw):
    rng = random.Random(seed)
    prompt = [rng.randrange(3, 1000) for _ in range(prompt_len)]
    request = core.make_request(rid, prompt, SamplingParams(max_tokens=max_tokens, ignore_eos=True), **kw)
    core.add_request(request)
    return request


def _outputs(core_kwargs, lengths, max_tokens=12, seeds=None):
    core, _ = make_core(**core_kwargs)
    seeds = seeds or range(len(lengths))
    requests = [_add(core, str(i), n, max_tokens, seed=s) for i, (n, s) in enumerate(zip(lengths, seeds))]
    run_to_completion(core)
    core.kv.check_invariants()
    assert core.kv.num_free_blocks == core.kv.num_blocks
    return [r.output_token_ids for r in requests], core


LENGTHS = [1, 3, 17, 40, 9, 64, 5, 30]


def test_token_budget_is_never_exceeded():
    core, executor = make_core(budget=16)
    for i, n in enumerate(LENGTHS):
        _add(core, str(i), n, seed=i)
    run_to_completion(core)
    assert executor.plans
    assert max(plan.num_batched_tokens for plan in executor.plans) <= 16
    assert any(plan.num_batched_tokens == 16 for plan in executor.plans)


def test_long_prompt_is_chunked_across_steps():
    core, executor = make_core(budget=8)
    _add(core, "long", 30)
    core.step()
    (chunk,) = executor.plans[0].chunks
    assert chunk.num_tokens == 8 and not chunk.sample
    run_to_completion(core)
    starts = [c.start_pos for p in executor.plans for c in p.chunks][:4]
    assert starts == [0, 8, 16, 24]


def test_running_decodes_are_served_before_new_prompts():
    core, executor = make_core(budget=16)
    _add(core, "a", 4, max_tokens=20)
    core.step()
    _add(core, "b", 40)
    core.step()
    chunks = executor.plans[-1].chunks
    assert [c.request_id for c in chunks] == ["a", "b"]
    assert chunks[0].num_tokens == 1 and chunks[1].num_tokens == 15


def test_outputs_do_not_depend_on_batching_chunking_or_preemption():
    alone = [_outputs({}, [n], seeds=[i])[0][0] for i, n in enumerate(LENGTHS)]
    batched, _ = _outputs({}, LENGTHS)
    chunked, _ = _outputs({"budget": 5}, LENGTHS)
    preempted, core = _outputs({"num_blocks": 30}, LENGTHS)
    assert core.scheduler.num_preemptions > 0
    assert batched == alone and chunked == alone and preempted == alone


def test_newest_request_is_preempted_first():
    core, executor = make_core(num_blocks=16, block_size=4, budget=64)
    old = _add(core, "old", 20, max_tokens=40, seed=1)
    new = _add(core, "new", 20, max_tokens=40, seed=2)
    while old.num_preemptions == 0 and new.num_preemptions == 0:
        core.step()
    assert new.num_preemptions == 1 and old.num_preemptions == 0
    run_to_completion(core)


@pytest.mark.parametrize("limit", ["memory", "max_num_seqs"])
def test_an_online_request_preempts_background_ones_under_sarathi(limit):
    """Batch API requests run at a large priority value: an online request (0) that arrives
    when they hold the memory or every sequence slot takes their place in its next step."""
    kwargs = ({"num_blocks": 16, "budget": 64} if limit == "memory"
              else {"max_num_seqs": 2, "budget": 64})
    core, executor = make_core(**kwargs)
    background = [_add(core, f"bg{i}", 24, max_tokens=30, seed=i, priority=BACKGROUND_PRIORITY)
                  for i in range(2)]
    for _ in range(3):
        core.step()
    assert all(r.status is RequestStatus.RUNNING for r in background)
    online = _add(core, "online", 20, max_tokens=4, seed=9)
    core.step()
    assert "online" in [c.request_id for c in executor.plans[-1].chunks]
    assert sum(r.num_preemptions for r in background) >= 1
    run_to_completion(core)
    assert online.output_token_ids and all(len(r.output_token_ids) == 30 for r in background)
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_background_prompts_pause_while_an_online_request_waits():
    """A batch request's long prompt would take the whole token budget for several steps: while
    an online request waits it pauses (its decodes would not), so the online one starts in the
    very next step."""
    core, executor = make_core(num_blocks=128, budget=32)
    background = _add(core, "bg", 200, max_tokens=4, seed=1, priority=BACKGROUND_PRIORITY)
    core.step()
    assert background.num_computed_tokens == 32
    _add(core, "online", 12, max_tokens=4, seed=2)
    core.step()
    chunks = {c.request_id: c.num_tokens for c in executor.plans[-1].chunks}
    assert chunks == {"online": 12}
    core.step()  # nobody waits now: the prompt goes on beside the online decode
    chunks = {c.request_id: c.num_tokens for c in executor.plans[-1].chunks}
    assert chunks["online"] == 1 and chunks["bg"] == 31
    run_to_completion(core)
    assert len(background.output_token_ids) == 4


def test_background_prompts_take_their_share_of_the_budget_while_online_requests_run():
    core, executor = make_core(num_blocks=128, budget=32)
    core.config.scheduler.background_token_share = 0.25
    online = _add(core, "online", 12, max_tokens=20, seed=2)
    core.step()  # the online prompt
    background = _add(core, "bg", 200, max_tokens=4, seed=1, priority=BACKGROUND_PRIORITY)
    for _ in range(3):
        core.step()
        chunks = {c.request_id: c.num_tokens for c in executor.plans[-1].chunks}
        assert chunks == {"online": 1, "bg": 8}  # a quarter of 32
    run_to_completion(core)
    assert len(online.output_token_ids) == 20 and len(background.output_token_ids) == 4
    alone = _add(core, "bg2", 100, max_tokens=2, seed=3, priority=BACKGROUND_PRIORITY)
    core.step()  # nobody online: the whole budget
    assert {c.request_id: c.num_tokens for c in executor.plans[-1].chunks} == {"bg2": 32}
    run_to_completion(core)
    assert len(alone.output_token_ids) == 2


def test_one_arrival_swaps_out_only_the_background_requests_it_needs():
    """Swapped-out blocks free after the step: the victims' blocks are counted as they go, so
    one online arrival does not swap the whole batch out."""
    core, executor = make_core(num_blocks=64, budget=256, host_blocks=64, preemption="swap")
    background = [_add(core, f"bg{i}", 20, max_tokens=40, seed=i, priority=BACKGROUND_PRIORITY)
                  for i in range(8)]
    while core.kv.num_free_blocks > 6:
        core.step()
    _add(core, "online", 36, max_tokens=4, seed=9)
    core.step()
    swapped = [r for r in background if r.num_preemptions]
    assert 1 <= len(swapped) <= 3, len(swapped)
    run_to_completion(core)
    assert core.kv.num_free_blocks == core.kv.num_blocks


def test_ordinary_priorities_do_not_preempt_for_waiting_under_sarathi():
    core, executor = make_core(max_num_seqs=2, budget=64)
    first = [_add(core, f"r{i}", 24, max_tokens=30, seed=i, priority=5) for i in range(2)]
    core.step()
    _add(core, "late", 20, max_tokens=4, seed=9)
    core.step()
    assert "late" not in [c.request_id for c in executor.plans[-1].chunks]
    assert all(r.num_preemptions == 0 for r in first)
    run_to_completion(core)


def test_prefix_cache_hit_skips_computed_tokens():
    core, executor = make_core(block_size=4)
    _add(core, "a", 21, seed=5)
    run_to_completion(core)
    b = _add(core, "b", 21, seed=5)
    core.step()
    first = executor.plans[-1].chunks[0]
    assert first.start_pos == 20 and b.num_cached_tokens == 20


def test_cached_and_uncached_outputs_match():
    with_cache, core = _outputs({}, [20, 20, 33], seeds=[1, 1, 1])
    without, _ = _outputs({"prefix_caching": False}, [20, 20, 33], seeds=[1, 1, 1])
    assert core.kv.prefix_cache.hits > 0
    assert with_cache == without


def test_follower_waits_for_leader_prompt_then_shares_its_blocks():
    core, executor = make_core(block_size=4, budget=64)
    _add(core, "r#0", 18, seed=3)
    follower = _add(core, "r#1", 18, seed=3, prefill_leader="r#0")
    core.step()
    assert [c.request_id for c in executor.plans[0].chunks] == ["r#0"]
    core.step()
    assert follower.num_cached_tokens == 16


def test_abort_frees_blocks_at_any_point():
    core, _ = make_core(num_blocks=40, budget=8)
    requests = [_add(core, str(i), n, seed=i) for i, n in enumerate(LENGTHS)]
    core.step()
    core.step()
    core.abort([r.request_id for r in requests[::2]])
    assert all(r.status is RequestStatus.FINISHED_ABORTED for r in requests[::2])
    run_to_completion(core)
    core.kv.check_invariants()
    assert core.kv.num_free_blocks == core.kv.num_blocks


@pytest.mark.parametrize("seed", range(20))
def test_random_arrivals_and_aborts_never_leak_blocks(seed):
    rng = random.Random(seed)
    core, _ = make_core(num_blocks=rng.randint(20, 60), block_size=rng.choice([1, 2, 4, 16]),
                        budget=rng.randint(1, 64), max_num_seqs=rng.randint(1, 16),
                        prefix_caching=rng.random() < 0.7)
    live, next_id = [], 0
    capacity = core.kv.num_blocks * core.kv.block_size
    for _ in range(300):
        action = rng.random()
        if action < 0.25:
            length = rng.randint(1, min(60, capacity - 9))
            prompt = [rng.randrange(3, 50) for _ in range(length)]  # small vocab: shared prefixes
            params = SamplingParams(max_tokens=rng.randint(1, 8))
            core.add_request(core.make_request(str(next_id), prompt, params))
            live.append(str(next_id))
            next_id += 1
        elif action < 0.35 and live:
            core.abort([live.pop(rng.randrange(len(live)))])
        else:
            core.step()
        core.kv.check_invariants()
    run_to_completion(core)
    core.kv.check_invariants()
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert not core.scheduler.requests


def test_prompt_longer_than_context_names_the_limit():
    core, _ = make_core(max_model_len=64)
    with pytest.raises(InvalidRequestError, match="prompt has 64 tokens.*64 tokens"):
        core.make_request("x", [5] * 64, SamplingParams())


def test_max_tokens_that_cannot_fit_names_the_room_left():
    core, _ = make_core(max_model_len=64)
    with pytest.raises(InvalidRequestError, match="at most 24") as info:
        core.make_request("x", [5] * 40, SamplingParams(max_tokens=30))
    assert info.value.param == "max_tokens"


def test_request_larger_than_kv_pool_points_at_kv_memory():
    core, _ = make_core(num_blocks=4, block_size=4)
    with pytest.raises(InvalidRequestError, match="--kv-cache-memory"):
        core.make_request("x", [5] * 10, SamplingParams(max_tokens=10))


def test_max_tokens_none_runs_to_the_context_end():
    core, _ = make_core(max_model_len=32)
    request = core.make_request("x", [5] * 20, SamplingParams(max_tokens=None, ignore_eos=True))
    core.add_request(request)
    run_to_completion(core)
    assert request.num_tokens == 32 and request.status is RequestStatus.FINISHED_LENGTH


def test_token_out_of_vocabulary_is_rejected():
    core, _ = make_core()
    with pytest.raises(InvalidRequestError, match="outside the vocabulary"):
        core.make_request("x", [5, 5000], SamplingParams())
