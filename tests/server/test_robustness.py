"""Clients that leave, load, full queues, keys, shutdown and fuzzed bodies: the server keeps
serving, answers in OpenAI's error shape, and never leaks a KV block."""

from __future__ import annotations

import asyncio
import json
import random
import signal

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import ServerProcess, wait_until_idle

LONG = dict(model="tiny", max_tokens=400, temperature=0, ignore_eos=True)


def test_client_disconnect_mid_stream_frees_its_blocks(server):
    body = {**LONG, "messages": [{"role": "user", "content": "go on"}], "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as resp:
        lines = resp.iter_lines()
        for _ in range(6):
            next(lines)
        assert server.metrics()["tierserve_kv_blocks_in_use"] > 0
    values = wait_until_idle(server, timeout=10)
    assert values["tierserve_kv_blocks_in_use"] == 0
    assert values['tierserve_requests_total{status="abort"}'] >= 1


def test_non_streamed_client_that_leaves_is_aborted(server):
    aborted = server.metrics().get('tierserve_requests_total{status="abort"}', 0)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(server.url + "/v1/completions",
                   json={**LONG, "prompt": "hello", "max_tokens": 1000}, timeout=0.3)
    values = wait_until_idle(server, timeout=10)
    assert values["tierserve_kv_blocks_in_use"] == 0
    assert values['tierserve_requests_total{status="abort"}'] == aborted + 1


def test_64_concurrent_streams_some_leaving_early(server):
    baseline_rss = server.rss_mb()

    async def one(aclient, i):
        stream = await aclient.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": f"client {i}"}], max_tokens=24,
            temperature=0, stream=True)
        text, count = "", 0
        async for chunk in stream:
            count += 1
            if chunk.choices:
                text += chunk.choices[0].delta.content or ""
            if i % 4 == 0 and count == 3:  # every fourth client walks away
                await stream.close()
                return None
        return text

    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0,
                                     timeout=120)
        results = await asyncio.wait_for(asyncio.gather(*[one(aclient, i) for i in range(64)]), 240)
        await aclient.close()
        return results

    results = asyncio.run(run())
    completed = [r for i, r in enumerate(results) if i % 4]
    assert len(completed) == 48 and all(r for r in completed)
    values = wait_until_idle(server)
    assert values["tierserve_kv_blocks_in_use"] == 0
    assert values["tierserve_num_requests_running"] == 0
    assert server.rss_mb() < baseline_rss + 64  # no per-request state left behind


@pytest.mark.parametrize("stream", [False, True])
def test_full_waiting_queue_answers_503_with_retry_after(tiny_llama_dir, stream):
    busy = ServerProcess(tiny_llama_dir, "--max-waiting-requests", "1", "--max-num-seqs", "1")
    try:
        async def run():
            async with httpx.AsyncClient(timeout=60) as http:
                body = {**LONG, "max_tokens": 60, "messages": [{"role": "user", "content": "x"}],
                        "stream": stream}
                return await asyncio.gather(*[
                    http.post(busy.url + "/v1/chat/completions", json=body) for _ in range(6)])

        responses = asyncio.run(run())
        codes = sorted(r.status_code for r in responses)
        assert 200 in codes and 503 in codes
        rejected = next(r for r in responses if r.status_code == 503)
        assert rejected.headers["Retry-After"] == "1"
        assert rejected.json()["error"]["code"] == "queue_full"
        # more prompts in one request than may ever wait: a 400 that says why, not a 503
        too_many = httpx.post(busy.url + "/v1/completions", timeout=60, json={
            "prompt": ["a", "b"], "max_tokens": 2, "stream": stream})
        assert too_many.status_code == 400
        assert "--max-waiting-requests" in too_many.json()["error"]["message"]
    finally:
        busy.stop()


def test_api_key_guards_v1_but_not_health(tiny_llama_dir):
    keyed = ServerProcess(tiny_llama_dir, env={"TIERSERVE_API_KEY": "s3cret"})
    try:
        assert httpx.get(keyed.url + "/health").status_code == 200
        denied = httpx.get(keyed.url + "/v1/models")
        assert denied.status_code == 401 and denied.json()["error"]["code"] == "invalid_api_key"
        wrong = openai.OpenAI(base_url=keyed.url + "/v1", api_key="nope", max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            wrong.models.list()
        right = openai.OpenAI(base_url=keyed.url + "/v1", api_key="s3cret", max_retries=0)
        assert right.models.list().data[0].id == "tiny"
    finally:
        keyed.stop()


def test_request_timeout_gives_504_and_frees_blocks(tiny_llama_dir):
    slow = ServerProcess(tiny_llama_dir, "--request-timeout", "0.2", "--max-num-batched-tokens", "1")
    try:
        response = httpx.post(slow.url + "/v1/completions",
                              json={**LONG, "prompt": [5] * 900, "max_tokens": 100}, timeout=30)
        assert response.status_code == 504 and response.json()["error"]["code"] == "timeout"
        assert wait_until_idle(slow, timeout=10)["tierserve_kv_blocks_in_use"] == 0
    finally:
        slow.stop()


def test_sigterm_finishes_in_flight_work_and_exits_0(tiny_llama_dir):
    proc = ServerProcess(tiny_llama_dir)
    client = httpx.Client(timeout=60)
    with client.stream("POST", proc.url + "/v1/completions",
                       json={"model": "tiny", "prompt": "x", "max_tokens": 40, "stream": True,
                             "temperature": 0, "ignore_eos": True}) as resp:
        lines = resp.iter_lines()
        first = next(lines)
        proc.proc.send_signal(signal.SIGTERM)
        body = first + "".join(lines)
    assert "[DONE]" in body  # the stream in flight was allowed to finish
    code, out = proc.stop()
    assert code == 0 and "tierserve stopped" in out


def test_metrics_are_prometheus_text(server):
    text = httpx.get(server.url + "/metrics").text
    for name in ("tierserve_time_to_first_token_seconds_bucket", "tierserve_requests_total",
                 "tierserve_kv_cache_usage", "tierserve_num_requests_waiting",
                 "tierserve_prefix_cache_hit_rate", "tierserve_preemptions_total",
                 "tierserve_tokens_per_second"):
        assert name in text
    assert "# TYPE tierserve_e2e_request_latency_seconds histogram" in text


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children,
                                                                     max_size=4),
    max_leaves=12)
FIELDS = ["model", "messages", "prompt", "max_tokens", "max_completion_tokens", "temperature",
          "top_p", "n", "stop", "seed", "presence_penalty", "frequency_penalty", "logprobs",
          "top_logprobs", "stream", "stream_options", "user", "top_k", "min_p",
          "repetition_penalty", "priority", "ignore_eos", "echo", "min_tokens", "stop_token_ids"]
bodies = st.fixed_dictionaries({}, optional={name: json_values for name in FIELDS})
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "x"]),
                                           "content": st.text(max_size=30) | json_values}),
                    max_size=3)


@settings(max_examples=80, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=bodies, msgs=messages, route=st.sampled_from(["chat/completions", "completions"]),
       small=st.integers(1, 4))
def test_fuzzed_bodies_never_get_a_500(server, body, msgs, route, small):
    body = dict(body)
    if random.random() < 0.5:
        body["messages"] = msgs
    if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 0:
        body["max_tokens"] = small  # keep valid requests quick
    body.pop("n", None) if isinstance(body.get("n"), int) and body["n"] > 4 else None
    response = httpx.post(f"{server.url}/v1/{route}", content=json.dumps(body),
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"}
