"""The server driven by the official openai client, as users would: chat, completions, streaming,
n > 1, stop, seeds, logprobs, and every error shape."""

from __future__ import annotations

import asyncio
import json

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


def test_echo_with_logprobs_scores_every_prompt_token_first_one_null(client, tiny_llama_dir):
    """The request lm-evaluation-harness sends for log-likelihoods, checked against the engine's
    own prompt logprobs (themselves checked against transformers in tests/engine)."""
    from tierserve import LLM, SamplingParams

    prompt = [5, 17, 42, 99, 3, 250, 8]
    scored = client.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                       logprobs=1, echo=True)
    logprobs = scored.choices[0].logprobs
    assert len(logprobs.tokens) == len(prompt) + 1  # the prompt, then the one generated token
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    reference = LLM(str(tiny_llama_dir), num_blocks=16).generate(
        [prompt], SamplingParams(max_tokens=0, prompt_logprobs=1), use_tqdm=False)[0]
    for position in range(1, len(prompt)):
        expected = reference.prompt_logprobs[position][prompt[position]].logprob
        assert logprobs.token_logprobs[position] == pytest.approx(expected, abs=1e-5)
        assert len(logprobs.top_logprobs[position]) == 1
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    assert "".join(logprobs.tokens) == scored.choices[0].text
    only = client.completions.create(model="tiny", prompt=prompt, max_tokens=0, logprobs=0,
                                     echo=True)
    assert only.usage.completion_tokens == 0 and only.choices[0].finish_reason == "length"
    assert only.choices[0].logprobs.token_logprobs == logprobs.token_logprobs[:-1]


def test_streamed_echo_sends_the_prompt_first(client):
    kwargs = dict(model="tiny", prompt="The quick", max_tokens=4, temperature=0, echo=True)
    full = client.completions.create(**kwargs).choices[0].text
    chunks = [c for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert chunks[0].choices[0].text == "The quick"
    assert "".join(c.choices[0].text for c in chunks) == full


def test_streamed_echo_with_logprobs_of_a_prompt_longer_than_the_step_budget(client):
    """600 prompt tokens take three prefill chunks (budget 256): the streamed echo still
    carries every prompt token's logprob, as the non-streamed answer does."""
    prompt = [(7 * i) % 500 + 3 for i in range(600)]
    kwargs = dict(model="tiny", prompt=prompt, max_tokens=2, temperature=0, echo=True,
                  logprobs=1)
    whole = client.completions.create(**kwargs).choices[0].logprobs
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True)
              if c.choices]
    streamed = [lp for c in chunks if c.logprobs for lp in c.logprobs.token_logprobs]
    assert len(streamed) == len(whole.token_logprobs) == 602
    assert streamed[0] is None and streamed[1:] == pytest.approx(whole.token_logprobs[1:],
                                                                 abs=1e-6)
    offsets = [o for c in chunks if c.logprobs for o in c.logprobs.text_offset]
    assert offsets == whole.text_offset


def test_prompt_logprobs_extension_and_the_tokenizer_routes(client, server):
    response = httpx.post(server.url + "/v1/completions", json={
        "model": "tiny", "prompt": [5, 6, 7, 8], "max_tokens": 1, "prompt_logprobs": 2}).json()
    entries = response["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == 4
    assert all(str(token) in entry for token, entry in zip([6, 7, 8], entries[1:]))
    tokenized = httpx.post(server.url + "/tokenize", json={"prompt": "The quick brown fox",
                                                           "add_special_tokens": False}).json()
    assert tokenized["count"] == len(tokenized["tokens"]) and tokenized["max_model_len"] == 1024
    text = httpx.post(server.url + "/detokenize", json={"tokens": tokenized["tokens"]}).json()
    assert text == {"prompt": "The quick brown fox"}
    chat = httpx.post(server.url + "/tokenize", json={"messages": MESSAGES}).json()
    assert chat["count"] == client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    info = httpx.get(server.url + "/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and "messages" in info["chat_template"]
    bad = httpx.post(server.url + "/detokenize", json={"tokens": [10**6]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"


def test_deeply_nested_bodies_are_ignored_or_refused_never_a_500(server):
    for depth, status in ((400, 200), (20000, 400)):  # an ignored field, then unparsable
        body = '{"model": "tiny", "prompt": "hi", "max_tokens": 1, "x": ' + "[" * depth \
            + "]" * depth + "}"
        response = httpx.post(server.url + "/v1/completions", content=body,
                              headers={"Content-Type": "application/json"})
        assert response.status_code == status, response.text
        assert status == 200 or response.json()["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize("body,param", [
    ({"prompt": ""}, "prompt"),
    ({"prompt": "hi", "seed": 2**63}, "seed"),
    ({"prompt": "hi", "stop": [""]}, "stop"),
    ({"prompt": "hi", "stop_token_ids": [10**6]}, "stop_token_ids"),
    ({"prompt": "\ud800 lone surrogate"}, None),
    ({"prompt": [10**6]}, "prompt"),
])
def test_what_the_engine_cannot_take_is_a_400_at_the_edge(server, body, param):
    content = json.dumps({"model": "tiny", **body})  # \ud800 survives json.dumps as an escape
    response = httpx.post(server.url + "/v1/completions", content=content,
                          headers={"Content-Type": "application/json"})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert httpx.get(server.url + "/health").status_code == 200
