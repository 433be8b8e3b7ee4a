"""SimExecutor: the real scheduler decides the same under the simulator as under the fake
executor for the same step times; copies take link time; runs are deterministic."""

import pytest

from tests.fakes import make_core
from tierserve.engine.core import EngineCore
from tierserve.kv.tiers import SwapOrder
from tierserve.kv.tiers_types import CopyRun, SwapOp, Tier
from tierserve.request import SamplingParams
from tierserve.sched.plan import ScheduledChunk, StepPlan
from tierserve.sim.cost import LinearCostModel
from tierserve.sim.driver import PromptMaker, drive
from tierserve.sim.executor import SimExecutor, SimLinks, VirtualClock
from tierserve.sim.hardware import LinkSpec
from tierserve.sim.traces import TraceRequest, poisson_arrivals

COST = LinearCostModel(fixed_s=0.004, per_token_s=0.0002, per_context_s=1e-6)
INSTANT = LinkSpec(bandwidth=1e30, overhead_s=0.0, efficiency=1.0)


class ClockedFake:
    """The fake executor, with the clock advanced by the cost model's price of each plan."""

    def __init__(self, inner, clock):
        self.inner, self.clock = inner, clock

    def execute(self, plan):
        result = self.inner.execute(plan)
        if plan.chunks:
            self.clock.advance(COST.step_seconds(SimExecutor.batch_shape(plan)))
        return result


def _trace(num=40, rate=20.0, seed=3):
    import random

    rng = random.Random(seed)
    trace = [TraceRequest(rng.randint(5, 60), rng.randint(1, 30),
                          client_id=f"client{rng.randint(0, 3)}") for _ in range(num)]
    poisson_arrivals(trace, rate, seed)
    return trace


def _plans(plans):
    return [([(c.request_id, c.start_pos, c.num_tokens, c.sample) for c in plan.chunks],
             plan.preempted_request_ids, [o.key for o in plan.swap_orders]) for plan in plans]


def _run_both(**engine):
    fake_core, fake = make_core(**engine)
    fake_clock = VirtualClock()
    recorder = ClockedFake(fake, fake_clock)
    fake_core = EngineCore(fake_core.config, recorder, fake_core.limits,
                           fake_core.eos_token_ids, clock=fake_clock)
    drive(fake_core, _trace(), fake_clock, fake_clock.advance, PromptMaker(1000, 7))

    sim_core, _ = make_core(**engine)
    clock = VirtualClock()
    sim = SimExecutor(COST, clock, bytes_per_block=1024, links=SimLinks(INSTANT, INSTANT))
    seen = []
    original = sim.execute
    sim.execute = lambda plan: (seen.append(plan), original(plan))[1]
    sim_core = EngineCore(sim_core.config, sim, sim_core.limits, sim_core.eos_token_ids,
                          clock=clock)
    result = drive(sim_core, _trace(), clock, clock.advance, PromptMaker(1000, 7))
    return fake.plans, seen, fake_clock.now, clock.now, result


@pytest.mark.parametrize("engine", [
    {"num_blocks": 48, "budget": 32, "policy": "sarathi", "preemption": "recompute"},
    {"num_blocks": 40, "budget": 24, "policy": "fair", "preemption": "swap", "host_blocks": 64},
    {"num_blocks": 64, "budget": 64, "policy": "fcfs-prefill-first"},
])
def test_scheduler_decides_the_same_under_sim_and_fake(engine):
    fake_plans, sim_plans, fake_end, sim_end, result = _run_both(**engine)
    assert result.summary["num_finished"] == 40
    assert _plans(sim_plans) == _plans(fake_plans)
    assert sim_end == pytest.approx(fake_end)
    if engine.get("host_blocks"):  # the case meant to swap did
        assert any(plan.swap_orders for plan in sim_plans)


def test_simulated_runs_are_deterministic_for_a_seed():
    def once():
        core, _ = make_core(num_blocks=40, budget=24, policy="sarathi")
        clock = VirtualClock()
        core = EngineCore(core.config, SimExecutor(COST, clock, 1024), core.limits,
                          clock=clock)
        return drive(core, _trace(seed=5), clock, clock.advance, PromptMaker(1000, 1)).summary

    first, second = once(), once()
    assert first == second and first["num_finished"] == 40


def _chunk(request_id="r", tokens=1, start=10):
    return ScheduledChunk(request_id, [5] * tokens, start, [0, 1], True, SamplingParams(),
                          [5] * start, [])


def test_swap_out_overlaps_the_forward_and_swap_in_is_waited_for():
    clock = VirtualClock()
    link = LinkSpec(bandwidth=1e9, overhead_s=0.001, efficiency=1.0)
    sim = SimExecutor(LinearCostModel(fixed_s=0.010), clock, bytes_per_block=1_000_000,
                      links=SimLinks(link))
    out = SwapOrder("swap-out-a", "a", [SwapOp(Tier.DEVICE, Tier.HOST, (CopyRun(0, 0, 4),))], "out")
    result = sim.execute(StepPlan(chunks=[_chunk()], swap_orders=[out]))
    # 1 ms + 4 MB / 1 GB/s = 5 ms, inside the 10 ms forward: reported done at its end.
    assert clock.now == pytest.approx(0.010)
    assert [(d.key, d.seconds) for d in result.swaps_done] == [("swap-out-a", pytest.approx(0.005))]
    scattered = [CopyRun(i * 2, i, 1) for i in range(4)]  # 4 runs of one block: 4 overheads
    swap_in = SwapOrder("swap-in-b", "b", [SwapOp(Tier.HOST, Tier.DEVICE, tuple(scattered))],
                        "in", wait=True)
    sim.execute(StepPlan(chunks=[_chunk("b")], swap_orders=[swap_in]))
    # The forward waits 4 x 1 ms + 4 ms for its swap-in, then runs 10 ms.
    assert clock.now == pytest.approx(0.010 + 0.008 + 0.010)


def test_copies_in_one_direction_queue_and_opposite_directions_overlap():
    clock = VirtualClock()
    sim = SimExecutor(LinearCostModel(fixed_s=0.001), clock, bytes_per_block=1_000_000,
                      links=SimLinks(LinkSpec(bandwidth=1e9, overhead_s=0.0, efficiency=1.0)))

    def order(key, src, dst):
        return SwapOrder(key, key, [SwapOp(src, dst, (CopyRun(0, 0, 10),))], "out")

    plan = StepPlan(swap_orders=[order("o1", Tier.DEVICE, Tier.HOST),
                                 order("o2", Tier.DEVICE, Tier.HOST),
                                 order("i1", Tier.HOST, Tier.DEVICE)])
    done = {d.key: d.seconds for d in sim.execute(plan).swaps_done}  # idle: waits for all
    assert done == {"o1": pytest.approx(0.010), "o2": pytest.approx(0.020),
                    "i1": pytest.approx(0.010)}
    assert clock.now == pytest.approx(0.020)


def test_a_plan_with_copies_and_no_links_is_refused():
    sim = SimExecutor(COST, VirtualClock(), 1024)
    order = SwapOrder("swap-out-a", "a", [SwapOp(Tier.DEVICE, Tier.HOST, (CopyRun(0, 0, 1),))],
                      "out")
    with pytest.raises(RuntimeError, match="no links"):
        sim.execute(StepPlan(swap_orders=[order]))


def test_hooks_price_selected_kv_and_expert_loads():
    from tierserve.sim.cost import RooflineCostModel
    from tierserve.sim.hardware import HARDWARE
    from tierserve.sim.model_shape import KNOWN_MODELS

    cost = RooflineCostModel(KNOWN_MODELS["llama-3-8b"], HARDWARE["a100-80gb-sxm"])
    plan = StepPlan(chunks=[_chunk(f"r{i}", 1, 32000) for i in range(64)])
    full = SimExecutor(cost, VirtualClock(), 1024)
    full.execute(plan)
    selected = SimExecutor(cost, VirtualClock(), 1024)
    selected.attended = lambda chunk: (chunk.start_pos - chunk.kv_offset) // 10  # 10% of the KV
    selected.step_hooks.append(lambda plan, shape, seconds: 0.002)  # an expert fetch per step
    selected.execute(plan)
    attention = cost.breakdown(SimExecutor.batch_shape(plan))["attention_decode"]
    saved = 0.9 * attention
    assert selected.clock.now == pytest.approx(full.clock.now - saved + 0.002, rel=0.01)
