"""The benchmarks: arrivals, workloads, datasets, and each subcommand's JSON on a tiny model."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from tierserve.bench.cli import add_bench_parser, cmd_swap, main
from tierserve.bench.report import format_table
from tierserve.bench.stats import cdf_points, cumulative_service, poisson_arrivals
from tierserve.bench.workloads import (
    WORKLOADS,
    BenchRequest,
    TokenSpace,
    WorkloadSpec,
    load_dataset,
    make_workload,
)
from tierserve.metrics import RequestTimeline

TOKENS = TokenSpace(49152, frozenset(range(17)))


# -- arrivals and statistics -------------------------------------------------------------------
def test_poisson_inter_arrival_mean_is_one_over_rate():
    arrivals = poisson_arrivals(4.0, np.random.default_rng(0), num_requests=20_000)
    gaps = np.diff([0.0, *arrivals])
    assert len(arrivals) == 20_000
    assert gaps.mean() == pytest.approx(0.25, rel=0.03)
    assert gaps.std() == pytest.approx(0.25, rel=0.05)  # exponential: std == mean


def test_poisson_arrivals_stop_at_the_duration():
    arrivals = poisson_arrivals(10.0, np.random.default_rng(1), duration=50.0)
    assert arrivals == sorted(arrivals) and arrivals[-1] <= 50.0
    assert len(arrivals) == pytest.approx(500, rel=0.15)


def test_poisson_arrivals_need_a_stopping_rule():
    with pytest.raises(ValueError, match="--duration or --num-requests"):
        poisson_arrivals(1.0, np.random.default_rng(0))


def test_cdf_points_end_at_one():
    xs, ys = cdf_points([3.0, 1.0, 2.0])
    assert xs == [1.0, 2.0, 3.0] and ys == pytest.approx([1 / 3, 2 / 3, 1.0])


def test_cumulative_service_counts_prompt_then_each_output_token():
    timeline = RequestTimeline("r0", "alice", arrival_time=10.0, num_prompt_tokens=5,
                               first_token_time=11.0, token_times=[11.0, 11.5, 12.0],
                               num_output_tokens=3)
    times, totals = cumulative_service([timeline], start=10.0)["alice"]
    assert times == [1.0, 1.0, 1.5, 2.0] and totals == [5, 6, 7, 8]


def test_format_table_has_a_row_per_configuration():
    text = format_table({"a": {"x": 1.5, "y": 1200}, "b": {"x": float("nan")}}, ["x", "y"])
    lines = text.splitlines()
    assert len(lines) == 4 and "1,200" in lines[2] and "nan" in lines[3]


# -- workloads ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", list(WORKLOADS))
def test_workloads_are_reproducible_for_a_seed(name):
    spec = WorkloadSpec(name=name, num_requests=20, seed=7, scale=0.1)
    first, again = make_workload(spec, TOKENS), make_workload(spec, TOKENS)
    other = make_workload(WorkloadSpec(name=name, num_requests=20, seed=8, scale=0.1), TOKENS)
    assert len(first) == 20
    assert first == again
    assert [r.prompt_token_ids for r in first] != [r.prompt_token_ids for r in other]


def test_sharegpt_like_length_means_match_the_published_means():
    spec = WorkloadSpec(num_requests=4000, seed=0, max_prompt_len=100_000,
                        max_output_len=100_000)
    requests = make_workload(spec, TOKENS)
    assert np.mean([len(r.prompt_token_ids) for r in requests]) == pytest.approx(161.31, rel=0.08)
    assert np.mean([r.max_tokens for r in requests]) == pytest.approx(337.99, rel=0.08)


def test_scale_shrinks_lengths_and_clipping_bounds_them():
    spec = WorkloadSpec(num_requests=2000, seed=0, scale=0.25, max_prompt_len=200,
                        max_output_len=300)
    requests = make_workload(spec, TOKENS)
    prompts = [len(r.prompt_token_ids) for r in requests]
    outputs = [r.max_tokens for r in requests]
    assert min(prompts) >= 4 and max(prompts) <= 200 and max(outputs) <= 300
    assert np.mean(prompts) == pytest.approx(161.31 * 0.25, rel=0.1)


def test_arxiv_like_prompts_are_long_and_outputs_short():
    requests = make_workload(WorkloadSpec(name="arxiv-summarization-like", num_requests=500,
                                          max_prompt_len=100_000), TOKENS)
    assert np.median([len(r.prompt_token_ids) for r in requests]) == pytest.approx(7059, rel=0.1)
    assert np.median([r.max_tokens for r in requests]) == pytest.approx(208, rel=0.1)


def test_long_prompt_fraction_gives_that_share_a_long_prompt():
    spec = WorkloadSpec(num_requests=200, scale=0.25, long_prompt_fraction=0.1,
                        long_prompt_len=(1000, 2000))
    lengths = [len(r.prompt_token_ids) for r in make_workload(spec, TOKENS)]
    long = [n for n in lengths if n >= 1000]
    assert len(long) == 20 and max(long) <= 2000


def test_shared_prefix_requests_share_their_prefix():
    spec = WorkloadSpec(name="shared-prefix", num_requests=8, num_prefixes=2, prefix_len=64,
                        question_len=8)
    requests = make_workload(spec, TOKENS)
    assert requests[0].prompt_token_ids[:64] == requests[2].prompt_token_ids[:64]
    assert requests[0].prompt_token_ids[:64] != requests[1].prompt_token_ids[:64]
    assert requests[0].prompt_token_ids[64:] != requests[2].prompt_token_ids[64:]


def test_many_groups_scatters_long_prefixes():
    spec = WorkloadSpec(name="many-groups", num_requests=64, num_prefixes=8, prefix_len=100,
                        question_len=8, output_len=4)
    requests = make_workload(spec, TOKENS)
    assert requests == make_workload(spec, TOKENS)  # seeded
    by_group = {}
    for position, r in enumerate(requests):
        by_group.setdefault(r.client_id, []).append(position)
    assert len(by_group) == 8 and all(len(p) == 8 for p in by_group.values())
    for positions in by_group.values():
        prompts = [requests[i].prompt_token_ids for i in positions]
        prefix = len(prompts[0]) - 8
        assert 100 <= prefix <= 200 and all(p[:prefix] == prompts[0][:prefix] for p in prompts)
    # shuffled: the first 8 requests are not one group
    assert len({r.client_id for r in requests[:8]}) > 1


def test_nested_builds_a_four_level_tree():
    from tierserve.batch.planner import prefill_optimum

    spec = WorkloadSpec(name="nested", num_requests=192, prefix_len=32, question_len=8,
                        output_len=4)
    requests = make_workload(spec, TOKENS)
    prompts = [r.prompt_token_ids for r in requests]
    assert len(prompts) == 192 and all(len(p) == 32 * 4 + 8 for p in prompts)
    assert len({tuple(p[:32]) for p in prompts}) == 3  # systems
    assert len({tuple(p[:64]) for p in prompts}) == 24  # templates
    assert len({tuple(p[:128]) for p in prompts}) == 96  # documents
    assert prefill_optimum(prompts, 16) == 3 * 32 + 24 * 32 + 96 * 64 + 192 * 8


def test_snippet_like_shares_one_document_with_a_tenth_as_output():
    spec = WorkloadSpec(name="snippet-like", num_requests=10, prefix_len=400, question_len=20)
    requests = make_workload(spec, TOKENS)
    assert all(r.prompt_token_ids[:400] == requests[0].prompt_token_ids[:400] for r in requests)
    assert all(r.max_tokens == 42 for r in requests)


def test_multi_turn_turns_extend_the_previous_context():
    spec = WorkloadSpec(name="multi-turn", num_requests=6, turns=3, question_len=8,
                        output_len=16)
    requests = make_workload(spec, TOKENS)
    first, second, third = requests[0], requests[2], requests[4]  # conversation 0
    assert first.client_id == second.client_id == third.client_id == "conversation-0"
    assert second.prompt_token_ids[: len(first.prompt_token_ids)] == first.prompt_token_ids
    assert third.prompt_token_ids[: len(second.prompt_token_ids)] == second.prompt_token_ids
    assert len(second.prompt_token_ids) == len(first.prompt_token_ids) + 16 + 8


def test_token_space_never_draws_excluded_ids():
    space = TokenSpace(8, frozenset({0, 1, 2, 7}))
    ids = space.draw(np.random.default_rng(0), 2000)
    assert set(ids) == {3, 4, 5, 6}


def test_unknown_workload_names_the_choices():
    with pytest.raises(ValueError, match="sharegpt-like"):
        WorkloadSpec(name="nope")


# -- datasets ----------------------------------------------------------------------------------
def test_dataset_lines_take_text_or_ids_and_optional_max_tokens(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"prompt": "a b c"}\n\n{"prompt_token_ids": [5, 6], "max_tokens": 3}\n')
    requests = load_dataset(path, encode=lambda text: [ord(c) for c in text.split()[0]] * 4,
                            default_max_tokens=9)
    assert requests == [BenchRequest([97, 97, 97, 97], 9), BenchRequest([5, 6], 3)]


def test_dataset_errors_name_the_line(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt_token_ids": [1]}\n{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"bad.jsonl:2: give \"prompt\""):
        load_dataset(path, encode=None, default_max_tokens=4)


# -- each subcommand on the tiny model ---------------------------------------------------------
@pytest.fixture
def one_torch_thread():
    """Run the smoke benchmarks on one torch thread, then restore the count. On a shared 2-core
    machine two OpenMP threads wait for each other at every op: 1.5 s became 15-33 s."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def _run_cli(tmp_path, args) -> dict:
    out = tmp_path / "result.json"
    assert main([*args, "--threads", "1", "--json", str(out), "--plot",
                 str(tmp_path / "plot.png"), "--no-progress"]) == 0
    assert (tmp_path / "plot.png").stat().st_size > 0
    document = json.loads(out.read_text())
    assert set(document) >= {"machine", "config", "results"}
    assert document["machine"]["cores"] >= 1 and document["machine"]["dtype"] == "float32"
    return document


def test_online_json_has_each_policy_with_latency_percentiles(tiny_llama_dir, tmp_path,
                                                             one_torch_thread):
    document = _run_cli(tmp_path, [
        "online", "--model", str(tiny_llama_dir), "--scale", "0.1", "--request-rate", "50",
        "--num-requests", "12", "--mix-long", "0.2", "--long-prompt-len", "100,200",
        "--policies", "sarathi,fcfs-prefill-first", "--max-num-batched-tokens", "64"])
    assert list(document["results"]) == ["sarathi", "fcfs-prefill-first"]
    for row in document["results"].values():
        assert set(row) >= {"ttft_p50_s", "ttft_p99_s", "tbt_p50_s", "tbt_p99_s", "e2e_p99_s",
                            "throughput_tokens_per_s", "preemptions"}
        assert row["num_finished"] == 12 and row["ttft_p99_s"] >= row["ttft_p50_s"] > 0
    assert document["config"]["requests"]["num_long_prompts"] == 2


def test_fairness_json_splits_light_and_heavy_clients(tiny_llama_dir, tmp_path, one_torch_thread):
    document = _run_cli(tmp_path, [
        "fairness", "--model", str(tiny_llama_dir), "--scale", "0.1", "--heavy-requests", "8",
        "--light-clients", "2", "--light-rate", "4", "--duration", "1", "--max-num-seqs", "2",
        "--swap-space", "4MiB"])
    assert list(document["results"]) == ["fair", "sarathi"]
    for row in document["results"].values():
        assert set(row) >= {"light_ttft_p99_s", "heavy_ttft_p99_s", "jain_index",
                            "throughput_tokens_per_s", "swap_preemptions"}
        assert 0 < row["jain_index"] <= 1
        assert set(row["service_in_window"]) == {"heavy", "light-0", "light-1"}


def test_swap_preempts_and_outputs_match_with_and_without_block_groups(tiny_llama_dir, tmp_path,
                                                                       one_torch_thread):
    document = _run_cli(tmp_path, [
        "swap", "--model", str(tiny_llama_dir), "--num-blocks", "24", "--num-requests", "10",
        "--input-len", "40", "--output-len", "60", "--swap-space", "4MiB"])
    assert document["outputs_identical"] is True
    rows = document["results"]
    assert list(rows) == ["block_group_size=8", "block_group_size=0"]
    for row in rows.values():
        assert row["swap_preemptions"] > 0 and row["swap_outs"] > 0
        assert row["copies_per_swap_mean"] >= 1 and row["bytes_per_copy_mean"] > 0


def test_bench_parser_hooks_into_a_main_parser():
    parser = argparse.ArgumentParser(prog="tierserve")
    add_bench_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "swap", "--group-sizes", "4,0", "--model", "m"])
    assert args.func is cmd_swap and args.group_sizes == "4,0" and args.num_blocks == 48
