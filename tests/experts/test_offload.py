"""Offloaded experts on a tiny random Mixtral: every policy's tokens equal all-resident, slots
never leak, tier faults are named, the disk tier drops its page cache."""

import os
import random
import shutil

import pytest

from tests.conftest import make_tiny_moe
from tierserve.engine.llm import LLM
from tierserve.experts.predictor import train_predictor
from tierserve.experts.routes import write_traces
from tierserve.experts.tiers import ExpertTierError, dequantize, quantize
from tierserve.experts.trace import RouteRecorder
from tierserve.model.loader import CheckpointError
from tierserve.request import SamplingParams

PARAMS = SamplingParams(max_tokens=10, temperature=0.0, ignore_eos=True)


def _prompts(count=12, seed=0):
    rng = random.Random(seed)
    return [[rng.randrange(3, 500) for _ in range(rng.randrange(4, 30))] for _ in range(count)]


def _run(folder, prompts, **options):
    llm = LLM(str(folder), num_blocks=64, swap_space=0, **options)
    try:
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
        offload = llm.engine.runner.experts
        if offload is not None:
            offload.check_invariants()
        return [list(o.outputs[0].token_ids) for o in outputs], offload
    finally:
        llm.engine.runner.close()


@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
    """(folder, prompts, resident tokens, trace file, predictor folder)."""
    root = tmp_path_factory.mktemp("offload")
    folder = root / "mixtral"
    make_tiny_moe("mixtral", folder)
    prompts = _prompts()
    llm = LLM(str(folder), num_blocks=64, swap_space=0)
    recorder = RouteRecorder(llm.engine.runner)
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    traces = [recorder.trace(o.request_id, p, t) for o, p, t in zip(outputs, prompts, tokens)]
    llm.engine.runner.close()
    write_traces(root / "trace.jsonl", traces)
    predictor, _ = train_predictor(traces, sorted(traces[0].routes), 6, 2, epochs=60)
    predictor.save(root / "predictor")
    return folder, prompts, tokens, str(root / "trace.jsonl"), str(root / "predictor"), traces


def test_recorded_traces_cover_every_computed_position(mixtral):
    _, prompts, tokens, _, _, traces = mixtral
    for trace, prompt, output in zip(traces, prompts, tokens):
        assert sorted(trace.routes) == [0, 1, 2]
        assert trace.num_positions == len(prompt) + len(output) - 1
        assert all(len(choice) == 2 for r in trace.routes.values() for choice in r)


@pytest.mark.parametrize("options", [
    dict(expert_policy="lru", expert_cache="6"),
    dict(expert_policy="lookahead", expert_cache="8"),
    dict(expert_policy="static", expert_cache="10", trace=True),
    dict(expert_policy="oracle", expert_cache="8", trace=True),
    dict(expert_policy="expertflow", expert_cache="8", predictor=True),
    dict(expert_policy="expertflow", expert_cache="8", predictor=True,
         scheduling_policy="expert-grouped"),
    dict(expert_policy="lru", expert_cache="7", expert_host_format="float"),
    dict(expert_policy="expertflow", expert_cache="8", predictor=True, expert_victim_buffer="6",
         expert_prefetch_window=0),
    dict(expert_policy="static", expert_cache="10", trace=True, expert_host_format="float",
         expert_host_compute=2),
], ids=["lru", "lookahead", "static", "oracle", "expertflow", "expertflow-regrouped", "host",
        "victim-buffer-unlimited-prefetch", "static-cold-on-host"])
def test_every_policy_gives_the_tokens_of_all_resident_experts(mixtral, options):
    folder, prompts, tokens, trace, predictor, _ = mixtral
    options = dict(options)
    if options.pop("trace", False):
        options["expert_trace"] = trace
    if options.pop("predictor", False):
        options["expert_predictor"] = predictor
    got, offload = _run(folder, prompts, **options)
    assert got == tokens
    counters = offload.cache.counters
    assert counters.requests > 0 and counters.loads > 0  # experts really came and went
    assert offload.cache.num_slots < 18  # fewer slots than the model's 3 x 6 experts
    if options["expert_policy"] in ("oracle", "expertflow"):
        assert counters.prefetches_used > 0
    if options.get("expert_host_compute"):
        assert offload.stats.host_runs > 0  # some misses really ran on the host


def test_quantized_host_tier_gives_the_same_tokens_under_any_policy(mixtral):
    folder, prompts, _, trace, _, _ = mixtral
    small, _ = _run(folder, prompts, expert_cache="6", expert_host_format="q8")
    large, _ = _run(folder, prompts, expert_cache="12", expert_host_format="q8",
                    expert_policy="oracle", expert_trace=trace)
    assert small == large


@pytest.mark.parametrize("host_format", ["none", "q4"])
def test_a_victim_buffer_serves_evicted_experts_again_without_the_slower_tier(mixtral,
                                                                               host_format):
    """Disk or Q4 host tier behind a buffer of 12 evicted experts (6 fast slots: LRU over 3 layers of 6 would miss every time): same tokens as without it,
    and some misses are copied back from the buffer instead of read or dequantized again."""
    folder, prompts = mixtral[0], mixtral[1]
    options = dict(expert_cache="6", expert_host_format=host_format)
    plain, without = _run(folder, prompts, **options)
    buffered, offload = _run(folder, prompts, **options, expert_victim_buffer="12")
    assert buffered == plain
    tier = offload.source.tier
    assert offload.victims.hits > 0 and offload.victims.saved > 0
    assert offload.stats.bytes_loaded["victim"] > 0
    assert offload.stats.bytes_loaded[tier] < without.stats.bytes_loaded[tier]
    assert offload.cache.counters.loads == without.cache.counters.loads  # same fast-slot story
    assert offload.victims.nbytes == 12 * offload.expert_bytes


@pytest.mark.parametrize("host_format", ["float", "q8"])
def test_cold_experts_run_on_the_host_tier_instead_of_loading(mixtral, host_format):
    """--expert-host-compute: a miss that few rows chose runs on the host tier's weights (no
    load, no slot); the tokens are those of the same tier loading every miss."""
    folder, prompts = mixtral[0], mixtral[1]
    options = dict(expert_cache="6", expert_host_format=host_format)
    loading, plain = _run(folder, prompts, **options)
    everything, on_host = _run(folder, prompts, **options, expert_host_compute=10_000)
    assert everything == loading
    assert on_host.cache.counters.loads == 0 and on_host.stats.bytes_loaded == {}
    assert on_host.stats.host_runs == _misses(on_host) > 0
    few, some = _run(folder, prompts, **options, expert_host_compute=1)
    assert few == loading
    # prompts (many rows) still load their misses; single-row decodes run on the host
    assert 0 < some.cache.counters.loads < plain.cache.counters.loads
    assert 0 < some.stats.host_runs == some.stats.host_rows
    assert some.stats.host_runs + some.cache.counters.loads == _misses(some)


def _misses(offload):
    return sum(c.misses for c in offload.cache.counters.layers.values())


def test_host_compute_needs_a_host_tier(mixtral):
    with pytest.raises(ValueError, match="--expert-host-format"):
        _run(mixtral[0], mixtral[1][:1], expert_cache="6", expert_host_compute=2)


def test_a_victim_buffer_is_sized_to_what_it_could_hold(mixtral):
    folder, prompts = mixtral[0], mixtral[1][:2]
    _, offload = _run(folder, prompts, expert_cache="6", expert_victim_buffer="100")
    assert offload.victims.num_slots == 12  # 18 experts, 6 of them in fast slots
    _, offload = _run(folder, prompts, expert_cache="6", expert_victim_buffer="6",
                      expert_host_format="float")
    assert offload.victims is None  # host memory holds them unquantized already


def test_prefetches_wait_while_the_window_of_loads_in_flight_is_full():
    from tierserve.experts.books import ExpertBooks
    from tierserve.experts.policies import ExpertPolicy

    class Queue:  # loads never finish: every one stays in flight
        def __init__(self):
            self.started = []

        def submit(self, key, ops):
            self.started += [op.key for op in ops]

        def poll(self):
            return []

        def wait(self, keys):
            pass

    for window, started in ((2, [(1, 0), (1, 1)]), (None, [(1, e) for e in range(4)] + [(0, 3)])):
        queue = Queue()
        books = ExpertBooks(16, ExpertPolicy(), [0, 1], 4, 2, queue, lambda: 0.0, window)
        books.prefetch([(1, e) for e in range(4)] + [(0, 3)])
        assert queue.started == started
    # A full window stops prefetches, never a forward's misses.
    books = ExpertBooks(16, ExpertPolicy(), [0, 1], 4, 2, Queue(), lambda: 0.0, 2)
    books.prefetch([(1, 0), (1, 1)])
    books.prefetch([(1, 2)])
    assert books.loads.started == [(1, 0), (1, 1)]
    books.hold(0, [0, 1])
    assert books.loads.started == [(1, 0), (1, 1), (0, 0), (0, 1)]
    # The window looks at the most urgent experts only, resident ones included.
    books = ExpertBooks(16, ExpertPolicy(), [0, 1], 4, 2, Queue(), lambda: 0.0, 2)
    books.cache.reserve((1, 0))
    books.cache.loaded(books.cache.slot_of((1, 0)))
    books.prefetch([(1, 0), (1, 1), (1, 2)])
    assert books.loads.started == [(1, 1)]


def test_a_load_names_the_expert_its_slot_held_until_then():
    from tierserve.experts.books import ExpertBooks
    from tierserve.experts.policies import ExpertPolicy

    class Queue:  # every load done at once
        def __init__(self):
            self.ops, self.pending = [], []

        def submit(self, key, ops):
            self.ops += ops
            self.pending.append(key)

        def poll(self):
            done, self.pending = self.pending, []
            return [type("Done", (), {"key": k, "error": None})() for k in done]

        def wait(self, keys):
            pass

    books = ExpertBooks(2, ExpertPolicy(), [0, 1], 2, 1, Queue(), lambda: 0.0)
    books.release(books.hold(0, [1, 0]))  # expert (0, 1) is freed first: least recent
    books.reap()
    books.release(books.hold(1, [0]))
    assert [(op.key, op.evicted) for op in books.loads.ops] == [
        ((0, 1), None), ((0, 0), None), ((1, 0), (0, 1))]


@pytest.mark.parametrize("fmt, bound", [("q8", 0.5 / 127), ("q4", 0.5 / 7)])
def test_quantization_error_is_within_half_a_step(fmt, bound):
    import torch

    weight = torch.randn(48, 64)
    back = dequantize(quantize(weight, fmt), torch.float32)
    scale = weight.abs().amax(dim=1, keepdim=True) if fmt == "q8" else (
        weight.reshape(48, 2, 32).abs().amax(dim=2, keepdim=True).expand(48, 2, 32).reshape(48, 64))
    assert ((back - weight).abs() <= scale * bound + 1e-6).all()


def test_no_expert_slot_leaks_under_random_arrivals_and_aborts(mixtral):
    folder, _, _, _, predictor, _ = mixtral
    llm = LLM(str(folder), num_blocks=64, swap_space=0, expert_cache="7",
              expert_policy="expertflow", expert_predictor=predictor,
              scheduling_policy="expert-grouped", max_num_seqs=6)
    core, rng = llm.core, random.Random(3)
    try:
        live, count = [], 0
        for _ in range(80):
            if rng.random() < 0.4:
                prompt = [rng.randrange(3, 500) for _ in range(rng.randrange(2, 40))]
                for request in core.make_requests(f"r{count}", prompt, SamplingParams(
                        max_tokens=rng.randrange(1, 12), temperature=0.0)):
                    core.add_request(request)
                    live.append(request.request_id)
                count += 1
            if live and rng.random() < 0.15:
                core.abort([live.pop(rng.randrange(len(live)))])
            core.step()
            llm.engine.runner.experts.check_invariants()
        while core.has_unfinished():
            core.step()
        offload = llm.engine.runner.experts
        offload.check_invariants()
        assert offload.cache.num_free == offload.cache.num_slots
        assert core.check_kv_accounting()
    finally:
        llm.engine.runner.close()


def test_a_truncated_expert_file_is_named_at_start(mixtral, tmp_path):
    folder = tmp_path / "broken"
    shutil.copytree(mixtral[0], folder)
    weights = folder / "model.safetensors"
    os.truncate(weights, weights.stat().st_size // 2)
    with pytest.raises((ExpertTierError, CheckpointError),
                       match=r"model\.safetensors.* truncated"):
        LLM(str(folder), num_blocks=64, swap_space=0, expert_cache="6")


def test_an_expert_file_damaged_while_serving_fails_its_requests_not_the_engine(
        mixtral, tmp_path):
    folder = tmp_path / "damaged"
    shutil.copytree(mixtral[0], folder)
    prompts = mixtral[1][:3]
    llm = LLM(str(folder), num_blocks=64, swap_space=0, expert_cache="6")
    try:
        # Replaced by a truncated copy (truncating in place would pull the pages from under the
        # memory-mapped dense weights: SIGBUS, as for any mmap-loading engine).
        weights = folder / "model.safetensors"
        damaged = folder / "partial"
        damaged.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
        os.replace(damaged, weights)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
        assert all(o.outputs[0].finish_reason == "error" for o in outputs)
        assert all("model.safetensors is truncated" in o.error for o in outputs)
        llm.engine.runner.experts.check_invariants()  # the failed loads left no slot held
        assert llm.core.check_kv_accounting() and not llm.core.has_unfinished()
    finally:
        llm.engine.runner.close()


def test_the_disk_tier_drops_its_page_cache_at_start_and_never_loads_the_experts(
        mixtral, monkeypatch):
    from tierserve.engine import loading

    calls, loaded = [], []
    real = os.posix_fadvise
    monkeypatch.setattr(os, "posix_fadvise", lambda fd, o, n, advice: (
        calls.append(advice), real(fd, o, n, advice)))
    real_load = loading.load_checkpoint

    def spy(*args, **kwargs):
        checkpoint = real_load(*args, **kwargs)
        loaded.append(sorted(checkpoint.tensors))
        return checkpoint
    monkeypatch.setattr(loading, "load_checkpoint", spy)
    _run(mixtral[0], mixtral[1][:1], expert_cache="6")
    assert os.POSIX_FADV_DONTNEED in calls
    assert loaded and not any(".mlp.experts." in name for name in loaded[0])
    _run(mixtral[0], mixtral[1][:1], expert_cache="6", expert_host_format="q8")
    assert any(".mlp.experts." in name for name in loaded[1])  # the host tier takes them


def test_offloading_needs_an_moe_model_and_room_for_a_layer(mixtral, tiny_llama_dir):
    with pytest.raises(ValueError, match="dense model"):
        LLM(str(tiny_llama_dir), num_blocks=16, swap_space=0, expert_cache="4")
    with pytest.raises(ValueError, match="fewer experts than one layer"):
        LLM(str(mixtral[0]), num_blocks=16, swap_space=0, expert_cache="3")
    with pytest.raises(ValueError, match="needs --expert-predictor"):
        LLM(str(mixtral[0]), num_blocks=16, swap_space=0, expert_cache="6",
            expert_policy="expertflow")


def test_an_moe_layers_output_for_a_token_does_not_depend_on_its_batch(mixtral):
    """Each expert's rows are padded like a step's (float32 batch invariance): else a token's
    output depends on how many others chose its experts, and regrouping or any other batching
    changes it in the last bits."""
    import torch

    llm = LLM(str(mixtral[0]), num_blocks=16, swap_space=0)
    try:
        block = llm.engine.runner.model.layers[0].mlp
        assert block.min_rows == 16
        torch.manual_seed(0)
        x = torch.randn(48, 64) * 3
        alone = block(x[:16], None, 1)[0]  # one real token in a padded step
        crowded = block(x, None, 40)[0]  # the same token among 39 others
        assert torch.equal(alone, crowded)
        block.min_rows = 1
        assert not torch.equal(block(x[:16], None, 1)[0], crowded)  # what the padding fixes
    finally:
        llm.engine.runner.close()


def test_a_bfloat16_engine_converts_the_float32_files_experts_on_load(mixtral):
    folder, prompts = mixtral[0], mixtral[1][:4]
    resident, _ = _run(folder, prompts, dtype="bfloat16")
    offloaded, offload = _run(folder, prompts, dtype="bfloat16", expert_cache="6")
    assert offloaded == resident
    assert offload.gate_up.dtype == offload.down.dtype == __import__("torch").bfloat16


def test_replayed_routes_make_another_model_choose_the_traces_experts(mixtral, tmp_path):
    from tierserve.experts.trace import RouteReplay

    _, prompts, tokens, _, _, traces = mixtral
    other = tmp_path / "other"
    make_tiny_moe("mixtral", other, seed=1)  # same shape, other weights, other router
    llm = LLM(str(other), num_blocks=64, swap_space=0)
    try:
        RouteReplay(llm.engine.runner, traces)
        recorder = RouteRecorder(llm.engine.runner)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
        replayed = [recorder.trace(o.request_id, p, list(o.outputs[0].token_ids))
                    for o, p in zip(outputs, prompts)]
    finally:
        llm.engine.runner.close()
    for got, want in zip(replayed, traces):
        assert got.routes == want.routes  # every position's experts, at every layer


def test_a_gguf_moe_serves_its_experts_from_the_file_and_gives_the_resident_tokens(
        mixtral, tmp_path):
    """The GGUF disk tier reads one expert's slice of the stacked ``ffn_*_exps`` tensors (here
    Q8_0, dequantized on load) and must give the tokens of the same file served resident."""
    import gguf
    import torch

    from tests.model.test_loader_moe import write_moe_gguf
    from tierserve.experts.tiers import DiskExperts
    from tierserve.model.loader import load_checkpoint

    folder, prompts = mixtral[0], mixtral[1][:6]
    reference = load_checkpoint(folder)
    path = tmp_path / "mixtral-q8.gguf"
    write_moe_gguf(path, {n: t.numpy() for n, t in reference.tensors.items()}, reference.arch,
                   expert_qtype=gguf.GGMLQuantizationType.Q8_0, tokenizer_dir=folder)
    resident = load_checkpoint(path).tensors
    disk = DiskExperts.from_gguf(path, torch.float32)
    for key in [(0, 0), (1, 3), (2, 5)]:
        weights = disk.read(key)
        prefix = f"model.layers.{key[0]}.mlp.experts.{key[1]}."
        assert torch.equal(weights.gate_up, torch.cat([resident[prefix + "gate_proj.weight"],
                                                       resident[prefix + "up_proj.weight"]]))
        assert torch.equal(weights.down, resident[prefix + "down_proj.weight"])
    want, _ = _run(path, prompts)
    got, offload = _run(path, prompts, expert_cache="6")
    assert got == want
    assert offload.source.tier == "disk" and offload.stats.bytes_loaded["disk"] > 0
    # The file cut short after start-up: the failed loads name it, the engine goes on.
    llm = LLM(str(path), num_blocks=64, swap_space=0, expert_cache="6")
    try:
        damaged = tmp_path / "partial"
        damaged.write_bytes(path.read_bytes()[: path.stat().st_size // 8])
        os.replace(damaged, path)
        outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS,
                               use_tqdm=False)
        assert all(o.outputs[0].finish_reason == "error" for o in outputs)
        assert all("mixtral-q8.gguf is truncated" in o.error for o in outputs)
        assert llm.core.check_kv_accounting() and not llm.core.has_unfinished()
    finally:
        llm.engine.runner.close()


def test_replay_gives_lookahead_the_traced_models_guesses(mixtral):
    """Traces keep the gate lookahead's guess per position (the next MoE layer's router on this
    layer's input); replayed onto a model, ``lookahead`` prefetches those guesses. On the
    traced model's first prefill they are exactly what its own gate guesses at layer 0 (later
    inputs differ: the replay weighs each chosen expert 1 / top_k)."""
    import torch
    import torch.nn.functional as F

    from tierserve.experts.trace import RouteReplay

    folder, prompts, _, _, _, traces = mixtral
    for trace in traces:
        assert sorted(trace.lookahead) == [0, 1]  # the last MoE layer has none after it
        assert all(len(per) == trace.num_positions for per in trace.lookahead.values())
        assert all(len(choice) == 2 for per in trace.lookahead.values() for choice in per)
    llm = LLM(str(folder), num_blocks=64, swap_space=0, expert_cache="12",
              expert_policy="lookahead", expert_prefetch_window=0)
    try:
        RouteReplay(llm.engine.runner, traces)
        offload = llm.engine.runner.experts
        calls = []
        replayed_gate = offload._gate_lookahead

        def spy(layer, x):
            guess = replayed_gate(layer, x)
            if layer == 0:
                after = offload.blocks[1]
                own = torch.topk(F.linear(x, after.router), after.top_k, dim=-1).indices
                calls.append((guess, [(1, int(e)) for e in torch.unique(own)], x.shape[0]))
            return guess
        offload._gate_lookahead = spy
        llm.generate([{"prompt_token_ids": p} for p in prompts], PARAMS, use_tqdm=False)
        assert offload.cache.counters.prefetches > 0
    finally:
        llm.engine.runner.close()
    first, own, rows = calls[0]
    assert rows == sum(len(p) for p in prompts)  # the first step: every prompt, whole
    from tierserve.experts.routes import by_votes

    traced = [(1, e) for e in by_votes(choice for t in traces
                                       for choice in t.lookahead[0][:len(t.prompt)])]
    assert first == traced  # read from the trace, most chosen first...
    assert sorted(traced) == own  # ...which recorded what the gate guesses
    assert len(calls) > 5 and all(guess for guess, _, _ in calls)
