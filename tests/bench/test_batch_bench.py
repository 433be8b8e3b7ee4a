"""`tierserve bench batch` smoke run on the tiny model: three modes, same tokens, JSON shape."""

from __future__ import annotations

import json

import pytest

from tierserve.bench.cli import main


def test_bench_batch_runs_three_ways_and_the_planner_computes_least(tiny_llama_dir, tmp_path):
    out = tmp_path / "batch.json"
    code = main(["batch", "--model", str(tiny_llama_dir), "--num-blocks", "200",
                 "--num-requests", "24", "--num-prefixes", "4", "--prefix-len", "48",
                 "--question-len", "6", "--output-len", "4", "--no-progress",
                 "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    results = document["results"]
    assert set(results) == {"planner", "lru", "no-cache"} and document["same_tokens"]
    assert all(row["differing_outputs"] == 0 for row in results.values())
    for row in results.values():
        for key in ("wall_s", "prefill_tokens", "output_tokens_per_s", "peak_kv_blocks"):
            assert key in row
    assert results["planner"]["prefill_tokens"] < results["no-cache"]["prefill_tokens"]
    assert results["no-cache"]["prefill_tokens"] == results["no-cache"]["prompt_tokens"]
    assert results["planner"]["prefill_tokens"] <= results["lru"]["prefill_tokens"]


def test_a_tight_pool_costs_lru_its_prefixes_but_not_the_planner(tiny_llama_dir, tmp_path):
    """many-groups with a pool holding a quarter of the distinct prefix KV: the planner reaches
    the optimum (each prefix once), LRU recomputes prefixes it evicted before their siblings came."""
    out = tmp_path / "batch.json"
    code = main(["batch", "--model", str(tiny_llama_dir), "--workload", "many-groups",
                 "--num-requests", "48", "--num-prefixes", "8", "--prefix-len", "64",
                 "--question-len", "6", "--output-len", "3", "--pool-share", "0.25",
                 "--modes", "planner,lru", "--no-progress", "--json", str(out)])
    assert code == 0
    document = json.loads(out.read_text())
    assert document["same_tokens"]
    pool = document["config"]["pool"]
    assert pool["num_blocks"] < 0.3 * pool["distinct_prefix_blocks"] + 2
    planner, lru = document["results"]["planner"], document["results"]["lru"]
    assert planner["prefill_optimum"] == lru["prefill_optimum"]
    assert planner["prefill_tokens"] == planner["prefill_optimum"]
    assert planner["saving_vs_optimum"] == 1.0
    assert lru["saving_vs_optimum"] < 0.9 and lru["prefill_tokens"] > planner["prefill_tokens"]


@pytest.mark.parametrize("dtype, code", [("float32", 1), ("bfloat16", 0)])
def test_differing_outputs_are_counted_and_fail_the_run_only_in_float32(tiny_llama_dir, tmp_path,
                                                                        monkeypatch, dtype, code):
    """float32 is batch-invariant, so a mode whose tokens differ is a bug (exit 1); in bfloat16 a
    near tie may flip with the batch, so the count is reported and the run succeeds."""
    import tierserve.bench.batch as batch_bench

    def open_perturbed(*args, **kwargs):
        llm = open_engine(*args, **kwargs)
        generate = llm.generate

        def perturbed(*a, **k):
            outputs = generate(*a, **k)
            if not k.get("batch_mode"):  # the lru mode: two requests' outputs changed
                for output in outputs[:2]:
                    output.outputs[0].token_ids = [*output.outputs[0].token_ids, 7]
            return outputs

        llm.generate = perturbed
        return llm

    open_engine = batch_bench.open_engine
    monkeypatch.setattr(batch_bench, "open_engine", open_perturbed)
    out = tmp_path / "batch.json"
    assert main(["batch", "--model", str(tiny_llama_dir), "--dtype", dtype, "--num-blocks", "200",
                 "--num-requests", "8", "--num-prefixes", "2", "--prefix-len", "32",
                 "--question-len", "4", "--output-len", "2", "--modes", "planner,lru",
                 "--no-progress", "--json", str(out)]) == code
    results = json.loads(out.read_text())["results"]
    assert results["planner"]["differing_outputs"] == 0
    assert results["lru"]["differing_outputs"] == 2
