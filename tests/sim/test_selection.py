"""KV selection in the simulator: static eviction frees blocks through the real scheduler,
dynamic selection narrows what a decode reads, and the counting rules are the engine's."""

import math

import pytest

from tierserve.config import CacheConfig, EngineConfig, SchedulerConfig, SelectionConfig
from tierserve.engine.core import EngineCore, EngineLimits
from tierserve.sched.plan import ScheduledChunk
from tierserve.selection.budget import kept_after_eviction, mpcache_window, selected_blocks
from tierserve.sim import repro_mpcache
from tierserve.sim.cost import LinearCostModel
from tierserve.sim.driver import PromptMaker, drive
from tierserve.sim.executor import SimExecutor, VirtualClock
from tierserve.sim.selection import SimKVSelection
from tierserve.sim.traces import TraceRequest

BLOCK = 16
COST = LinearCostModel(fixed_s=0.002, per_token_s=1e-5, per_context_s=1e-6)


def _chunk(start_pos, num_tokens, prompt_len=512, kv_offset=0):
    return ScheduledChunk("r", [1] * num_tokens, start_pos, [], sample=True,
                          sampling_params=None, prompt_token_ids=[1] * prompt_len,
                          output_token_ids=[], eos_token_ids=(), kv_offset=kv_offset)


def _run(selection: SelectionConfig, num_requests=6, prompt_len=400, output_len=40):
    engine = EngineConfig(
        cache=CacheConfig(block_size=BLOCK, enable_prefix_caching=False, swap_space=0),
        scheduler=SchedulerConfig(max_num_batched_tokens=512, max_num_seqs=16, policy="sarathi",
                                  preemption_mode="recompute"),
        selection=selection)
    clock = VirtualClock()
    executor = SimExecutor(COST, clock, bytes_per_block=1, record_steps=True)
    core = EngineCore(engine, executor, EngineLimits(1024, 4096, 1200, 1), clock=clock)
    model = SimKVSelection(selection, num_layers=8, block_size=BLOCK, cost=COST)
    model.install(executor)
    if executor.evicted is not None:  # record what each prompt's end reported
        report, executor.reports = executor.evicted, []
        executor.evicted = lambda chunk: executor.reports.append(report(chunk)) or \
            executor.reports[-1]
    trace = [TraceRequest(prompt_len, output_len, arrival_s=0.0) for _ in range(num_requests)]
    result = drive(core, trace, clock, clock.advance, PromptMaker(4096))
    assert result.summary["num_finished"] == num_requests
    return core, executor, clock.now


def test_full_attention_reads_the_whole_context():
    model = SimKVSelection(SelectionConfig(), num_layers=8, block_size=BLOCK, cost=COST)
    assert model.attended(_chunk(1000, 1)) == 1000
    assert model.attended(_chunk(300, 64)) == 300  # a prompt chunk is never selected


def test_dynamic_selection_reads_the_budget_in_sparse_layers_plus_scored_bounds():
    config = SelectionConfig(kv_selection="mpcache", kv_budget=0.1, kv_dense_layers=2)
    model = SimKVSelection(config, num_layers=8, block_size=BLOCK, cost=COST)
    context = 1600
    blocks = math.ceil((context + 1) / BLOCK)  # 101
    read = selected_blocks(0.1, blocks, 2, BLOCK) * BLOCK  # 11 blocks
    bounds = 3 * blocks  # 6 sparse layers, pairs share: 3 score
    assert model.attended(_chunk(context, 1)) == round((2 * context + 6 * read + bounds) / 8)
    quest = SimKVSelection(SelectionConfig(kv_selection="quest", kv_budget=0.1), 8, BLOCK, COST)
    assert quest.attended(_chunk(context, 1)) > model.attended(_chunk(context, 1))  # no sharing
    streaming = SimKVSelection(SelectionConfig(kv_selection="streaming", kv_budget=0.1), 8,
                               BLOCK, COST)
    assert streaming.attended(_chunk(context, 1)) < model.attended(_chunk(context, 1))


def test_counting_rules_match_the_engine():
    torch = pytest.importorskip("torch")
    from tierserve.selection.policies import BlockView

    config = SelectionConfig(kv_selection="mpcache", kv_budget=0.1)
    lens = torch.tensor([17, 160, 1601, 40])
    tables = torch.zeros(4, 120, dtype=torch.int64)
    view = BlockView.build(tables, lens, BLOCK, config)
    expected = [selected_blocks(0.1, math.ceil(n / BLOCK), 2, BLOCK) for n in lens.tolist()]
    assert view.keep.tolist() == expected
    from tierserve.selection.eviction import EVICTIONS

    for name in ("mpcache", "snapkv"):  # the forced tokens the simulator counts are the engine's
        eviction_config = SelectionConfig(kv_eviction=name, kv_eviction_budget=0.5)
        engine = EVICTIONS[name](eviction_config, BLOCK)
        model = SimKVSelection(eviction_config, num_layers=8, block_size=BLOCK, cost=COST)
        for length in (5, 20, 40, 401):
            assert model.forced(length) == int(engine.forced(length).sum()), (name, length)
    assert kept_after_eviction(0.5, 401, 32) == 201
    assert kept_after_eviction(0.01, 401, 32) == 32  # sink and last block always stay
    assert mpcache_window(0.2, 1000) == 200 and mpcache_window(0.2, 30000) == 3000


def test_static_eviction_frees_blocks_and_fits_more_requests():
    full_core, _, full_time = _run(SelectionConfig())
    evict_core, executor, evict_time = _run(
        SelectionConfig(kv_eviction="mpcache", kv_eviction_budget=0.25))
    assert full_core.scheduler.num_preemptions > evict_core.scheduler.num_preemptions
    assert evict_time < full_time
    # each prompt's end evicted 75% of it (a recomputed prompt evicts again)
    assert len(executor.reports) >= 6 and set(executor.reports) == {300}


def test_everything_kept_reads_the_context_without_scoring():
    config = SelectionConfig(kv_selection="mpcache", kv_budget=0.5)
    model = SimKVSelection(config, num_layers=8, block_size=BLOCK, cost=COST)
    assert model.attended(_chunk(20, 1)) == 20  # 2 blocks: sink and recent are all of it


def test_a_threshold_eviction_is_refused():
    config = SelectionConfig(kv_eviction="mpcache", kv_eviction_threshold=0.01)
    model = SimKVSelection(config, num_layers=8, block_size=BLOCK, cost=COST)
    with pytest.raises(ValueError, match="--kv-eviction-budget"):
        model.install(SimExecutor(COST, VirtualClock(), bytes_per_block=1))


def test_evicted_count_and_window_cost():
    config = SelectionConfig(kv_eviction="mpcache", kv_eviction_budget=0.25)
    model = SimKVSelection(config, num_layers=8, block_size=BLOCK, cost=COST)
    assert model.evicted(_chunk(0, 400, prompt_len=400)) == 400 - 100
    assert model.window(400) == 80


def test_mpcache_reproduction_runs_small():
    rows = repro_mpcache.private_decode()
    assert [r["context"] for r in rows] == list(repro_mpcache.CONTEXTS)
    assert all(r["communication_ratio"] > 1 for r in rows)
    assert all(r["break_even_latency_ms"] > 0 for r in rows)
    modes = {m.name: m for m in repro_mpcache.SERVING_MODES}
    full = repro_mpcache.run_serving((modes["full KV"], "offline", 12, None, 0))
    both = repro_mpcache.run_serving(
        (modes["mpcache static 50% + dynamic 10%"], "offline", 12, None, 0))
    dynamic = repro_mpcache.run_serving((modes["mpcache dynamic 10%"], "offline", 12, None, 0))
    assert full["num_finished"] == both["num_finished"] == dynamic["num_finished"] == 12
    assert dynamic["throughput_tokens_per_s"] > full["throughput_tokens_per_s"]
    assert both["throughput_tokens_per_s"] > full["throughput_tokens_per_s"]


def test_mpcache_reproduction_report_table_and_plot(tmp_path):
    report = repro_mpcache.reproduce_mpcache(num_requests=6, rate=2.0, workers=1,
                                             progress=False)
    assert set(report["serving"]) == {"offline batch", "online 2 req/s"}
    for by_mode in report["serving"].values():
        assert by_mode["full KV"]["throughput_ratio"] == 1.0
    table = repro_mpcache.markdown_table(report)
    assert "mpcache static 50% + dynamic 10%" in table and "| 16384 |" in table
    repro_mpcache.plot_mpcache(report, str(tmp_path / "mpcache.png"))
    assert (tmp_path / "mpcache.png").stat().st_size > 0
