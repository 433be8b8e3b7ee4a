"""AsyncEngine in process: output work off the engine thread, stop strings, aborts, failures."""

from __future__ import annotations

import asyncio
import random
import threading
import time

import pytest

from tierserve import LLM, SamplingParams
from tierserve.config import EngineConfig
from tierserve.engine.async_engine import AsyncEngine, EngineDeadError, QueueFullError
from tierserve.engine.loading import build_engine
from tierserve.engine.output import OutputProcessor
from tierserve.model.tokenizer import IncrementalDetokenizer


def _prompt(seed: int, length: int = 10) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 350) for _ in range(length)]


def _greedy(max_tokens: int, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, **kw)


@pytest.fixture
def engine(tiny_llama_dir):
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_blocks=64)
    engine = AsyncEngine(build_engine(config))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def llm(tiny_llama_dir):
    return LLM(str(tiny_llama_dir), num_blocks=64)


def _run(engine: AsyncEngine, request_id: str, prompt: list[int], params: SamplingParams,
         stop_after: int | None = None) -> list:
    """Every RequestOutput of one request; with ``stop_after``, leave after that many."""

    async def collect():
        requests = engine.make_requests(request_id, prompt, params)
        outputs = []
        stream = engine.generate(request_id, None, requests)
        async for output in stream:
            outputs.append(output)
            if len(outputs) == stop_after:
                break
        await stream.aclose()
        return outputs

    return asyncio.run(collect())


def _wait_until_no_blocks_held(engine: AsyncEngine, timeout: float = 10.0) -> None:
    """Aborts and stops reach the engine thread a little after the stream closes."""
    core = engine.core
    deadline = time.time() + timeout
    while core.scheduler.requests or core.kv.num_free_blocks != core.kv.num_blocks:
        assert time.time() < deadline, "KV blocks still held"
        time.sleep(0.01)
    core.kv.check_invariants()


def test_detokenization_runs_on_the_output_thread_not_the_engine_thread(engine, monkeypatch):
    threads = {"detokenize": set(), "step": set()}
    add, step = IncrementalDetokenizer.add, engine.core.step

    def recording_add(self, token_id):
        threads["detokenize"].add(threading.current_thread().name)
        return add(self, token_id)

    def recording_step():
        threads["step"].add(threading.current_thread().name)
        return step()

    monkeypatch.setattr(IncrementalDetokenizer, "add", recording_add)
    monkeypatch.setattr(engine.core, "step", recording_step)
    outputs = _run(engine, "r", _prompt(1), _greedy(8))
    assert outputs[-1].finished and len(outputs[-1].outputs[0].token_ids) == 8
    assert threads == {"detokenize": {"tierserve-output"}, "step": {"tierserve-engine"}}


def test_stop_string_cuts_the_text_frees_blocks_and_the_engine_serves_on(engine, llm):
    prompt = _prompt(9)
    free = llm.generate([prompt], _greedy(30), use_tqdm=False)[0].outputs[0]
    stop = free.text[8:12]
    # The offline path stops in the same step it finds the string: the reference.
    expected = llm.generate([prompt], _greedy(300, stop=[stop]), use_tqdm=False)[0].outputs[0]
    assert expected.text == free.text[: free.text.index(stop)]
    stops_before = engine.core.metrics.requests_total.get("stop", 0)

    outputs = _run(engine, "stopped", prompt, _greedy(300, stop=[stop]))
    final = outputs[-1].outputs[0]
    assert outputs[-1].finished and [o.finished for o in outputs].count(True) == 1
    assert final.text == expected.text and final.token_ids == expected.token_ids
    assert final.finish_reason == "stop" and final.stop_reason == stop
    for output in outputs:  # no token past the stop string ever reached the client
        seen = output.outputs[0].token_ids
        assert seen == expected.token_ids[: len(seen)]
    _wait_until_no_blocks_held(engine)
    assert engine.core.metrics.requests_total.get("stop", 0) == stops_before + 1
    assert engine.num_in_flight == 0

    after = _run(engine, "next", prompt, _greedy(30))[-1].outputs[0]
    assert after.text == free.text and after.finish_reason == "length"
    _wait_until_no_blocks_held(engine)


def test_stop_string_in_one_of_n_completions_ignores_its_later_updates(engine):
    params = SamplingParams(temperature=1.0, seed=3, n=3, max_tokens=40, ignore_eos=True)
    free = _run(engine, "free", _prompt(5), params)[-1]
    stop = free.outputs[1].text[6:9]
    stopped = _run(engine, "stopped", _prompt(5), SamplingParams(
        temperature=1.0, seed=3, n=3, max_tokens=40, ignore_eos=True, stop=[stop]))[-1]
    for before, after in zip(free.outputs, stopped.outputs):
        if stop in before.text:
            assert after.text == before.text[: before.text.index(stop)]
            assert after.finish_reason == "stop"
            assert after.token_ids == before.token_ids[: len(after.token_ids)]
        else:
            assert after.text == before.text and after.finish_reason == "length"
    _wait_until_no_blocks_held(engine)


def test_abort_mid_stream_frees_blocks(engine):
    aborted_before = engine.core.metrics.requests_total.get("abort", 0)
    outputs = _run(engine, "left", _prompt(2, 40), _greedy(500), stop_after=3)
    assert len(outputs) == 3 and not outputs[-1].finished
    _wait_until_no_blocks_held(engine)
    assert engine.core.metrics.requests_total.get("abort", 0) == aborted_before + 1
    assert engine.num_in_flight == 0 and engine.alive


def test_an_output_thread_error_fails_the_stream_and_stops_the_engine(engine, monkeypatch):
    def broken(self, updates):
        raise RuntimeError("detokenizer bug")

    monkeypatch.setattr(OutputProcessor, "process", broken)
    with pytest.raises(EngineDeadError, match="output thread died: detokenizer bug"):
        _run(engine, "doomed", _prompt(3), _greedy(50))
    assert not engine.alive and isinstance(engine.error, RuntimeError)
    _wait_until_no_blocks_held(engine)


def test_shutdown_ends_open_streams_and_joins_both_threads(engine):
    async def main():
        requests = engine.make_requests("long", _prompt(4), _greedy(800))
        stream = engine.generate("long", None, requests)
        outputs = [await anext(stream)]
        await asyncio.to_thread(engine.shutdown)
        outputs += [output async for output in stream]
        return outputs

    outputs = asyncio.run(main())
    assert outputs[-1].finished
    assert not engine._thread.is_alive() and not engine._output_thread.is_alive()
    _wait_until_no_blocks_held(engine)


def test_admission_is_decided_at_submission_so_requests_sent_together_count_each_other(
        tiny_llama_dir):
    config = EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_blocks=64, max_num_seqs=1)
    busy = AsyncEngine(build_engine(config), max_waiting_requests=1)
    submitted = threading.Event()
    apply_commands = busy._apply_commands

    def after_submission():  # the engine thread takes no command until all three are in
        submitted.wait(timeout=30)
        apply_commands()

    busy._apply_commands = after_submission

    async def submit_three():
        streams, refused = [], 0
        for index in range(3):  # no await between them: the engine thread has seen none yet
            requests = busy.make_requests(f"r{index}", _prompt(index), _greedy(5))
            try:
                streams.append(busy.generate(f"r{index}", None, requests))
            except QueueFullError:
                refused += 1
        submitted.set()
        outputs = []
        for stream in streams:
            outputs.append([output async for output in stream])
        return refused, outputs

    try:
        refused, outputs = asyncio.run(submit_three())
        assert refused == 2 and len(outputs) == 1 and outputs[0][-1].finished
        _wait_until_no_blocks_held(busy)
    finally:
        busy.shutdown()


def test_a_stream_dropped_before_its_first_iteration_aborts_its_request(engine):
    async def submit_and_drop():
        requests = engine.make_requests("dropped", _prompt(5), _greedy(400))
        stream = engine.generate("dropped", None, requests)  # submitted already
        in_flight = engine.num_in_flight
        del stream  # never iterated: its finally never runs; collected here
        await asyncio.sleep(0.05)
        return in_flight

    assert asyncio.run(submit_and_drop()) == 1
    _wait_until_no_blocks_held(engine)
    assert engine.num_in_flight == 0
    # aborted on the engine thread, or dropped there before it was added: never run to the end
    assert all(t.num_output_tokens < 400 for t in engine.core.metrics.finished_timelines())


def test_a_request_whose_text_work_fails_ends_its_stream_with_the_error_only(engine,
                                                                            monkeypatch):
    """The detokenizer of one request raises: its stream ends with ``error``, the engine and
    output threads live on, and a request beside it gets the tokens of a fault-free run."""
    expected = _run(engine, "clean", _prompt(8), _greedy(10))[-1].outputs[0].token_ids
    add = IncrementalDetokenizer.add

    def failing(self, token_id):
        if self._ids[:5] == _prompt(7)[-5:] and len(self.output_ids) >= 2:
            raise ValueError("cannot decode this one")
        return add(self, token_id)

    monkeypatch.setattr(IncrementalDetokenizer, "add", failing)

    async def both():
        streams = [engine.generate(rid, None, engine.make_requests(rid, prompt, _greedy(10)))
                   for rid, prompt in (("bad", _prompt(7)), ("good", _prompt(8)))]
        collected = []
        for stream in streams:
            collected.append([output async for output in stream])
        return collected

    bad, good = asyncio.run(both())
    assert bad[-1].finished and "cannot decode this one" in bad[-1].error
    assert bad[-1].outputs[0].finish_reason == "error"
    assert good[-1].error is None and good[-1].outputs[0].token_ids == expected
    assert engine.alive and engine.health_problem() is None
    _wait_until_no_blocks_held(engine)
