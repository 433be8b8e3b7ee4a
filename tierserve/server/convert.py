"""OpenAI request bodies -> engine inputs (prompt ids and SamplingParams), shared by the HTTP
server and the offline batch mode."""

from __future__ import annotations

import json

from tierserve.errors import InvalidRequestError
from tierserve.model.tokenizer import Tokenizer
from tierserve.request import SamplingParams
from tierserve.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from tierserve.structured import StructuredOutputs
from tierserve.structured.tools import HERMES, CallSyntax, call_grammar, prompt_messages, syntax_for


def chat_messages(body: ChatCompletionRequest, template_takes_tools: bool = False
                  ) -> list[dict]:
    """The conversation as the chat template gets it; with tools, as tools.prompt_messages
    prepares it for this template."""
    messages = []
    for m in body.messages:
        message = {"role": m.role, "content": m.text()}
        if m.tool_calls:  # arguments as an object, what templates (and HF) expect
            message["tool_calls"] = [_call_in(call.model_dump()) for call in m.tool_calls]
        if m.tool_call_id is not None:
            message["tool_call_id"] = m.tool_call_id
        messages.append(message)
    tools = chat_tools(body)
    if tools is None and not any("tool_calls" in m or m["role"] == "tool" for m in messages):
        return messages
    return prompt_messages(messages, tools, template_takes_tools)


def _call_in(call: dict) -> dict:
    arguments = call["function"].get("arguments")
    if isinstance(arguments, str):
        try:
            call["function"]["arguments"] = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # left as the client sent it
    return call


def chat_inputs(body: ChatCompletionRequest, tokenizer: Tokenizer) -> tuple[list[dict], dict]:
    """(messages, template keyword arguments) for ``tokenizer.chat_prompt``: a template that
    renders ``tools`` itself gets them, any other gets them folded into the messages."""
    takes_tools = "tools" in (tokenizer.chat_template or "")
    tools = chat_tools(body) if takes_tools else None
    return chat_messages(body, takes_tools), {"tools": tools} if tools else {}


def tool_syntax(body: ChatCompletionRequest, tokenizer: Tokenizer) -> CallSyntax | None:
    """The call syntax the answer is parsed with (the checkpoint's, by its chat template), or
    None when the request has no active tools."""
    return syntax_for(tokenizer.chat_template) if tools_active(body) else None


def tools_active(body: ChatCompletionRequest) -> bool:
    """Whether the answer is parsed for tool calls."""
    return bool(body.tools) and body.tool_choice != "none"


def chat_tools(body: ChatCompletionRequest) -> list[dict] | None:
    """The request's tools as the template gets them (None: no tools, or tool_choice none)."""
    if not tools_active(body):
        return None
    return [tool.model_dump(exclude_none=True) for tool in body.tools]


def chat_params(body: ChatCompletionRequest, syntax: CallSyntax | None = None
                ) -> SamplingParams:
    """``syntax``: the checkpoint's call syntax (``tool_syntax``) when tools are active."""
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    params = sampling_params(body, body.max_completion_tokens or body.max_tokens, logprobs,
                             body.prompt_logprobs)
    if syntax is not None and syntax.special:  # the parser must see the markers (as vLLM)
        params.skip_special_tokens = False
    syntax = syntax or HERMES
    choice = body.tool_choice
    forced = bool(body.tools) and (choice == "required" or not isinstance(choice, (str, type(None))))
    if forced:  # the call must be valid JSON for the tool's parameters: the grammar sees to it
        if params.structured_outputs is not None:
            raise InvalidRequestError("a forced tool call (tool_choice required or a named "
                                      "function) cannot also take a structured output",
                                      "tool_choice")
        name = None if choice == "required" else choice.function.name
        params.structured_outputs = call_grammar(chat_tools(body), name,
                                                 body.parallel_tool_calls, syntax)
    elif choice is not None and choice != "none" and not body.tools:
        named = choice if isinstance(choice, str) else "a named function"
        raise InvalidRequestError(f"tool_choice {named} needs tools", "tool_choice")
    return params


def completion_params(body: CompletionRequest) -> SamplingParams:
    """With ``echo`` and ``logprobs`` the prompt's tokens are scored too (what evaluation
    harnesses read: lm-evaluation-harness's local-completions sums them)."""
    prompt_logprobs = body.prompt_logprobs
    if body.echo and body.logprobs is not None:
        prompt_logprobs = max(prompt_logprobs or 0, body.logprobs)
    return sampling_params(body, body.max_tokens, body.logprobs, prompt_logprobs)


def encode_prompts(tokenizer: Tokenizer, prompt) -> list[tuple[str | None, list[int]]]:
    """A completions ``prompt`` (text, texts, token ids, lists of token ids) as (text, ids)."""
    if isinstance(prompt, str):
        return [(prompt, tokenizer.encode(prompt))]
    if not prompt:  # the schema says so too; batch lines come here unvalidated by HTTP
        raise InvalidRequestError("prompt must not be empty", "prompt")
    if all(isinstance(t, int) for t in prompt):
        return [(None, list(prompt))]
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (None, list(p)) for p in prompt]


def sampling_params(body: SamplingFields, max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None) -> SamplingParams:
    """OpenAI defaults (temperature 1, top_p 1); raises InvalidRequestError naming the field."""
    return SamplingParams(
        n=body.n, temperature=1.0 if body.temperature is None else body.temperature,
        top_p=1.0 if body.top_p is None else body.top_p, top_k=body.top_k, min_p=body.min_p,
        seed=body.seed, presence_penalty=body.presence_penalty,
        frequency_penalty=body.frequency_penalty, repetition_penalty=body.repetition_penalty,
        max_tokens=max_tokens, min_tokens=body.min_tokens, stop=body.stop or [],
        stop_token_ids=body.stop_token_ids or [], ignore_eos=body.ignore_eos, logprobs=logprobs,
        prompt_logprobs=prompt_logprobs, structured_outputs=structured_outputs(body))


def structured_outputs(body: SamplingFields) -> StructuredOutputs | None:
    """The request's structured output, from whichever field gives it (one at most)."""
    given = []
    response_format = body.response_format
    if response_format is not None and response_format.type == "json_object":
        given.append(StructuredOutputs(json_object=True, param="response_format"))
    elif response_format is not None and response_format.type == "json_schema":
        if response_format.json_schema is None:
            raise InvalidRequestError("response_format of type json_schema needs json_schema",
                                      "response_format")
        given.append(StructuredOutputs(json=response_format.json_schema.schema_,
                                       param="response_format"))
    fields = body.structured_outputs
    if fields is not None:
        given.append(StructuredOutputs(
            json=fields.json_, json_object=bool(fields.json_object), regex=fields.regex,
            choice=tuple(fields.choice) if fields.choice is not None else None,
            grammar=fields.grammar, param="structured_outputs"))
    for name, kind in (("guided_json", "json"), ("guided_regex", "regex"),
                       ("guided_choice", "choice"), ("guided_grammar", "grammar")):
        value = getattr(body, name)
        if value is not None:
            value = tuple(value) if kind == "choice" else value
            given.append(StructuredOutputs(**{kind: value}, param=name))
    if len(given) > 1:
        raise InvalidRequestError(f"give one structured output at most; got "
                                  f"{', '.join(g.param for g in given)}", given[1].param)
    return given[0] if given else None
