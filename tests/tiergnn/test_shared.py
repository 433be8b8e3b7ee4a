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
