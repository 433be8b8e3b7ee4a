"""Tool calls in Mistral's and Llama 3's syntaxes through the server, with the official openai
client: a tiny random model whose chat template renders ``tools`` with that family's markers
(so the server picks the family's parser), a forced call (the grammar makes even random
weights write one), parsed into message.tool_calls, streamed as tool_calls deltas."""

from __future__ import annotations

import json
import shutil

import jsonschema
import openai
import pytest

from tests.server.conftest import ServerProcess

ADD = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
       "required": ["a", "b"]}
TOOLS = [{"type": "function", "function": {"name": "add", "description": "Add two integers",
                                           "parameters": ADD}}]
ASK = [{"role": "user", "content": "1+2?"}]
TEMPLATES = {
    "mistral": ("{% if tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}"
                "{% for m in messages %}{% if m.tool_calls %}[TOOL_CALLS]"
                "{{ m.tool_calls | tojson }}{% else %}<s>{{ m['role'] }}: {{ m['content'] }}</s>"
                "{% endif %}\n{% endfor %}{% if add_generation_prompt %}<s>assistant: {% endif %}"),
    "llama3": ("{% if tools %}Functions: {{ tools | tojson }}. Reply with JSON.{% endif %}"
               "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
               "{% if add_generation_prompt %}<s>assistant: {% endif %}"
               "{# calls may open with <|python_tag|> #}"),
}


def test_the_templates_name_their_families():
    from tierserve.structured.tools import SYNTAXES, syntax_for

    for family, template in TEMPLATES.items():
        assert syntax_for(template) is SYNTAXES[family]


@pytest.fixture(scope="module", params=sorted(TEMPLATES))
def family_client(request, tiny_llama_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    shutil.copytree(tiny_llama_dir, folder, dirs_exist_ok=True)
    (folder / "chat_template.jinja").write_text(TEMPLATES[request.param])
    proc = ServerProcess(folder, "--max-model-len", "1024")
    yield request.param, openai.OpenAI(base_url=proc.url + "/v1", api_key="none", max_retries=0)
    proc.stop()


def test_a_forced_call_comes_back_as_tool_calls(family_client):
    family, client = family_client
    response = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, max_tokens=400, temperature=0, logprobs=True,
        tool_choice={"type": "function", "function": {"name": "add"}})
    choice = response.choices[0]
    raw = "".join(token.token for token in choice.logprobs.content)  # what the model wrote
    assert raw.startswith({"mistral": '[TOOL_CALLS][{"name": "add", "arguments": ',
                           "llama3": '{"name": "add", "parameters": '}[family]), raw
    assert choice.finish_reason == "tool_calls", (family, choice.message.content)
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "add" and call.id.startswith("call_")
    jsonschema.validate(json.loads(call.function.arguments), ADD)


def test_a_streamed_forced_call_arrives_as_a_tool_calls_delta(family_client):
    family, client = family_client
    stream = client.chat.completions.create(
        model="tiny", messages=ASK, tools=TOOLS, max_tokens=400, temperature=0, stream=True,
        tool_choice={"type": "function", "function": {"name": "add"}})
    deltas, content, reasons = [], "", []
    for chunk in stream:
        choice = chunk.choices[0]
        deltas += choice.delta.tool_calls or []
        content += choice.delta.content or ""
        reasons.append(choice.finish_reason)
    assert [d.function.name for d in deltas] == ["add"], family
    jsonschema.validate(json.loads(deltas[0].function.arguments), ADD)
    assert content == "" and reasons[-1] == "tool_calls"


def _stream(text: str, syntax, parallel: bool = True, step: int = 3) -> tuple[str, list[str]]:
    """Feed ``text`` to the tool stream a few characters at a time; (content, call names)."""
    from types import SimpleNamespace

    from tierserve.server.streaming import _ChoiceState, _tool_stream

    state, content, names = _ChoiceState(), "", []
    for end in [*range(step, len(text), step), len(text)]:
        done = end == len(text)
        completion = SimpleNamespace(text=text[:end], index=0, finished=done,
                                     finish_reason="stop" if done else None)
        for choices in _tool_stream(lambda choices: choices, completion, state, 0, syntax,
                                    parallel):
            delta = choices[0]["delta"]
            content += delta.get("content") or ""
            names += [call["function"]["name"] for call in delta.get("tool_calls") or []]
    return content, names


@pytest.mark.parametrize("family", ["hermes", "mistral", "llama3"])
def test_a_stream_carries_what_the_whole_answer_has(family):
    """Content between and after calls is streamed too, and equals the non-streamed content."""
    from tierserve.structured.tools import SYNTAXES, parse_calls

    syntax = SYNTAXES[family]
    add, now = '{"name": "add", "%s": {"a": 1, "b": 2}}', '{"name": "now", "%s": {}}'
    add, now = add % syntax.arguments, now % syntax.arguments
    text = {"hermes": f"Let me see. <tool_call>\n{add}\n</tool_call> then\n<tool_call>\n{now}"
                      "\n</tool_call>\nDone.",
            "mistral": f"Let me see.[TOOL_CALLS][{add}, {now}] Done.",
            "llama3": f"<|python_tag|>{add}; {now}"}[family]
    content, calls = parse_calls(text, syntax)
    streamed, names = _stream(text, syntax)
    assert names == [c["function"]["name"] for c in calls] == ["add", "now"]
    assert streamed == (content or "")
    assert _stream(text, syntax, parallel=False)[1] == ["add"]
    assert parse_calls(text, syntax, parallel=False)[0] == content  # extra calls are dropped
