"""Render a model's jinja2 chat template the way Hugging Face transformers does.

Same environment as transformers' ``apply_chat_template``: an immutable sandbox with
``trim_blocks`` and ``lstrip_blocks``, the ``loopcontrols`` extension, a ``{% generation %}`` tag
that renders its body, ``raise_exception``, ``strftime_now``, a ``tojson`` that does not escape
HTML, and sandbox-safe ``dict`` / ``namespace``. Variables: ``messages``, ``tools``,
``documents``, ``add_generation_prompt``, the special token strings (``bos_token`` ...), then
any caller kwargs, which win.

One deliberate difference: OpenAI-style content lists (``[{"type": "text", "text": ...}]``) are
joined into one string (parts separated by newlines, as vLLM does) when the template never loops
over a message's content. transformers hands the list to the template as-is, which fails or
prints a Python list for text-only templates such as SmolLM2's.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The chat template is missing, or the messages cannot be rendered with it."""


# Reasoning goes by several names; templates read "reasoning_content" (gpt-oss: "thinking").
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    special_tokens: Mapping[str, str],
    tools: list[dict] | None = None,
    documents: list[dict] | None = None,
    **kwargs: Any,
) -> str:
    """Render ``messages`` with ``template`` exactly as transformers'
    ``apply_chat_template(..., tokenize=False)`` does (see the module docstring for the one
    difference). ``special_tokens`` maps names like ``bos_token`` to token strings."""
    if not messages:
        raise ChatTemplateError(
            "cannot apply a chat template to an empty conversation; send at least one message"
        )
    compiled, loops_over_content = _compile(template)
    chat = [
        _normalize_message(i, m, flatten=not loops_over_content) for i, m in enumerate(messages)
    ]
    variables = {**special_tokens, **kwargs}
    try:
        return compiled.render(
            messages=chat,
            tools=tools,
            documents=documents,
            add_generation_prompt=add_generation_prompt,
            **variables,
        )
    except (jinja2.TemplateError, TypeError) as exc:
        raise ChatTemplateError(f"the chat template rejected these messages: {exc}") from exc


@lru_cache(maxsize=32)
def _compile(template: str) -> tuple[jinja2.Template, bool]:
    env = _environment()
    try:
        loops_over_content = _loops_over_content(env.parse(template))
        return env.from_string(template), loops_over_content
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(
            f"the chat template is not valid jinja2 (line {exc.lineno}: {exc.message}); "
            "fix it or pass another with chat_template="
        ) from exc


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson escapes <, >, & and ' for HTML; templates expect plain JSON.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


class _TemplateDict:
    """``dict(...)`` for templates, without exposing the dict type itself."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """jinja's ``namespace`` that refuses underscore-prefixed names (no CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 -- jinja's signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"chat templates cannot store underscore-prefixed names on a namespace ({name!r})"
            )


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
    for rendering it is its body."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _loops_over_content(ast: jinja2.nodes.Template) -> bool:
    """Whether the template has a ``{% for ... in <x>.content %}`` / ``<x>['content']`` loop,
    i.e. it takes content as a list of parts itself."""
    for loop in ast.find_all(jinja2.nodes.For):
        target = loop.iter
        while isinstance(target, jinja2.nodes.Filter) and target.node is not None:
            target = target.node  # e.g. message['content'] | selectattr(...)
        if isinstance(target, jinja2.nodes.Getattr) and target.attr == "content":
            return True
        if (
            isinstance(target, jinja2.nodes.Getitem)
            and isinstance(target.arg, jinja2.nodes.Const)
            and target.arg.value == "content"
        ):
            return True
    return False


def _normalize_message(index: int, message: Any, flatten: bool) -> dict[str, Any]:
    if not isinstance(message, Mapping):
        raise ChatTemplateError(
            f"message {index} is a {type(message).__name__}; send dicts with 'role' and 'content'"
        )
    # As transformers: keys whose value is None are dropped (OpenAI clients send content=None).
    chat = {key: value for key, value in message.items() if value is not None}
    reasoning = next((chat[k] for k in _REASONING_FIELDS if k in chat), None)
    if reasoning is not None:
        chat = {"thinking": reasoning, **chat, "reasoning_content": reasoning}
    content = chat.get("content")
    if flatten and isinstance(content, list):
        chat["content"] = _join_text_parts(index, content)
    return chat


def _join_text_parts(index: int, parts: Iterable[Any]) -> str:
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif isinstance(part, Mapping) and part.get("type", "text") == "text" and "text" in part:
            texts.append(part["text"])
        else:
            kind = part.get("type") if isinstance(part, Mapping) else type(part).__name__
            raise ChatTemplateError(
                f"message {index} has a {kind!r} content part, but this model's chat template "
                "only takes text; send text parts or a plain string"
            )
    return "\n".join(texts)
