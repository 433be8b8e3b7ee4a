"""`tierserve bench faults` on the tiny model: faults of every kind fire, every failure is
explained by one, every request that finished has its fault-free tokens, nothing leaks, and the
command's exit status says so."""

from __future__ import annotations

import json

from tierserve.bench import cli


def test_faults_bench_counts_every_outcome_and_finds_no_leak(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "faults.json"
    code = cli.main(["faults", "--model", str(tiny_llama_dir), "--num-requests", "40",
                     "--num-blocks", "40", "--input-len", "40", "--output-len", "20",
                     "--fault-rate", "0.5", "--step-failure-rate", "0.05",
                     "--copy-failure-rate", "0.5", "--seed", "3", "--no-progress",
                     "--json", str(out), "--plot", str(tmp_path / "faults.png")])
    assert code == 0, capsys.readouterr().out
    row = json.loads(out.read_text())["results"]["faults"]
    for kind in ("logits_processor", "nan_logits", "detokenizer", "forward", "swap_copy"):
        assert row[f"injected_{kind}"] > 0, kind
    assert row["failed_unexplained"] == 0 and row["finished_different"] == 0
    assert row["blocks_leaked"] == 0 and row["serves_after"]
    assert row["finished_identical"] > 0 and row["failed_own_fault"] > 0
    assert (row["failed_own_fault"] + row["failed_with_step"] + row["finished_identical"]
            == row["requests"] == 40)
    assert (tmp_path / "faults.png").stat().st_size > 0
