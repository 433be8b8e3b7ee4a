"""The server driven by the official openai client, as users would: chat, completions, streaming,
n > 1, stop, seeds, logprobs, and every error shape."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

MESSAGES = [{"role": "user", "content": "Tell me about paged attention."}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0)


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]


def test_models_reports_the_context_that_requests_are_checked_against(client):
    context = client.models.list().data[0].max_model_len  # vLLM's extra field
    fits = client.completions.create(model="tiny", prompt=[5] * (context - 1), max_tokens=1,
                                     temperature=0)
    assert fits.usage.prompt_tokens == context - 1
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="tiny", prompt=[5] * (context + 1), max_tokens=1)


def test_chat_completion_has_openai_shape(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=12,
                                              temperature=0)
    assert response.id.startswith("chatcmpl-") and response.object == "chat.completion"
    assert response.created > 0 and response.system_fingerprint
    (choice,) = response.choices
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason == "length"
    assert response.usage.completion_tokens == 12
    assert response.usage.total_tokens == response.usage.prompt_tokens + 12


def test_streamed_content_equals_non_streamed_content(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs).choices[0].message.content
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 20


def test_text_completion_with_string_list_and_token_prompts(client):
    one = client.completions.create(model="tiny", prompt="def main():", max_tokens=5, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    many = client.completions.create(model="tiny", prompt=["def main():", "The quick"],
                                     max_tokens=5, temperature=0)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == one.choices[0].text
    ids = client.completions.create(model="tiny", prompt=[5, 6, 7, 8], max_tokens=3)
    assert ids.usage.prompt_tokens == 4 and ids.usage.completion_tokens == 3


def test_streamed_completion_equals_non_streamed(client):
    kwargs = dict(model="tiny", prompt="Paged attention stores", max_tokens=16, temperature=0)
    full = client.completions.create(**kwargs).choices[0].text
    assert "".join(c.choices[0].text for c in client.completions.create(**kwargs, stream=True)
                   if c.choices) == full


def test_n_choices(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, max_tokens=8,
                                              temperature=1.0, seed=3)
    assert sorted(c.index for c in response.choices) == [0, 1, 2]
    assert len({c.message.content for c in response.choices}) > 1
    assert response.usage.completion_tokens == 24
    streamed = client.chat.completions.create(model="tiny", messages=MESSAGES, n=3, max_tokens=8,
                                              temperature=1.0, seed=3, stream=True)
    texts = {0: "", 1: "", 2: ""}
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == {c.index: c.message.content for c in response.choices}


def test_stop_string_is_not_in_the_output_streamed_or_not(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=30, temperature=0)
    free = client.chat.completions.create(**kwargs).choices[0].message.content
    stop = free[6:9]
    cut = client.chat.completions.create(**kwargs, stop=[stop]).choices[0]
    assert cut.message.content == free[: free.index(stop)] and cut.finish_reason == "stop"
    streamed = "".join(c.choices[0].delta.content or ""
                       for c in client.chat.completions.create(**kwargs, stop=stop, stream=True)
                       if c.choices)
    assert streamed == cut.message.content


def test_seed_reproducible(client):
    kwargs = dict(model="tiny", messages=MESSAGES, max_tokens=16, temperature=1.0)
    a = client.chat.completions.create(**kwargs, seed=11).choices[0].message.content
    b = client.chat.completions.create(**kwargs, seed=11).choices[0].message.content
    c = client.chat.completions.create(**kwargs, seed=12).choices[0].message.content
    assert a == b and a != c


def test_logprobs_chat_and_completions(client):
    chat = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=4,
                                          temperature=0, logprobs=True, top_logprobs=3)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)  # greedy: the best
    text = client.completions.create(model="tiny", prompt="The quick", max_tokens=3,
                                     temperature=0, logprobs=2)
    logprobs = text.choices[0].logprobs
    assert len(logprobs.tokens) == 3 and all(len(t) == 2 for t in logprobs.top_logprobs)
    assert "".join(logprobs.tokens) == text.choices[0].text


def test_async_client_concurrent_requests(server):
    async def run():
        aclient = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0)
        results = await asyncio.gather(*[
            aclient.chat.completions.create(model="tiny", max_tokens=6, temperature=0,
                                            messages=[{"role": "user", "content": f"n{i}"}])
            for i in range(8)])
        await aclient.close()
        return results

    results = asyncio.run(run())
    assert all(r.usage.completion_tokens == 6 for r in results)


@pytest.mark.parametrize("kwargs,param", [
    (dict(max_tokens=-1), "max_tokens"),
    (dict(temperature=3.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(n=0), "n"),
    (dict(top_logprobs=50, logprobs=True), "top_logprobs"),
])
def test_invalid_values_are_400_naming_the_field(client, kwargs, param):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=MESSAGES, **kwargs)
    assert info.value.status_code == 400
    assert info.value.body["param"] == param and info.value.body["type"] == "invalid_request_error"


def test_empty_messages_and_unknown_role_are_400(client):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=[])
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny", messages=[{"role": "wizard", "content": "x"}])
    assert "role" in info.value.body["message"]


def test_prompt_longer_than_context_names_both_numbers(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model="tiny", prompt=[5] * 2000, max_tokens=4)
    message = info.value.body["message"]
    assert "2,000 tokens" in message and "1,024" in message
    assert info.value.body["code"] == "context_length_exceeded"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-9", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"


def test_malformed_json_and_wrong_types_are_400_not_422(server):
    bad = httpx.post(server.url + "/v1/chat/completions", content=b"{not json",
                     headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
    wrong = httpx.post(server.url + "/v1/completions", json={"prompt": {"a": 1}})
    assert wrong.status_code == 400 and wrong.json()["error"]["param"] == "prompt"


def test_unknown_fields_are_ignored(server):
    response = httpx.post(server.url + "/v1/chat/completions", json={
        "model": "tiny", "messages": MESSAGES, "max_tokens": 2, "future_field": {"x": 1}})
    assert response.status_code == 200


def test_oversized_body_is_413(server):
    response = httpx.post(server.url + "/v1/completions",
                          json={"prompt": "x" * (5 << 20), "max_tokens": 1})
    assert response.status_code == 413 and response.json()["error"]["code"] == "body_too_large"


def test_health_and_docs(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/docs").status_code == 200
    assert "/v1/chat/completions" in httpx.get(server.url + "/openapi.json").json()["paths"]


def test_content_parts_and_token_id_batches(client, server):
    parts = [{"role": "user", "content": [{"type": "text", "text": "Tell me about "},
                                          {"type": "text", "text": "paged attention."}]}]
    a = client.chat.completions.create(model="tiny", messages=parts, max_tokens=6, temperature=0)
    b = client.chat.completions.create(model="tiny", messages=MESSAGES, max_tokens=6,
                                       temperature=0)
    assert a.choices[0].message.content == b.choices[0].message.content
    batch = client.completions.create(model="tiny", prompt=[[5, 6, 7], [8, 9]], max_tokens=2)
    assert [c.index for c in batch.choices] == [0, 1] and batch.usage.prompt_tokens == 5
    echoed = client.completions.create(model="tiny", prompt="The quick", max_tokens=2,
                                       temperature=0, echo=True)
    assert echoed.choices[0].text.startswith("The quick")


def test_max_completion_tokens_and_user_are_honoured(client):
    response = client.chat.completions.create(model="tiny", messages=MESSAGES, temperature=0,
                                              max_completion_tokens=3, user="alice")
    assert response.usage.completion_tokens == 3
