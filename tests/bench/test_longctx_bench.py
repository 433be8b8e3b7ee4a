"""bench longctx on the tiny model: one row per policy, selection reads fewer KV bytes."""

from __future__ import annotations

from tierserve import LLM
from tierserve.bench.longctx import measure


def test_selection_reads_less_kv_than_full_at_the_same_context(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_selection="quest", num_blocks=4 * 40,
              enable_prefix_caching=False)
    rows = measure(llm, 600, 4, [("full", 1.0), ("streaming", 0.1), ("mpcache", 0.1)],
                   repeats=1, dense_layers=0)
    assert [row["policy"] for row in rows] == ["full", "streaming", "mpcache"]
    full, streaming, mpcache = rows
    assert streaming["kv_read_mib"] < 0.2 * full["kv_read_mib"]
    # mpcache reads its selected blocks plus the bounds of every block of the scoring layer
    assert streaming["kv_read_mib"] < mpcache["kv_read_mib"] < 0.3 * full["kv_read_mib"]
    assert all(row["step_ms"] > 0 and row["attention_ms"] > 0 for row in rows)
    assert full["selection_ms"] == 0 and mpcache["selection_ms"] > 0
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
