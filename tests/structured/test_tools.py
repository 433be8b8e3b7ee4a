"""Tool calling pieces without a model: prompts for a template that knows no tools, the forced
call's grammar, and calls parsed out of text."""

from __future__ import annotations

import json

import pytest

from tierserve.errors import InvalidRequestError
from tierserve.structured.tools import call_grammar, parse_calls, prompt_messages

TOOLS = [{"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
    "required": ["a", "b"]}}}, {"type": "function", "function": {"name": "now"}}]


def test_calls_are_parsed_out_of_the_text_and_the_rest_is_content():
    text = ('Let me add.\n<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n'
            '</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    content, calls = parse_calls(text)
    assert content == "Let me add."
    assert [c["function"]["name"] for c in calls] == ["add", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert calls[0]["id"] != calls[1]["id"] and calls[0]["type"] == "function"
    assert parse_calls("no calls here") == ("no calls here", [])
    broken = "<tool_call>\n{not json}\n</tool_call>"
    assert parse_calls(broken) == (broken, [])  # not a call: stays text
    assert parse_calls('<tool_call>{"name": "now", "arguments": {}}</tool_call>')[0] is None


def test_a_template_without_tools_gets_them_in_the_system_prompt_and_calls_in_the_text():
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "", "tool_calls": [
                    {"id": "c1", "type": "function",
                     "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
                {"role": "tool", "tool_call_id": "c1", "content": "3"}]
    out = prompt_messages(messages, TOOLS, template_takes_tools=False)
    assert out[0]["role"] == "system" and out[0]["content"].startswith("Be brief.")
    assert '"name": "add"' in out[0]["content"] and "<tool_call>" in out[0]["content"]
    assert out[2]["content"] == ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}'
                                 '\n</tool_call>')
    assert out[3] == {"role": "tool", "content": "<tool_response>\n3\n</tool_response>"}
    assert prompt_messages(messages, TOOLS, template_takes_tools=True) is messages


def test_the_forced_call_grammar_names_the_tool_and_closes_its_arguments():
    grammar = call_grammar(TOOLS, "add", parallel=True).grammar
    assert grammar.startswith("start: call\n")  # a named choice: exactly one call
    assert '"name\\": \\"add\\"' in grammar and "now" not in grammar
    schema = json.loads(grammar.split("%json ", 1)[1])
    assert schema["additionalProperties"] is False and "x-guidance" in schema
    anyone = call_grammar(TOOLS, None, parallel=True).grammar
    assert anyone.startswith('start: call ("\\n" call)*\n') and "call: call_0 | call_1" in anyone
    with pytest.raises(InvalidRequestError, match="not in tools"):
        call_grammar(TOOLS, "missing", parallel=False)


def test_forced_calls_compile_with_refs_and_bound_whitespace(tiny_llama_dir):
    """Arguments schemas with $defs (what pydantic writes for nested models) compile, and a
    call cannot pad its JSON with unbounded whitespace."""
    import llguidance

    from tierserve.config import EngineConfig
    from tierserve.engine.loading import build_engine
    from tierserve.structured import grammar_text

    person = {"type": "object", "properties": {"home": {"$ref": "#/$defs/Addr"}},
              "required": ["home"], "$defs": {"Addr": {"type": "object", "properties": {
                  "city": {"type": "string"}}, "required": ["city"]}}}
    tools = [{"type": "function", "function": {"name": "Person", "parameters": person}}]
    engine = build_engine(EngineConfig.from_kwargs(model=str(tiny_llama_dir), num_blocks=16))
    constraints = engine.core.constraints
    spec = call_grammar(tools, None, parallel=False)
    constraints.check(spec)
    matcher = llguidance.LLMatcher(constraints.tokenizer, grammar_text(*spec.key()), log_level=0)
    tokenizer = engine.tokenizer
    prefix = tokenizer.encode('<tool_call>\n{"name": "Person", "arguments": {',
                              add_special_tokens=False)
    assert matcher.consume_tokens(prefix)
    newline = tokenizer.encode("\n", add_special_tokens=False)
    taken = 0
    while taken < 100 and matcher.consume_tokens(newline):
        taken += 1
    assert taken <= 32
    engine.runner.close()


def test_content_is_held_back_only_where_a_call_may_open():
    from tierserve.structured.tools import complete_calls, content_end

    assert content_end("Sure. <tool") == len("Sure. ")
    assert content_end("Sure. <tool_call>\n{") == len("Sure. ")
    assert content_end("a < b") == len("a < b")
    assert content_end("x <") == len("x ")
    text = '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>\n<tool_call>\n{"na'
    assert [c["function"]["name"] for _, _, c in complete_calls(text)] == ["now"]


def test_earlier_call_arguments_reach_a_tools_template_as_objects():
    from tierserve.server.convert import chat_messages
    from tierserve.server.schemas import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({"messages": [
        {"role": "user", "content": "1+2?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "add", "arguments": '{"a": 1, "b": 2}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "3"}], "tools": TOOLS})
    messages = chat_messages(body, template_takes_tools=True)
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"a": 1, "b": 2}
    assert messages[2]["tool_call_id"] == "c1"
