"""The paper reproductions run end to end at small size and keep the papers' setups."""

from tierserve.sim import repro_fastswitch, repro_sarathi
from tierserve.sim.priorities import PriorityPattern
from tierserve.sim.traces import LENGTH_TRACES


def test_sarathi_cases_are_the_papers_deployments():
    cases = repro_sarathi.sarathi_cases()
    assert {(c.model, c.tensor_parallel, c.tbt_slo_s, c.token_budget) for c in cases} == {
        ("mistral-7b", 1, 0.1, 512), ("mistral-7b", 1, 0.5, 2048),
        ("yi-34b", 2, 0.2, 512), ("yi-34b", 2, 1.0, 2048)}
    assert {c.trace for c in cases} == {"sharegpt4", "arxiv"}


def test_sarathi_case_beats_the_prefill_first_baseline_under_a_strict_slo():
    case = repro_sarathi.sarathi_cases()[0]  # Mistral-7B, sharegpt4, strict
    ours = repro_sarathi.run_case((case, "sarathi", 96, 0, 3))
    base = repro_sarathi.run_case((case, repro_sarathi.BASELINE, 96, 0, 3))
    assert base["token_budget"] == LENGTH_TRACES["sharegpt4"].max_total
    assert ours["capacity_rps"] > (base["capacity_rps"] or 0)
    report = {"cases": {case.name: {"sarathi": ours, repro_sarathi.BASELINE: base,
                                    "ratio": None}}}
    assert case.name in repro_sarathi.markdown_table(report)


def test_fastswitch_case_runs_both_systems_under_changing_priorities():
    case = repro_fastswitch.fastswitch_cases()[0]  # LLaMA-3-8B on A10, random
    ours = repro_fastswitch.run_case((case, "fastswitch", 12, 0))["row"]
    base = repro_fastswitch.run_case((case, "baseline", 12, 0))["row"]
    assert ours["num_finished"] == base["num_finished"] > 12
    assert ours["priority_updates"] > 10
    assert ours["swap_bytes"] > 0 == base["swap_bytes"]  # swap vs recompute
    assert ours["prefix_cache_hit_rate"] > 0 == base["prefix_cache_hit_rate"]


class _Core:
    def __init__(self, requests):
        self.scheduler = type("S", (), {"requests": requests})()


def test_priority_patterns_redraw_per_conversation():
    from tierserve.request import Request, SamplingParams

    requests = {f"r{i}": Request(f"r{i}", [5], SamplingParams(), client_id=f"c{i % 3}")
                for i in range(6)}
    core = _Core(requests)
    markov = PriorityPattern("markov", update_fraction=0.5, levels=4, stay=0.0, seed=1)
    seen = []
    for step in range(40):
        markov(step, core)
        levels = {r.client_id: r.priority for r in requests.values()}
        # One level per conversation, shared by its requests.
        assert all(r.priority == levels[r.client_id] for r in requests.values())
        seen.append(levels["c0"])
    assert markov.updates == 20
    assert all(abs(a - b) <= 1 for a, b in zip(seen, seen[1:]))  # a birth-death chain
    assert len(set(seen)) > 1


def test_batchllm_planner_computes_the_optimum_and_lru_does_not_in_a_tight_pool():
    from tierserve.sim import repro_batchllm

    case = repro_batchllm.BatchCase("many-groups", 0.25, num_requests=64)
    ours = repro_batchllm.run_case((case, "planner"))
    base = repro_batchllm.run_case((case, "lru"))
    assert ours["prefill_tokens"] == ours["prefill_optimum"] < base["prefill_tokens"]
    assert ours["output_tokens_per_s"] > base["output_tokens_per_s"]
    assert ours["kv_capacity_tokens"] == base["kv_capacity_tokens"]


def test_fastswitch_matched_load_runs_at_a_share_of_the_baselines_service_rate():
    import dataclasses

    cases = repro_fastswitch.fastswitch_cases()[:1]
    first = repro_fastswitch._run_pairs(cases, 12, 0, 1, False)
    base = first[cases[0].name]["baseline"]
    rate = round(repro_fastswitch.MATCHED_SHARE * base["num_finished"] / base["simulated_s"], 2)
    matched = dataclasses.replace(cases[0], rate=rate)
    assert f"{rate:g} req/s" in matched.name
    again = repro_fastswitch._run_pairs([matched], 12, 0, 1, False)[matched.name]
    assert again["baseline"]["num_finished"] == base["num_finished"]
    # a slower arrival process spreads the same conversations over a longer time
    assert again["baseline"]["simulated_s"] > base["simulated_s"]
