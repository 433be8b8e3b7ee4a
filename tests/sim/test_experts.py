"""Expert offloading in the simulator: the engine's expert books and policies over recorded
routes, loads timed on a simulated link."""

import random

import pytest

from tierserve.config import CacheConfig, EngineConfig, SchedulerConfig
from tierserve.engine.core import EngineCore, EngineLimits
from tierserve.experts.policies import make_expert_policy
from tierserve.experts.routes import (
    PredictedRoute,
    RequestTrace,
    prompt_key,
    read_predictions,
    write_predictions,
    write_traces,
)
from tierserve.sim import repro_expertflow
from tierserve.sim.cost import LinearCostModel
from tierserve.sim.driver import PromptMaker, drive
from tierserve.sim.executor import SimExecutor, VirtualClock
from tierserve.sim.experts import SimExperts, SimLoadQueue, install
from tierserve.sim.hardware import HostCPU, LinkSpec
from tierserve.sim.traces import TraceRequest, poisson_arrivals

LAYERS, EXPERTS, TOP_K = 4, 8, 2
EXPERT_BYTES = 1_000_000
LINK = LinkSpec(bandwidth=1e9, overhead_s=0.0, efficiency=1.0)  # 1 ms per expert
FLOPS_PER_ROW = 1e6
# Reads an expert in 0.25 ms, computes a row in 0.1 ms: up to 10 rows beat a 1 ms load.
FAST_CPU = HostCPU("fast", flops=1e10, memory_bandwidth=4e9, source="test",
                   flops_efficiency=1.0, bandwidth_efficiency=1.0)


def make_traces(num_requests=8, seed=0, prompt_len=6, output_len=10) -> list[RequestTrace]:
    """Each request keeps to a few experts per layer (routing with structure to learn)."""
    rng = random.Random(seed)
    traces = []
    for index in range(num_requests):
        favourites = {layer: rng.sample(range(EXPERTS), 3) for layer in range(LAYERS)}
        positions = prompt_len + output_len - 1
        routes = {layer: [rng.sample(favourites[layer], TOP_K) for _ in range(positions)]
                  for layer in range(LAYERS)}
        prompt = [100 + index, *(rng.randrange(1000, 2000) for _ in range(prompt_len - 1))]
        traces.append(RequestTrace(prompt, [7] * output_len, routes))
    return traces


def predictions_of(traces) -> dict[str, PredictedRoute]:
    """Each request's true shares from its trace: a perfect predictor."""
    return {prompt_key(t.prompt): PredictedRoute({layer: t.shares(layer, EXPERTS)
                                                  for layer in t.routes}) for t in traces}


def run(policy_name, traces, num_slots, step_s=0.004, max_num_seqs=8, policy="sarathi",
        predictions=None, train=None, rate=None, host_cpu=None):
    engine = EngineConfig(
        cache=CacheConfig(block_size=4, enable_prefix_caching=False, swap_space=0),
        scheduler=SchedulerConfig(max_num_batched_tokens=256, max_num_seqs=max_num_seqs,
                                  policy=policy, preemption_mode="recompute"))
    clock = VirtualClock()
    cost = LinearCostModel(fixed_s=step_s)
    executor = SimExecutor(cost, clock, bytes_per_block=1)
    core = EngineCore(engine, executor, EngineLimits(256, 4096, 4096, 1), clock=clock)
    policy_object = make_expert_policy(policy_name, train or traces)
    experts = SimExperts(policy_object, num_slots, traces, EXPERT_BYTES, LINK, LAYERS,
                         predictions, host_cpu=host_cpu, expert_flops_per_row=FLOPS_PER_ROW)
    install(experts, executor)
    requests = [TraceRequest(len(t.prompt), len(t.output), arrival_s=0.0 if rate is None else
                             None, request_id=f"r{i}", prompt_token_ids=list(t.prompt))
                for i, t in enumerate(traces)]
    if rate is not None:
        poisson_arrivals(requests, rate, seed=0)
    result = drive(core, requests, clock, clock.advance, PromptMaker(4096))
    assert result.summary["num_finished"] == len(traces)
    experts.core = core
    return experts, clock.now, executor


def test_loads_queue_on_the_link_and_a_wait_moves_time_to_the_last_needed():
    queue = SimLoadQueue(LINK, EXPERT_BYTES)
    queue.submit("a", [object()])
    queue.submit("b", [object()])
    assert queue.poll() == []
    queue.wait(["a"])
    assert queue.now == pytest.approx(0.001)
    assert [d.key for d in queue.poll()] == ["a"]
    queue.wait(["b"])
    assert queue.now == pytest.approx(0.002)  # b waited for a on the link
    assert queue.bytes_moved == 2 * EXPERT_BYTES


def test_every_expert_resident_stalls_only_on_the_first_loads():
    traces = make_traces()
    experts, took, executor = run("lru", traces, num_slots=LAYERS * EXPERTS)
    report = experts.report(sum(len(t.output) for t in traces))
    assert report["loads"] <= LAYERS * EXPERTS  # each expert loaded at most once
    assert report["stall_s"] <= LAYERS * EXPERTS * 0.001 + 1e-9
    assert took == pytest.approx(executor.num_steps * 0.004 + report["stall_s"])


def test_a_small_cache_stalls_and_the_step_time_includes_the_stall():
    traces = make_traces()
    small, took_small, _ = run("lru", traces, num_slots=EXPERTS)
    large, took_large, _ = run("lru", traces, num_slots=LAYERS * EXPERTS)
    output = sum(len(t.output) for t in traces)
    assert small.report(output)["hit_ratio"] < large.report(output)["hit_ratio"]
    assert small.report(output)["stall_s"] > large.report(output)["stall_s"]
    assert took_small > took_large


def test_prediction_beats_lru_and_no_slot_leaks():
    traces = make_traces(seed=3)
    output = sum(len(t.output) for t in traces)
    slots = LAYERS * EXPERTS // 2
    reports = {}
    for name in ("lru", "expertflow", "oracle", "static", "lookahead"):
        experts, took, _ = run(name, traces, slots, predictions=predictions_of(traces))
        reports[name] = experts.report(output) | {"took": took}
        experts.books.check_invariants()  # only pins hold slots once the run is over
        assert experts.books.cache.num_free == slots - experts.books.pinned
    assert reports["oracle"]["hit_ratio"] > reports["lru"]["hit_ratio"]
    assert reports["expertflow"]["hit_ratio"] > reports["lru"]["hit_ratio"]
    assert reports["oracle"]["took"] < reports["lru"]["took"]


def test_regrouping_runs_fewer_distinct_experts_per_step():
    traces = make_traces(num_requests=16, seed=5)
    output = sum(len(t.output) for t in traces)
    predictions = predictions_of(traces)
    plain, _, _ = run("expertflow", traces, 16, max_num_seqs=16, predictions=predictions)
    grouped, _, _ = run("expertflow", traces, 16, max_num_seqs=16, predictions=predictions,
                        policy="expert-grouped")
    assert (grouped.report(output)["distinct_experts_per_step"]
            < plain.report(output)["distinct_experts_per_step"])


def test_cold_experts_run_on_the_host_cpu_when_it_beats_a_load():
    traces = make_traces(seed=3)
    output = sum(len(t.output) for t in traces)
    loading, took_loading, _ = run("static", traces, EXPERTS * 2)
    fiddler, took_fiddler, _ = run("static", traces, EXPERTS * 2, host_cpu=FAST_CPU)
    report = fiddler.report(output)
    assert fiddler.host_rows == 10
    assert fiddler.host_seconds(1) == pytest.approx(0.00025)  # bandwidth-bound
    assert fiddler.host_seconds(10) == pytest.approx(0.001)  # compute-bound
    assert report["host_runs"] > 0 and report["host_rows"] >= report["host_runs"]
    # a host run loads nothing: only the pins and the misses of more than 10 rows load
    assert report["loads"] < loading.report(output)["loads"]
    assert report["gib_loaded"] < loading.report(output)["gib_loaded"]
    assert took_fiddler < took_loading
    fiddler.books.check_invariants()
    assert fiddler.books.cache.num_free == EXPERTS * 2 - fiddler.books.pinned


def test_a_host_cpu_slower_than_the_link_changes_nothing():
    traces = make_traces(seed=3)
    slow = HostCPU("slow", flops=1e9, memory_bandwidth=0.5e9, source="test")
    plain, took_plain, _ = run("lru", traces, EXPERTS * 2)
    with_cpu, took_cpu, _ = run("lru", traces, EXPERTS * 2, host_cpu=slow)
    assert with_cpu.host_rows == 0 and with_cpu.books.stats.host_runs == 0
    assert took_cpu == took_plain


def test_simulated_runs_are_deterministic():
    traces = make_traces(seed=2)
    first, took_first, _ = run("expertflow", traces, 16, predictions=predictions_of(traces))
    second, took_second, _ = run("expertflow", traces, 16, predictions=predictions_of(traces))
    assert took_first == took_second
    assert first.report(1) == second.report(1)


def test_a_prompt_outside_the_trace_is_refused_by_name():
    traces = make_traces(num_requests=2)
    experts = SimExperts(make_expert_policy("lru"), EXPERTS, traces, EXPERT_BYTES, LINK, LAYERS)
    request = type("R", (), {"request_id": "stranger", "prompt_token_ids": [1, 2, 3]})()
    with pytest.raises(ValueError, match="stranger.*not in the router trace"):
        experts.annotate(request)


def test_predictions_round_trip_through_their_file(tmp_path):
    traces = make_traces(num_requests=3)
    predictions = predictions_of(traces)
    path = tmp_path / "pred.jsonl"
    assert write_predictions(path, predictions) == 3
    assert read_predictions(path) == predictions


def test_reproduction_runs_one_small_case(tmp_path):
    traces = make_traces(num_requests=6, seed=1)
    write_traces(tmp_path / "bench.jsonl", traces)
    write_traces(tmp_path / "train.jsonl", make_traces(num_requests=6, seed=9))
    write_predictions(tmp_path / "pred.jsonl", predictions_of(traces))
    inputs = repro_expertflow.ExpertInputs(str(tmp_path / "bench.jsonl"),
                                           str(tmp_path / "train.jsonl"),
                                           str(tmp_path / "pred.jsonl"))
    case = repro_expertflow.ExpertCase(0.25, 4)
    report = repro_expertflow.reproduce_expertflow(inputs, workers=1, progress=False,
                                                   cases=[case])
    rows = report["cases"][case.name]
    assert set(rows) == set(repro_expertflow.POLICIES)
    assert rows["all-resident"]["output_tokens_per_s"] > rows["lru"]["output_tokens_per_s"]
    assert rows["oracle"]["hit_ratio"] >= rows["lru"]["hit_ratio"]
    assert report["model"] == "mixtral-8x7b-as-8e-top2"
    assert case.name in repro_expertflow.markdown_table(report)
    repro_expertflow.plot_expertflow(report, str(tmp_path / "plot.png"))
    assert (tmp_path / "plot.png").stat().st_size > 0


def test_requests_ended_between_steps_are_forgotten():
    """Plans without chunks still end requests (arrivals with idle gaps between them)."""
    traces = make_traces(num_requests=6, seed=4)
    experts, _, _ = run("expertflow", traces, 16, predictions=predictions_of(traces), rate=2.0)
    experts.core.step()  # the last requests' endings come with the next plan, chunks or not
    assert experts.books._known == {}
    assert experts.policy.predicted == {} and experts.policy.observed == {}


def test_a_trace_without_every_prediction_is_refused_up_front():
    traces = make_traces(num_requests=3)
    partial = dict(list(predictions_of(traces).items())[:2])
    with pytest.raises(ValueError, match="1 of the trace's 3 prompts have no predicted route"):
        SimExperts(make_expert_policy("expertflow"), EXPERTS, traces, EXPERT_BYTES, LINK,
                   LAYERS, partial)
