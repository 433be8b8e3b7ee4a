"""Structured outputs over HTTP with the official openai client: response_format with a
pydantic model (chat.completions.parse), json_object, vLLM's guided_* and structured_outputs
fields, streamed too; a spec that cannot compile is a 400 naming its field."""

from __future__ import annotations

import json
import re
from typing import Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.server.conftest import ServerProcess, wait_until_idle


class City(BaseModel):
    name: str = Field(max_length=30)
    country: str = Field(max_length=30)
    population_millions: int = Field(ge=0, le=50)
    climate: Literal["hot", "mild", "cold"]


@pytest.fixture(scope="module")
def server(smollm2_path):
    # Packed weights (the GGUF as stored): these tests check structured outputs through the
    # API, not the float path's numerics (the parity tests own those); decode is faster.
    proc = ServerProcess(smollm2_path, "--served-model-name", "tiny", "--kv-cache-memory",
                         "128MiB", "--max-model-len", "1024", "--quantization", "gguf")
    yield proc
    proc.stop()


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)


def test_chat_completions_parse_returns_the_pydantic_model(client):
    completion = client.chat.completions.parse(
        model="tiny", messages=[{"role": "user", "content": "Describe Paris as JSON."}],
        response_format=City, temperature=0, max_tokens=120)
    city = completion.choices[0].message.parsed
    assert isinstance(city, City), completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"


def test_json_object_guided_fields_and_a_stream(client, server):
    messages = [{"role": "user", "content": 'Reply with exactly this JSON: {"ok": true}'}]
    anything = client.chat.completions.create(model="tiny", messages=messages, temperature=0,
                                              max_tokens=200,
                                              response_format={"type": "json_object"})
    assert anything.choices[0].finish_reason == "stop", anything.choices[0].message.content
    assert isinstance(json.loads(anything.choices[0].message.content), dict)
    choice = client.completions.create(model="tiny", prompt="Is the sky blue? Answer:",
                                       max_tokens=5, temperature=0,
                                       extra_body={"guided_choice": ["yes", "no"]})
    assert choice.choices[0].text in ("yes", "no")
    phone = client.completions.create(
        model="tiny", prompt="A phone number:", max_tokens=40, temperature=0.8, seed=2,
        extra_body={"structured_outputs": {"regex": r"\(\d{3}\) \d{3}-\d{4}"}})
    assert re.fullmatch(r"\(\d{3}\) \d{3}-\d{4}", phone.choices[0].text)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, max_tokens=120, stream=True,
        response_format={"type": "json_schema", "json_schema": {
            "name": "city", "strict": True,
            "schema": {**City.model_json_schema(), "additionalProperties": False}}})
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    City.model_validate_json(text)
    assert wait_until_idle(server)["tierserve_kv_blocks_in_use"] == 0


@pytest.mark.parametrize("extra, param", [
    ({"guided_regex": "(unclosed"}, "guided_regex"),
    ({"response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "properties": {"a": {"type": "nope"}}}}}},
     "response_format"),
    ({"guided_choice": ["a"], "guided_regex": "b"}, "guided_choice"),  # two: the second
    ({"structured_outputs": {"grammar": "start: missing"}}, "structured_outputs"),
])
def test_a_spec_that_cannot_compile_is_a_400_naming_its_field(client, server, extra, param):
    with pytest.raises(openai.BadRequestError) as refused:
        client.completions.create(model="tiny", prompt="x", max_tokens=4, extra_body=extra)
    assert refused.value.body["param"] == param
    assert server.metrics()["tierserve_num_requests_waiting"] == 0
