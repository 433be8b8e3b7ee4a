"""The command line end to end: gen, train (one worker, in process), bench (a spawned worker)."""

from __future__ import annotations

import json

from tiergnn.cli import main


def test_gen_train_and_bench_from_the_command_line(tmp_path):
    graph = tmp_path / "g"
    assert main(["gen", str(graph), "--nodes", "3000", "--avg-degree", "8", "--feat-dim", "32",
                 "--classes", "4", "--train-frac", "0.5"]) == 0
    report = tmp_path / "train.json"
    assert main(["train", str(graph), "--batch-size", "256", "--epochs", "2", "--hidden", "32",
                 "--cache-frac", "0.05", "--out", str(report)]) == 0
    trained = json.loads(report.read_text())
    assert len(trained["epochs"]) == 2 and trained["test_accuracy"] > 0.5   # 4 classes
    assert trained["epochs"][1]["mean_loss"] < trained["epochs"][0]["mean_loss"]
    bench = tmp_path / "bench.json"
    assert main(["bench", str(graph), "--systems", "lsm-gnn", "--cache-fracs", "0.1",
                 "--batch-size", "256", "--max-batches", "3", "--warmup-batches", "1",
                 "--out", str(bench)]) == 0
    run = json.loads(bench.read_text())["runs"][0]
    assert run["system"] == "lsm-gnn" and run["batches_per_worker"] == 3
    assert abs(sum(run["hit_ratio"].values()) - 1) < 1e-9
    assert bench.with_suffix(".png").stat().st_size > 10_000
