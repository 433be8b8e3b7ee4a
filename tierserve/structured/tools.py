"""Tool calling: tools described to the model, calls parsed out of its answer, forced calls.

The call syntax is a parser per model family, as data (``SYNTAXES``): Hermes / Qwen style
``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` blocks, Mistral's
``[TOOL_CALLS][{...}, ...]`` and Llama 3's JSON calls (``{"name": ..., "parameters": {...}}`` as
the whole answer, ``;`` apart, perhaps after ``<|python_tag|>``). A chat template that takes
``tools`` renders them itself and its markers say which syntax its model writes; a checkpoint
whose template knows no tools (SmolLM2's) is told Hermes: the tools are then described in the
system prompt in that syntax, as NousResearch's Hermes prompts do.
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
    """How a model family writes its calls, as data. Each call is a JSON object with its name
    under ``"name"`` and its arguments under ``arguments``; the calls come

    - each in a block between ``open`` and ``close`` (Hermes / Qwen ``<tool_call>``), text around;
    - as one JSON array after ``open`` (Mistral's ``[TOOL_CALLS][...]``), text before;
    - as the whole answer, objects ``separator`` apart, ``open`` an optional lead (Llama 3's JSON
      tool calls, perhaps after ``<|python_tag|>``).

    A chat template naming ``open`` (stripped) writes this syntax; ``special``: its markers are
    special tokens, which the answer must keep to be parsed."""

    name: str
    open: str
    close: str = ""
    arguments: str = "arguments"
    form: str = "blocks"  # blocks | array | whole
    separator: str = "\n"  # between two forced calls
    special: bool = False


HERMES = CallSyntax("hermes", "<tool_call>\n", "\n</tool_call>")
MISTRAL = CallSyntax("mistral", "[TOOL_CALLS]", form="array", separator=", ", special=True)
LLAMA3 = CallSyntax("llama3", "<|python_tag|>", arguments="parameters", form="whole",
                    separator="; ", special=True)
SYNTAXES = {syntax.name: syntax for syntax in (HERMES, MISTRAL, LLAMA3)}


def syntax_for(chat_template: str | None) -> CallSyntax:
    """The syntax a checkpoint writes: a template that renders ``tools`` says which by its
    markers (Hermes when it names none); one that knows no tools is told Hermes (the system
    prompt above)."""
    template = chat_template or ""
    if "tools" not in template:
        return HERMES
    return next((syntax for syntax in (MISTRAL, LLAMA3) if syntax.open.strip() in template),
                HERMES)


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
        head = '{"name": ' + json.dumps(function["name"]) + f', "{syntax.arguments}": '
        close = "}" + (syntax.close if syntax.form == "blocks" else "")
        head = (syntax.open if syntax.form == "blocks" else "") + head
        rules.append(f"call_{i}: {json.dumps(head)} args_{i} {json.dumps(close)}")
        rules.append(f"args_{i}: %json {json.dumps(_closed(function.get('parameters')))}")
    calls = " | ".join(f"call_{i}" for i in range(len(defined)))
    body = "call" if choice is not None or not parallel else \
        f"call ({json.dumps(syntax.separator)} call)*"
    if syntax.form == "array":
        body = f"{json.dumps(syntax.open + '[')} {body} \"]\""
    lark = "\n".join([f"start: {body}", f"call: {calls}", *rules]) + "\n"
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


_BLOCK = {name: re.compile(re.escape(s.open.strip()) + r"\s*(.*?)\s*" + re.escape(s.close.strip()),
                           re.DOTALL) for name, s in SYNTAXES.items() if s.form == "blocks"}
_JSON = json.JSONDecoder()
_WHITESPACE = re.compile(r"\s*")


def _call(value, syntax: CallSyntax) -> dict | None:
    """A parsed JSON value as a call in OpenAI's shape, without its id (``with_id`` gives one
    to a call handed out), or None if it is not one."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(syntax.arguments, value.get("arguments", {}))
    return {"type": "function",
            "function": {"name": value["name"], "arguments": arguments
                         if isinstance(arguments, str) else json.dumps(arguments)}}


def with_id(call: dict) -> dict:
    """A parsed call as handed to a client: with a new id."""
    return {"id": f"call_{secrets.token_hex(12)}", **call}


def _decode(text: str, at: int):
    """The JSON value starting at ``at`` (after whitespace) and where it ends, or None."""
    at = _WHITESPACE.match(text, at).end()  # no copy of the rest: this runs per streamed token
    try:
        return _JSON.raw_decode(text, at)
    except json.JSONDecodeError:
        return None


def complete_calls(text: str, syntax: CallSyntax = HERMES) -> list[tuple[int, int, dict]]:
    """The complete calls in ``text`` so far: (start, end, call in OpenAI's shape). What does
    not parse as a call is not one."""
    if syntax.form == "blocks":
        found = []
        for match in _BLOCK[syntax.name].finditer(text):
            decoded = _decode(match.group(1), 0)
            call = _call(decoded[0], syntax) if decoded and not \
                match.group(1)[decoded[1]:].strip() else None
            if call is not None:
                found.append((match.start(), match.end(), call))
        return found
    if syntax.form == "array":  # an array after the marker: each element once it parses
        at = text.find(syntax.open)
        if at < 0:
            return []
        rest = text[at + len(syntax.open):].lstrip()
        if not rest.startswith("["):
            return []
        return _sequence(text, len(text) - len(rest) + 1, at, syntax, close="]")
    # the whole answer: objects one after another, ``separator`` apart
    at = _WHITESPACE.match(text).end()
    if text.startswith(syntax.open, at):
        at += len(syntax.open)
    return _sequence(text, at, 0, syntax)


def _sequence(text: str, at: int, start: int, syntax: CallSyntax,
              close: str = "") -> list[tuple[int, int, dict]]:
    """Calls written one after another from ``at``, the syntax's separator apart (and
    ``close`` after the last): each complete one with its span, the first from ``start``, the
    last taking the closing mark when it is there."""
    separator = syntax.separator.strip()
    found = []
    while (decoded := _decode(text, at)) is not None:
        call = _call(decoded[0], syntax)
        if call is None:
            break
        found.append((start, decoded[1], call))
        start = at = decoded[1]
        rest = text[at:].lstrip()
        if close and rest.startswith(close):
            found[-1] = (found[-1][0], len(text) - len(rest) + len(close), call)
            break
        if not rest.startswith(separator):
            break
        at = len(text) - len(rest) + len(separator)
    return found


def parse_calls(text: str, syntax: CallSyntax = HERMES, parallel: bool = True
                ) -> tuple[str | None, list[dict]]:
    """(content, tool_calls) of a model's answer: the calls in OpenAI's shape, the text around
    them as content (None when nothing is left). What does not parse as a call stays text.
    Without ``parallel`` only the first call is kept (``parallel_tool_calls: false``)."""
    found = complete_calls(text, syntax)
    if not found:
        return text, []
    calls = [with_id(call) for _, _, call in (found if parallel else found[:1])]
    return between_calls(text, found, 0).strip() or None, calls


def between_calls(text: str, found: list[tuple[int, int, dict]], since: int) -> str:
    """The text from ``since`` that lies outside the calls ``found`` (content around them)."""
    kept, last = [], since
    for start, end, _ in found:
        if start > last:
            kept.append(text[last:start])
        last = max(last, end)
    return "".join(kept) + text[last:]


def content_end(text: str, syntax: CallSyntax = HERMES) -> int:
    """How much of ``text`` is surely content: up to the first call's opening, and short of a
    tail that may be the start of one (held back until the next tokens tell). An answer that
    may be Llama 3's calls (it opens with ``{`` or the lead) is held back whole."""
    if syntax.form == "whole":
        lead = text.lstrip()
        if not lead or lead.startswith(("{", syntax.open)) or syntax.open.startswith(lead):
            return 0
        return len(text)
    marker = syntax.open.strip()
    at = text.find(marker)
    if at >= 0:
        return at
    for keep in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-keep:]):
            return len(text) - keep
    return len(text)
