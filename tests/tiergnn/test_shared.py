"""The system-wide shared cache with two real processes over gloo."""

from __future__ import annotations

import json

from tests.tiergnn import shared_workers
from tiergnn.launch import run_workers


def test_two_workers_get_the_right_rows_and_cache_each_line_once(small_graph, tmp_path):
    run_workers(shared_workers.gather_and_check, 2, str(small_graph.root), str(tmp_path))
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for result in results:
        assert result["mismatches"] == 0
        assert result["foreign_lines"] == 0          # each line lives with its owner only
        assert result["resident"] > 0 and result["slab_hits"] > 0
        assert result["rows_fetched_remote"] > 0 and result["bytes_sent"] > 0


def test_a_dead_worker_is_a_clear_error_not_wrong_rows(small_graph, tmp_path):
    run_workers(shared_workers.one_worker_dies, 2, str(small_graph.root), str(tmp_path),
                timeout_s=20)
    message = (tmp_path / "error.txt").read_text()
    assert "peer died or timed out" in message and "No rows were returned" in message


def test_two_worker_training_through_the_shared_cache_equals_in_memory(small_graph, tmp_path):
    for system in ("lsm-gnn", "memory"):
        run_workers(shared_workers.train_and_report, 2, str(small_graph.root), system,
                    str(tmp_path))
    for rank in range(2):
        shared = json.loads((tmp_path / f"lsm-gnn-rank{rank}.json").read_text())
        memory = json.loads((tmp_path / f"memory-rank{rank}.json").read_text())
        assert shared["losses"] == memory["losses"] and len(shared["losses"]) >= 5
        assert shared["accuracy"] == memory["accuracy"] > 0.5
        assert shared["storage_rows"] > 0 and memory["storage_rows"] == 0


def test_owners_see_every_workers_next_batch_across_a_cut_pass(small_graph, tmp_path):
    run_workers(shared_workers.lookahead_reaches_owners, 2, str(small_graph.root), str(tmp_path))
    for rank in range(2):
        assert json.loads((tmp_path / f"lookahead{rank}.json").read_text())["failures"] == []
