"""The server under injected faults, driven by the official openai client: a request that fails
inside the engine gets an OpenAI-shaped 500 (or an error event on its stream), the requests beside
it get the text of a fault-free run, no KV block leaks, and the server answers the next request.
Only whole engine steps failing again and again turn /health to 503."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest

from tests.server.conftest import InProcessServer

POISON = [7, 7, 7, 11, 13]  # the prompt whose logits go NaN once it has 3 output tokens
OTHERS = [[20 + i, 30 + i, 40 + i, 50 + i] for i in range(4)]
GREEDY = dict(model="tiny", max_tokens=12, temperature=0, extra_body={"ignore_eos": True})


@pytest.fixture(scope="module")
def live(tiny_llama_dir):
    server = InProcessServer(tiny_llama_dir)
    yield server
    server.stop()


@pytest.fixture
def poisoned(live, monkeypatch):
    sampler = live.engine.engine.runner.sampler
    real = sampler.sample

    def sample(logits, rows):
        for index, row in enumerate(rows):
            if row.prompt_token_ids == POISON and len(row.output_token_ids) == 3:
                logits = logits.clone()
                logits[index] = float("nan")
        return real(logits, rows)

    monkeypatch.setattr(sampler, "sample", sample)
    return live


def _client(live, cls=openai.OpenAI):
    return cls(base_url=live.url + "/v1", api_key="x", max_retries=0, timeout=60)


def _idle(live, timeout: float = 10.0) -> None:
    core, deadline = live.engine.core, time.time() + timeout
    while core.scheduler.requests or core.kv.num_free_blocks != core.kv.num_blocks:
        assert time.time() < deadline, "KV blocks still held"
        time.sleep(0.02)
    core.kv.check_invariants()


def _texts(live, stream: bool) -> tuple[list, list[str]]:
    """Send POISON and OTHERS at once; (what the poisoned request raised or returned, texts)."""
    async def one(client, prompt):
        try:
            if not stream:
                return (await client.completions.create(prompt=prompt, **GREEDY)).choices[0].text
            text = ""
            async for chunk in await client.completions.create(prompt=prompt, stream=True,
                                                               **GREEDY):
                text += chunk.choices[0].text if chunk.choices else ""
            return text
        except openai.APIError as exc:
            return exc

    async def run():
        client = _client(live, openai.AsyncOpenAI)
        results = await asyncio.gather(*[one(client, p) for p in [POISON, *OTHERS]])
        await client.close()
        return results

    results = asyncio.run(run())
    return results[0], results[1:]


@pytest.fixture(scope="module")
def expected(live):
    return _texts(live, stream=False)[1]  # fault-free, the poison prompt sent beside them too


@pytest.mark.parametrize("stream", [False, True])
def test_a_request_failing_in_the_engine_fails_alone_and_the_server_serves_on(
        live, expected, poisoned, stream, monkeypatch):
    failed, texts = _texts(live, stream)
    assert texts == expected
    assert isinstance(failed, openai.APIError) and "non-finite" in failed.message
    if not stream:
        assert isinstance(failed, openai.InternalServerError) and failed.status_code == 500
        assert failed.body["type"] == "server_error"
    _idle(live)
    monkeypatch.undo()
    again = _client(live).completions.create(prompt=POISON, **GREEDY)
    assert again.choices[0].finish_reason == "length" and again.usage.completion_tokens == 12
    assert httpx.get(live.url + "/health").json() == {"status": "ok"}


def test_a_logits_processor_error_is_a_500_naming_it_and_nothing_leaks(live, monkeypatch):
    """Any exception in a request's own logits work (here injected as a processor) fails only
    that request, through the whole HTTP path."""
    from tierserve.engine.async_engine import AsyncEngine

    real = AsyncEngine.make_requests

    def with_processor(self, request_id, prompt_ids, params, **kw):
        if prompt_ids == POISON:
            def broken(output_ids, row):
                raise ZeroDivisionError("processor divides by zero")
            params.logits_processors = [broken]
        return real(self, request_id, prompt_ids, params, **kw)

    monkeypatch.setattr(AsyncEngine, "make_requests", with_processor)
    with pytest.raises(openai.InternalServerError, match="divides by zero"):
        _client(live).completions.create(prompt=POISON, **GREEDY)
    ok = _client(live).completions.create(prompt=OTHERS[0], **GREEDY)
    assert ok.usage.completion_tokens == 12
    _idle(live)


def test_repeated_whole_step_failures_turn_health_503_until_a_step_succeeds(live, monkeypatch):
    runner = live.engine.core.executor

    def broken(plan):
        raise RuntimeError("device lost")

    monkeypatch.setattr(live.engine.core, "executor", type("X", (), {"execute": broken}))
    client = _client(live)
    for attempt in range(3):
        with pytest.raises(openai.InternalServerError, match="device lost"):
            client.completions.create(prompt=OTHERS[attempt], **GREEDY)
        health = httpx.get(live.url + "/health")
        assert health.status_code == (503 if attempt == 2 else 200)
    assert "3 engine steps in a row failed" in health.json()["status"]
    assert "device lost" in health.json()["status"]
    _idle(live)
    monkeypatch.setattr(live.engine.core, "executor", runner)
    assert client.completions.create(prompt=OTHERS[0], **GREEDY).usage.completion_tokens == 12
    assert httpx.get(live.url + "/health").status_code == 200
    assert live.engine.alive


def test_a_seed_beyond_64_bits_is_a_400_naming_seed_and_the_engine_lives(live):
    with pytest.raises(openai.BadRequestError) as caught:
        _client(live).chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "hi"}], seed=2**64 + 5)
    assert caught.value.body["param"] == "seed" and "9223372036854775807" in caught.value.message
    seeded = _client(live).chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], seed=2**63 - 1, n=2,
        max_tokens=4)  # the largest seed, and seed + 1 for the second completion, both work
    assert len(seeded.choices) == 2
    assert httpx.get(live.url + "/health").status_code == 200
