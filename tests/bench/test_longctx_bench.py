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


def test_static_eviction_rows_hold_and_read_their_share(tiny_llama_dir):
    llm = LLM(str(tiny_llama_dir), kv_selection="quest", num_blocks=4 * 40,
              enable_prefix_caching=False)
    evictions = {}
    rows = measure(llm, 600, 4, [("full", 1.0), ("snapkv", 0.25), ("mpcache-static", 0.25)],
                   repeats=1, dense_layers=0, evictions=evictions)
    full, snapkv, mpstatic = rows
    block = llm.engine.runner.kv_cache[0].numel() * llm.engine.runner.kv_cache.element_size()
    assert full["kv_held_mib"] * 2**20 == 4 * 38 * block  # ceil(601 / 16) blocks each
    for row in (snapkv, mpstatic):
        assert row["kv_held_mib"] * 2**20 == 4 * 10 * block  # ceil(151 / 16)
        assert row["kv_read_mib"] < 0.3 * full["kv_read_mib"]
        assert row["eviction_ms"] > 0 and row["selection_ms"] == 0
    assert "eviction_ms" not in full
    assert set(evictions) == {(600, "snapkv", 0.25), (600, "mpcache-static", 0.25)}
    # measured once: a second batch size reuses it
    again = measure(llm, 600, 1, [("snapkv", 0.25)], repeats=1, evictions=evictions)
    assert again[0]["eviction_ms"] == snapkv["eviction_ms"]
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
