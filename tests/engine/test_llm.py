"""LLM.generate / chat end to end: batch invariance, sampling, stops, n > 1, errors, no leaks."""

from __future__ import annotations

import random

import pytest

from tierserve import LLM, InvalidRequestError, SamplingParams

LENGTHS = [1, 3, 9, 16, 17, 30, 47, 64, 80, 100, 5, 12, 33, 70, 2, 121]


def _prompts(seed=0, lengths=LENGTHS, vocab=350):
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]


def _greedy(max_tokens=20, **kw):
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


def _assert_no_blocks_held(llm):
    llm.core.kv.check_invariants()
    assert llm.core.kv.num_free_blocks == llm.core.kv.num_blocks
    assert not llm.core.scheduler.requests


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_blocks=256)


def _tokens(outputs):
    return [o.outputs[0].token_ids for o in outputs]


def test_greedy_output_is_the_same_alone_batched_chunked_and_preempted(tiny_llama_dir, llm):
    prompts = _prompts()
    alone = [_tokens(llm.generate([p], _greedy(), use_tqdm=False))[0] for p in prompts]
    batched = _tokens(llm.generate(prompts, _greedy(), use_tqdm=False))
    chunked_llm = LLM(str(tiny_llama_dir), num_blocks=256, max_num_batched_tokens=7)
    chunked = _tokens(chunked_llm.generate(prompts, _greedy(), use_tqdm=False))
    tiny_pool = LLM(str(tiny_llama_dir), num_blocks=20, enable_prefix_caching=False)
    preempted = _tokens(tiny_pool.generate(prompts, _greedy(), use_tqdm=False))
    assert tiny_pool.core.scheduler.num_preemptions > 0
    assert batched == alone
    assert chunked == alone
    assert preempted == alone
    for engine in (llm, chunked_llm, tiny_pool):
        _assert_no_blocks_held(engine)


@pytest.mark.parametrize("tiers", [dict(swap_space="64MiB"),
                                   dict(num_host_blocks=4, num_disk_blocks=400)])
def test_swapped_requests_give_the_same_tokens_as_recomputed_and_unpreempted(
        tiny_llama_dir, llm, tmp_path, tiers):
    prompts = _prompts(seed=12)
    expected = _tokens(llm.generate(prompts, _greedy(), use_tqdm=False))
    recomputed = LLM(str(tiny_llama_dir), num_blocks=20, preemption_mode="recompute",
                     enable_prefix_caching=False)
    assert _tokens(recomputed.generate(prompts, _greedy(), use_tqdm=False)) == expected
    assert recomputed.core.scheduler.num_preemptions > 0
    swapped = LLM(str(tiny_llama_dir), num_blocks=20, preemption_mode="swap",
                  swap_dir=str(tmp_path), **tiers)
    assert _tokens(swapped.generate(prompts, _greedy(), use_tqdm=False)) == expected
    assert swapped.core.scheduler.num_swap_preemptions > 0
    if "num_disk_blocks" in tiers:
        assert list(tmp_path.iterdir())  # the disk tier's file exists while the engine lives
    _assert_no_blocks_held(swapped)
    for store in swapped.core.kv.lower:
        assert store.pool.num_free == store.pool.num_blocks
    summary = swapped.core.metrics.summary()
    assert summary["preemptions_total"] > 0 and summary["swap_bytes_total"] > 0


def test_next_turn_reuses_host_tier_kv_on_the_real_model(tiny_llama_dir):
    engine = LLM(str(tiny_llama_dir), num_blocks=24, swap_space="64MiB")
    first = _prompts(seed=13, lengths=[150])[0]
    turn1 = engine.generate([first], _greedy(10), use_tqdm=False)[0]
    engine.generate(_prompts(seed=14, lengths=[200, 150]), _greedy(10), use_tqdm=False)
    history = first + turn1.outputs[0].token_ids + _prompts(seed=15, lengths=[12])[0]
    hits_before = engine.core.kv.counters.lower_prefix_hits
    turn2 = engine.generate([history], _greedy(), use_tqdm=False)[0]
    assert engine.core.kv.counters.lower_prefix_hits - hits_before >= 5
    fresh = LLM(str(tiny_llama_dir), num_blocks=64, enable_prefix_caching=False)
    assert _tokens([turn2]) == _tokens(fresh.generate([history], _greedy(), use_tqdm=False))


def test_prefix_cached_output_equals_uncached(tiny_llama_dir, llm):
    shared = _prompts(seed=3, lengths=[40])[0]
    prompts = [shared + tail for tail in _prompts(seed=4, lengths=[5, 9, 20])]
    uncached = LLM(str(tiny_llama_dir), num_blocks=256, enable_prefix_caching=False)
    expected = _tokens(uncached.generate(prompts, _greedy(), use_tqdm=False))
    llm.generate([shared], _greedy(1), use_tqdm=False)  # warm the cache with the shared prefix
    hits_before = llm.core.kv.prefix_cache.hits
    outputs = llm.generate(prompts, _greedy(), use_tqdm=False)
    assert _tokens(outputs) == expected
    assert llm.core.kv.prefix_cache.hits > hits_before
    assert all(o.num_cached_tokens >= 32 for o in outputs)


def test_same_seed_gives_same_text_whatever_else_is_in_the_batch(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=24, ignore_eos=True)
    target = _prompts(seed=5, lengths=[20])[0]
    alone = llm.generate([target], params, use_tqdm=False)[0].outputs[0].token_ids
    others = _prompts(seed=6, lengths=[3, 50, 9, 70])
    mixed = llm.generate(others[:2] + [target] + others[2:],
                         [SamplingParams(temperature=1.0, max_tokens=30)] * 2 + [params]
                         + [SamplingParams(temperature=0.7, max_tokens=10)] * 2, use_tqdm=False)
    assert mixed[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=24, ignore_eos=True)
    assert llm.generate([target], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_n_completions_share_the_prompt_blocks(llm):
    prompt = _prompts(seed=7, lengths=[60])[0]
    hits_before = llm.core.kv.prefix_cache.hits
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=10, ignore_eos=True)
    (output,) = llm.generate([prompt], params, use_tqdm=False)
    assert [c.index for c in output.outputs] == [0, 1, 2]
    assert len({tuple(c.token_ids) for c in output.outputs}) > 1  # different seeds per child
    assert llm.core.kv.prefix_cache.hits - hits_before >= 2 * (59 // 16)  # followers reused it
    again = llm.generate([prompt], params, use_tqdm=False)[0]
    assert [c.token_ids for c in again.outputs] == [c.token_ids for c in output.outputs]
    _assert_no_blocks_held(llm)


def test_stop_token_ids_end_the_output_and_are_not_in_the_text(llm):
    prompt = _prompts(seed=8, lengths=[10])[0]
    free = llm.generate([prompt], _greedy(20), use_tqdm=False)[0].outputs[0]
    stop_id = free.token_ids[5]
    first = free.token_ids.index(stop_id)
    out = llm.generate([prompt], _greedy(20, stop_token_ids=[stop_id]), use_tqdm=False)[0]
    completion = out.outputs[0]
    assert completion.token_ids == free.token_ids[: first + 1]
    assert completion.finish_reason == "stop" and completion.stop_reason == stop_id
    tok = llm.get_tokenizer()
    assert completion.text == tok.decode(free.token_ids[:first])


def test_stop_string_truncates_the_text_before_it(llm):
    prompt = _prompts(seed=9, lengths=[10])[0]
    free = llm.generate([prompt], _greedy(30), use_tqdm=False)[0].outputs[0]
    text = free.text
    assert len(text) > 12
    stop = text[8:12]
    out = llm.generate([prompt], _greedy(30, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert out.text == text[: text.index(stop)]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    kept = llm.generate([prompt], _greedy(30, stop=[stop], include_stop_str_in_output=True),
                        use_tqdm=False)[0].outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    _assert_no_blocks_held(llm)


def test_max_tokens_and_min_tokens(llm):
    prompt = _prompts(seed=10, lengths=[12])[0]
    free = llm.generate([prompt], _greedy(15), use_tqdm=False)[0].outputs[0]
    assert len(free.token_ids) == 15 and free.finish_reason == "length"
    eos_at_3 = free.token_ids[3]  # pretend that token is a stop id, with min_tokens beyond it
    params = _greedy(15, stop_token_ids=[eos_at_3], min_tokens=10)
    out = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]
    assert eos_at_3 not in out.token_ids[:10]
    assert len(out.token_ids) >= 10


def test_chat_uses_the_template(llm):
    out = llm.chat([{"role": "user", "content": "hello"}], _greedy(5), use_tqdm=False)[0]
    expected = llm.get_tokenizer().encode_chat([{"role": "user", "content": "hello"}])
    assert out.prompt_token_ids == expected and len(out.outputs[0].token_ids) == 5


def test_bad_requests_raise_clear_errors_and_the_engine_keeps_serving(llm):
    with pytest.raises(InvalidRequestError, match="prompt has 2,000 tokens"):
        llm.generate([[5] * 2000], _greedy(), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="max_tokens"):
        llm.generate([[5] * 10], SamplingParams(max_tokens=5000), use_tqdm=False)
    with pytest.raises(InvalidRequestError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(InvalidRequestError, match="top_p"):
        SamplingParams(top_p=0)
    assert llm.generate([[5, 6, 7]], _greedy(3), use_tqdm=False)[0].outputs[0].token_ids
    _assert_no_blocks_held(llm)


def test_unknown_model_name_is_a_clear_error():
    from tierserve.model.hub import ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match=r"not a known name \(smollm2\)"):
        LLM("no-such-model")


def test_a_failing_step_fails_its_requests_frees_every_block_and_the_engine_recovers(
        tiny_llama_dir):
    """The forward of step 3 raises: the two requests in it fail with the error, the one not
    yet admitted (max_num_seqs=2) finishes with the tokens it has in a fault-free run."""
    llm = LLM(str(tiny_llama_dir), num_blocks=64, max_num_seqs=2)
    prompts, params = _prompts(seed=11, lengths=[30, 4, 50]), _greedy(6)
    expected = _tokens(llm.generate(prompts, params, use_tqdm=False))
    runner = llm.engine.runner
    real_execute, calls = runner.execute, {"n": 0}

    def flaky(plan):
        calls["n"] += 1
        if calls["n"] == 3:
            runner._start_copies(plan)  # a forward fails after its step's copies started
            raise RuntimeError("injected failure")
        return real_execute(plan)

    llm.core.executor = type("E", (), {"execute": staticmethod(flaky)})
    outputs = llm.generate(prompts, params, use_tqdm=False)
    llm.core.executor = runner
    assert [o.outputs[0].finish_reason for o in outputs] == ["error", "error", "length"]
    assert all("injected failure" in o.error for o in outputs[:2]) and outputs[2].error is None
    assert outputs[2].outputs[0].token_ids == expected[2]
    assert llm.core.num_step_failures == 1 and llm.core.consecutive_step_failures == 0
    _assert_no_blocks_held(llm)
    assert _tokens(llm.generate(prompts, params, use_tqdm=False)) == expected


def test_random_generate_calls_never_leak_blocks(tiny_llama_dir):
    engine = LLM(str(tiny_llama_dir), num_blocks=24, max_num_batched_tokens=16)
    rng = random.Random(0)
    for round_ in range(4):
        lengths = [rng.randint(1, 90) for _ in range(rng.randint(1, 8))]
        params = [SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 20),
                                 n=rng.choice([1, 1, 2]), seed=rng.choice([None, round_]),
                                 stop=rng.choice([[], ["a"]]))
                  for _ in lengths]
        engine.generate(_prompts(seed=round_, lengths=lengths), params, use_tqdm=False)
        _assert_no_blocks_held(engine)


def test_text_work_runs_beside_the_model_steps_and_its_errors_surface(llm, monkeypatch):
    """Detokenization runs on the output thread, not the caller's; a failure there stops the
    run, reaches the caller, and leaves no block held."""
    import threading

    from tierserve.engine.output import OutputProcessor

    threads = set()
    process = OutputProcessor.process

    def recording(self, updates):
        threads.add(threading.current_thread().name)
        return process(self, updates)

    monkeypatch.setattr(OutputProcessor, "process", recording)
    expected = _tokens(llm.generate(_prompts(seed=5)[:6], _greedy(8), use_tqdm=False))
    assert threads == {"tierserve-output"}
    assert all(len(tokens) == 8 for tokens in expected)

    calls = 0

    def failing(self, updates):
        nonlocal calls
        calls += 1
        if calls == 3:
            raise ValueError("detokenizer broke")
        return process(self, updates)

    monkeypatch.setattr(OutputProcessor, "process", failing)
    with pytest.raises(ValueError, match="detokenizer broke"):
        llm.generate(_prompts(seed=5)[:6], _greedy(40), use_tqdm=False)
    _assert_no_blocks_held(llm)
    monkeypatch.setattr(OutputProcessor, "process", process)
    assert _tokens(llm.generate(_prompts(seed=5)[:6], _greedy(8), use_tqdm=False)) == expected
