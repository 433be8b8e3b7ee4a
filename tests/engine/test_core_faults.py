"""EngineCore under injected faults (fake executor, no torch): a failure pinned on a request fails
it alone, a failed step fails only its own requests, and the KV books always balance."""

from __future__ import annotations

import random

import pytest

from tests.fakes import FaultyExecutor, make_core
from tierserve.request import SamplingParams


def _add(core, count: int = 6, seed: int = 0, max_tokens: int = 12, prefix: str = "r"
         ) -> list[str]:
    rng = random.Random(seed)
    ids = []
    for index in range(count):
        prompt = [rng.randrange(3, 900) for _ in range(rng.randint(3, 30))]
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        for request in core.make_requests(f"{prefix}{index}", prompt, params):
            core.add_request(request)
        ids.append(f"{prefix}{index}")
    return ids


def _run(core, max_steps: int = 5000) -> dict[str, tuple[list[int], str | None, str | None]]:
    """request id -> (tokens, finish reason, error) once everything has finished."""
    tokens: dict[str, list[int]] = {}
    ends: dict[str, tuple[str | None, str | None]] = {}
    for _ in range(max_steps):
        if not core.has_unfinished() and not core.kv.has_inflight:
            break
        for update in core.step():
            tokens.setdefault(update.request_id, []).extend(update.new_token_ids)
            if update.finished:
                ends[update.request_id] = (update.finish_reason, update.error)
    else:
        raise AssertionError("engine did not finish")
    return {rid: (tokens.get(rid, []), *ends[rid]) for rid in ends}


def _assert_books_balance(core) -> None:
    core.kv.check_invariants()
    assert core.kv.num_free_blocks == core.kv.num_blocks
    assert not core.scheduler.requests and not core.kv.owners()


def _reference(**core_args) -> dict:
    core, _ = make_core(**core_args)
    _add(core)
    return _run(core)


@pytest.mark.parametrize("mode", ["fail", "raise_for"])
def test_a_fault_pinned_on_one_request_fails_it_alone(mode):
    expected = _reference(budget=16, max_num_seqs=4)
    core, executor = make_core(budget=16, max_num_seqs=4)
    core.executor = FaultyExecutor(executor, **{mode: {"r2"}})
    _add(core)
    results = _run(core)
    assert results["r2"][1] == "error" and "injected" in results["r2"][2]
    for rid, outcome in expected.items():
        if rid != "r2":
            assert results[rid] == outcome  # same tokens, same finish, no error
    assert core.num_step_failures == 0  # pinned on a request: no step failed as a whole
    _assert_books_balance(core)


def test_a_whole_step_failure_fails_that_steps_requests_only_and_the_loop_goes_on():
    expected = _reference(budget=16, max_num_seqs=2)
    core, executor = make_core(budget=16, max_num_seqs=2)
    core.executor = FaultyExecutor(executor, raise_on_calls={4})
    _add(core)
    results = _run(core)
    in_failed_step = {c.request_id for c in core.executor.plans[3].chunks}
    assert in_failed_step and len(in_failed_step) <= 2
    for rid, (tokens, reason, error) in results.items():
        if rid in in_failed_step:
            assert reason == "error" and "injected forward failure" in error
        else:
            assert (tokens, reason, error) == expected[rid]
    assert core.num_step_failures == 1 and core.consecutive_step_failures == 0
    assert core.fatal_error is None
    _assert_books_balance(core)


def test_consecutive_step_failures_are_counted_and_reset_by_a_good_step():
    core, executor = make_core(budget=16, max_num_seqs=2)
    core.executor = FaultyExecutor(executor, raise_on_calls={1, 2, 3})
    _add(core, count=8)
    failed = [u for _ in range(3) for u in core.step()]
    assert core.consecutive_step_failures == 3 and "injected" in core.last_step_error
    assert failed and {u.finish_reason for u in failed} == {"error"}
    results = _run(core)
    assert core.consecutive_step_failures == 0
    assert len(results) == 8 - len(failed)
    assert {reason for _, reason, _ in results.values()} == {"length"}
    _assert_books_balance(core)


def test_a_scheduler_failure_fails_the_queued_requests_and_later_ones_are_served(monkeypatch):
    core, _ = make_core()
    _add(core, count=3)
    real = core.scheduler.schedule

    def broken():
        monkeypatch.setattr(core.scheduler, "schedule", real)
        raise KeyError("scheduler bug")

    monkeypatch.setattr(core.scheduler, "schedule", broken)
    updates = core.step()
    assert sorted(u.request_id for u in updates) == ["r0", "r1", "r2"]
    assert all(u.finish_reason == "error" and "scheduler bug" in u.error for u in updates)
    _assert_books_balance(core)
    _add(core, count=2, seed=5, prefix="late")
    assert {reason for _, reason, _ in _run(core).values()} == {"length"}


@pytest.mark.parametrize("direction", ["out", "in"])
def test_a_failed_swap_fails_its_request_drops_what_the_copy_registered_and_leaks_nothing(
        direction):
    """A small pool forces preemption by swap; the first swap-out (or swap-in) copy fails. Its
    request fails (a swap-in's step runs again without it: the forward needed that copy),
    nothing the failed copy registered is found by content again, and every request not
    involved finishes as in a fault-free run."""
    args = dict(num_blocks=14, block_size=4, budget=16, host_blocks=64, preemption="swap",
                max_num_seqs=8)
    reference, _ = make_core(**args)
    _add(reference)
    expected = _run(reference)
    assert reference.scheduler.num_swap_preemptions > 0
    core, executor = make_core(**args)
    executor.fail_next_copy = f"{direction}-"
    _add(core)
    results = _run(core)
    (order,) = executor.failed_copies
    failed = {rid for rid, (_, reason, _) in results.items() if reason == "error"}
    assert failed == {order.request_id}  # it alone held what the copy wrote
    assert "between memory tiers" in results[order.request_id][2]
    assert core.num_step_failures == 0  # pinned on the copy: no step failed as a whole
    for rid, outcome in expected.items():
        if rid not in failed:
            assert results[rid] == outcome
    _assert_books_balance(core)
    for store in core.kv.lower:  # swapped blocks went back; the failed ones left no cache entry
        assert store.pool.num_free == store.pool.num_blocks
        for op in order.ops:
            if op.dst_tier is store.tier:
                for run in op.runs:
                    assert not any(store.cache.holds(b)
                                   for b in range(run.dst_start, run.dst_start + run.length))


def test_a_failing_update_counts_as_a_step_failure_and_its_copies_are_still_settled(
        monkeypatch):
    args = dict(num_blocks=14, block_size=4, budget=16, host_blocks=64, preemption="swap",
                max_num_seqs=8)
    core, _ = make_core(**args)
    _add(core)
    real, broken_with_copies = core.scheduler.update, []

    def broken(plan, result):  # the first three updates of steps that also report copies
        if result.swaps_done and len(broken_with_copies) < 3:
            broken_with_copies.append(len(result.swaps_done))
            raise KeyError("update bug")
        return real(plan, result)

    monkeypatch.setattr(core.scheduler, "update", broken)
    while len(broken_with_copies) < 3:
        assert core.has_unfinished(), "the workload ended before three steps with copies"
        core.step()
    assert core.consecutive_step_failures >= 1 and "update bug" in core.last_step_error
    monkeypatch.undo()
    _add(core, count=2, seed=9, prefix="late")
    _run(core)
    assert core.consecutive_step_failures == 0
    _assert_books_balance(core)  # copies reported in the failed steps were settled anyway


def test_a_request_that_can_never_fit_fails_instead_of_stalling_the_loop(monkeypatch):
    core, _ = make_core(num_blocks=16, block_size=4)
    _add(core, count=1)
    monkeypatch.setattr(core.kv, "can_allocate", lambda *a, **k: False)
    updates = core.step()
    assert [u.finish_reason for u in updates] == ["error"]
    assert "does not fit" in updates[0].error
    _assert_books_balance(core)
