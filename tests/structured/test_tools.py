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


def test_each_family_is_known_by_its_template():
    from tierserve.structured.tools import HERMES, LLAMA3, MISTRAL, syntax_for

    assert syntax_for(None) is HERMES and syntax_for("{{ messages }}") is HERMES  # no tools
    assert syntax_for("{% if tools %}[AVAILABLE_TOOLS]{% endif %}[TOOL_CALLS]") is MISTRAL
    assert syntax_for("{% if tools %}{{ tools }}{% endif %}<|python_tag|>") is LLAMA3
    assert syntax_for("{% for tool in tools %}<tool_call>{% endfor %}") is HERMES
    assert syntax_for("{% if tools %}{{ tools }}{% endif %}") is HERMES  # says nothing else


def test_mistral_calls_are_one_array_after_the_marker():
    from tierserve.structured.tools import MISTRAL, complete_calls, content_end

    text = ('Adding.[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
            '{"name": "now", "arguments": {}}]')
    content, calls = parse_calls(text, MISTRAL)
    assert content == "Adding."
    assert [c["function"]["name"] for c in calls] == ["add", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert len(complete_calls(text[:-5], MISTRAL)) == 1  # the second is still being written
    assert content_end("Adding.[TOOL", MISTRAL) == len("Adding.")
    assert parse_calls('[TOOL_CALLS][{"nom": 1}]', MISTRAL)[1] == []  # not calls: text


def test_llama3_calls_are_the_whole_answer():
    from tierserve.structured.tools import LLAMA3, complete_calls, content_end

    text = ('<|python_tag|>{"name": "add", "parameters": {"a": 1, "b": 2}}; '
            '{"name": "now", "parameters": {}}')
    content, calls = parse_calls(text, LLAMA3)
    assert content is None and [c["function"]["name"] for c in calls] == ["add", "now"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"a": 1, "b": 2}
    assert parse_calls('{"a": 1}', LLAMA3) == ('{"a": 1}', [])  # JSON, but not a call
    assert parse_calls("The answer is 3.", LLAMA3) == ("The answer is 3.", [])
    assert len(complete_calls(text[:-3], LLAMA3)) == 1  # the second is still being written
    assert content_end(" {", LLAMA3) == 0 and content_end("<|py", LLAMA3) == 0
    assert content_end("Sure, 3.", LLAMA3) == len("Sure, 3.")


def test_without_parallel_calls_one_call_is_kept_and_the_rest_is_dropped():
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>')
    content, calls = parse_calls(text, parallel=False)
    assert content is None and [c["function"]["name"] for c in calls] == ["add"]


@pytest.mark.parametrize("family", ["hermes", "mistral", "llama3"])
def test_forced_calls_of_every_family_generate_and_parse(tiny_llama_dir, family):
    """The forced grammar of each syntax makes even a random model write a call its parser
    reads back, valid for the schema."""
    import jsonschema

    from tierserve.engine.llm import LLM
    from tierserve.request import SamplingParams
    from tierserve.structured.tools import SYNTAXES

    syntax = SYNTAXES[family]
    llm = LLM(str(tiny_llama_dir), num_blocks=64)
    schema = TOOLS[0]["function"]["parameters"]
    for choice, parallel in (("add", False), (None, True)):
        params = SamplingParams(max_tokens=400, temperature=0.0,
                                structured_outputs=call_grammar(TOOLS, choice, parallel, syntax))
        completion = llm.generate(["x"], params)[0].outputs[0]
        content, calls = parse_calls(completion.text, syntax)
        assert calls, completion.text
        # a stopped answer is all calls; one cut by max_tokens may end inside the next call
        assert content is None or completion.finish_reason == "length", completion.text
        for call in calls:
            if call["function"]["name"] == "add":
                jsonschema.validate(json.loads(call["function"]["arguments"]), schema)
    llm.engine.runner.close()
