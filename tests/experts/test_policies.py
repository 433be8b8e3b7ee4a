"""Expert policies and token regrouping: pure bookkeeping."""

import pytest

from tierserve.experts.policies import (
    ExpertFlowPolicy,
    OraclePolicy,
    StaticPolicy,
    make_expert_policy,
)
from tierserve.experts.routes import PredictedRoute, RequestTrace, StepRequest
from tierserve.request import Request, SamplingParams
from tierserve.sched.policies import ExpertGroupedPolicy


def _trace(prompt, per_layer):
    return RequestTrace(prompt, [9, 9], {layer: r for layer, r in per_layer.items()})


def test_static_pins_the_most_chosen_experts_and_leaves_a_layer_free():
    trace = _trace([1, 2], {0: [[0, 1], [0, 2], [0, 1]], 1: [[3, 0], [3, 1], [3, 2]]})
    policy = StaticPolicy([trace])
    policy.bind([0, 1], num_experts=4, top_k=2, num_slots=6)
    assert policy.pinned() == [(0, 0), (1, 3)]  # 6 slots - 4 for one layer's on-demand experts


def test_policies_that_read_a_trace_say_so():
    with pytest.raises(ValueError, match="needs a router trace"):
        make_expert_policy("oracle", None)
    with pytest.raises(ValueError, match="unknown expert policy"):
        make_expert_policy("belady")


def test_oracle_prefetches_exactly_the_next_layers_true_experts():
    trace = _trace([1, 2, 3], {0: [[0, 1], [1, 2], [2, 3], [0, 3]],
                               1: [[0, 1], [0, 1], [1, 2], [2, 3]]})
    policy = OraclePolicy([trace], depth=1)
    policy.bind([0, 1], 4, 2, 8)
    policy.annotate("r", trace)
    # A decode at position 3 (after a 3-token prompt): layer 0 chose {0, 3}, layer 1 {2, 3}.
    assert sorted(policy.begin_step([StepRequest("r", 3, 1)])) == [(0, 0), (0, 3)]
    assert sorted(policy.after_route(0)) == [(1, 2), (1, 3)]
    assert policy.score((1, 2)) > policy.score((0, 1)) == 0.0


def test_expertflow_prefetches_by_predicted_demand_and_scores_nearer_use_higher():
    policy = ExpertFlowPolicy(depth=2)
    policy.bind([0, 1, 2], num_experts=4, top_k=1, num_slots=8)
    policy.annotate("a", PredictedRoute({0: [0.9, 0.1, 0, 0], 1: [0, 0, 1, 0], 2: [0, 0, 0, 1]}))
    keys = policy.begin_step([StepRequest("a", 5, 1)])
    assert keys == [(0, 0), (1, 2)]  # two layers ahead, only likely experts (P >= 0.5)
    assert policy.score((0, 0)) > policy.score((1, 2)) > policy.score((2, 3)) > 0
    assert policy.score((0, 3)) == 0.0
    policy.forget("a")
    assert policy.begin_step([StepRequest("a", 6, 1)]) == []


def _request(rid, route, computed=10):
    request = Request(rid, list(range(computed)), SamplingParams(max_tokens=50))
    request.num_computed_tokens = computed  # decoding: one new token each step
    request.expert_route = tuple(frozenset(layer) for layer in route)
    return request


def test_regrouping_runs_overlapping_decodes_together_and_starves_no_one():
    policy = ExpertGroupedPolicy(group_fraction=0.5, min_group=2, max_skip=2)
    routes = {"a": [{0, 1}], "b": [{0, 1}], "c": [{2, 3}], "d": [{2, 3}]}
    running = [_request(rid, route) for rid, route in routes.items()]
    seen: dict[str, int] = dict.fromkeys(routes, 0)
    for _ in range(12):
        chosen = policy.select_running(running)
        assert len(chosen) == 2
        ids = {r.request_id for r in chosen}
        assert ids in ({"a", "b"}, {"c", "d"})  # never mixed: 2 experts per step, not 4
        for rid in ids:
            seen[rid] += 1
    assert min(seen.values()) >= 4  # everyone runs at least every third step


def test_regrouping_leaves_prompts_and_unpredicted_requests_alone():
    policy = ExpertGroupedPolicy(min_group=1)
    prompt = Request("p", list(range(30)), SamplingParams(max_tokens=5))  # 30 tokens to compute
    unpredicted = [Request(str(i), [1, 2], SamplingParams(max_tokens=5)) for i in range(4)]
    for r in unpredicted:
        r.num_computed_tokens = 2
    assert policy.select_running(unpredicted) == unpredicted
    running = [prompt] + [_request(str(i), [{i}]) for i in range(4)]
    assert prompt in policy.select_running(running)


def test_expertflows_hybrid_pins_a_share_of_the_slots_from_the_trace():
    trace = _trace([1, 2], {0: [[0, 1], [0, 2], [0, 1]], 1: [[3, 0], [3, 1], [3, 2]]})
    policy = make_expert_policy("expertflow", [trace], pin_fraction=0.25)
    policy.bind([0, 1], num_experts=4, top_k=2, num_slots=16)
    assert policy.pinned()[:3] == [(0, 0), (1, 3), (0, 1)] and len(policy.pinned()) == 4
    with pytest.raises(ValueError, match="give --expert-trace"):
        make_expert_policy("expertflow", None, pin_fraction=0.5)
