"""`tierserve bench batch-api` smoke run on the tiny model: real servers, probes beside a Batch
API batch and beside the same requests sent online, every batch token accounted for."""

from __future__ import annotations

import json

from tierserve.bench.cli import main


def test_bench_batch_api_runs_each_scenario_on_its_own_server(tiny_llama_dir, tmp_path):
    out = tmp_path / "batch_api.json"
    code = main(["batch-api", "--model", str(tiny_llama_dir), "--dtype", "float32",
                 "--scenarios", "online-alone,batch-api,online-flood", "--num-requests", "24",
                 "--num-prefixes", "3", "--prefix-len", "40", "--output-len", "40",
                 "--probes", "3", "--probe-output-len", "6", "--json", str(out)])
    assert code == 0
    results = json.loads(out.read_text())["results"]
    assert set(results) == {"online-alone", "batch-api", "online-flood"}
    for row in results.values():
        assert 0 < row["probe_ttft_p50_s"] <= row["probe_e2e_p50_s"]
    for name in ("batch-api", "online-flood"):
        assert results[name]["batch_output_tokens"] == 24 * 40
        assert results[name]["batch_output_tokens_per_s"] > 0
    assert "batch_wall_s" not in results["online-alone"]
