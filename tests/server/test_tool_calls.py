"""Tool calling through the server with the official openai client and SmolLM2 (its template
knows no tools: they are described in the system prompt): forced and named calls are valid
JSON for their schemas, streamed as tool_calls deltas, tool results fed back; bad choices 400."""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess

WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40},
                                            "unit": {"enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather",
                                           "description": "Current weather in a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD}}]
SCHEMAS = {"get_weather": WEATHER, "add": ADD}
ASK = [{"role": "user", "content": "What is the weather in Paris, in celsius?"}]


@pytest.fixture(scope="module")
def client(smollm2_path):
    # Packed weights (the GGUF as stored): what these tests check is the API's tool calling,
    # not the float path's numerics (the parity tests own those); decode is several times faster.
    proc = ServerProcess(smollm2_path, "--kv-cache-memory", "128MiB", "--max-model-len", "2048",
                         "--quantization", "gguf")
    yield openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0)
    proc.stop()


def _check(call) -> dict:
    arguments = json.loads(call.function.arguments)
    jsonschema.validate(arguments, SCHEMAS[call.function.name])
    return arguments


def test_a_required_call_is_valid_for_its_schema_and_a_named_one_is_that_tool(client):
    required = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                              tool_choice="required", temperature=0,
                                              max_tokens=120, parallel_tool_calls=False)
    choice = required.choices[0]
    assert choice.finish_reason == "tool_calls" and len(choice.message.tool_calls) == 1
    _check(choice.message.tool_calls[0])
    named = client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "What is 2 plus 3?"}], tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "add"}}, temperature=0,
        max_tokens=60)
    call = named.choices[0].message.tool_calls[0]
    assert call.function.name == "add" and set(_check(call)) == {"a", "b"}


def test_a_streamed_call_arrives_as_a_tool_calls_delta(client):
    stream = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                            tool_choice="required", temperature=0,
                                            max_tokens=120, stream=True)
    deltas, reasons = [], []
    for chunk in stream:
        if chunk.choices:
            deltas += chunk.choices[0].delta.tool_calls or []
            reasons.append(chunk.choices[0].finish_reason)
    assert reasons[-1] == "tool_calls" and deltas and deltas[0].index == 0
    assert deltas[0].id.startswith("call_") and deltas[0].function.name in SCHEMAS
    jsonschema.validate(json.loads(deltas[0].function.arguments),
                        SCHEMAS[deltas[0].function.name])


def test_a_tool_result_fed_back_gets_an_answer(client):
    first = client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                           tool_choice={"type": "function",
                                                        "function": {"name": "get_weather"}},
                                           temperature=0, max_tokens=120)
    call = first.choices[0].message.tool_calls[0]
    messages = ASK + [first.choices[0].message.model_dump(exclude_none=True),
                      {"role": "tool", "tool_call_id": call.id,
                       "content": json.dumps({"temperature": 21, "sky": "clear"})}]
    answer = client.chat.completions.create(model="tiny", messages=messages, tools=TOOLS,
                                            tool_choice="none", temperature=0, max_tokens=40)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_tool_choice_errors_are_400s(client):
    with pytest.raises(openai.BadRequestError) as unknown:
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS, tool_choice={
            "type": "function", "function": {"name": "nope"}}, max_tokens=4)
    assert unknown.value.body["param"] == "tool_choice"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=ASK, tool_choice="required",
                                       max_tokens=4)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="tiny", messages=ASK, tools=TOOLS,
                                       tool_choice="required", max_tokens=4,
                                       response_format={"type": "json_object"})
