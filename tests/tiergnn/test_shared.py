"""The system-wide shared cache with two real processes over gloo."""

from __future__ import annotations

import json

import pytest

from tests.tiergnn import shared_workers
from tiergnn.launch import run_workers


@pytest.fixture(scope="module")
def two_workers(small_graph, tmp_path_factory):
    """One two-process run of every healthy check; the tests read its reports."""
    out = tmp_path_factory.mktemp("two-workers")
    run_workers(shared_workers.all_checks, 2, str(small_graph.root), str(out))
    return out


def test_two_workers_get_the_right_rows_and_cache_each_line_once(two_workers):
    results = [json.loads((two_workers / f"rank{r}.json").read_text()) for r in range(2)]
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


def test_two_worker_training_through_the_shared_cache_equals_in_memory(two_workers):
    for rank in range(2):
        shared = json.loads((two_workers / f"lsm-gnn-rank{rank}.json").read_text())
        memory = json.loads((two_workers / f"memory-rank{rank}.json").read_text())
        assert shared["losses"] == memory["losses"] and len(shared["losses"]) >= 5
        assert shared["accuracy"] == memory["accuracy"] > 0.5
        assert shared["storage_rows"] > 0 and memory["storage_rows"] == 0


def test_owners_see_every_workers_next_batch_across_a_cut_pass(two_workers):
    for rank in range(2):
        assert json.loads((two_workers / f"lookahead{rank}.json").read_text())["failures"] == []
