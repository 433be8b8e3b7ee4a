"""OpenAI request bodies -> engine inputs (prompt ids and SamplingParams), shared by the HTTP
server and the offline batch mode."""

from __future__ import annotations

from tierserve.errors import InvalidRequestError
from tierserve.model.tokenizer import Tokenizer
from tierserve.request import SamplingParams
from tierserve.server.schemas import ChatCompletionRequest, CompletionRequest, SamplingFields
from tierserve.structured import StructuredOutputs


def chat_messages(body: ChatCompletionRequest) -> list[dict]:
    return [{"role": m.role, "content": m.text()} for m in body.messages]


def chat_params(body: ChatCompletionRequest) -> SamplingParams:
    logprobs = (body.top_logprobs or 0) if body.logprobs else None
    return sampling_params(body, body.max_completion_tokens or body.max_tokens, logprobs,
                           body.prompt_logprobs)


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
