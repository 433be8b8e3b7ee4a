"""`tierserve sim run | capacity` from the command line, on small traces."""

import json

import pytest

from tierserve.cli import main


def test_sim_run_replays_a_trace_per_policy(tmp_path, capsys):
    out = tmp_path / "run.json"
    assert main(["sim", "run", "--trace", "sharegpt4", "--num-requests", "40", "--rate", "2",
                 "--policies", "sarathi,fcfs-prefill-first", "--no-progress",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sarathi: 40 finished" in text and "fcfs-prefill-first: 40 finished" in text
    results = json.loads(out.read_text())["results"]
    for row in results.values():
        assert row["num_finished"] == 40 and row["tbt_p99_s"] > 0 and row["simulated_s"] > 0
    # Whole prompts in one step stall decodes: the baseline's tail TBT is worse.
    assert results["fcfs-prefill-first"]["tbt_p99_s"] > results["sarathi"]["tbt_p99_s"]


def test_sim_capacity_searches_and_plots(tmp_path, capsys):
    out, plot = tmp_path / "capacity.json", tmp_path / "capacity.png"
    assert main(["sim", "capacity", "--trace", "sharegpt4", "--num-requests", "64",
                 "--tbt-slo", "0.1", "--min-rate", "0.05", "--max-rate", "8", "--iterations",
                 "3", "--no-progress", "--json", str(out), "--plot", str(plot)]) == 0
    result = json.loads(out.read_text())["results"]["sarathi"]
    assert 0.05 <= result["capacity_rps"] < 8
    assert [p["met"] for p in result["probes"]][:2] == [True, False]
    assert plot.stat().st_size > 10_000
    assert "capacity" in capsys.readouterr().out


def test_sim_conversations_reuse_the_previous_turns_kv(tmp_path):
    out = tmp_path / "conversations.json"
    assert main(["sim", "run", "--trace", "conversations", "--num-requests", "20", "--rate",
                 "1", "--model", "llama-3-8b", "--hardware", "a10", "--no-progress",
                 "--json", str(out)]) == 0
    row = json.loads(out.read_text())["results"]["sarathi"]
    assert row["num_finished"] > 20  # follow-up turns were sent
    # Each later turn's prompt starts with the whole previous turn: its blocks hit the cache.
    assert row["prefix_cache_hit_rate"] > 0.3


@pytest.mark.parametrize("argv, message", [
    (["--cost", "magic"], "profile:FOLDER"),
    (["--model", "yi-34b", "--hardware", "a10"], "--tp"),
    (["--trace", "nope"], "unknown trace"),
])
def test_sim_errors_name_the_fix(argv, message, capsys):
    assert main(["sim", "run", "--num-requests", "2", "--no-progress", *argv]) != 0
    assert message in capsys.readouterr().err
