"""Tool calling: tool definitions into the prompt, the model's calls out of its text, and the
grammar that makes a required (or named) call valid JSON for its parameters' schema.

The call syntax is a parser per model family, as data (``SYNTAXES``). Today one is built:
Hermes / Qwen style, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``, which is also
what a checkpoint whose chat template knows no tools (SmolLM2's) is told to write: the tools are
then described in the system prompt in that syntax, as NousResearch's Hermes prompts do. A chat
template that takes ``tools`` renders them itself.
"""

from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass

from tierserve.errors import InvalidRequestError
from tierserve.structured import JSON_LAYOUT, StructuredOutputs


@dataclass(frozen=True, slots=True)
class CallSyntax:
    """How a model family writes a call: ``open`` + JSON ``{"name", "arguments"}`` + ``close``."""

    name: str
    open: str
    close: str


HERMES = CallSyntax("hermes", "<tool_call>\n", "\n</tool_call>")
SYNTAXES = {"hermes": HERMES}

SYSTEM_PROMPT = (
    "You are a function calling AI model. You may call one or more functions to assist with "
    "the user query. Don't make assumptions about what values to plug into functions. Here "
    "are the available tools: <tools> {tools} </tools> For each function call return a json "
    "object with function name and arguments within <tool_call></tool_call> XML tags:\n"
    "<tool_call>\n{{\"name\": <function-name>, \"arguments\": <args-json-object>}}\n"
    "</tool_call>")


def functions(tools: list[dict]) -> list[dict]:
    """The function definitions of OpenAI ``tools`` (``{"type": "function", "function": ...}``)."""
    return [tool["function"] for tool in tools if tool.get("type", "function") == "function"]


def prompt_messages(messages: list[dict], tools: list[dict] | None, template_takes_tools: bool,
                    syntax: CallSyntax = HERMES) -> list[dict]:
    """Chat messages for a template: with a template that renders ``tools`` itself, the
    assistant's earlier calls stay structured (``tool_calls``); otherwise the tools go into the
    system prompt, earlier calls into the assistant's text in the model's syntax, and tool
    results into ``<tool_response>`` blocks."""
    if template_takes_tools:
        return messages
    out = []
    if tools:
        described = SYSTEM_PROMPT.format(tools=json.dumps(functions(tools)))
        if messages and messages[0]["role"] in ("system", "developer"):
            first = messages[0]
            out.append({"role": "system", "content": f"{first['content']}\n\n{described}"})
            messages = messages[1:]
        else:
            out.append({"role": "system", "content": described})
    for message in messages:
        role, content = message["role"], message.get("content") or ""
        if role == "assistant" and message.get("tool_calls"):
            calls = "\n".join(syntax.open + json.dumps({
                "name": call["function"]["name"],
                "arguments": _arguments(call["function"].get("arguments"))}) + syntax.close
                for call in message["tool_calls"])
            content = f"{content}\n{calls}" if content else calls
        elif role == "tool":
            content = f"<tool_response>\n{content}\n</tool_response>"
        out.append({"role": role, "content": content})
    return out


def _arguments(arguments) -> object:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except json.JSONDecodeError:
            return arguments
    return arguments if arguments is not None else {}


def call_grammar(tools: list[dict], choice: str | None, parallel: bool,
                 syntax: CallSyntax = HERMES) -> StructuredOutputs:
    """The grammar of a forced call: ``choice`` None means any of the tools (``required``;
    several calls in a row, a newline apart, with ``parallel``), a name exactly one call of
    that tool (as OpenAI's named choice). Each tool's arguments are their own ``%json`` rule,
    so a schema's ``$ref``/``$defs`` resolve against that schema, with JSON's whitespace
    bounded as for response_format."""
    defined = functions(tools)
    if choice is not None:
        defined = [f for f in defined if f.get("name") == choice]
        if not defined:
            raise InvalidRequestError(f"tool_choice names function {choice!r}, which is not "
                                      "in tools", "tool_choice")
    rules = []
    for i, function in enumerate(defined):
        head = syntax.open + '{"name": ' + json.dumps(function["name"]) + ', "arguments": '
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps('}' + syntax.close)}")
        rules.append(f"args_{i}: %json {json.dumps(_closed(function.get('parameters')))}")
    calls = " | ".join(f"call_{i}" for i in range(len(defined)))
    start = "start: call" if choice is not None or not parallel else r'start: call ("\n" call)*'
    lark = "\n".join([start, f"call: {calls}", *rules]) + "\n"
    return StructuredOutputs(grammar=lark, param="tool_choice")


def _closed(parameters: dict | None) -> dict:
    """A function's parameters as the forced call follows them: only the declared arguments at
    the top level (OpenAI's strict mode closes every level; nested objects here stay as the
    schema says), and JSON's whitespace bounded."""
    if not parameters:
        parameters = {"type": "object", "properties": {}}
    if parameters.get("type") == "object" and "additionalProperties" not in parameters:
        parameters = {**parameters, "additionalProperties": False}
    if "x-guidance" not in parameters:
        parameters = {**parameters, "x-guidance": JSON_LAYOUT}
    return parameters


_CALL = {name: re.compile(re.escape(s.open.strip()) + r"\s*(.*?)\s*" + re.escape(s.close.strip()),
                          re.DOTALL) for name, s in SYNTAXES.items()}


def complete_calls(text: str, syntax: CallSyntax = HERMES) -> list[tuple[int, int, dict]]:
    """The complete calls in ``text`` so far: (start, end, call in OpenAI's shape, new id). A
    block that is not a JSON call is not one."""
    found = []
    for match in _CALL[syntax.name].finditer(text):
        try:
            value = json.loads(match.group(1))
            name, arguments = value["name"], value.get("arguments", {})
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            continue
        if not isinstance(name, str):
            continue
        found.append((match.start(), match.end(), {
            "id": f"call_{secrets.token_hex(12)}", "type": "function",
            "function": {"name": name, "arguments": arguments if isinstance(arguments, str)
                         else json.dumps(arguments)}}))
    return found


def parse_calls(text: str, syntax: CallSyntax = HERMES) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a model's answer: the calls in OpenAI's shape, the text around
    them as content (None when nothing is left). A block that is not a JSON call stays text."""
    found = complete_calls(text, syntax)
    if not found:
        return text, []
    kept, last = [], 0
    for start, end, _ in found:
        kept.append(text[last:start])
        last = end
    content = ("".join(kept) + text[last:]).strip()
    return content or None, [call for _, _, call in found]


def content_end(text: str, syntax: CallSyntax = HERMES) -> int:
    """How much of ``text`` is surely content: up to the first call's opening, and short of a
    tail that may be the start of one (held back until the next tokens tell)."""
    marker = syntax.open.strip()
    at = text.find(marker)
    if at >= 0:
        return at
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
